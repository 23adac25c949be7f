"""conv2d on CuPy: one im2col copy and one GEMM, the copy kept for the weight gradient.

The input is made channels-last (N, H, W, C) and its windows copied once into the
(N*OH*OW, kh*kw*C) im2col matrix: by the im2col kernel, one block per window row, or,
for rows shorter than a warp (Conv1's 9 values), by a CuPy copy that appends a column
of ones (``_window_matrix``). One GEMM against the weights then gives the output,
(N, O, OH, OW) as a transposed view of channels-last memory (element-wise ops keep that
layout, so the next convolution reads its input without a copy).

The VJP reuses the forward's copy for the weight gradient (PrimaryCaps: 300 MB at batch
100, held from forward to backward, against 0.14 ms on an H200 to copy it again), split
along its rows into a batch of GEMMs where the rows dwarf the result (``_gram``). The
input gradient is one GEMM per kernel row, batched, and one gather kernel
(kernels.col2im) instead of a strided add per kernel offset.

Where the windows exceed ``DEVICE_CHUNK_BYTES``, the dtype is not float32 or float64,
or the input has too many elements for col2im's 32-bit indices, the variant declines
and the reference runs.
"""
from __future__ import annotations

from typing import Any

from capsflow.backends.cuda import kernels
from capsflow.backends.cuda.gemm import matmul_on
from capsflow.core.opdef import DECLINED
from capsflow.backends.windows import channels_last, channels_last_windows
from capsflow.ops.conv import conv2d

#: Largest window copy (bytes) the variant makes: PrimaryCaps' whole im2col at batch 100 fits.
DEVICE_CHUNK_BYTES = 2 ** 30
#: Split a GEMM's inner dimension over a batch once it exceeds this many times the
#: output's width (see ``_gram``).
SPLIT_K_RATIO = 8
#: Shortest window row (kw*C values) that the im2col kernel copies, one block per row:
#: a warp's worth, so that no block idles most of its threads (Conv1's rows of 9 values
#: are copied by CuPy instead).
MIN_GPU_ROW = 32

gpu_conv2d = conv2d.variant("cupy")


def _applies(x: Any, w: Any, b: Any, stride: int, padding: int) -> bool:
    """Whether the windows fit the budget and the kernels take the arrays."""
    n, c, h, wd = (x.shape[0], x.shape[1], x.shape[2] + 2 * padding, x.shape[3] + 2 * padding)
    kh, kw = w.shape[2:]
    oh, ow = (h - kh) // stride + 1, (wd - kw) // stride + 1
    return (kernels.usable(x, w, *([] if b is None else [b]))
            and n * oh * ow * kh * kw * c * x.itemsize <= DEVICE_CHUNK_BYTES
            and n * h * wd * c <= kernels.INT_MAX)


def _window_matrix(xp: Any, xt: Any, kh: int, kw: int, stride: int, ones_column: bool) -> Any:
    """The windows of xt (N, H, W, C) copied into an (N*OH*OW, kh*kw*C) matrix, with a
    last column of ones if asked: against a bias row of the weights the GEMM then adds
    the bias, and in the weight gradient's GEMM that column sums the output gradient into
    the bias gradient (each saves a pass over Conv1's 41 MB output at batch 100)."""
    win = channels_last_windows(xp, xt, kh, kw, stride)
    n, oh, ow, _, _, c = win.shape                                   # (N, OH, OW, kh, kw, C)
    k = kh * kw * c
    cols = xp.empty((n * oh * ow, k + int(ones_column)), dtype=win.dtype)
    s = cols.itemsize
    row = cols.shape[1] * s
    # The first k columns as (N, OH, OW, kh, kw, C): an explicit view, never a copy.
    into = xp.lib.stride_tricks.as_strided(
        cols, shape=win.shape, strides=(oh * ow * row, ow * row, row, kw * c * s, c * s, s))
    into[...] = win
    if ones_column:
        cols[:, k] = 1
    return cols


@gpu_conv2d.forward
def _(be, x, w, b=None, *, stride, padding):
    if not _applies(x, w, b, stride, padding):
        return DECLINED
    xp = be.xp
    o, c, kh, kw = w.shape
    xt = channels_last(xp, x, padding)
    n, h, wd, _ = xt.shape
    oh, ow = (h - kh) // stride + 1, (wd - kw) // stride + 1
    k = kh * kw * c
    if kw * c >= MIN_GPU_ROW:
        cols = kernels.im2col(xp, xt, kh, kw, stride)
    else:
        cols = _window_matrix(xp, xt, kh, kw, stride, ones_column=b is not None)
    w_mat = xp.empty((cols.shape[1], o), dtype=xt.dtype)             # (kh*kw*C [+ 1], O)
    w_mat[:k].reshape(kh, kw, c, o)[...] = w.transpose(2, 3, 1, 0)
    if cols.shape[1] > k:
        w_mat[k] = b  # against the ones column: the GEMM adds the bias
    out = matmul_on(be, cols, w_mat)
    if b is not None and cols.shape[1] == k:
        out += b
    # The weights' (kh, kw*C, O) copy serves the input gradient's GEMMs.
    extras = {"xt": xt, "w_cols": w_mat[:k].reshape(kh, kw * c, o), "cols": cols}
    return out.reshape(n, oh, ow, o).transpose(0, 3, 1, 2), extras


@gpu_conv2d.vjp
def _(be, saved, g, needs, *, stride, padding):
    xp = be.xp
    xt, w = saved["xt"], saved["w"]
    o, c, kh, kw = w.shape
    n, oh, ow = g.shape[0], g.shape[2], g.shape[3]
    k = kh * kw * c
    g2 = xp.ascontiguousarray(g.transpose(0, 2, 3, 1)).reshape(-1, o)  # (N*OH*OW, O)
    needs_gb = len(needs) > 2 and needs[2]
    gx = gw = gb = None
    cols = saved.pop("cols")  # popped, so that the windows are freed as soon as used
    if needs[1]:
        prod = _gram(be, g2, cols)                                     # (O, k [+ 1])
        gw = xp.ascontiguousarray(prod[:, :k].reshape(o, kh, kw, c).transpose(0, 3, 1, 2))
        if needs_gb and prod.shape[1] > k:  # the ones column: the bias gradient
            gb = xp.ascontiguousarray(prod[:, k])
    del cols
    if needs_gb and gb is None:
        gb = kernels.column_sums(xp, g2)
    if needs[0]:
        # One GEMM per kernel row, batched (faster than one GEMM of the same size on an
        # H200), against the forward's weight copy read transposed, then one gather kernel.
        w_rows = saved["w_cols"].transpose(0, 2, 1)                   # (kh, O, kw*C)
        gcols = matmul_on(be, g2, w_rows).reshape(kh, n, oh, ow, kw, c)
        gxt = kernels.col2im(xp, gcols, xt.shape, stride)
        del gcols
        if padding:
            gxt = gxt[:, padding:-padding, padding:-padding]
        gx = gxt.transpose(0, 3, 1, 2)                                 # (N, C, H, W) view
    return gx, gw, gb


def _gram(be: Any, a: Any, b: Any) -> Any:
    """a.T @ b for a (M, P), b (M, Q). When M dwarfs the (P, Q) output (Conv1's weight
    gradient: M = 40000 rows, output 256 x 81), the rows are split into a batch of GEMMs
    whose products are summed, so that enough thread blocks run at once."""
    m = a.shape[0]
    if m > 4 * SPLIT_K_RATIO * max(a.shape[1], b.shape[1]):
        splits = next((s for s in range(64, 1, -1) if m % s == 0), 1)
        if splits > 1:
            a3 = a.reshape(splits, m // splits, a.shape[1]).transpose(0, 2, 1)
            partial = matmul_on(be, a3, b.reshape(splits, m // splits, b.shape[1]))
            summed = kernels.sum_leading(be.xp, partial)
            return partial.sum(axis=0) if summed is None else summed
    return matmul_on(be, a.T, b)
