"""The default CapsNet (graphs/capsnet.yaml) computes the paper's formulas exactly:
squash(s) = |s|^2 / (1 + |s|^2) * s / |s| and class scores |v|, with no eps anywhere.

At initialisation |v| is only 1e-4 to 6e-4, so an eps of 1e-7 under a square root is not
a rounding detail: sqrt(|v|^2 + 1e-7) is up to ~3x |v| there, and it scaled the margin
loss's gradient by 0.3-0.7. Everything below is checked in float64 against formulas
computed independently in PyTorch autograd (not capsflow.runners.torch_ref), to
round-off; and the old behaviour stays reachable through the eps options.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import capsflow  # noqa: E402
from conftest import CAPSNET  # noqa: E402

N = 4
LABELS = [0, 3, 7, 9]


def _probe(tmp_path, extra: str = "", name: str = "probe"):
    """capsnet.yaml with the capsules before and after each squash as outputs."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"extends: {CAPSNET}\n{extra}outputs:\n  primary_caps: primary_caps\n"
                    "  u: u\n  s: routing/s\n  u_hat: u_hat\n")
    return capsflow.compile(path)


def _mnist_like(n: int, seed: int = 0) -> np.ndarray:
    """Dark images with eight bright strokes each: mostly exact zeros, about 15% of the
    pixels lit and a mean of 0.12, as MNIST's (17%, 0.12)."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 1, 28, 28))
    for k in range(n):
        for _ in range(8):
            r, c = rng.integers(4, 20, 2)
            long, value = rng.integers(4, 10), rng.uniform(0.5, 1.0)
            if rng.random() < 0.5:
                x[k, 0, r:r + long, c:c + 3] = value
            else:
                x[k, 0, r:r + 3, c:c + long] = value
    return x


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    graph = _probe(tmp_path_factory.mktemp("paper"))
    params = graph.init_params(seed=0, dtype="float64")
    batch = {"x": _mnist_like(N), "y": np.eye(10)[LABELS]}
    outputs, grads = graph.value_and_grad(params, batch)
    return graph, params, batch, outputs, grads


# -- independent formulas, in torch float64 --------------------------------------------
def squash(s):
    """The paper's Eq. 1, as written."""
    n2 = (s * s).sum(-1, keepdim=True)
    return n2 / (1 + n2) * s / torch.sqrt(n2)


def lengths_of(v):
    return torch.sqrt((v * v).sum(-1))


def margin(lengths, y):
    """The paper's Eq. 4: m+ = 0.9, m- = 0.1, lambda = 0.5, summed over classes."""
    return (y * torch.clamp(0.9 - lengths, min=0) ** 2
            + 0.5 * (1 - y) * torch.clamp(lengths - 0.1, min=0) ** 2).sum(-1)


def capsnet_loss(p, x, y):
    """CapsNet as the paper describes it, written here from scratch: (loss, lengths, v)."""
    n = x.shape[0]
    h = F.relu(F.conv2d(x, p["conv1.w"], p["conv1.b"]))
    grid = F.conv2d(h, p["primary.w"], p["primary.b"], stride=2)
    u = squash(grid.reshape(n, 8, 1152).transpose(1, 2))       # channel d*32 + t: dimension d
    u_hat = torch.einsum("ijdk,nik->nijd", p["digit.W"], u)
    b = torch.zeros(n, 1152, 10, dtype=x.dtype)
    for it in range(3):
        c = torch.softmax(b, dim=2)
        v = squash((c[..., None] * u_hat).sum(1))
        if it < 2:
            b = b + (u_hat * v[:, None]).sum(-1)
    lengths = lengths_of(v)
    h = (v * y[..., None]).reshape(n, 160)
    for k in (1, 2):
        h = F.relu(h @ p[f"fc{k}.w"] + p[f"fc{k}.b"])
    recon = torch.sigmoid(h @ p["fc3.w"] + p["fc3.b"])
    sse = ((recon - x.reshape(n, 784)) ** 2).sum(-1)
    return (margin(lengths, y) + 0.0005 * sse).mean(), lengths, v


def t64(a):
    return torch.as_tensor(np.asarray(a), dtype=torch.float64)


def rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# -- the checks --------------------------------------------------------------------------
def test_lengths_are_exactly_the_capsule_lengths(setup):
    _, _, _, out, _ = setup
    v = out["digitcaps"]
    want = lengths_of(t64(v)).numpy()
    np.testing.assert_allclose(out["lengths"], want, rtol=1e-12, atol=0)
    # at initialisation the capsules are short: where an eps of 1e-7 would not be small
    assert 1e-6 < out["lengths"].min() and out["lengths"].max() < 2e-3
    old = np.sqrt((v * v).sum(-1) + 1e-7)
    assert (old / out["lengths"]).min() > 1.1


def test_squash_is_the_papers_formula(setup):
    _, _, _, out, _ = setup
    for before, after in (("primary_caps", "u"), ("s", "digitcaps")):
        want = squash(t64(out[before])).numpy()
        np.testing.assert_allclose(out[after], want, rtol=1e-12, atol=0, err_msg=after)


def test_loss_lengths_and_digit_W_gradient_match_torch_autograd(setup):
    _, params, batch, out, grads = setup
    p = {k: t64(a).requires_grad_(k == "digit.W") for k, a in params.items()}
    x, y = t64(batch["x"]), t64(batch["y"])
    loss, lengths, v = capsnet_loss(p, x, y)
    loss.backward()
    np.testing.assert_allclose(out["lengths"], lengths.detach().numpy(), rtol=1e-12, atol=0)
    np.testing.assert_allclose(out["digitcaps"], v.detach().numpy(), rtol=1e-11, atol=1e-20)
    assert abs(float(out["loss"]) - loss.item()) <= 1e-13 * loss.item()
    per_example = margin(lengths, y).detach().numpy()
    np.testing.assert_allclose(per_example, margin(t64(out["lengths"]), y).numpy(), rtol=1e-12)
    assert rel(grads["digit.W"], p["digit.W"].grad.numpy()) < 1e-11


def test_the_margin_gradient_is_not_scaled_by_an_eps(setup):
    """d margin / d lengths is the paper's; through |v| it reaches v as v / |v|, which the
    old sqrt(|v|^2 + eps) shrank to v / sqrt(|v|^2 + eps) (by 0.3-0.7 at initialisation).
    The engine's norm VJP is torch's."""
    from capsflow.core.gradcheck import apply_op
    from capsflow.core.opdef import get_op
    _, _, batch, out, _ = setup
    y = t64(batch["y"])

    def margin_grad(length):
        v = t64(out["digitcaps"]).requires_grad_(True)
        margin(length(v), y).sum().backward()
        return v.grad.numpy()

    exact = margin_grad(lengths_of)
    old = margin_grad(lambda v: torch.sqrt((v * v).sum(-1) + 1e-7))
    present = batch["y"] == 1            # the absent classes' lengths are under m- = 0.1
    assert not exact[~present].any()
    shrink = np.linalg.norm(old[present], axis=-1) / np.linalg.norm(exact[present], axis=-1)
    assert shrink.max() < 0.8                                   # what the eps did
    lengths, saved, attrs, _ = apply_op("norm", "numpy", [out["digitcaps"]], {"axis": -1})
    g = np.random.default_rng(0).standard_normal((N, 10))
    (gv,) = get_op("norm").vjp_fn(np, saved, g, (True,), **attrs)
    v = t64(out["digitcaps"]).requires_grad_(True)
    (lengths_of(v) * t64(g)).sum().backward()
    np.testing.assert_allclose(gv, v.grad.numpy(), rtol=1e-12)
    np.testing.assert_allclose(lengths, out["lengths"], rtol=0, atol=0)


def test_torch_reference_defaults_to_the_same_formulas(setup):
    """capsflow.runners.torch_ref, which the parity tests use, agrees to round-off."""
    from capsflow.runners.torch_ref import reference_value_and_grad
    _, params, batch, out, grads = setup
    ref_out, ref_grads = reference_value_and_grad(params, batch["x"], batch["y"])
    np.testing.assert_allclose(out["lengths"], ref_out["lengths"], rtol=1e-12, atol=0)
    assert rel(grads["digit.W"], ref_grads["digit.W"]) < 1e-11
    assert rel(grads["conv1.w"], ref_grads["conv1.w"]) < 1e-10


def test_the_old_eps_is_still_reachable(tmp_path, setup):
    """--set squash_eps=1.0e-7 and the norm's eps attribute give the old formulas."""
    from capsflow.runners.torch_ref import reference_value_and_grad
    _, params, batch, new, _ = setup
    replace = ("replace:\n  lengths: {id: lengths, op: norm, in: [routing/v], "
               "attrs: {axis: -1, eps: 1.0e-7}}\n")
    path = tmp_path / "old.yaml"
    path.write_text(f"extends: {CAPSNET}\n{replace}outputs:\n  primary_caps: primary_caps\n"
                    "  u: u\n  s: routing/s\n")
    graph = capsflow.compile(path, {"squash_eps": 1.0e-7})
    assert graph.dag.nodes["u"]["attrs"]["eps"] == 1e-7
    assert graph.dag.nodes["lengths"]["attrs"]["eps"] == 1e-7
    out, grads = graph.value_and_grad(params, batch)
    for before, after in (("primary_caps", "u"), ("s", "digitcaps")):
        s = out[before]
        n2 = (s * s).sum(-1, keepdims=True)
        np.testing.assert_allclose(out[after], n2 / (1 + n2) * s / np.sqrt(n2 + 1e-7),
                                   rtol=1e-12, err_msg=after)
    v = out["digitcaps"]
    np.testing.assert_allclose(out["lengths"], np.sqrt((v * v).sum(-1) + 1e-7), rtol=1e-12)
    assert (out["lengths"] / new["lengths"]).min() > 1.1       # it does change the scores
    ref_out, ref_grads = reference_value_and_grad(params, batch["x"], batch["y"],
                                                  squash_eps=1e-7, norm_eps=1e-7)
    np.testing.assert_allclose(out["lengths"], ref_out["lengths"], rtol=1e-12)
    assert rel(grads["digit.W"], ref_grads["digit.W"]) < 1e-11


TINY = """\
name: tiny
inputs: {x: {shape: [N, 3, 8]}}
nodes:
  - {id: v, op: squash, in: [x]}
  - {id: lengths, op: norm, in: [v]}
  - {id: v_eps, op: squash, in: [x], attrs: {eps: 1.0e-7}}
  - {id: lengths_eps, op: norm, in: [v_eps], attrs: {eps: 1.0e-7}}
outputs: {v: v, lengths: lengths, v_eps: v_eps, lengths_eps: lengths_eps}
"""


def test_onnx_export_computes_the_same_formulas(tmp_path):
    """The exported squash and norm are the paper's, with no eps node, unless eps is set;
    onnxruntime agrees with capsflow on short capsules and an exact zero capsule."""
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from capsflow.export.onnx import export_model
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    graph = capsflow.compile(path)
    model = export_model(graph, {})
    consts = {t.name for t in model.graph.initializer}
    assert {c for c in consts if c.endswith("/eps")} == {"v_eps/eps", "lengths_eps/eps"}
    x = np.random.default_rng(0).standard_normal((2, 3, 8)).astype(np.float32) * 1e-3
    x[1, 1] = 0
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"x": x})))
    want = graph.run({}, {"x": x})
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-12, err_msg=name)
    assert not got["v"][1, 1].any() and got["lengths"][1, 1] == 0
    n = np.linalg.norm(x.astype(np.float64), axis=-1)
    np.testing.assert_allclose(got["lengths"], n * n / (1 + n * n), rtol=1e-5)
