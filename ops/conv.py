"""2-D convolution, written directly from its definition over a strided view of every
window (no copy until the contraction): the reference that backends' variants are
checked against (capsflow/backends/cpu/conv.py splits the batch over threads; the GPU
backend copies the windows once and runs one GEMM)."""
from capsflow.core.opdef import defop
from capsflow.core.shapes import ShapeError, fmt

conv2d = defop("conv2d", inputs=("x", "w", "b?"), attrs={"stride": 1, "padding": 0},
               saves=("x", "w"),
               doc="x (N, C, H, W) * w (O, C, kh, kw) + b (O,) -> (N, O, OH, OW); no dilation")


@conv2d.shape
def _(x, w, b=None, *, stride, padding):
    if len(x) != 4 or len(w) != 4:
        raise ShapeError(f"conv2d needs x (N, C, H, W) and w (O, C, kh, kw), got {fmt(x)} and {fmt(w)}")
    if x[1] != w[1]:
        raise ShapeError(f"conv2d: input has {x[1]} channels, weight {fmt(w)} expects {w[1]}")
    if b is not None and tuple(b) != (w[0],):
        raise ShapeError(f"conv2d: bias {fmt(b)} should be ({w[0]},)")
    if not all(isinstance(k, int) for k in w[2:]):
        raise ShapeError(f"conv2d: kernel size of {fmt(w)} must be known")
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


def sliding_windows(xp, x, kh: int, kw: int, stride: int):
    """View (N, C, OH, OW, kh, kw) of all conv windows of x (N, C, H, W); no copy.

    ``as_strided`` exists in every array library capsflow runs on,
    ``sliding_window_view`` not in all of them, hence this helper.
    """
    n, c, h, w = x.shape
    oh, ow = (h - kh) // stride + 1, (w - kw) // stride + 1
    sn, sc, sh, sw = x.strides
    return xp.lib.stride_tricks.as_strided(
        x, shape=(n, c, oh, ow, kh, kw),
        strides=(sn, sc, sh * stride, sw * stride, sh, sw))


def pad_spatial(xp, x, padding: int):
    """x (N, C, H, W) with ``padding`` zeros around H and W."""
    if not padding:
        return x
    return xp.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))


@conv2d.forward
def _(xp, x, w, b=None, *, stride, padding):
    kh, kw = w.shape[2:]
    win = sliding_windows(xp, pad_spatial(xp, x, padding), kh, kw, stride)  # (N, C, OH, OW, kh, kw)
    out = xp.tensordot(win, w, axes=([1, 4, 5], [1, 2, 3]))               # (N, OH, OW, O)
    if b is not None:
        out += b
    return out.transpose(0, 3, 1, 2)


@conv2d.vjp
def _(xp, saved, g, needs, *, stride, padding):
    x, w = saved["x"], saved["w"]
    kh, kw = w.shape[2:]
    oh, ow = g.shape[2:]
    xpad = pad_spatial(xp, x, padding)
    gw = gb = gx = None
    if needs[1]:
        win = sliding_windows(xp, xpad, kh, kw, stride)
        gw = xp.tensordot(g, win, axes=([0, 2, 3], [0, 2, 3]))             # (O, C, kh, kw)
    if len(needs) > 2 and needs[2]:
        gb = g.sum(axis=(0, 2, 3))
    if needs[0]:
        # Each kernel offset (i, j) sends g back through w[:, :, i, j] to the inputs it read.
        gxp = xp.zeros(xpad.shape, dtype=g.dtype)
        for i in range(kh):
            for j in range(kw):
                gxp[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride] += \
                    xp.tensordot(w[:, :, i, j], g, axes=([0], [1])).transpose(1, 0, 2, 3)
        h, wd = x.shape[2:]
        gx = gxp[:, :, padding:padding + h, padding:padding + wd]
    return gx, gw, gb
