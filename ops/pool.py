"""Spatial window ops on NCHW images: max pooling, and ``unfold``, the sliding windows
that convolutional capsule layers transform one by one.

Both read every window through conv.py's strided view (``sliding_windows``) of the
padded input; both VJPs scatter-add back one kernel offset at a time (col2im), so
overlapping windows (stride < kernel) add up where they share an input.
"""
from capsflow.core.opdef import Attr, defop
from capsflow.core.shapes import ShapeError, fmt

from .conv import sliding_windows

INT_OR_NULL = Attr((int, type(None)), None)


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _window_shape(op: str, x: tuple, kh: int, kw: int, stride: int, padding: int) -> tuple:
    """(OH, OW) of the windows of ``x`` (N, C, H, W), with the checks both ops share."""
    if len(x) != 4:
        raise ShapeError(f"{op} needs x (N, C, H, W), got {fmt(x)}")
    if stride < 1:
        raise ShapeError(f"{op}: stride must be >= 1, got {stride}")
    if padding < 0:
        raise ShapeError(f"{op}: padding must be >= 0, got {padding}")
    if not all(isinstance(size, int) for size in x[2:]):
        raise ShapeError(f"{op}: spatial size of {fmt(x)} must be known")
    if x[2] + 2 * padding < kh or x[3] + 2 * padding < kw:
        raise ShapeError(f"{op}: kernel {kh}x{kw} is larger than input {fmt(x)}"
                         + (f" padded by {padding}" if padding else ""))
    return tuple((size + 2 * padding - k) // stride + 1 for size, k in zip(x[2:], (kh, kw)))


def _pad(xp, x, padding: int, value: float):
    """x (N, C, H, W) with ``padding`` values ``value`` around H and W."""
    if not padding:
        return x
    return xp.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)),
                  constant_values=value)


def _col2im(xp, g, shape_in: tuple, kh: int, kw: int, stride: int, padding: int, pick):
    """The gradient of x (``shape_in``) from window gradients: ``pick(i, j)`` is what the
    windows send back through kernel offset (i, j), shape (N, C, OH, OW); contributions
    of overlapping windows add up. Padding is cropped off at the end."""
    n, c, h, w = shape_in
    oh, ow = g.shape[2:4]
    gxp = xp.zeros((n, c, h + 2 * padding, w + 2 * padding), dtype=g.dtype)
    for i in range(kh):
        for j in range(kw):
            gxp[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride] += pick(i, j)
    return gxp[:, :, padding:padding + h, padding:padding + w]


# -- max_pool2d ------------------------------------------------------------------------------
max_pool2d = defop(
    "max_pool2d", inputs=("x",),
    attrs={"kernel": Attr(int), "stride": INT_OR_NULL, "padding": 0},
    saves=("arg", "shape_in"),
    doc="x (N, C, H, W) -> (N, C, OH, OW): the maximum of each kernel x kernel window; "
        "stride null means the kernel size; padding (at most kernel // 2) is -inf. The "
        "gradient goes to each window's maximum (the first one on ties, as in PyTorch)")


def _pool_stride(kernel: int, stride) -> int:
    return kernel if stride is None else stride


@max_pool2d.shape
def _(x, *, kernel, stride, padding):
    if kernel < 1:
        raise ShapeError(f"max_pool2d: kernel must be >= 1, got {kernel}")
    if stride is not None and stride < 1:
        raise ShapeError(f"max_pool2d: stride must be >= 1 (or null: the kernel size), "
                         f"got {stride}")
    if padding > kernel // 2:
        raise ShapeError(f"max_pool2d: padding {padding} is more than half the kernel "
                         f"({kernel}); a window would hold padding only")
    oh, ow = _window_shape("max_pool2d", x, kernel, kernel, _pool_stride(kernel, stride), padding)
    return (x[0], x[1], oh, ow)


@max_pool2d.forward
def _(xp, x, *, kernel, stride, padding):
    s = _pool_stride(kernel, stride)
    win = sliding_windows(xp, _pad(xp, x, padding, -float("inf")), kernel, kernel, s)
    n, c, oh, ow = win.shape[:4]
    flat = win.reshape(n, c, oh, ow, kernel * kernel)   # a copy: (N, C, OH, OW, k*k)
    arg = flat.argmax(axis=-1)                         # the first maximum (NaN wins, as in PyTorch)
    out = xp.take_along_axis(flat, arg[..., None], axis=-1)[..., 0]
    return out, {"arg": arg, "shape_in": x.shape}


@max_pool2d.vjp
def _(xp, saved, g, needs, *, kernel, stride, padding):
    arg = saved["arg"]
    return (_col2im(xp, g, saved["shape_in"], kernel, kernel, _pool_stride(kernel, stride),
                    padding, lambda i, j: g * (arg == i * kernel + j)),)


# -- unfold ----------------------------------------------------------------------------------
unfold = defop(
    "unfold", inputs=("x",), attrs={"kernel": Attr((int, list)), "stride": 1,
                                     "padding": 0},
    saves=("shape_in",),
    doc="x (N, C, H, W) -> (N, C, OH, OW, kh, kw): every kernel window (kernel: k or "
        "[kh, kw]) with zero padding; out[n, c, i, j, a, b] = xpad[n, c, i*stride + a, "
        "j*stride + b]. torch's F.unfold(x) is this reshaped to (N, C*kh*kw, OH*OW) after "
        "moving (kh, kw) before (OH, OW)")


def _kernel_hw(kernel) -> tuple:
    """``kernel`` (k or [kh, kw]) -> (kh, kw), each a whole number >= 1."""
    sizes = [kernel, kernel] if not isinstance(kernel, list) else kernel
    if len(sizes) != 2 or not all(_whole(k) and k >= 1 for k in sizes):
        raise ShapeError(f"unfold: kernel must be a whole number >= 1 or a list [kh, kw] of "
                         f"two, got {kernel!r:.60}")
    return tuple(sizes)


@unfold.shape
def _(x, *, kernel, stride, padding):
    kh, kw = _kernel_hw(kernel)
    oh, ow = _window_shape("unfold", x, kh, kw, stride, padding)
    return (x[0], x[1], oh, ow, kh, kw)


@unfold.forward
def _(xp, x, *, kernel, stride, padding):
    kh, kw = _kernel_hw(kernel)
    win = sliding_windows(xp, _pad(xp, x, padding, 0), kh, kw, stride)
    # A copy: the view's windows overlap in memory, and x may be freed or changed later.
    return xp.ascontiguousarray(win), {"shape_in": x.shape}


@unfold.vjp
def _(xp, saved, g, needs, *, kernel, stride, padding):
    kh, kw = _kernel_hw(kernel)
    return (_col2im(xp, g, saved["shape_in"], kh, kw, stride, padding,
                    lambda i, j: g[:, :, :, :, i, j]),)
