"""The CUDA backend's memory layout helpers (capsflow/backends/cuda/layout.py), on the CPU
with stand-ins for CuPy's behaviour."""
import numpy as np
import pytest


class COrder(np.ndarray):
    """Arrays whose element-wise results come out in C order whatever the inputs' layout,
    as CuPy's do (NumPy's keep the inputs' layout)."""

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        plain = [np.asarray(a) if isinstance(a, COrder) else a for a in inputs]
        return np.ascontiguousarray(getattr(ufunc, method)(*plain, **kwargs)).view(COrder)


@pytest.mark.parametrize("name,attrs", [("relu", {}), ("sigmoid", {}), ("scale", {"by": 2.0})])
def test_one_input_ops_keep_a_channels_last_layout_where_elementwise_ops_return_c_order(
        name, attrs):
    """The one-input ops work in their input's memory order, forward and VJP, so Conv1's
    channels-last output (and its gradient) stays channels-last on CuPy too."""
    from capsflow.backends import memory_order
    from capsflow.core.opdef import get_op
    rng = np.random.default_rng(0)
    x, g = (rng.standard_normal((2, 5, 4, 3)).view(COrder).transpose(0, 3, 1, 2)
            for _ in range(2))                                    # channels-last memory
    assert memory_order(np.maximum(x, 0)) == (0, 1, 2, 3)          # what the ops must undo
    op = get_op(name)
    out = op.forward_fn(np, x, **attrs)
    np.testing.assert_allclose(np.asarray(out), op.forward_fn(np, np.asarray(x), **attrs),
                               rtol=1e-15)
    (gx,) = op.vjp_fn(np, {"out": out}, g, (True,), **attrs)
    for result in (out, gx):
        assert memory_order(result) == memory_order(x) == (0, 2, 3, 1)
        assert result.transpose(0, 2, 3, 1).flags.c_contiguous


def test_host_to_device_copies_asynchronously_and_waits_before_reusing_its_buffer():
    """On CuPy the values go through pinned memory by a copy on the current stream; the
    next write waits for that copy's event first. Here a stand-in records the calls."""
    from types import SimpleNamespace
    from capsflow.backends import HostToDevice
    calls = []

    class Event:
        def synchronize(self):
            calls.append("wait")

    stream = SimpleNamespace(record=lambda: calls.append("record") or Event())
    cuda = SimpleNamespace(alloc_pinned_memory=lambda n: bytearray(n),
                           get_current_stream=lambda: stream)
    fake_cupy = SimpleNamespace(__name__="cupy", cuda=cuda)

    class DeviceArray(np.ndarray):
        def set(self, host, stream=None):
            calls.append(("set", tuple(host), stream is not None))
            self[...] = host

    dst = np.zeros(2).view(DeviceArray)
    box = HostToDevice(fake_cupy, dst)
    box.write((1.0, 2.0))
    box.write((3.0, 4.0))
    assert calls == [("set", (1.0, 2.0), True), "record", "wait", ("set", (3.0, 4.0), True),
                     "record"]
    np.testing.assert_array_equal(dst, [3.0, 4.0])
    plain = HostToDevice(np, np.zeros(2))  # NumPy: an assignment
    plain.write((5.0, 6.0))
    np.testing.assert_array_equal(plain.dst, [5.0, 6.0])
