"""2-D convolution as one GEMM over im2col windows (a strided view, copied once)."""
from capsflow.backend import sliding_windows
from capsflow.opdef import defop
from capsflow.shapes import ShapeError, fmt

conv2d = defop("conv2d", inputs=("x", "w", "b?"), attrs={"stride": 1, "padding": 0},
               saves=("cols", "w", "x_shape"),
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


def _pad(xp, x, padding):
    if not padding:
        return x
    return xp.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))


@conv2d.forward
def _(xp, x, w, b=None, *, stride, padding):
    n = x.shape[0]
    o, c, kh, kw = w.shape
    win = sliding_windows(xp, _pad(xp, x, padding), kh, kw, stride)  # (N, C, OH, OW, kh, kw)
    oh, ow = win.shape[2:4]
    # Rows are output pixels, columns the (C, kh, kw) patch: one big GEMM does the conv.
    cols = xp.ascontiguousarray(win.transpose(0, 2, 3, 1, 4, 5)).reshape(n * oh * ow, c * kh * kw)
    out = cols @ w.reshape(o, -1).T                                   # (N*OH*OW, O)
    if b is not None:
        out += b
    out = out.reshape(n, oh, ow, o).transpose(0, 3, 1, 2)              # (N, O, OH, OW) view
    return out, {"cols": cols, "x_shape": x.shape}


@conv2d.vjp
def _(xp, saved, g, needs, *, stride, padding):
    cols, w, (n, c, h, wd) = saved["cols"], saved["w"], saved["x_shape"]
    o, _, kh, kw = w.shape
    oh, ow = g.shape[2:]
    g2 = g.transpose(0, 2, 3, 1).reshape(n * oh * ow, o)              # (N*OH*OW, O)
    gw = (g2.T @ cols).reshape(w.shape) if needs[1] else None
    gb = g2.sum(axis=0) if len(needs) > 2 and needs[2] else None
    gx = None
    if needs[0]:
        gcols = (g2 @ w.reshape(o, -1)).reshape(n, oh, ow, c, kh, kw)
        gx = xp.zeros((n, c, h + 2 * padding, wd + 2 * padding), dtype=g.dtype)
        # col2im: each kernel offset adds its slice back into the strided input positions.
        for i in range(kh):
            for j in range(kw):
                gx[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride] += \
                    gcols[:, :, :, :, i, j].transpose(0, 3, 1, 2)
        if padding:
            gx = gx[:, :, padding:-padding, padding:-padding]
    return gx, gw, gb
