"""2-D convolution as GEMMs over channels-last windows, a few kernel rows at a time.

The input is viewed channels-last (N, H, W, C) and its windows as a strided view
(N, OH, OW, kh, kw, C); a full im2col copy of that view would be (N*OH*OW, C*kh*kw),
which for CapsNet's PrimaryCaps (9x9 over 256 channels) is 300 MB at batch 100. So
the kernel rows are taken in chunks whose copy stays within ``CHUNK_BYTES``: each
chunk is one large GEMM, and the chunks' products are summed. Small convolutions
(Conv1: one input channel) fit in one chunk, i.e. one im2col GEMM.

The output is (N, O, OH, OW), a transposed view of channels-last memory; element-wise
ops keep that layout, so the next convolution reads its input channels-last without
a copy. On NumPy only the input (not the windows) is saved for the VJP, which rebuilds
each chunk's windows: the copy costs far less than the GEMM it feeds, and memory stays
low.

On NumPy the batch is split over as many threads as BLAS has (ops/parallel.py), so
the window copies and the col2im adds run in parallel as well as the GEMMs. CuPy runs
the whole batch in one part, with a budget large enough for one im2col GEMM per
convolution (few large launches suit a GPU): an im2col kernel copies the windows once
and the VJP reuses that copy for the weight gradient (PrimaryCaps: 300 MB held from
forward to backward, against 0.14 ms to copy it again), and the input gradient is one
batched GEMM and one gather kernel (cuda_kernels.col2im) instead of a strided add per
kernel offset.
"""
from capsflow.backends.cuda import kernels as cuda_kernels
from capsflow.backends.cuda import gemm
from capsflow.backends import on_cpu, sliding_windows
from capsflow.core.opdef import defop
from capsflow.core.shapes import ShapeError, fmt

from .parallel import OrderedSum, batch_parts, in_parallel

#: Largest window copy (bytes) made at once for the whole batch: bounds the extra memory
#: a convolution takes. A single kernel row's windows are copied even when larger.
CHUNK_BYTES = 48 * 2 ** 20
#: The same bound off NumPy (on a GPU): PrimaryCaps' whole im2col at batch 100 fits.
DEVICE_CHUNK_BYTES = 2 ** 30


def _budget(xp) -> int:
    return CHUNK_BYTES if on_cpu(xp) else DEVICE_CHUNK_BYTES

conv2d = defop("conv2d", inputs=("x", "w", "b?"), attrs={"stride": 1, "padding": 0},
               saves=("xt", "w", "w_cols", "cols"),
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


def _window_matrix(xp, win, ones_column: bool):
    """The windows (N, OH, OW, kh, kw, C) copied into an (N*OH*OW, kh*kw*C) matrix, with
    a last column of ones if asked: against a bias row of the weights the GEMM then adds
    the bias, and in the weight gradient's GEMM that column sums the output gradient into
    the bias gradient (each saves a pass over Conv1's 41 MB output at batch 100)."""
    n, oh, ow, kh, kw, c = win.shape
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


@conv2d.forward
def _(xp, x, w, b=None, *, stride, padding):
    o, c, kh, kw = w.shape
    xt = _channels_last(xp, x, padding)
    win = _windows(xp, xt, kh, kw, stride)
    n, oh, ow = win.shape[:3]
    chunks = row_chunks(kh, n * oh * ow * kw * c * xt.itemsize, _budget(xp))
    if _gpu_windows(xp, chunks):
        # One im2col copy, one GEMM. The copy is kept for the weight gradient (rebuilding
        # PrimaryCaps' costs as long as copying 300 MB: 0.14 ms on an H200), and the
        # weights' (kh, kw*C, O) copy for the input gradient's GEMMs.
        k = kh * kw * c
        cols = cuda_kernels.im2col(xp, xt, kh, kw, stride) if kw * c >= MIN_GPU_ROW else None
        if cols is None:
            cols = _window_matrix(xp, win, ones_column=b is not None)
        w_mat = xp.empty((cols.shape[1], o), dtype=xt.dtype)   # (kh*kw*C [+ 1], O)
        w_mat[:k].reshape(kh, kw, c, o)[...] = w.transpose(2, 3, 1, 0)
        if cols.shape[1] > k:
            w_mat[k] = b  # against the ones column: the GEMM adds the bias
        out = gemm.matmul(xp, cols, w_mat)
        if b is not None and cols.shape[1] == k:
            out += b
        extras = {"xt": xt, "w_cols": w_mat[:k].reshape(kh, kw * c, o), "cols": cols}
        return out.reshape(n, oh, ow, o).transpose(0, 3, 1, 2), extras
    w2 = _weight_rows(xp, w)                                          # (O, kh*kw*C)
    out = xp.empty((n, oh * ow, o), dtype=xt.dtype)

    def part(rows):
        acc = out[rows].reshape(-1, o)                                # (n_part*OH*OW, O)
        for k, (r0, r1) in enumerate(chunks):
            gemm.matmul(xp, _chunk_cols(xp, win[rows], r0, r1), w2[:, r0 * kw * c:r1 * kw * c].T,
                        out=acc, accumulate=k > 0)
        if b is not None:
            acc += b

    in_parallel(part, batch_parts(xp, n))
    out = out.reshape(n, oh, ow, o).transpose(0, 3, 1, 2)             # (N, O, OH, OW) view
    return out, {"xt": xt, "w_cols": None, "cols": None}


#: Split a GEMM's inner dimension over a batch once it exceeds this many times the
#: output's width (GPU only; see ``_gram``).
SPLIT_K_RATIO = 8
#: Shortest window row (kw*C values) that the im2col kernel copies, one block per row:
#: a warp's worth, so that no block idles most of its threads (Conv1's rows of 9 values
#: are copied by CuPy instead).
MIN_GPU_ROW = 32


def _gpu_windows(xp, chunks: list) -> bool:
    """Whether a convolution runs as one im2col copy and one GEMM whose windows are kept
    for the VJP (GPU, windows within the budget)."""
    return len(chunks) == 1 and cuda_kernels.enabled(xp)


def _gram(xp, a, b):
    """a.T @ b for a (M, P), b (M, Q). On a GPU, when M dwarfs the (P, Q) output (Conv1's
    weight gradient: M = 40000 rows, output 256 x 81), the rows are split into a batch of
    GEMMs whose products are summed, so that enough thread blocks run at once."""
    m = a.shape[0]
    if cuda_kernels.enabled(xp) and m > 4 * SPLIT_K_RATIO * max(a.shape[1], b.shape[1]):
        splits = next((s for s in range(64, 1, -1) if m % s == 0), 1)
        if splits > 1:
            a3 = a.reshape(splits, m // splits, a.shape[1]).transpose(0, 2, 1)
            return _sum_leading(xp, gemm.matmul(xp, a3, b.reshape(splits, m // splits, b.shape[1])))
    return gemm.matmul(xp, a.T, b)


def _sum_leading(xp, a):
    """a.sum(axis=0), by a CUDA kernel where one applies."""
    fused = cuda_kernels.sum_leading(xp, a)
    return a.sum(axis=0) if fused is None else fused


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
    needs_gb = len(needs) > 2 and needs[2]
    gb = None
    chunks = row_chunks(kh, n * oh * ow * kw * c * xt.itemsize, _budget(xp))
    win = _windows(xp, xt, kh, kw, stride)
    # The forward's windows (GPU): popped, so that they are freed as soon as used.
    cols = saved.pop("cols", None)
    gwt = None  # gw in the windows' column order (O, kh, kw, C)
    if needs[1] and cols is not None:
        k = kh * kw * c
        prod = _gram(xp, g4.reshape(-1, o), cols)                     # (O, k [+ 1])
        gwt = prod[:, :k].reshape(o, kh, kw, c)
        if needs_gb and prod.shape[1] > k:  # the ones column: the bias gradient
            gb = xp.ascontiguousarray(prod[:, k])
    del cols
    if needs_gb and gb is None:
        gb = cuda_kernels.column_sums(xp, g4.reshape(-1, o))
    from_windows = gwt is not None
    if needs[1] and not from_windows:  # summed over the parts, in their order
        gwt = xp.zeros((o, kh, kw, c), dtype=g4.dtype)
    gxt = None
    if needs[0] and _gpu_windows(xp, chunks):
        # One GEMM per kernel row, batched (faster than one GEMM of the same size on an
        # H200), then one gather kernel.
        w_cols = saved.get("w_cols")  # the forward's (kh, kw*C, O) copy, read transposed
        w_rows = (_weight_rows(xp, w).reshape(o, kh, kw * c).transpose(1, 0, 2) if w_cols is None
                  else w_cols.transpose(0, 2, 1))                    # (kh, O, kw*C)
        gcols = gemm.matmul(xp, g4.reshape(-1, o), w_rows).reshape(kh, n, oh, ow, kw, c)
        gxt = cuda_kernels.col2im(xp, gcols, xt.shape, stride)
        del gcols
    col2im_done = gxt is not None
    if needs[0] and not col2im_done:
        gxt = xp.zeros(xt.shape, dtype=g4.dtype)
    parts = batch_parts(xp, n)
    gw_sum = OrderedSum(parts)

    def part(rows):
        g2 = g4[rows].reshape(-1, o)                                   # (n_part*OH*OW, O)
        if needs[1] and not from_windows:
            for r0, r1 in chunks:
                prod = _gram(xp, g2, _chunk_cols(xp, win[rows], r0, r1)).reshape(o, r1 - r0, kw, c)
                gw_sum.add(r0, gwt[:, r0:r1], rows, prod)
        if needs[0] and not col2im_done:
            dst = gxt[rows]
            for r0, r1 in chunks:
                rows_w = xp.ascontiguousarray(w[:, :, r0:r1].transpose(0, 2, 3, 1)).reshape(o, -1)
                gcols = gemm.matmul(xp, g2, rows_w).reshape(-1, oh, ow, r1 - r0, kw, c)
                # col2im: each kernel offset adds its slice back at the strided input positions.
                for i in range(r0, r1):
                    for j in range(kw):
                        dst[:, i:i + stride * oh:stride, j:j + stride * ow:stride] += \
                            gcols[:, :, :, i - r0, j]

    in_parallel(part, parts)
    gw = xp.ascontiguousarray(gwt.transpose(0, 3, 1, 2)) if needs[1] else None
    gx = None
    if needs[0]:
        if padding:
            gxt = gxt[:, padding:-padding, padding:-padding]
        gx = gxt.transpose(0, 3, 1, 2)                                 # (N, C, H, W) view
    return gx, gw, gb
