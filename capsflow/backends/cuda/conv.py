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

Where the whole batch's windows exceed ``DEVICE_CHUNK_BYTES`` (PrimaryCaps past a
batch of about 360), the batch is taken in chunks of images whose windows fit: each
chunk's copy and GEMM write their rows of the output, and the VJP copies each chunk's
windows again instead of keeping them. Memory stays bounded and every call is still one
that a CUDA graph records (the reference's ``tensordot`` is CuPy's own cuBLAS call,
which is not). The variant declines, and the reference runs, only where one image's
windows exceed the budget, the dtype is not float32 or float64, or one image has too
many elements for col2im's 32-bit indices.
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


def _images_per_chunk(x: Any, w: Any, stride: int, padding: int) -> int:
    """How many images one chunk takes: as many as the window budget and col2im's 32-bit
    indices allow (the whole batch where it fits); 0 where a single image is too big."""
    n, c, h, wd = (x.shape[0], x.shape[1], x.shape[2] + 2 * padding, x.shape[3] + 2 * padding)
    kh, kw = w.shape[2:]
    oh, ow = (h - kh) // stride + 1, (wd - kw) // stride + 1
    windows_per_image = oh * ow * kh * kw * c * x.itemsize
    return min(n, DEVICE_CHUNK_BYTES // max(windows_per_image, 1),
               kernels.INT_MAX // max(h * wd * c, 1))


def _windows(xp: Any, xt: Any, kh: int, kw: int, stride: int, ones_column: bool) -> Any:
    """The im2col matrix of xt (N, H, W, C): by the im2col kernel for rows of at least
    MIN_GPU_ROW values, else copied by CuPy (``_window_matrix``), with the ones column."""
    if kw * xt.shape[3] >= MIN_GPU_ROW:
        return kernels.im2col(xp, xt, kh, kw, stride)
    return _window_matrix(xp, xt, kh, kw, stride, ones_column)


def _chunks(n: int, size: int) -> list:
    """[(first, end), ...] covering range(n) in runs of ``size``."""
    return [(i, min(n, i + size)) for i in range(0, n, size)]


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
    if not kernels.usable(x, w, *([] if b is None else [b])):
        return DECLINED
    per_chunk = _images_per_chunk(x, w, stride, padding)
    if per_chunk < 1:
        return DECLINED
    xp = be.xp
    o, c, kh, kw = w.shape
    xt = channels_last(xp, x, padding)
    n, h, wd, _ = xt.shape
    oh, ow = (h - kh) // stride + 1, (wd - kw) // stride + 1
    k = kh * kw * c
    ones_column = b is not None and kw * c < MIN_GPU_ROW
    w_mat = xp.empty((k + ones_column, o), dtype=xt.dtype)           # (kh*kw*C [+ 1], O)
    w_mat[:k].reshape(kh, kw, c, o)[...] = w.transpose(2, 3, 1, 0)
    if ones_column:
        w_mat[k] = b  # against the ones column: the GEMM adds the bias
    # The weights' (kh, kw*C, O) copy serves the input gradient's GEMMs.
    extras = {"xt": xt, "w_cols": w_mat[:k].reshape(kh, kw * c, o)}
    if per_chunk == n:  # the usual case: one copy, kept for the weight gradient
        extras["cols"] = _windows(xp, xt, kh, kw, stride, ones_column)
        out = matmul_on(be, extras["cols"], w_mat)
    else:
        out = xp.empty((n * oh * ow, o), dtype=xt.dtype)
        for i, end in _chunks(n, per_chunk):
            cols = _windows(xp, xt[i:end], kh, kw, stride, ones_column)
            matmul_on(be, cols, w_mat, out=out[i * oh * ow:end * oh * ow])
            del cols
    if b is not None and not ones_column:
        out += b
    return out.reshape(n, oh, ow, o).transpose(0, 3, 1, 2), extras


@gpu_conv2d.vjp
def _(be, saved, g, needs, *, stride, padding):
    xp = be.xp
    xt, w = saved["xt"], saved["w"]
    o, c, kh, kw = w.shape
    n, oh, ow = g.shape[0], g.shape[2], g.shape[3]
    k = kh * kw * c
    g2 = xp.ascontiguousarray(g.transpose(0, 2, 3, 1)).reshape(-1, o)  # (N*OH*OW, O)
    has_bias = len(needs) > 2
    # The forward's windows where it kept them (popped, so that they are freed as soon
    # as used); else it took the batch in chunks of images, whose windows are copied again.
    kept = saved.pop("cols", None)
    per_chunk = n if kept is not None else _images_per_chunk(saved["x"], w, stride, padding)
    chunks = _chunks(n, per_chunk)
    # The input gradient: one GEMM per kernel row, batched (faster than one GEMM of the
    # same size on an H200), against the forward's weight copy read transposed, then one
    # gather kernel.
    w_rows = saved["w_cols"].transpose(0, 2, 1)                       # (kh, O, kw*C)
    prod = gxt = None
    for i, end in chunks:
        rows = g2[i * oh * ow:end * oh * ow]
        if needs[1]:
            if kept is None:
                kept = _windows(xp, xt[i:end], kh, kw, stride,
                                ones_column=has_bias and kw * c < MIN_GPU_ROW)
            part = _gram(be, rows, kept)                               # (O, k [+ 1])
            kept = None
            if prod is None:
                prod = part
            else:
                prod += part
        if needs[0]:
            gcols = matmul_on(be, rows, w_rows).reshape(kh, end - i, oh, ow, kw, c)
            part = kernels.col2im(xp, gcols, (end - i,) + xt.shape[1:], stride)
            del gcols
            if len(chunks) == 1:
                gxt = part
            else:
                if gxt is None:
                    gxt = xp.empty(xt.shape, dtype=xt.dtype)
                gxt[i:end] = part
    del kept
    gx = gw = gb = None
    if needs[1]:
        gw = xp.ascontiguousarray(prod[:, :k].reshape(o, kh, kw, c).transpose(0, 3, 1, 2))
        if has_bias and needs[2] and prod.shape[1] > k:  # the ones column: the bias gradient
            gb = xp.ascontiguousarray(prod[:, k])
    if has_bias and needs[2] and gb is None:
        gb = kernels.column_sums(xp, g2)
    if needs[0]:
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
