"""Tests for the PyTorch CapsNet reference (``capsflow.runners.torch_ref``).

The reference is what capsflow's engine is checked against, so these tests
pin down its own conventions (parameter layout, capsule layout, routing,
masking, loss) independently of capsflow, and check torch autograd's
gradients with directional finite differences.  Everything runs on a tiny
batch in float64 on the CPU (a few seconds on 2 cores).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from capsflow.runners import torch_ref as tr  # noqa: E402

N = 2
LABELS = [3, 7]


def _squash_np(s: np.ndarray, eps: float = 0.0) -> np.ndarray:
    """Independent NumPy squash over the last axis: the paper's n2 / (1 + n2) s / |s|,
    or with ``eps`` the old sqrt(n2 + eps) in place of |s|."""
    n2 = (s * s).sum(-1, keepdims=True)
    return n2 / (1 + n2) * s / np.sqrt(n2 + eps)


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def _tensors(params_np: dict) -> dict:
    return {k: torch.as_tensor(v) for k, v in params_np.items()}


@pytest.fixture(scope="module")
def params64() -> dict:
    """Standard init (digit.W std 0.01): routing barely moves c."""
    return tr.init_params_like_capsnet(0, np.float64)


@pytest.fixture(scope="module")
def routed64(params64) -> dict:
    """digit.W scaled to std 0.3: coupling visibly non-uniform and lengths
    spread over (0.1, 0.9), so both margin branches and the routing
    gradient path are exercised."""
    p = dict(params64)
    p["digit.W"] = params64["digit.W"] * 30.0
    return p


@pytest.fixture(scope="module")
def batch() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1234)
    x = rng.uniform(0.0, 1.0, size=(N, 1, 28, 28))
    y = np.eye(10)[LABELS]
    return x, y


@pytest.fixture(scope="module")
def value_and_grad(routed64, batch):
    x, y = batch
    return tr.reference_value_and_grad(routed64, x, y)


# --------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------
def test_param_shapes_and_count():
    p = tr.init_params_like_capsnet(0)
    assert list(p) == list(tr.PARAM_SHAPES)
    for name, shape in tr.PARAM_SHAPES.items():
        assert p[name].shape == shape
        assert p[name].dtype == np.float32
    assert sum(a.size for a in p.values()) == 8_215_568
    assert sum(a.size for k, a in p.items() if not k.startswith("fc")) == 6_804_224


def test_init_deterministic_and_scaled():
    a = tr.init_params_like_capsnet(7, np.float64)
    b = tr.init_params_like_capsnet(7, np.float64)
    c = tr.init_params_like_capsnet(8, np.float64)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["conv1.w"], c["conv1.w"])
    fan_in = {"conv1": 81, "primary": 256 * 81, "fc1": 160, "fc2": 512, "fc3": 1024}
    for layer, fan in fan_in.items():
        bound = 1.0 / np.sqrt(fan)
        for kind in ("w", "b"):
            arr = a[f"{layer}.{kind}"]
            assert np.abs(arr).max() <= bound
            assert np.abs(arr).max() > 0.9 * bound  # really uses the range
    assert abs(a["digit.W"].std() - 0.01) < 2e-4
    assert abs(a["digit.W"].mean()) < 1e-4


def test_bad_params_rejected(params64, batch):
    x, y = batch
    bad = dict(params64)
    bad["fc1.w"] = bad["fc1.w"].T  # (out, in) instead of (in, out)
    with pytest.raises(ValueError, match="fc1.w"):
        tr.reference_outputs(bad, x, y)
    missing = {k: v for k, v in params64.items() if k != "digit.W"}
    with pytest.raises(KeyError, match="digit.W"):
        tr.reference_outputs(missing, x, y)
    with pytest.raises(TypeError):
        tr.reference_outputs(params64, x, y, routing_iter=2)  # typo
    with pytest.raises(ValueError, match="labels"):
        tr.reference_value_and_grad(params64, x, None)


# --------------------------------------------------------------------------
# Forward conventions
# --------------------------------------------------------------------------
def test_output_shapes_and_ranges(params64):
    x = np.random.default_rng(0).uniform(size=(3, 1, 28, 28)).astype(np.float32)
    out = tr.reference_outputs(tr.init_params_like_capsnet(0), x, dtype="float32")
    assert set(out) == {"lengths", "recon", "v"}  # no labels -> no loss
    assert out["lengths"].shape == (3, 10)
    assert out["recon"].shape == (3, 784)
    assert out["v"].shape == (3, 10, 16)
    assert all(a.dtype == np.float32 for a in out.values())
    for p in (params64, dict(params64, **{"digit.W": params64["digit.W"] * 100})):
        out = tr.reference_outputs(p, x.astype(np.float64))
        assert np.all((out["lengths"] > 0) & (out["lengths"] < 1))
        assert np.all((out["recon"] > 0) & (out["recon"] < 1))


def test_loss_finite_positive(params64, routed64, batch):
    x, y = batch
    for p in (params64, routed64):
        loss = tr.reference_outputs(p, x, y)["loss"]
        assert loss.shape == ()
        assert np.isfinite(loss) and loss > 0


def test_primary_capsule_layout(params64, batch):
    """channel = d*32 + t; capsule i = t*36 + row*6 + col."""
    x, _ = batch
    P = _tensors(params64)
    xt = torch.as_tensor(x)
    with torch.no_grad():
        h1 = torch.relu(torch.nn.functional.conv2d(xt, P["conv1.w"], P["conv1.b"]))
        p = torch.nn.functional.conv2d(h1, P["primary.w"], P["primary.b"], stride=2)
        u = tr.primary_capsules(P, xt).numpy()
    p = p.numpy()
    assert p.shape == (N, 256, 6, 6)
    raw = np.empty((N, 1152, 8))
    for t in range(32):
        for r in range(6):
            for c in range(6):
                for d in range(8):
                    raw[:, t * 36 + r * 6 + c, d] = p[:, d * 32 + t, r, c]
    assert _rel_err(u, _squash_np(raw)) < 1e-13


def test_prediction_vectors(routed64, batch):
    x, _ = batch
    P = _tensors(routed64)
    with torch.no_grad():
        u = tr.primary_capsules(P, torch.as_tensor(x))
        u_hat = tr.prediction_vectors(P["digit.W"], u).numpy()
    u, W = u.numpy(), routed64["digit.W"]
    assert u_hat.shape == (N, 1152, 10, 16)
    for n, i, j in [(0, 0, 0), (1, 1151, 9), (0, 577, 4)]:
        np.testing.assert_allclose(u_hat[n, i, j], W[i, j] @ u[n, i], rtol=1e-12)


def test_single_routing_iteration_is_uniform(routed64, batch):
    x, y = batch
    P = _tensors(routed64)
    with torch.no_grad():
        u_hat = tr.prediction_vectors(
            P["digit.W"], tr.primary_capsules(P, torch.as_tensor(x))
        )
        _, _, c = tr.dynamic_routing(u_hat, routing_iters=1)
        out = tr.forward(P, torch.as_tensor(x), torch.as_tensor(y), routing_iters=1)
    assert torch.all(c == 0.1)
    expected = _squash_np(u_hat.numpy().sum(axis=1) / 10.0)
    assert _rel_err(out["v"].numpy(), expected) < 1e-12


def test_routing_iterations_matter(routed64, batch):
    x, _ = batch
    P = _tensors(routed64)
    with torch.no_grad():
        u_hat = tr.prediction_vectors(
            P["digit.W"], tr.primary_capsules(P, torch.as_tensor(x))
        )
        v3, s3, c3 = tr.dynamic_routing(u_hat, routing_iters=3)
        v1, _, _ = tr.dynamic_routing(u_hat, routing_iters=1)
    np.testing.assert_allclose(c3.sum(dim=2).numpy(), 1.0, rtol=1e-14)
    assert float(c3.max() - c3.min()) > 0.01  # agreement moved the coupling
    assert _rel_err(v3.numpy(), v1.numpy()) > 1e-3
    assert torch.allclose(v3, tr.squash(s3))
    with pytest.raises(ValueError):
        tr.dynamic_routing(u_hat, routing_iters=0)


def test_mask_label_vs_argmax(routed64, batch):
    x, y = batch
    P = _tensors(routed64)
    xt = torch.as_tensor(x)
    with torch.no_grad():
        free = tr.forward(P, xt)
        pred = free["lengths"].argmax(dim=1)
        same = tr.forward(P, xt, torch.eye(10, dtype=xt.dtype)[pred])
        other = tr.forward(P, xt, torch.eye(10, dtype=xt.dtype)[(pred + 1) % 10])
        # the decoder sees only the selected capsule
        mask = torch.eye(10, dtype=xt.dtype)[pred]
        manual = tr.decoder(P, free["v"], mask)
    assert torch.equal(free["recon"], same["recon"])
    assert torch.equal(free["recon"], manual)
    assert not torch.allclose(free["recon"], other["recon"])
    # labels only change the decoder input, never the capsules
    assert torch.equal(free["v"], other["v"])
    assert torch.equal(free["lengths"], other["lengths"])


def test_loss_formula(routed64, batch):
    """Recompute the loss in NumPy from the returned lengths and recon."""
    x, y = batch
    hp = dict(m_plus=0.8, m_minus=0.2, lambda_=0.25, recon_weight=0.01)
    out = tr.reference_outputs(routed64, x, y, **hp)
    L = out["lengths"]
    margin = (y * np.maximum(0.8 - L, 0) ** 2
              + 0.25 * (1 - y) * np.maximum(L - 0.2, 0) ** 2).sum(1)
    sse = ((out["recon"] - x.reshape(N, 784)) ** 2).sum(1)
    assert abs(out["loss"] - np.mean(margin + 0.01 * sse)) < 1e-13
    # both margin branches are active in this configuration
    assert np.any((y == 1) & (L < 0.8)) and np.any((y == 0) & (L > 0.2))
    v = out["v"]
    np.testing.assert_allclose(L, np.sqrt((v * v).sum(-1)), rtol=1e-14)   # the paper's |v|


def test_eps_options_give_the_old_formulas(routed64, batch):
    """squash_eps and norm_eps put an eps under the square roots, as capsflow's squash and
    norm ``eps`` attributes do; by default there is none."""
    x, y = batch
    s = torch.as_tensor(np.random.default_rng(5).standard_normal((3, 10, 16)))
    for eps in (0.0, 1e-7, 1e-2):
        assert _rel_err(tr.squash(s, eps=eps).numpy(), _squash_np(s.numpy(), eps)) < 1e-14
    v = tr.squash(s).numpy()
    np.testing.assert_allclose(tr.capsule_lengths(torch.as_tensor(v)).numpy(),
                               np.linalg.norm(v, axis=-1), rtol=1e-14)
    np.testing.assert_allclose(tr.capsule_lengths(torch.as_tensor(v), norm_eps=1e-7).numpy(),
                               np.sqrt((v * v).sum(-1) + 1e-7), rtol=1e-14)
    old = tr.reference_outputs(routed64, x, y, squash_eps=1e-7, norm_eps=1e-7)
    new = tr.reference_outputs(routed64, x, y)
    np.testing.assert_allclose(old["lengths"], np.sqrt((old["v"] ** 2).sum(-1) + 1e-7),
                               rtol=1e-14)
    assert _rel_err(old["v"], new["v"]) > 1e-9   # the eps changes the capsules


def test_squash_and_lengths_are_finite_at_zero():
    """At s = 0 squash is 0 with gradient 0, and |v|'s gradient is 0 (torch's norm)."""
    s = torch.zeros(2, 16, dtype=torch.float64, requires_grad=True)
    v = tr.squash(s)
    g = torch.autograd.grad(v.sum() + tr.capsule_lengths(v).sum(), s)[0]
    assert torch.equal(v, torch.zeros_like(v)) and torch.equal(g, torch.zeros_like(g))


# --------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------
def test_value_and_grad_contents(routed64, batch, value_and_grad):
    x, y = batch
    outputs, grads = value_and_grad
    assert set(outputs) == {"loss", "lengths", "recon", "v"}
    assert set(grads) == set(tr.PARAM_SHAPES)
    for name, g in grads.items():
        assert g.shape == tr.PARAM_SHAPES[name] and g.dtype == np.float64
        assert np.all(np.isfinite(g)) and np.any(g != 0)
    plain = tr.reference_outputs(routed64, x, y)
    for k in outputs:
        np.testing.assert_allclose(outputs[k], plain[k], rtol=1e-13, atol=0)


@pytest.mark.parametrize("name", list(tr.PARAM_SHAPES))
def test_directional_finite_difference(name, routed64, batch, value_and_grad, monkeypatch):
    """Central difference along one random direction vs. <grad, direction>.

    The loss is piecewise smooth (ReLUs in conv1, the decoder and the
    margin).  A central difference across a kink is off by ~1e-4, which
    says nothing about the gradient, so every ReLU's on/off pattern is
    recorded at p - h*d, p and p + h*d and a direction along which none
    flips is used (the first of a few seeded draws).
    """
    x, y = batch
    _, grads = value_and_grad
    p0 = routed64[name]
    # 1e-6 (times the parameter's rms) balances truncation and round-off;
    # the decoder's gradients are ~1e-5 (recon_weight), so it needs more.
    h = 1e-4 if name.startswith("fc") else 1e-6

    signs: list = []
    relu = torch.nn.functional.relu

    def recording_relu(t, *args, **kwargs):
        signs.append((t > 0).flatten())
        return relu(t, *args, **kwargs)

    monkeypatch.setattr(tr.F, "relu", recording_relu)

    def loss_and_pattern(step: np.ndarray):
        signs.clear()
        out = tr.reference_outputs(dict(routed64, **{name: p0 + step}), x, y)
        return float(out["loss"]), torch.cat(signs)

    _, pattern0 = loss_and_pattern(np.zeros_like(p0))
    for seed in range(10):
        rng = np.random.default_rng([list(tr.PARAM_SHAPES).index(name), seed])
        d = rng.standard_normal(p0.shape) * np.sqrt(np.mean(p0 ** 2))
        plus, pattern_p = loss_and_pattern(h * d)
        minus, pattern_m = loss_and_pattern(-h * d)
        if torch.equal(pattern_p, pattern0) and torch.equal(pattern_m, pattern0):
            break
    else:
        pytest.fail("every direction crossed a ReLU kink")

    fd = (plus - minus) / (2 * h)
    analytic = float(np.sum(grads[name] * d))
    # kink-free, the error is truncation + round-off: ~1e-8 for the encoder,
    # ~2e-7 for the decoder (its tiny gradients sit under an O(1) loss).
    rtol = 1e-5 if name.startswith("fc") else 1e-6
    assert abs(fd - analytic) <= rtol * abs(analytic), (seed, fd, analytic)


def test_routing_gradient_is_not_detached(routed64, batch, value_and_grad):
    """Gradients flow through the agreement updates of b: detaching them
    must change d loss / d digit.W noticeably."""
    x, y = batch
    _, grads = value_and_grad
    P = {k: torch.tensor(v, requires_grad=(k == "digit.W")) for k, v in routed64.items()}
    u_hat = tr.prediction_vectors(P["digit.W"], tr.primary_capsules(P, torch.as_tensor(x)))
    b = torch.zeros(u_hat.shape[:3], dtype=u_hat.dtype)
    for r in range(3):
        c = torch.softmax(b, dim=2)
        v = tr.squash((c[..., None] * u_hat).sum(1))
        if r < 2:
            b = b + torch.einsum("nijd,njd->nij", u_hat, v).detach()
    L = tr.capsule_lengths(v)
    yt = torch.as_tensor(y)
    recon = tr.decoder(P, v, yt)
    sse = ((recon - torch.as_tensor(x).reshape(N, 784)) ** 2).sum(1)
    (tr.margin_loss(L, yt) + 0.0005 * sse).mean().backward()
    assert _rel_err(P["digit.W"].grad.numpy(), grads["digit.W"]) > 1e-3


# --------------------------------------------------------------------------
# Benchmark helper
# --------------------------------------------------------------------------
def test_torch_step_without_optimizer_matches_reference(routed64, batch, value_and_grad):
    x, y = batch
    outputs, grads = value_and_grad
    step = tr.TorchStep(routed64, device="cpu", dtype="float64", optimizer=None)
    for _ in range(2):  # grads are reset, not accumulated
        loss = step.step(x, y)
    step.synchronize()
    assert abs(float(loss) - float(outputs["loss"])) < 1e-14
    for name, p in step.params.items():
        assert _rel_err(p.grad.numpy(), grads[name]) < 1e-12
    # the caller's arrays are copied, not aliased
    step.params["conv1.b"].data.add_(1.0)
    assert not np.array_equal(step.params_numpy()["conv1.b"], routed64["conv1.b"])


def test_torch_step_adam_reduces_loss(batch):
    x, y = batch
    params = tr.init_params_like_capsnet(3)
    step = tr.TorchStep(params, device="cpu", dtype="float32", precision="tf32",
                        optimizer="adam", lr=1e-3)
    losses = [float(step.step(torch.as_tensor(x), y)) for _ in range(3)]
    assert all(np.isfinite(losses))
    assert max(losses[1:]) < losses[0]
    new = step.params_numpy()
    assert new["conv1.w"].dtype == np.float32
    assert not np.array_equal(new["fc3.b"], params["fc3.b"])


def test_torch_step_validates_arguments(params64):
    with pytest.raises(ValueError):
        tr.TorchStep(params64, precision="bf16")
    with pytest.raises(ValueError):
        tr.TorchStep(params64, optimizer="sgd")


def test_tf32_context_restores_global_flags():
    knobs = tr._tf32_knobs()
    before = [getattr(obj, attr) for obj, attr, _, _ in knobs]
    for enabled in (True, False):
        with tr._tf32(enabled):
            for obj, attr, on, off in knobs:
                assert getattr(obj, attr) == (on if enabled else off)
        assert [getattr(obj, attr) for obj, attr, _, _ in knobs] == before


# --------------------------------------------------------------------------
# CUDA (skipped without a GPU)
# --------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(routed64, batch, value_and_grad):
    x, y = batch
    outputs, grads = value_and_grad
    out_gpu, grads_gpu = tr.reference_value_and_grad(routed64, x, y, device="cuda")
    for k in outputs:
        assert _rel_err(out_gpu[k], outputs[k]) < 1e-10, k
    for k in grads:
        assert _rel_err(grads_gpu[k], grads[k]) < 1e-10, k
    for precision in ("fp32", "tf32"):
        step = tr.TorchStep(routed64, device="cuda", dtype="float32", precision=precision)
        loss = step.step(x, y)
        step.synchronize()
        assert loss.device.type == "cuda"
        assert abs(float(loss) - float(outputs["loss"])) < 2e-2 * float(outputs["loss"])
