"""conv2d on NumPy: GEMMs over channels-last windows, a few kernel rows at a time, the
batch split over threads.

The input is viewed channels-last (N, H, W, C) and its windows as a strided view
(N, OH, OW, kh, kw, C); a full im2col copy of that view would be (N*OH*OW, C*kh*kw),
which for CapsNet's PrimaryCaps (9x9 over 256 channels) is 300 MB at batch 100. So
the kernel rows are taken in chunks whose copy stays within ``CHUNK_BYTES``: each
chunk is one large GEMM, and the chunks' products are summed. Small convolutions
(Conv1: one input channel) fit in one chunk, i.e. one im2col GEMM.

The output is (N, O, OH, OW), a transposed view of channels-last memory; element-wise
ops keep that layout, so the next convolution reads its input channels-last without
a copy. Only the channels-last input (not the windows) is saved for the VJP, which
rebuilds each chunk's windows: the copy costs far less than the GEMM it feeds, and
memory stays low.

The batch is split over as many threads as BLAS has (parallel.py), so the window
copies and the col2im adds run in parallel as well as the GEMMs.
"""
from __future__ import annotations

import numpy as np

from capsflow.backends.cpu.parallel import OrderedSum, batch_parts, in_parallel
from capsflow.backends.windows import channels_last, channels_last_windows
from capsflow.ops.conv import conv2d

#: Largest window copy (bytes) made at once for the whole batch: bounds the extra memory
#: a convolution takes. A single kernel row's windows are copied even when larger.
CHUNK_BYTES = 48 * 2 ** 20

threaded = conv2d.variant("numpy")


def row_chunks(kh: int, row_bytes: int, budget: int | None = None) -> list:
    """Split kernel rows 0..kh into [(start, stop)] whose window copy fits ``budget``
    (``CHUNK_BYTES`` by default)."""
    step = max(1, min(kh, (CHUNK_BYTES if budget is None else budget) // max(row_bytes, 1)))
    return [(r, min(r + step, kh)) for r in range(0, kh, step)]


def _chunk_cols(win, r0, r1):
    """Windows of kernel rows r0..r1 as a contiguous (N*OH*OW, rows*kw*C) matrix."""
    n, oh, ow, _, kw, c = win.shape
    return np.ascontiguousarray(win[:, :, :, r0:r1]).reshape(n * oh * ow, (r1 - r0) * kw * c)


def _weight_rows(w):
    """w (O, C, kh, kw) -> (O, kh*kw*C), columns in the windows' (kh, kw, C) order."""
    return np.ascontiguousarray(w.transpose(0, 2, 3, 1)).reshape(w.shape[0], -1)


def _chunks(xt, w, n, oh, ow):
    o, c, kh, kw = w.shape
    return row_chunks(kh, n * oh * ow * kw * c * xt.itemsize)


@threaded.forward
def _(be, x, w, b=None, *, stride, padding):
    o, c, kh, kw = w.shape
    xt = channels_last(np, x, padding)
    win = channels_last_windows(np, xt, kh, kw, stride)
    n, oh, ow = win.shape[:3]
    chunks = _chunks(xt, w, n, oh, ow)
    w2 = _weight_rows(w)                                              # (O, kh*kw*C)
    out = np.empty((n, oh * ow, o), dtype=xt.dtype)

    def part(rows):
        acc = out[rows].reshape(-1, o)                                # (n_part*OH*OW, O)
        for k, (r0, r1) in enumerate(chunks):
            cols, w_rows = _chunk_cols(win[rows], r0, r1), w2[:, r0 * kw * c:r1 * kw * c].T
            if k:
                acc += cols @ w_rows
            else:
                np.matmul(cols, w_rows, out=acc)
        if b is not None:
            acc += b

    in_parallel(part, batch_parts(n))
    return out.reshape(n, oh, ow, o).transpose(0, 3, 1, 2), {"xt": xt}   # (N, O, OH, OW) view


@threaded.vjp
def _(be, saved, g, needs, *, stride, padding):
    xt, w = saved["xt"], saved["w"]
    o, c, kh, kw = w.shape
    n, oh, ow = g.shape[0], g.shape[2], g.shape[3]
    g4 = np.ascontiguousarray(g.transpose(0, 2, 3, 1)).reshape(n, oh * ow, o)
    chunks = _chunks(xt, w, n, oh, ow)
    win = channels_last_windows(np, xt, kh, kw, stride)
    gb = g4.reshape(-1, o).sum(axis=0) if len(needs) > 2 and needs[2] else None
    gwt = np.zeros((o, kh, kw, c), dtype=g4.dtype) if needs[1] else None  # (kh, kw, C) order
    gxt = np.zeros(xt.shape, dtype=g4.dtype) if needs[0] else None
    parts = batch_parts(n)
    gw_sum = OrderedSum(parts)  # summed over the parts, in their order

    def part(rows):
        g2 = g4[rows].reshape(-1, o)                                   # (n_part*OH*OW, O)
        if needs[1]:
            for r0, r1 in chunks:
                prod = (g2.T @ _chunk_cols(win[rows], r0, r1)).reshape(o, r1 - r0, kw, c)
                gw_sum.add(r0, gwt[:, r0:r1], rows, prod)
        if needs[0]:
            dst = gxt[rows]
            for r0, r1 in chunks:
                rows_w = np.ascontiguousarray(w[:, :, r0:r1].transpose(0, 2, 3, 1)).reshape(o, -1)
                gcols = (g2 @ rows_w).reshape(-1, oh, ow, r1 - r0, kw, c)
                # col2im: each kernel offset adds its slice back at the strided input positions.
                for i in range(r0, r1):
                    for j in range(kw):
                        dst[:, i:i + stride * oh:stride, j:j + stride * ow:stride] += \
                            gcols[:, :, :, i - r0, j]

    in_parallel(part, parts)
    gw = np.ascontiguousarray(gwt.transpose(0, 3, 1, 2)) if needs[1] else None
    gx = None
    if needs[0]:
        if padding:
            gxt = gxt[:, padding:-padding, padding:-padding]
        gx = gxt.transpose(0, 3, 1, 2)                                 # (N, C, H, W) view
    return gx, gw, gb
