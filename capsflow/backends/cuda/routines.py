"""The CuPy variants of the engine's routines (capsflow/core/routine.py): the sum of
factored outer-product gradients and the Adam update as kernels, the training step
recorded as CUDA graphs, host arrays copied to the device (Adam's per-step numbers,
the batch) from pinned memory, and the step's numbers copied back into it."""
from __future__ import annotations

import inspect

from capsflow.backends.cuda import kernels
from capsflow.backends.cuda.cudagraph import Captured
from capsflow.backends.cuda.layout import DeviceToHost, HostToDevice
from capsflow.core.gradients import sum_outer_terms
from capsflow.core.opdef import DECLINED
from capsflow.training.optim import adam_update
from capsflow.training.train_step import device_to_host, host_to_device, record_step

#: Terms one outer_sum launch takes (the kernel has this many pointer pairs).
KERNEL_TERMS = 8


@sum_outer_terms.variant("cupy")
def _(be, terms: list):
    """One outer_sum launch per 8 terms, the first writing, the others adding, in the
    terms' order."""
    lefts, rights = [t.left for t in terms], [t.right for t in terms]
    nb, nl, nj = lefts[0].shape
    out = be.xp.empty((nb, nl, nj, rights[0].shape[2]), dtype=terms[0].dtype)
    for k in range(0, len(terms), KERNEL_TERMS):
        if not kernels.outer_sum(be.xp, lefts[k:k + KERNEL_TERMS], rights[k:k + KERNEL_TERMS],
                                 out, accumulate=k > 0):
            return DECLINED
    return out.reshape(terms[0].shape)


@adam_update.variant("cupy")
def _(be, params, grads, state, hyper, betas, eps):
    """One fused kernel per parameter, reading ``hyper`` on the device (so a captured
    step sees each step's numbers and its go flag); the reference updates the
    parameters the kernel declines."""
    xp = be.xp
    device_hyper = hyper if hasattr(hyper, "dtype") else xp.asarray(hyper, dtype=xp.float64)
    rest = {name: p for name, p in params.items()
            if not kernels.adam_update(xp, p, grads[name], state["m"][name], state["v"][name],
                                       device_hyper, betas, eps)}
    if rest:
        adam_update.reference(xp, rest, grads, state, hyper, betas, eps)


record_step.variant("cupy", option="replay_steps")(lambda be, fn: Captured(be.xp, fn))


@host_to_device.variant("cupy")
def _(be, dst):
    """HostToDevice, where the module has pinned memory (CuPy, not the tests' emulator)."""
    if not hasattr(be.xp.cuda, "alloc_pinned_memory") or not hasattr(dst, "set"):
        return DECLINED
    return HostToDevice(be.xp, dst)


@device_to_host.variant("cupy")
def _(be, shape, dtype):
    """DeviceToHost, where the module has pinned memory and an asynchronous ``asnumpy``
    (CuPy 13 and later; not the tests' emulator)."""
    if not hasattr(be.xp.cuda, "alloc_pinned_memory") or not hasattr(be.xp, "asnumpy"):
        return DECLINED
    try:
        asynchronous = "blocking" in inspect.signature(be.xp.asnumpy).parameters
    except (TypeError, ValueError):  # no signature to read: do not guess
        asynchronous = False
    return DeviceToHost(be.xp, shape, dtype) if asynchronous else DECLINED
