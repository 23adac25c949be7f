"""Backend selection: NumPy always, CuPy only with a GPU; clear errors otherwise."""
import builtins

import numpy as np
import pytest

from capsflow.backends import get_array_module, get_backend, sliding_windows
from capsflow.errors import BackendError


def _cupy_usable() -> bool:
    try:
        get_backend("cupy")
    except BackendError:
        return False
    return True


def test_numpy_backend_and_array_module():
    be = get_backend("numpy")
    assert be.xp is np and get_array_module(np.zeros(2), 1.0) is np
    a = be.asarray([[1, 2]], dtype=np.float32)
    assert a.dtype == np.float32 and a.flags.c_contiguous


def test_unknown_backend_is_one_line():
    with pytest.raises(BackendError, match="unknown backend 'torch'; choose one of: numpy, cupy"):
        get_backend("torch")


def test_cupy_missing_is_one_clear_line(monkeypatch):
    import capsflow.backends as backend
    monkeypatch.setattr(backend, "_cache", {})
    real_import = builtins.__import__

    def no_cupy(name, *args, **kwargs):
        if name == "cupy":
            raise ImportError("No module named 'cupy'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_cupy)
    monkeypatch.setattr(backend.importlib, "import_module",
                        lambda name: no_cupy(name) if name == "cupy" else real_import(name))
    with pytest.raises(BackendError, match=r"backend 'cupy' needs CuPy: pip install 'capsflow\[cuda12\]'"):
        get_backend("cupy")


@pytest.mark.skipif(_cupy_usable(), reason="CuPy and a GPU are present")
def test_cli_backend_cupy_without_gpu_exits_2(capsys):
    from capsflow.cli import main
    from conftest import CAPSNET
    assert main(["gradcheck", str(CAPSNET), "--backend", "cupy", "--set", "routing_iters=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("capsflow gradcheck: error: backend 'cupy'")


def test_sliding_windows_is_a_view_of_every_window():
    x = np.arange(2 * 3 * 7 * 7, dtype=np.float64).reshape(2, 3, 7, 7)
    win = sliding_windows(np, x, 3, 3, 2)
    assert win.shape == (2, 3, 3, 3, 3, 3) and np.shares_memory(win, x)
    np.testing.assert_array_equal(win[1, 2, 1, 2], x[1, 2, 2:5, 4:7])


def test_tf32_precision_sets_cupys_switch(monkeypatch):
    from capsflow.backends import use_precision
    monkeypatch.delenv("CUPY_TF32", raising=False)
    use_precision("tf32")
    import os
    assert os.environ["CUPY_TF32"] == "1"
    use_precision("fp32")
    assert os.environ["CUPY_TF32"] == "0"
    with pytest.raises(BackendError, match="unknown precision 'bf16'"):
        use_precision("bf16")


def test_cpu_and_gpu_paths_are_told_apart_in_one_place():
    import types

    import numpy as np

    from capsflow.backends import on_cpu, on_gpu
    assert on_cpu(np) and not on_gpu(np)
    stand_in = types.ModuleType("cupy")
    assert on_gpu(stand_in) and not on_cpu(stand_in)


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
