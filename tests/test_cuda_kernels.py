"""What the CPU can check of the CUDA backend (capsflow/backends/cuda) without g++ or a
GPU: when its variants apply, which einsums the routing kernels take, which arrays the
kernels decline, the GPU-only branches of conv2d (windows kept for the VJP, the ones
column, batched input-gradient GEMMs, split-K weight gradients) with NumPy doing the
kernels' work, and the pinned host-to-device copy with a stand-in for CuPy. The kernels
themselves run in tests/test_cuda_emulated.py, and on a GPU in ``gpu_check``."""
from types import SimpleNamespace

import numpy as np
import pytest

from capsflow.backends import Backend
from capsflow.backends.cuda import conv, kernels
from capsflow.backends.cuda.layout import HostToDevice
from capsflow.core.gradients import sum_outer_terms
from capsflow.core.opdef import OPS
from capsflow.options import Options
from capsflow.training.optim import adam_update
from capsflow.training.train_step import host_to_device, record_step

FAST = Options(backend="cupy")


def _cuda_variants(options: Options) -> list:
    """The CUDA variants of ops and routines that apply under ``options``."""
    variants = [v for op in OPS.values() for v in op.variants]
    variants += [v for r in (sum_outer_terms, adam_update, record_step, host_to_device)
                 for v in r.variants]
    return [v for v in variants if v.backend == "cupy" and v.applies(options)]


def test_cuda_variants_apply_on_cupy_with_their_option_only():
    on = {(v.op, v.option) for v in _cuda_variants(FAST)}
    assert {"matmul", "linear", "einsum", "conv2d", "softmax", "squash", "relu", "sigmoid",
            "scale", "sum_outer_terms", "adam_update", "host_to_device",
            "record_step"} == {op for op, _ in on}
    assert ("record_step", "replay_steps") in on
    assert [v.op for v in _cuda_variants(FAST.replace(fast_paths=False))] == ["record_step"]
    assert not _cuda_variants(FAST.replace(fast_paths=False, replay_steps=False))
    assert not _cuda_variants(Options())  # NumPy


@pytest.mark.parametrize("subs,out,expected", [
    (["nijd", "njd"], "nij", ("contract_d", (0, 1))),        # routing agreement
    (["njd", "nijd"], "nij", ("contract_d", (1, 0))),        # dc of the weighted sum
    (["nij", "nijd"], "njd", ("contract_i", (0, 1))),        # the weighted sum
    (["nijd", "nij"], "njd", ("contract_i", (1, 0))),
    (["nij", "njd"], "nijd", None),                          # an outer product
    (["ijdk", "nik"], "nijd", None),                         # u_hat: a batched GEMM
    (["nijd", "njd"], "nji", None),                          # another output order
    (["nijd", "nid"], "nij", None),
])
def test_routing_patterns(subs, out, expected):
    assert kernels.routing_pattern(subs, out) == expected


def test_kernels_decline_other_dtypes_and_axes():
    """Declined before any kernel is made: no CUDA is needed to get the answer."""
    assert kernels.usable(np.ones(2, np.float32), np.ones(3, np.float32))
    assert not kernels.usable(np.ones(2, np.float32), np.ones(2))
    assert not kernels.usable(np.ones(2, np.float16))
    x = np.ones((2, 3))
    assert kernels.rowwise(None, "softmax_fwd", 0, x) is None           # not the last axis
    assert kernels.rowwise(None, "softmax_fwd", -1, x.astype(int)) is None
    assert kernels.routing_contraction(None, ["nij", "nijd"], "njd",
                                       (np.ones((1, 2, 3), np.float32), np.ones((1, 2, 3, 4)))) is None
    assert not kernels.adam_update(None, x.T, x.T, x.T, x.T, np.ones(2), (0.9, 0.99), 1e-8)


class _NumpyKernels:
    """kernels as conv.py uses them, their work done by NumPy."""
    INT_MAX = kernels.INT_MAX
    usable = staticmethod(kernels.usable)

    @staticmethod
    def im2col(xp, xt, kh, kw, stride):
        return conv._window_matrix(xp, xt, kh, kw, stride, ones_column=False)

    @staticmethod
    def col2im(xp, cols, in_shape, stride):  # (KH, N, OH, OW, KW, C) -> (N, H, W, C)
        kh, _, oh, ow, kw, _ = cols.shape
        out = np.zeros(in_shape)
        for i in range(kh):
            for j in range(kw):
                out[:, i:i + stride * oh:stride, j:j + stride * ow:stride] += cols[i, :, :, :, j]
        return out

    @staticmethod
    def sum_leading(xp, a):
        return a.sum(axis=0)

    @staticmethod
    def column_sums(xp, a):
        return a.sum(axis=0)


@pytest.mark.parametrize("channels", [16, 1])  # windows by the im2col kernel, or copied
def test_conv_variant_branches_match_the_reference(monkeypatch, channels):
    rng = np.random.default_rng(0)
    c = channels
    x, w, b = rng.standard_normal((8, c, 28, 28)), rng.standard_normal((4, c, 3, 3)), rng.standard_normal(4)
    m = 8 * 26 * 26
    assert (3 * c >= conv.MIN_GPU_ROW) == (c == 16)
    assert m > 4 * conv.SPLIT_K_RATIO * 3 * 3 * c  # _gram splits the weight gradient's rows
    monkeypatch.setattr(conv, "kernels", _NumpyKernels)
    be = Backend(FAST, np)
    out, extras = conv.gpu_conv2d.forward_fn(be, x, w, b, stride=1, padding=0)
    assert extras["cols"].shape[1] == 9 * c + (c == 1)  # Conv1's ones column for the bias
    g = rng.standard_normal(out.shape)
    grads = conv.gpu_conv2d.vjp_fn(be, {**extras, "w": w}, g, (True, True, True),
                                   stride=1, padding=0)
    op = conv.conv2d
    np.testing.assert_allclose(out, op.forward_fn(np, x, w, b, stride=1, padding=0),
                               rtol=1e-12, atol=1e-12)
    wants = op.vjp_fn(np, {"x": x, "w": w}, g, (True, True, True), stride=1, padding=0)
    for got, want in zip(grads, wants):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-10)


def test_host_to_device_copies_asynchronously_and_waits_before_reusing_its_buffer():
    """On CuPy the values go through pinned memory by a copy on the current stream; the
    next write waits for that copy's event first. Here a stand-in records the calls."""
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
    box = host_to_device(Backend(FAST, fake_cupy), dst)
    assert isinstance(box, HostToDevice)
    box.write((1.0, 2.0))
    box.write((3.0, 4.0))
    assert calls == [("set", (1.0, 2.0), True), "record", "wait", ("set", (3.0, 4.0), True),
                     "record"]
    np.testing.assert_array_equal(dst, [3.0, 4.0])


def test_every_gemm_of_matmul_and_linear_goes_through_own_cublas_at_the_options_precision(
        monkeypatch):
    """Their references run on gemm.OwnMatmul: each product (forward, and both input
    gradients) is one call of capsflow's cuBLAS, TF32 where Options.precision says so,
    whatever the environment says."""
    from capsflow.backends.cuda import gemm, linalg
    seen = []
    monkeypatch.setenv("CUPY_TF32", "1")
    monkeypatch.setattr(gemm, "cublas", lambda xp: object())
    monkeypatch.setattr(gemm, "_run", lambda xp, a, b, out, accumulate, tf32:
                        seen.append(tf32) or np.matmul(a, b))
    rng = np.random.default_rng(0)
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((2, 3), (3, 4), (4,)))
    for precision in ("fp32", "tf32"):
        be = Backend(FAST.replace(precision=precision), np)
        out = linalg.gpu_matmul.forward_fn(be, x, w)
        linalg.gpu_matmul.vjp_fn(be, {"a": x, "b": w}, out, (True, True))
        out = linalg.gpu_linear.forward_fn(be, x, w, b)
        _, _, gb = linalg.gpu_linear.vjp_fn(be, {"x": x, "w": w}, out, (True, True, False))
        assert gb is None
    assert seen == [False] * 6 + [True] * 6
