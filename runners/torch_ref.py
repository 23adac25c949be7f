"""Plain functional PyTorch reference for CapsNet (Sabour et al., 2017).

This module mirrors ``graphs/capsnet.yaml`` op for op so that capsflow's
NumPy/CuPy engine can be checked against torch autograd (float64) and
benchmarked against it.  It takes the *same* parameter dict (name -> array)
as capsflow; the math must stay identical to the graph, so any change to the
graph has to be made here too.

Shapes (N = batch size)::

    x       (N, 1, 28, 28)   pixels in [0, 1]
    y       (N, 10)          one-hot labels (float), optional
    h1      (N, 256, 20, 20) relu(conv1(x))
    p       (N, 256, 6, 6)   primary conv, stride 2
    u       (N, 1152, 8)     squashed primary capsules
    u_hat   (N, 1152, 10, 16) prediction vectors
    v       (N, 10, 16)      digit capsules after dynamic routing
    lengths (N, 10)
    recon   (N, 784)

Nothing here touches torch's global thread settings; ``TorchStep`` only
switches TF32 on/off for the duration of each step and restores it after.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Mapping, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "PARAM_SHAPES",
    "NUM_CLASSES",
    "squash",
    "primary_capsules",
    "prediction_vectors",
    "dynamic_routing",
    "capsule_lengths",
    "decoder",
    "margin_loss",
    "forward",
    "reference_value_and_grad",
    "reference_outputs",
    "init_params_like_capsnet",
    "TorchStep",
]

NUM_CLASSES = 10
NUM_PRIMARY = 1152  # 32 maps * 6 * 6 positions
PRIMARY_DIM = 8
DIGIT_DIM = 16

#: Parameter names and shapes shared with ``graphs/capsnet.yaml``.
#: Linear weights are stored (in, out): ``y = x @ w + b``.
PARAM_SHAPES: dict[str, tuple[int, ...]] = {
    "conv1.w": (256, 1, 9, 9),
    "conv1.b": (256,),
    "primary.w": (256, 256, 9, 9),
    "primary.b": (256,),
    "digit.W": (NUM_PRIMARY, NUM_CLASSES, DIGIT_DIM, PRIMARY_DIM),
    "fc1.w": (NUM_CLASSES * DIGIT_DIM, 512),
    "fc1.b": (512,),
    "fc2.w": (512, 1024),
    "fc2.b": (1024,),
    "fc3.w": (1024, 784),
    "fc3.b": (784,),
}

DTypeLike = Union[str, torch.dtype, np.dtype, type]
ArrayLike = Union[np.ndarray, torch.Tensor]


# --------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------
def squash(s: torch.Tensor, dim: int = -1, eps: float = 0.0) -> torch.Tensor:
    """Capsule non-linearity of the paper, ``n2 / (1 + n2) * s / |s|``.

    ``n2 = sum(s**2, dim, keepdim=True)``.  Written ``s * |s| / (1 + n2)`` (the same
    function), with ``|s|`` from ``torch.linalg.vector_norm``, whose backward is 0
    at ``s = 0``, so the value is 0 there and the gradient finite.  ``eps > 0``
    gives the old ``n2 / (1 + n2) * s / sqrt(n2 + eps)`` (capsflow's ``squash``
    with that ``eps``).  Output has the shape of ``s``.
    """
    n2 = (s * s).sum(dim=dim, keepdim=True)
    if eps:
        return n2 / (1.0 + n2) * s / torch.sqrt(n2 + eps)
    return s * (torch.linalg.vector_norm(s, dim=dim, keepdim=True) / (1.0 + n2))


def primary_capsules(
    params: Mapping[str, torch.Tensor], x: torch.Tensor, squash_eps: float = 0.0
) -> torch.Tensor:
    """Conv1 + PrimaryCaps: ``x`` (N,1,28,28) -> squashed ``u`` (N,1152,8)."""
    n = x.shape[0]
    h1 = F.relu(F.conv2d(x, params["conv1.w"], params["conv1.b"], stride=1))
    p = F.conv2d(h1, params["primary.w"], params["primary.b"], stride=2)
    # Seed layout: 8 convs of 32 maps, channel = d*32 + t, so the capsule
    # dimension d is the slow axis: (N, 8, 32*6*6) -> (N, 1152, 8).
    u = p.reshape(n, PRIMARY_DIM, NUM_PRIMARY).transpose(1, 2)
    return squash(u, dim=-1, eps=squash_eps)


def prediction_vectors(W: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``u_hat[n,i,j,d] = sum_k W[i,j,d,k] u[n,i,k]``.

    W (1152,10,16,8), u (N,1152,8) -> u_hat (N,1152,10,16).  torch lowers
    this einsum to one bmm batched over the 1152 primary capsules.
    """
    return torch.einsum("ijdk,nik->nijd", W, u)


def dynamic_routing(
    u_hat: torch.Tensor, routing_iters: int = 3, squash_eps: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Routing-by-agreement.

    Args:
        u_hat: (N, 1152, 10, 16) prediction vectors.
        routing_iters: number of routing iterations (>= 1).
        squash_eps: epsilon of ``squash`` (0: the paper's exact squash).

    Returns:
        ``(v, s, c)``: digit capsules (N,10,16), their pre-squash input
        (N,10,16) and the coupling coefficients of the last iteration
        (N,1152,10).  Gradients flow through every iteration (no detach),
        exactly like the capsflow graph.
    """
    if routing_iters < 1:
        raise ValueError(f"routing_iters must be >= 1, got {routing_iters}")
    n, n_in, n_out, _ = u_hat.shape
    b = u_hat.new_zeros((n, n_in, n_out))
    for r in range(routing_iters):
        c = torch.softmax(b, dim=2)  # over the 10 output capsules
        s = (c[..., None] * u_hat).sum(dim=1)
        v = squash(s, dim=-1, eps=squash_eps)
        if r < routing_iters - 1:  # the last agreement would be unused
            b = b + torch.einsum("nijd,njd->nij", u_hat, v)
    return v, s, c


def capsule_lengths(v: torch.Tensor, norm_eps: float = 0.0) -> torch.Tensor:
    """``|v| = sqrt(sum(v**2, -1))``: (N,10,16) -> (N,10).  Its backward is
    ``v / |v|``, 0 where ``v = 0`` (torch's norm).  ``norm_eps > 0`` gives
    ``sqrt(sum(v**2, -1) + norm_eps)`` (capsflow's ``norm`` with that ``eps``)."""
    if norm_eps:
        return torch.sqrt((v * v).sum(dim=-1) + norm_eps)
    return torch.linalg.vector_norm(v, dim=-1)


def decoder(
    params: Mapping[str, torch.Tensor], v: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Reconstruction MLP on the masked digit capsules.

    v (N,10,16), mask (N,10) -> recon (N,784) in (0,1).
    """
    n = v.shape[0]
    masked = (v * mask[..., None]).reshape(n, NUM_CLASSES * DIGIT_DIM)
    h = F.relu(masked @ params["fc1.w"] + params["fc1.b"])
    h = F.relu(h @ params["fc2.w"] + params["fc2.b"])
    return torch.sigmoid(h @ params["fc3.w"] + params["fc3.b"])


def margin_loss(
    lengths: torch.Tensor,
    y: torch.Tensor,
    m_plus: float = 0.9,
    m_minus: float = 0.1,
    lambda_: float = 0.5,
) -> torch.Tensor:
    """Per-sample margin loss: lengths (N,10), y (N,10) -> (N,)."""
    present = y * F.relu(m_plus - lengths) ** 2
    absent = lambda_ * (1.0 - y) * F.relu(lengths - m_minus) ** 2
    return (present + absent).sum(dim=1)


# --------------------------------------------------------------------------
# Whole network
# --------------------------------------------------------------------------
def forward(
    params: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    y: Optional[torch.Tensor] = None,
    *,
    routing_iters: int = 3,
    squash_eps: float = 0.0,
    norm_eps: float = 0.0,
    m_plus: float = 0.9,
    m_minus: float = 0.1,
    lambda_: float = 0.5,
    recon_weight: float = 0.0005,
) -> dict[str, torch.Tensor]:
    """CapsNet forward pass (and loss when labels are given).

    Args:
        params: name -> tensor, names/shapes as in ``PARAM_SHAPES``.
        x: (N, 1, 28, 28) images in [0, 1].
        y: (N, 10) one-hot float labels, or None.  When given they select
            the capsule fed to the decoder and the loss is computed;
            otherwise the longest capsule is used (no gradient through the
            mask either way).

    Returns:
        dict with ``"lengths"`` (N,10), ``"recon"`` (N,784), ``"v"``
        (N,10,16) and, when ``y`` is given, the scalar ``"loss"``.
    """
    n = x.shape[0]
    u = primary_capsules(params, x, squash_eps)
    u_hat = prediction_vectors(params["digit.W"], u)
    v, _, _ = dynamic_routing(u_hat, routing_iters, squash_eps)
    lengths = capsule_lengths(v, norm_eps)

    if y is not None:
        mask = y.detach()
    else:
        # argmax picks the first maximum on ties, like numpy.argmax.
        mask = F.one_hot(lengths.detach().argmax(dim=1), NUM_CLASSES).to(v.dtype)
    recon = decoder(params, v, mask)

    out = {"lengths": lengths, "recon": recon, "v": v}
    if y is not None:
        margin = margin_loss(lengths, y, m_plus, m_minus, lambda_)
        sse = ((recon - x.reshape(n, -1)) ** 2).sum(dim=1)
        out["loss"] = (margin + recon_weight * sse).mean()
    return out


# --------------------------------------------------------------------------
# NumPy-facing helpers
# --------------------------------------------------------------------------
def _torch_dtype(dtype: DTypeLike) -> torch.dtype:
    """Accept "float64", np.float64, np.dtype(...) or a torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = np.dtype(dtype).name
    try:
        return {"float64": torch.float64, "float32": torch.float32,
                "float16": torch.float16}[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype!r}") from None


def _to_tensor(
    a: ArrayLike, device: Union[str, torch.device], dtype: torch.dtype
) -> torch.Tensor:
    """numpy array or tensor -> tensor on ``device`` with ``dtype``."""
    if isinstance(a, torch.Tensor):
        return a.to(device=device, dtype=dtype)
    return torch.as_tensor(np.asarray(a), dtype=dtype, device=device)


def _check_params(params_np: Mapping[str, Any]) -> None:
    """Fail early with a clear message on a wrong name or shape."""
    missing = set(PARAM_SHAPES) - set(params_np)
    if missing:
        raise KeyError(f"missing parameters: {sorted(missing)}")
    for name, shape in PARAM_SHAPES.items():
        if tuple(params_np[name].shape) != shape:
            raise ValueError(
                f"{name}: expected shape {shape}, got {tuple(params_np[name].shape)}"
            )


def _leaf_params(
    params_np: Mapping[str, ArrayLike],
    device: Union[str, torch.device],
    dtype: torch.dtype,
    requires_grad: bool,
) -> dict[str, torch.Tensor]:
    """Fresh leaf tensors (copies: the caller's arrays are never aliased)."""
    _check_params(params_np)
    return {
        name: _to_tensor(params_np[name], device, dtype)
        .detach()
        .clone()
        .requires_grad_(requires_grad)
        for name in PARAM_SHAPES
    }


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def reference_value_and_grad(
    params_np: Mapping[str, np.ndarray],
    x_np: np.ndarray,
    y_np: np.ndarray,
    device: Union[str, torch.device] = "cpu",
    dtype: DTypeLike = "float64",
    **hp: Any,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Outputs and parameter gradients of the loss, via torch autograd.

    Args:
        params_np: name -> array (``PARAM_SHAPES``).
        x_np: (N,1,28,28) images; y_np: (N,10) one-hot labels.
        device, dtype: where/in what precision torch computes.
        **hp: hyper-parameters of ``forward`` (routing_iters, ...).

    Returns:
        ``(outputs, grads)``: outputs has "loss" (0-d), "lengths" (N,10),
        "recon" (N,784), "v" (N,10,16); grads maps every parameter name to
        d loss / d param (same shape as the parameter).
    """
    if y_np is None:
        raise ValueError("reference_value_and_grad needs labels: the loss uses y")
    tdtype = _torch_dtype(dtype)
    params = _leaf_params(params_np, device, tdtype, requires_grad=True)
    x = _to_tensor(x_np, device, tdtype)
    y = _to_tensor(y_np, device, tdtype)
    out = forward(params, x, y, **hp)
    out["loss"].backward()
    outputs = {k: _to_numpy(t) for k, t in out.items()}
    grads = {name: _to_numpy(p.grad) for name, p in params.items()}
    return outputs, grads


def reference_outputs(
    params_np: Mapping[str, np.ndarray],
    x_np: np.ndarray,
    y_np: Optional[np.ndarray] = None,
    device: Union[str, torch.device] = "cpu",
    dtype: DTypeLike = "float64",
    **hp: Any,
) -> dict[str, np.ndarray]:
    """Forward only (no autograd): same keys as ``forward``, as numpy."""
    tdtype = _torch_dtype(dtype)
    with torch.no_grad():
        params = _leaf_params(params_np, device, tdtype, requires_grad=False)
        x = _to_tensor(x_np, device, tdtype)
        y = None if y_np is None else _to_tensor(y_np, device, tdtype)
        out = forward(params, x, y, **hp)
    return {k: _to_numpy(t) for k, t in out.items()}


def init_params_like_capsnet(
    seed: int, dtype: DTypeLike = np.float32
) -> dict[str, np.ndarray]:
    """Deterministic CapsNet parameters for tests and benchmarks.

    Conv/linear weights and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with
    fan_in = in_channels*kh*kw (conv) or in_features (linear, weights stored
    (in, out)); ``digit.W`` ~ N(0, 0.01**2).  Uses a NumPy Generator so the
    values do not depend on torch's global RNG.
    """
    rng = np.random.default_rng(seed)
    params: dict[str, np.ndarray] = {}
    for name, shape in PARAM_SHAPES.items():
        layer, kind = name.split(".")
        if name == "digit.W":
            arr = rng.normal(0.0, 0.01, size=shape)
        else:
            w_shape = PARAM_SHAPES[f"{layer}.w"]
            # conv weight (out, in, kh, kw); linear weight (in, out).
            fan_in = (
                int(np.prod(w_shape[1:])) if len(w_shape) == 4 else w_shape[0]
            )
            bound = 1.0 / math.sqrt(fan_in)
            arr = rng.uniform(-bound, bound, size=shape)
        params[name] = arr.astype(dtype)
    return params


# --------------------------------------------------------------------------
# Benchmark helper
# --------------------------------------------------------------------------
def _tf32_knobs() -> list[tuple[Any, str, Any, Any]]:
    """(object, attribute, tf32 value, strict fp32 value) for matmul and conv.

    torch >= 2.9 has the ``fp32_precision`` API and refuses to *read* the
    legacy ``allow_tf32`` flags once the new API has been used, so prefer
    the new one when present and fall back to the legacy flags otherwise.
    """
    b = torch.backends
    if hasattr(b.cuda.matmul, "fp32_precision") and hasattr(b.cudnn, "conv"):
        return [
            (b.cuda.matmul, "fp32_precision", "tf32", "ieee"),
            (b.cudnn.conv, "fp32_precision", "tf32", "ieee"),
        ]
    return [
        (b.cuda.matmul, "allow_tf32", True, False),
        (b.cudnn, "allow_tf32", True, False),
    ]


@contextlib.contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
    """Set TF32 for matmul and cuDNN convs inside the block, then restore.

    The flags are process-global; restoring them keeps other users of torch
    (and other tests) unaffected.  "fp32" must switch cuDNN's TF32 *off*
    explicitly, since torch enables it for convolutions by default.
    """
    knobs = _tf32_knobs()
    saved = [getattr(obj, attr) for obj, attr, _, _ in knobs]
    try:
        for obj, attr, on, off in knobs:
            setattr(obj, attr, on if enabled else off)
        yield
    finally:
        for (obj, attr, _, _), value in zip(knobs, saved):
            setattr(obj, attr, value)


class TorchStep:
    """One CapsNet training step in plain PyTorch, for benchmarking.

    Holds the parameters as leaf tensors (``self.params``) and, optionally,
    a ``torch.optim.Adam`` over them.  ``step`` = zero_grad, forward,
    backward, optimizer step.  Without an optimizer the gradients are left
    in ``p.grad`` (reset at every step).

    Args:
        params_np: name -> array (``PARAM_SHAPES``); copied, not aliased.
        device: "cpu", "cuda", "cuda:0", ...
        dtype: compute dtype ("float32", "float64", ...).
        precision: "fp32" (TF32 off) or "tf32" (TF32 matmul/conv on CUDA).
        optimizer: "adam" or None.
        lr: Adam learning rate.
        **hp: hyper-parameters forwarded to ``forward``.
    """

    def __init__(
        self,
        params_np: Mapping[str, ArrayLike],
        device: Union[str, torch.device] = "cpu",
        dtype: DTypeLike = "float32",
        precision: str = "fp32",
        optimizer: Optional[str] = "adam",
        lr: float = 1e-3,
        **hp: Any,
    ) -> None:
        if precision not in ("fp32", "tf32"):
            raise ValueError(f"precision must be 'fp32' or 'tf32', got {precision!r}")
        if optimizer not in ("adam", None):
            raise ValueError(f"optimizer must be 'adam' or None, got {optimizer!r}")
        self.device = torch.device(device)
        self.dtype = _torch_dtype(dtype)
        self.precision = precision
        self.hp = hp
        self.params = _leaf_params(params_np, self.device, self.dtype, requires_grad=True)
        self.optimizer: Optional[torch.optim.Optimizer] = (
            torch.optim.Adam(self.params.values(), lr=lr) if optimizer == "adam" else None
        )

    def _input(self, a: ArrayLike) -> torch.Tensor:
        if isinstance(a, torch.Tensor):
            # non_blocking only matters for pinned host tensors -> CUDA.
            return a.to(device=self.device, dtype=self.dtype, non_blocking=True)
        return torch.as_tensor(np.asarray(a), dtype=self.dtype, device=self.device)

    def step(self, x: ArrayLike, y: ArrayLike) -> torch.Tensor:
        """Run one step on x (N,1,28,28), y (N,10) one-hot.

        Returns the loss as a detached 0-d tensor on ``self.device``
        (not ``.item()``, so no host sync is forced; call ``synchronize``).
        """
        x_t, y_t = self._input(x), self._input(y)
        with _tf32(self.precision == "tf32"):
            if self.optimizer is not None:
                self.optimizer.zero_grad(set_to_none=True)
            else:
                for p in self.params.values():
                    p.grad = None
            loss = forward(self.params, x_t, y_t, **self.hp)["loss"]
            loss.backward()
            if self.optimizer is not None:
                self.optimizer.step()
        return loss.detach()

    def synchronize(self) -> None:
        """Wait for queued CUDA work (no-op on CPU), for honest timings."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def params_numpy(self) -> dict[str, np.ndarray]:
        """Current parameter values as numpy arrays (copies)."""
        return {name: _to_numpy(p).copy() for name, p in self.params.items()}
