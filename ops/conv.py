"""2-D convolution as GEMMs over channels-last windows, a few kernel rows at a time.

The input is viewed channels-last (N, H, W, C) and its windows as a strided view
(N, OH, OW, kh, kw, C); a full im2col copy of that view would be (N*OH*OW, C*kh*kw),
which for CapsNet's PrimaryCaps (9x9 over 256 channels) is 300 MB at batch 100. So
the kernel rows are taken in chunks whose copy stays within ``CHUNK_BYTES``: each
chunk is one large GEMM, and the chunks' products are summed. Small convolutions
(Conv1: one input channel) fit in one chunk, i.e. one im2col GEMM.

The output is (N, O, OH, OW), a transposed view of channels-last memory; element-wise
ops keep that layout, so the next convolution reads its input channels-last without
a copy. Only the input (not the windows) is saved for the VJP, which rebuilds each
chunk's windows: the copy costs far less than the GEMM it feeds, and memory stays low.

On NumPy the batch is split over as many threads as BLAS has (ops/parallel.py), so
the window copies and the col2im adds run in parallel as well as the GEMMs; CuPy runs
the same code on the whole batch in one part.
"""
import threading

from capsflow.backend import sliding_windows
from capsflow.opdef import defop
from capsflow.shapes import ShapeError, fmt

from .parallel import batch_parts, in_parallel

#: Largest window copy (bytes) made at once for the whole batch: bounds the extra memory
#: a convolution takes. A single kernel row's windows are copied even when larger.
CHUNK_BYTES = 48 * 2 ** 20

conv2d = defop("conv2d", inputs=("x", "w", "b?"), attrs={"stride": 1, "padding": 0},
               saves=("xt", "w"),
               doc="x (N, C, H, W) * w (O, C, kh, kw) + b (O,) -> (N, O, OH, OW); no dilation")


@conv2d.shape
def _(x, w, b=None, *, stride, padding):
    if len(x) != 4 or len(w) != 4:
        raise ShapeError(f"conv2d needs x (N, C, H, W) and w (O, C, kh, kw), got {fmt(x)} and {fmt(w)}")
    if x[1] != w[1]:
        raise ShapeError(f"conv2d: input has {x[1]} channels, weight {fmt(w)} expects {w[1]}")
    if b is not None and tuple(b) != (w[0],):
        raise ShapeError(f"conv2d: bias {fmt(b)} should be ({w[0]},)")
    if stride < 1 or padding < 0:
        raise ShapeError(f"conv2d: stride must be >= 1 and padding >= 0, got {stride}, {padding}")
    out_hw = []
    for size, k in zip(x[2:], w[2:]):
        if not isinstance(size, int):
            raise ShapeError(f"conv2d: spatial size of {fmt(x)} must be known")
        if size + 2 * padding < k:
            raise ShapeError(f"conv2d: kernel {w[2]}x{w[3]} is larger than input {fmt(x)}")
        out_hw.append((size + 2 * padding - k) // stride + 1)
    return (x[0], w[0], *out_hw)


def _channels_last(xp, x, padding):
    """x (N, C, H, W) -> contiguous padded (N, H+2p, W+2p, C); no copy when x already
    lies channels-last in memory without padding."""
    xt = x.transpose(0, 2, 3, 1)
    if padding:
        xt = xp.pad(xt, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    return xp.ascontiguousarray(xt)


def _windows(xp, xt, kh, kw, stride):
    """Strided view (N, OH, OW, kh, kw, C) of every window of xt (N, H, W, C); no copy."""
    return sliding_windows(xp, xt.transpose(0, 3, 1, 2), kh, kw, stride).transpose(0, 2, 3, 4, 5, 1)


def row_chunks(kh: int, row_bytes: int, budget: int | None = None) -> list:
    """Split kernel rows 0..kh into [(start, stop)] whose window copy fits ``budget``."""
    step = max(1, min(kh, (CHUNK_BYTES if budget is None else budget) // max(row_bytes, 1)))
    return [(r, min(r + step, kh)) for r in range(0, kh, step)]


def _chunk_cols(xp, win, r0, r1):
    """Windows of kernel rows r0..r1 as a contiguous (N*OH*OW, rows*kw*C) matrix."""
    n, oh, ow, _, kw, c = win.shape
    return xp.ascontiguousarray(win[:, :, :, r0:r1]).reshape(n * oh * ow, (r1 - r0) * kw * c)


@conv2d.forward
def _(xp, x, w, b=None, *, stride, padding):
    o, c, kh, kw = w.shape
    xt = _channels_last(xp, x, padding)
    win = _windows(xp, xt, kh, kw, stride)
    n, oh, ow = win.shape[:3]
    w2 = _weight_rows(xp, w)                                          # (O, kh*kw*C)
    out = xp.empty((n, oh * ow, o), dtype=xt.dtype)
    chunks = row_chunks(kh, n * oh * ow * kw * c * xt.itemsize)

    def part(rows):
        acc = out[rows].reshape(-1, o)                                # (n_part*OH*OW, O)
        for k, (r0, r1) in enumerate(chunks):
            prod = _chunk_cols(xp, win[rows], r0, r1) @ w2[:, r0 * kw * c:r1 * kw * c].T
            if k == 0:
                acc[...] = prod
            else:
                acc += prod
        if b is not None:
            acc += b

    in_parallel(part, batch_parts(xp, n))
    return out.reshape(n, oh, ow, o).transpose(0, 3, 1, 2), {"xt": xt}  # (N, O, OH, OW) view


def _weight_rows(xp, w):
    """w (O, C, kh, kw) -> (O, kh*kw*C), columns in the windows' (kh, kw, C) order."""
    o = w.shape[0]
    return xp.ascontiguousarray(w.transpose(0, 2, 3, 1)).reshape(o, -1)


@conv2d.vjp
def _(xp, saved, g, needs, *, stride, padding):
    xt, w = saved["xt"], saved["w"]
    o, c, kh, kw = w.shape
    n, oh, ow = g.shape[0], g.shape[2], g.shape[3]
    g4 = xp.ascontiguousarray(g.transpose(0, 2, 3, 1)).reshape(n, oh * ow, o)
    gb = g4.sum(axis=(0, 1)) if len(needs) > 2 and needs[2] else None
    chunks = row_chunks(kh, n * oh * ow * kw * c * xt.itemsize)
    win = _windows(xp, xt, kh, kw, stride)
    # gw in the windows' column order (O, kh, kw, C), summed over the parts under a lock
    gwt = xp.zeros((o, kh, kw, c), dtype=g4.dtype) if needs[1] else None
    gxt = xp.zeros(xt.shape, dtype=g4.dtype) if needs[0] else None
    lock = threading.Lock()

    def part(rows):
        g2 = g4[rows].reshape(-1, o)                                   # (n_part*OH*OW, O)
        if needs[1]:
            for r0, r1 in chunks:
                prod = (g2.T @ _chunk_cols(xp, win[rows], r0, r1)).reshape(o, r1 - r0, kw, c)
                with lock:
                    gwt[:, r0:r1] += prod
        if needs[0]:
            dst = gxt[rows]
            for r0, r1 in chunks:
                rows_w = xp.ascontiguousarray(w[:, :, r0:r1].transpose(0, 2, 3, 1)).reshape(o, -1)
                gcols = (g2 @ rows_w).reshape(-1, oh, ow, r1 - r0, kw, c)
                # col2im: each kernel offset adds its slice back at the strided input positions.
                for i in range(r0, r1):
                    for j in range(kw):
                        dst[:, i:i + stride * oh:stride, j:j + stride * ow:stride] += \
                            gcols[:, :, :, i - r0, j]

    in_parallel(part, batch_parts(xp, n))
    gw = xp.ascontiguousarray(gwt.transpose(0, 3, 1, 2)) if needs[1] else None
    gx = None
    if needs[0]:
        if padding:
            gxt = gxt[:, padding:-padding, padding:-padding]
        gx = gxt.transpose(0, 3, 1, 2)                                 # (N, C, H, W) view
    return gx, gw, gb
