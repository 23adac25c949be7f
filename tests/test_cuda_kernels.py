"""What the CPU can check of the CuPy kernel paths (capsflow/backends/cuda/kernels.py): which
einsums the routing kernels take, and the GPU-only branches of conv2d (windows kept for
the VJP, the ones column, batched input-gradient GEMMs, split-K weight gradients), run
on NumPy with the kernels' switch forced on. The kernels themselves are checked
against the xp code on a GPU by runners/gpu_check.py."""
import numpy as np
import pytest

from capsflow.backends.cuda import kernels as cuda_kernels
from capsflow.core.opdef import get_op
from capsflow.ops import conv


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
    assert cuda_kernels.routing_pattern(subs, out) == expected


def test_kernels_are_off_on_numpy():
    assert not cuda_kernels.enabled(np)
    x = np.ones((2, 3))
    assert cuda_kernels.rowwise(np, "softmax_fwd", -1, x) is None
    assert cuda_kernels.routing_contraction(np, ["nij", "nijd"], "njd",
                                            (np.ones((1, 2, 3)), np.ones((1, 2, 3, 4)))) is None


class _GpuBranchesOnNumpy:
    """cuda_kernels as conv.py sees it on a GPU, minus the CUDA: enabled, the sums done
    by NumPy, no im2col or col2im (their xp fallbacks run)."""
    @staticmethod
    def enabled(xp):
        return True

    @staticmethod
    def col2im(xp, cols, in_shape, stride):
        return None

    @staticmethod
    def im2col(xp, xt, kh, kw, stride):
        return None

    @staticmethod
    def sum_leading(xp, a):  # what the kernel computes
        return a.sum(axis=0)

    @staticmethod
    def column_sums(xp, a):
        return a.sum(axis=0)


@pytest.mark.parametrize("channels", [16, 1])  # windows by the im2col kernel, or copied
def test_conv_gpu_branches_match_the_plain_path(monkeypatch, channels):
    rng = np.random.default_rng(0)
    c = channels
    x, w, b = rng.standard_normal((8, c, 28, 28)), rng.standard_normal((4, c, 3, 3)), rng.standard_normal(4)
    op = get_op("conv2d")
    m = 8 * 26 * 26
    assert (3 * c >= conv.MIN_GPU_ROW) == (c == 16)
    assert m > 4 * conv.SPLIT_K_RATIO * 3 * 3 * c  # _gram splits the weight gradient's rows

    def run():
        out, extras = op.forward_fn(np, x, w, b, stride=1, padding=0)
        g = rng.standard_normal(out.shape)
        return out, op.vjp_fn(np, {**extras, "w": w}, g, (True, True, True),
                              stride=1, padding=0)

    rng = np.random.default_rng(1)
    plain_out, plain_grads = run()
    monkeypatch.setattr(conv, "cuda_kernels", _GpuBranchesOnNumpy)
    rng = np.random.default_rng(1)
    split_out, split_grads = run()
    np.testing.assert_allclose(split_out, plain_out, rtol=1e-12, atol=1e-12)
    for s, p in zip(split_grads, plain_grads):
        np.testing.assert_allclose(s, p, rtol=1e-12, atol=1e-10)
