"""Channels-last convolution windows, shared by the CPU and GPU conv2d variants: both
copy or multiply the windows with the channels innermost, so that each window row is
one contiguous run of memory."""
from __future__ import annotations

from typing import Any

from capsflow.ops.conv import sliding_windows


def channels_last(xp: Any, x: Any, padding: int) -> Any:
    """x (N, C, H, W) -> contiguous padded (N, H+2p, W+2p, C); no copy when x already
    lies channels-last in memory without padding."""
    xt = x.transpose(0, 2, 3, 1)
    if padding:
        xt = xp.pad(xt, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    return xp.ascontiguousarray(xt)


def channels_last_windows(xp: Any, xt: Any, kh: int, kw: int, stride: int) -> Any:
    """Strided view (N, OH, OW, kh, kw, C) of every window of xt (N, H, W, C); no copy."""
    return sliding_windows(xp, xt.transpose(0, 3, 1, 2), kh, kw, stride).transpose(0, 2, 3, 4, 5, 1)
