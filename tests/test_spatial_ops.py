"""max_pool2d, unfold and dropout (ops/pool.py, ops/regularize.py): values and gradients
against torch in float64, dropout's seeded masks, shape errors, the trainer feeding
``dropout_seed`` (a tiny graph trained through Trainer.fit, resumed exactly), the
recorded step declining such graphs, and the ONNX export. The finite-difference checks
of the three VJPs are cases of capsflow/core/gradcases.py (tests/test_ops_grad.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import capsflow
from capsflow import Options
from capsflow.backends import get_backend
from capsflow.core.gradcheck import apply_op
from capsflow.core.graph import Graph
from capsflow.core.opdef import get_op
from capsflow.errors import SpecError
from capsflow.runners import training
from capsflow.runners.training import (DROPOUT_SEED, Data, TrainConfig, Trainer, dropout_seed,
                                       read_checkpoint)
from capsflow.training.optim import Adam
from capsflow.training.train_step import TrainStep
from capsflow.ops.regularize import seed_value

RNG = np.random.default_rng(11)


def forward_and_vjp(name: str, args: list, attrs: dict, g: np.ndarray | None = None):
    """capsflow's output and input gradient (for cotangent ``g``, random if None)."""
    out, saved, full, _ = apply_op(name, Options(fast_paths=False), args, attrs)
    g = RNG.standard_normal(out.shape) if g is None else g
    needs = tuple(k == 0 for k in range(len(args)))
    grads = get_op(name).vjp_fn(np, saved, g, needs, **full)
    return out, grads[0], g


def torch_value_and_grad(fn, x: np.ndarray, g: np.ndarray):
    t = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    out = fn(t)
    out.backward(torch.tensor(g).reshape(out.shape))
    return out.detach().numpy(), t.grad.numpy()


# -- max_pool2d ---------------------------------------------------------------------------
@pytest.mark.parametrize("shape,attrs", [
    ((2, 3, 8, 8), {"kernel": 2}),
    ((2, 3, 7, 9), {"kernel": 3, "stride": 2, "padding": 1}),   # overlapping, -inf padding
    ((1, 2, 6, 6), {"kernel": 3, "stride": 1}),                 # heavily overlapping
    ((1, 2, 9, 7), {"kernel": 2, "stride": 3}),                 # skips inputs
    ((1, 1, 5, 5), {"kernel": 4, "stride": 1, "padding": 2}),
])
@pytest.mark.parametrize("ties", [False, True], ids=["floats", "ties"])
def test_max_pool2d_matches_torch(shape, attrs, ties):
    x = RNG.standard_normal(shape)
    if ties:   # whole numbers: most windows hold their maximum twice (the first one wins)
        x = np.round(x)
    out, gx, g = forward_and_vjp("max_pool2d", [x], attrs)
    k = attrs["kernel"]
    want, want_g = torch_value_and_grad(
        lambda t: F.max_pool2d(t, k, attrs.get("stride") or k, attrs.get("padding", 0)), x, g)
    np.testing.assert_array_equal(out, want)
    np.testing.assert_allclose(gx, want_g, rtol=1e-12, atol=1e-12)


def test_max_pool2d_stride_null_is_the_kernel():
    x = RNG.standard_normal((1, 1, 6, 6))
    a, *_ = apply_op("max_pool2d", "numpy", [x], {"kernel": 3})
    b, *_ = apply_op("max_pool2d", "numpy", [x], {"kernel": 3, "stride": 3})
    assert a.shape == (1, 1, 2, 2) and np.array_equal(a, b)


# -- unfold -------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,attrs", [
    ((2, 3, 6, 6), {"kernel": 3}),
    ((2, 2, 7, 8), {"kernel": 3, "stride": 2, "padding": 1}),
    ((1, 3, 5, 7), {"kernel": [2, 3], "stride": 1, "padding": 2}),
    ((1, 2, 9, 9), {"kernel": [3, 1], "stride": 3}),
])
def test_unfold_matches_torch(shape, attrs):
    x = RNG.standard_normal(shape)
    out, gx, g = forward_and_vjp("unfold", [x], attrs)
    n, c, oh, ow, kh, kw = out.shape
    # torch: (N, C*kh*kw, OH*OW), channel-major then kernel offsets; ours (N, C, OH, OW, kh, kw)
    as_torch = out.transpose(0, 1, 4, 5, 2, 3).reshape(n, c * kh * kw, oh * ow)
    g_torch = g.transpose(0, 1, 4, 5, 2, 3).reshape(n, c * kh * kw, oh * ow)
    want, want_g = torch_value_and_grad(
        lambda t: F.unfold(t, (kh, kw), padding=attrs.get("padding", 0),
                           stride=attrs.get("stride", 1)), x, g_torch)
    np.testing.assert_array_equal(as_torch, want)
    np.testing.assert_allclose(gx, want_g, rtol=1e-12, atol=1e-12)


def test_unfold_layout_is_the_documented_one():
    x = RNG.standard_normal((1, 2, 5, 5))
    out, *_ = apply_op("unfold", "numpy", [x], {"kernel": 3, "stride": 2, "padding": 1})
    xpad = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    assert out.shape == (1, 2, 3, 3, 3, 3) and out.flags.c_contiguous
    for i, j, a, b in [(0, 0, 0, 0), (1, 2, 2, 1), (2, 1, 0, 2)]:
        assert out[0, 1, i, j, a, b] == xpad[0, 1, 2 * i + a, 2 * j + b]


# -- dropout ------------------------------------------------------------------------------
def dropout(x, seed=None, rate=0.5):
    args = [x] if seed is None else [x, np.asarray(seed, dtype=np.float64)]
    return get_op("dropout").compute(get_backend("numpy"), *args, rate=rate)


def test_dropout_keeps_one_minus_rate_and_scales_them():
    x = np.ones((200, 500))
    for rate in (0.3, 0.75):
        out = dropout(x, 5, rate)
        kept = out != 0
        assert abs(kept.mean() - (1 - rate)) < 0.01
        np.testing.assert_allclose(out[kept], 1 / (1 - rate), rtol=1e-15)
        assert abs(out.mean() - 1) < 0.03       # inverted dropout keeps the expectation
    assert np.array_equal(dropout(x, 5, 0.0), x)


def test_dropout_mask_is_a_function_of_the_seed():
    x = RNG.standard_normal((40, 50))
    assert np.array_equal(dropout(x, 123), dropout(x, 123))
    assert not np.array_equal(dropout(x, 123) != 0, dropout(x, 124) != 0)
    assert np.array_equal(dropout(x, 7.0), dropout(x, np.float32(7)))  # any float dtype
    assert dropout(x) is x                                            # no seed: identity


def test_dropout_gradient_is_the_mask_and_identity_without_a_seed():
    x = RNG.standard_normal((6, 7))
    g = RNG.standard_normal((6, 7))
    out, gx, _ = forward_and_vjp("dropout", [x, np.array(9.0)], {"rate": 0.4}, g)
    np.testing.assert_allclose(gx, g * (out != 0) / 0.6, rtol=1e-15)
    out, gx, _ = forward_and_vjp("dropout", [x], {}, g)
    assert np.array_equal(out, x) and np.array_equal(gx, g)
    assert get_op("dropout").nondiff == ("seed",)


def test_dropout_seed_values():
    assert seed_value(np.float32(2 ** 24)) == 2 ** 24 and seed_value(np.array(-1.0)) == 2 ** 32 - 1
    assert seed_value(np.array([7.9], dtype=np.float32)) == 7
    with pytest.raises(ValueError, match="finite"):
        seed_value(np.array(np.nan))
    seeds = [int(dropout_seed(3, step)) for step in range(50)]
    assert len(set(seeds)) == 50 and all(0 <= s < 2 ** 24 for s in seeds)
    assert int(dropout_seed(3, 7)) == seeds[7] != int(dropout_seed(4, 7))


# -- shape errors -------------------------------------------------------------------------
def compile_text(tmp_path, text: str) -> Graph:
    path = tmp_path / "g.yaml"
    path.write_text(text)
    return capsflow.compile(path)


def one_node(op: str, attrs: str, shape: str = "[N, 2, 6, 6]", extra_in: str = "",
             extra_inputs: str = "") -> str:
    return (f"name: g\ninputs:\n  x: {{shape: {shape}}}\n{extra_inputs}"
            f"nodes:\n  - {{id: out, op: {op}, in: [x{extra_in}], attrs: {attrs}}}\n"
            f"outputs: {{out: out}}\n")


@pytest.mark.parametrize("op,attrs,shape,message", [
    ("max_pool2d", "{kernel: 2}", "[N, 6, 6]", r"max_pool2d needs x \(N, C, H, W\), got \(N, 6, 6\)"),
    ("max_pool2d", "{kernel: 7}", "[N, 2, 6, 6]", "kernel 7x7 is larger than input"),
    ("max_pool2d", "{kernel: 3, padding: 2}", "[N, 2, 6, 6]", "more than half the kernel"),
    ("max_pool2d", "{kernel: 2, stride: 0}", "[N, 2, 6, 6]", "stride must be >= 1"),
    ("max_pool2d", "{kernel: 0}", "[N, 2, 6, 6]", "kernel must be >= 1"),
    ("max_pool2d", "{stride: 2}", "[N, 2, 6, 6]", "needs attribute 'kernel'"),
    ("max_pool2d", "{kernel: 2.5}", "[N, 2, 6, 6]", "attribute 'kernel' must be int"),
    ("max_pool2d", "{kernel: 2}", "[N, 2, M, 6]", "spatial size .* must be known"),
    ("unfold", "{kernel: [2]}", "[N, 2, 6, 6]", r"kernel must be a whole number >= 1 or a list"),
    ("unfold", "{kernel: [2, 0]}", "[N, 2, 6, 6]", "kernel must be"),
    ("unfold", "{kernel: [2, true]}", "[N, 2, 6, 6]", "kernel must be"),
    ("unfold", "{kernel: x}", "[N, 2, 6, 6]", "attribute 'kernel' must be int or list"),
    ("unfold", "{kernel: 3, stride: 0}", "[N, 2, 6, 6]", "stride must be >= 1"),
    ("unfold", "{kernel: 3, padding: -1}", "[N, 2, 6, 6]", "padding must be >= 0"),
    ("unfold", "{kernel: [3, 9]}", "[N, 2, 6, 6]", "kernel 3x9 is larger than input"),
    ("dropout", "{rate: 1}", "[N, 2, 6, 6]", r"rate must lie in \[0, 1\)"),
    ("dropout", "{rate: -0.1}", "[N, 2, 6, 6]", "rate must lie in"),
])
def test_shape_errors_are_one_clear_line(tmp_path, op, attrs, shape, message):
    with pytest.raises(SpecError, match=message) as err:
        compile_text(tmp_path, one_node(op, attrs, shape))
    assert "\n" not in str(err.value)


def test_dropout_seed_must_be_a_scalar(tmp_path):
    text = one_node("dropout", "{rate: 0.5}", extra_in=", s",
                    extra_inputs="  s: {shape: [2], optional: true}\n")
    with pytest.raises(SpecError, match=r"the seed must be one number \(shape \[1\] or \[\]\), "
                                        r"got \(2,\)"):
        compile_text(tmp_path, text)


# -- a tiny graph with dropout, trained -----------------------------------------------------
TINY = """\
name: tiny-dropout
inputs:
  x: {shape: [N, 1, 28, 28]}
  y: {shape: [N, 10], optional: true}
  dropout_seed: {shape: [1], optional: true}
params:
  w: {shape: [81, 10], init: {normal: 0.3}}
  b: {shape: [10], init: zeros}
nodes:
  - {id: pooled, op: max_pool2d, in: [x], attrs: {kernel: 4}}                       # (N, 1, 7, 7)
  - {id: windows, op: unfold, in: [pooled], attrs: {kernel: 3, stride: 2}}          # (N, 1, 3, 3, 3, 3)
  - {id: flat, op: reshape, in: [windows], attrs: {shape: [-1, 81]}}
  - {id: dropped, op: dropout, in: [flat, dropout_seed], attrs: {rate: 0.3}}
  - {id: logits, op: linear, in: [dropped, w, b]}
  - {id: lengths, op: sigmoid, in: [logits]}
  - {id: margin, op: margin_loss, in: [lengths, y]}
  - {id: loss, op: mean, in: [margin]}
outputs: {loss: loss, lengths: lengths}
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("graph") / "tiny.yaml"
    path.write_text(TINY)
    return capsflow.compile(path)


def tiny_data() -> Data:
    rng = np.random.default_rng(0)
    images = rng.random((32, 1, 28, 28), dtype=np.float32)
    labels = rng.integers(0, 10, 32)
    return Data(images[:12], labels[:12], images[12:], labels[12:])


def fit(graph, save_dir, epochs: int, monkeypatch, resume=None, interrupt_at=None) -> tuple:
    """Train ``graph`` on tiny_data (3 steps of 4 per epoch): (trainer, fed seeds, whether
    any forward-only run was given a seed)."""
    fed, run_seeded = [], []
    real_gradients, real_run = TrainStep.gradients, Graph.run

    def gradients(self, inputs):
        if interrupt_at is not None and len(fed) == interrupt_at:
            raise KeyboardInterrupt
        assert inputs[DROPOUT_SEED].shape == (1,)
        fed.append(int(inputs[DROPOUT_SEED][0]))
        return real_gradients(self, inputs)

    def run(self, params, inputs, *args, **kwargs):
        run_seeded.append(DROPOUT_SEED in inputs)
        return real_run(self, params, inputs, *args, **kwargs)

    monkeypatch.setattr(TrainStep, "gradients", gradients)
    monkeypatch.setattr(Graph, "run", run)
    config = TrainConfig(batch_size=4, num_epochs=epochs, seed=5, disp=1, limit_test=8)
    trainer = Trainer(graph, tiny_data(), config, save_dir, log=lambda line: None,
                      progress_bar=False)
    if resume is not None:
        trainer.restore(read_checkpoint(resume))
    trainer.fit()
    monkeypatch.setattr(TrainStep, "gradients", real_gradients)
    monkeypatch.setattr(Graph, "run", real_run)
    return trainer, fed, any(run_seeded)


def test_training_feeds_a_seed_per_step_and_resumes_exactly(tiny, tmp_path, monkeypatch):
    straight, fed, eval_seeded = fit(tiny, tmp_path / "a", 2, monkeypatch)
    assert fed == [int(dropout_seed(5, step)) for step in range(6)]
    assert not eval_seeded                      # validation runs dropout as the identity
    assert straight.state.iteration == 6 and straight.train_step.mode == "eager"
    epochs = [r for r in training.read_metrics(tmp_path / "a" / "metrics.jsonl")
              if r["kind"] == "epoch"]
    assert len(epochs) == 2 and all(np.isfinite(r["train_loss"]) for r in epochs)

    # Interrupted in epoch 2 (before its 2nd step), then resumed: the same masks, bit for bit.
    stopped, fed_b, _ = fit(tiny, tmp_path / "b", 2, monkeypatch, interrupt_at=4)
    assert stopped.stopped_early and fed_b == fed[:4]
    resumed, fed_c, _ = fit(tiny, tmp_path / "b", 2, monkeypatch, resume=tmp_path / "b" / "last.npz")
    assert fed_c == fed[4:]
    for name, value in straight.params.items():
        assert np.array_equal(resumed.params[name], value), name


def test_the_mask_changes_the_step_and_evaluation_is_deterministic(tiny):
    params = tiny.init_params(0, "float64")
    x = np.random.default_rng(1).random((4, 1, 28, 28))
    eval_a = tiny.run(params, {"x": x}, outputs=["lengths"])["lengths"]
    eval_b = tiny.run(params, {"x": x, DROPOUT_SEED: None}, outputs=["lengths"])["lengths"]
    assert np.array_equal(eval_a, eval_b)
    seeded = [tiny.run(params, {"x": x, DROPOUT_SEED: dropout_seed(0, k).reshape(1)},
                       outputs=["lengths"])["lengths"] for k in (0, 0, 1)]
    assert np.array_equal(seeded[0], seeded[1])
    assert not np.array_equal(seeded[0], seeded[2]) and not np.array_equal(seeded[0], eval_a)


def test_a_recorded_step_declines_graphs_that_draw_masks(tiny, tmp_path):
    params = tiny.init_params(0, "float64")
    opt = Adam(1e-3)
    step = TrainStep(tiny, params, opt, opt.init_state(params), simulate=True)
    assert not step.replay_wanted
    rng = np.random.default_rng(2)
    for k in range(3):
        batch = {"x": rng.random((4, 1, 28, 28)), "y": np.eye(10)[rng.integers(0, 10, 4)],
                 DROPOUT_SEED: dropout_seed(0, k).reshape(1)}
        out = step.gradients(batch)
        step.update()
        assert np.isfinite(float(out["loss"]))
    assert step.mode == "eager"
    # the same graph with dropout's seed input left out records as any other
    plain = compile_text(tmp_path, TINY.replace("in: [flat, dropout_seed]", "in: [flat]"))
    p = plain.init_params(0, "float64")
    assert TrainStep(plain, p, opt, opt.init_state(p), simulate=True).replay_wanted


# -- ONNX ---------------------------------------------------------------------------------
EXPORTED = """\
name: spatial
inputs:
  x: {shape: [N, 2, 9, 8]}
  dropout_seed: {shape: [1], optional: true}
nodes:
  - {id: pool, op: max_pool2d, in: [x], attrs: {kernel: 3, stride: 2, padding: 1}}   # (N, 2, 5, 4)
  - {id: pool2, op: max_pool2d, in: [x], attrs: {kernel: 2}}                          # (N, 2, 4, 4)
  - {id: win, op: unfold, in: [pool], attrs: {kernel: [2, 3], padding: 1}}           # (N, 2, 6, 4, 2, 3)
  - {id: win2, op: unfold, in: [x], attrs: {kernel: 3, stride: 2}}                    # (N, 2, 4, 3, 3, 3)
  - {id: drop, op: dropout, in: [win, dropout_seed], attrs: {rate: 0.5}}
outputs: {drop: drop, pool2: pool2, win2: win2}
"""


def test_onnx_export_matches_inference(tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from capsflow.export.onnx import export_model
    graph = compile_text(tmp_path, EXPORTED)
    model = export_model(graph, {})
    assert [i.name for i in model.graph.input] == ["x"]      # exported in evaluation mode
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for n in (1, 3):
        x = np.random.default_rng(n).standard_normal((n, 2, 9, 8)).astype(np.float32)
        want = graph.run({}, {"x": x})
        got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"x": x})))
        for name, value in want.items():
            np.testing.assert_array_equal(got[name], value, err_msg=name)
