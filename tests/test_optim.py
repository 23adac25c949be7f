"""Optimizers against torch.optim, state round trips, schedules."""
from __future__ import annotations

import numpy as np
import pytest

from capsflow.training.optim import (
    SGD,
    Adam,
    ExponentialDecay,
    OptimizerError,
    make_optimizer,
    state_from_flat,
    state_to_flat,
)

torch = pytest.importorskip("torch")

SHAPES = {"conv1.w": (4, 1, 3, 3), "conv1.b": (4,), "caps.W": (2, 3, 8, 16), "scale": ()}


def _params(rng: np.random.Generator, dtype=np.float64) -> dict:
    return {k: rng.standard_normal(s).astype(dtype) for k, s in SHAPES.items()}


def _grad_sequence(rng: np.random.Generator, steps: int) -> list:
    return [{k: rng.standard_normal(s) for k, s in SHAPES.items()} for _ in range(steps)]


def _run_ours(opt, params: dict, grads_seq: list, lrs=None) -> tuple:
    state = opt.init_state(params)
    for i, grads in enumerate(grads_seq):
        opt.step(params, grads, state, lr=None if lrs is None else lrs[i])
    return params, state


def _run_torch(make_opt, params: dict, grads_seq: list, lrs=None) -> dict:
    tparams = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True)
               for k, v in params.items()}
    opt = make_opt(list(tparams.values()))
    for i, grads in enumerate(grads_seq):
        if lrs is not None:
            for group in opt.param_groups:
                group["lr"] = lrs[i]
        for k, p in tparams.items():
            p.grad = torch.tensor(grads[k], dtype=torch.float64)
        opt.step()
    return {k: p.detach().numpy() for k, p in tparams.items()}


def _assert_close(ours: dict, ref: dict, rtol: float) -> None:
    for k in ref:
        scale = np.maximum(np.abs(ref[k]), 1e-12)
        rel = np.max(np.abs(ours[k] - ref[k]) / scale)
        assert rel <= rtol, f"{k}: relative error {rel}"


def test_adam_matches_torch():
    rng = np.random.default_rng(0)
    start = _params(rng)
    grads_seq = _grad_sequence(rng, 5)
    ours, state = _run_ours(Adam(lr=0.01), {k: v.copy() for k, v in start.items()}, grads_seq)
    ref = _run_torch(lambda ps: torch.optim.Adam(ps, lr=0.01, foreach=False), start, grads_seq)
    _assert_close(ours, ref, 1e-10)
    assert state["t"] == 5


def test_adam_matches_torch_with_changing_lr_and_betas():
    rng = np.random.default_rng(1)
    start = _params(rng)
    grads_seq = _grad_sequence(rng, 5)
    lrs = [0.01 * 0.9 ** i for i in range(5)]
    opt = Adam(lr=0.01, betas=(0.8, 0.99), eps=1e-6)
    ours, _ = _run_ours(opt, {k: v.copy() for k, v in start.items()}, grads_seq, lrs)
    ref = _run_torch(lambda ps: torch.optim.Adam(ps, lr=0.01, betas=(0.8, 0.99), eps=1e-6),
                     start, grads_seq, lrs)
    _assert_close(ours, ref, 1e-10)


def _run_tf1_formula(params: dict, grads_seq: list, lr: float, b1=0.9, b2=0.999,
                     eps=1e-8) -> dict:
    """TF1's AdamOptimizer (tf.compat.v1.train.AdamOptimizer's documented update):
    lr_t = lr * sqrt(1 - b2^t) / (1 - b1^t); p -= lr_t * m_t / (sqrt(v_t) + eps)."""
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(p) for k, p in params.items()}
    out = {k: p.copy() for k, p in params.items()}
    for t, grads in enumerate(grads_seq, start=1):
        lr_t = lr * np.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        for k, g in grads.items():
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            out[k] = out[k] - lr_t * m[k] / (np.sqrt(v[k]) + eps)
    return out


def test_adam_tf1_matches_tensorflow_ones_update_and_parts_from_torchs_for_small_gradients():
    """Gradients of about 1e-8, where the two forms of epsilon part (docs/training.md)."""
    rng = np.random.default_rng(6)
    start = _params(rng)
    grads_seq = [{k: g * 1e-8 for k, g in grads.items()} for grads in _grad_sequence(rng, 5)]
    ours, state = _run_ours(make_optimizer("adam-tf1", 0.01),
                            {k: v.copy() for k, v in start.items()}, grads_seq)
    _assert_close(ours, _run_tf1_formula(start, grads_seq, 0.01), 1e-12)
    assert state["t"] == 5
    torch_form, _ = _run_ours(Adam(lr=0.01), {k: v.copy() for k, v in start.items()}, grads_seq)
    step_tf = ours["conv1.w"] - start["conv1.w"]
    step_torch = torch_form["conv1.w"] - start["conv1.w"]
    assert np.median(np.abs(step_torch) / np.abs(step_tf)) > 5


def test_adam_forms_agree_for_large_gradients():
    """Gradients of 0.1 and more: epsilon (1e-8, or 3e-7 at TF's first step) is noise."""
    rng = np.random.default_rng(7)
    start = _params(rng)
    grads_seq = [{k: np.sign(g) * (0.1 + np.abs(g)) for k, g in grads.items()}
                 for grads in _grad_sequence(rng, 5)]
    tf1, _ = _run_ours(make_optimizer("adam-tf1", 0.01),
                       {k: v.copy() for k, v in start.items()}, grads_seq)
    torch_form, _ = _run_ours(Adam(lr=0.01), {k: v.copy() for k, v in start.items()}, grads_seq)
    for k in start:  # Adam's steps are about lr each: compare them in units of lr
        assert np.max(np.abs(tf1[k] - torch_form[k])) / 0.01 < 1e-4, k


def test_adam_eps_form_is_checked():
    with pytest.raises(OptimizerError, match="eps_form must be one of torch, tf1"):
        Adam(eps_form="tf2")


def test_sgd_momentum_matches_torch():
    rng = np.random.default_rng(2)
    start = _params(rng)
    grads_seq = _grad_sequence(rng, 5)
    ours, _ = _run_ours(SGD(lr=0.05, momentum=0.9), {k: v.copy() for k, v in start.items()},
                        grads_seq)
    ref = _run_torch(lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), start, grads_seq)
    _assert_close(ours, ref, 1e-10)


def test_sgd_without_momentum_matches_torch():
    rng = np.random.default_rng(3)
    start = _params(rng)
    grads_seq = _grad_sequence(rng, 3)
    ours, _ = _run_ours(SGD(lr=0.1, momentum=0.0), {k: v.copy() for k, v in start.items()},
                        grads_seq)
    ref = _run_torch(lambda ps: torch.optim.SGD(ps, lr=0.1), start, grads_seq)
    _assert_close(ours, ref, 1e-10)


@pytest.mark.parametrize("name", ["adam", "adam-tf1", "sgd"])
def test_step_updates_in_place_and_keeps_float32(name):
    rng = np.random.default_rng(4)
    params = _params(rng, np.float32)
    ids = {k: id(v) for k, v in params.items()}
    before = {k: v.copy() for k, v in params.items()}
    opt = make_optimizer(name, 0.01)
    state = opt.init_state(params)
    grads = {k: v.astype(np.float32) for k, v in _grad_sequence(rng, 1)[0].items()}
    opt.step(params, grads, state)
    for k, p in params.items():
        assert id(p) == ids[k]
        assert p.dtype == np.float32
        assert not np.array_equal(p, before[k])
    for slot, arrays in state.items():
        if slot != "t":
            assert all(a.dtype == np.float32 for a in arrays.values())


@pytest.mark.parametrize("name", ["adam", "adam-tf1", "sgd"])
def test_flat_state_round_trip_resumes_exactly(name, tmp_path):
    rng = np.random.default_rng(5)
    params = _params(rng)
    grads_seq = _grad_sequence(rng, 4)
    opt = make_optimizer(name, 0.01)

    straight = {k: v.copy() for k, v in params.items()}
    _run_ours(opt, straight, grads_seq)

    resumed = {k: v.copy() for k, v in params.items()}
    _, state = _run_ours(opt, resumed, grads_seq[:2])
    flat = state_to_flat(state)
    assert flat["t"].shape == () and int(flat["t"]) == 2
    assert all(isinstance(v, np.ndarray) for v in flat.values())
    if name.startswith("adam"):
        assert {"m/conv1.w", "v/conv1.w", "m/caps.W"} <= set(flat)
    np.savez(tmp_path / "opt.npz", **flat)
    with np.load(tmp_path / "opt.npz") as f:
        state = state_from_flat(dict(f), np)
    assert state["t"] == 2
    for grads in grads_seq[2:]:
        opt.step(resumed, grads, state)
    for k in params:
        np.testing.assert_array_equal(resumed[k], straight[k])


def test_unknown_optimizer_lists_choices():
    with pytest.raises(ValueError, match="adam, adam-tf1, sgd") as info:
        make_optimizer("rmsprop", 0.1)
    assert "rmsprop" in str(info.value)
    assert "\n" not in str(info.value)


def test_make_optimizer_types():
    assert isinstance(make_optimizer("adam", 0.002), Adam)
    assert make_optimizer("Adam", 0.002).lr == 0.002
    assert isinstance(make_optimizer("sgd", 0.1), SGD)
    assert make_optimizer("adam-tf1", 0.002).eps_form == "tf1"
    assert make_optimizer("adam", 0.002).eps_form == "torch"


def test_exponential_decay():
    decay = ExponentialDecay(0.001, 0.96)
    assert decay.lr_at(0) == pytest.approx(0.001)
    assert decay.lr_at(1) == pytest.approx(0.00096)
    assert decay.lr_at(10) == pytest.approx(0.001 * 0.96 ** 10)
    assert ExponentialDecay(0.5, 1.0).lr_at(100) == 0.5


def test_per_step_decay_is_the_official_codes_schedule():
    """tf.train.exponential_decay(1e-3, step, 2000, 0.96) (no staircase), then
    tf.maximum(lr, 1e-6): continuous in the step, blind to the epoch."""
    decay = ExponentialDecay(1e-3, 0.96, "per-step", every=2000, floor=1e-6)
    assert decay.lr_at(epoch=0, step=0) == pytest.approx(1e-3)
    assert decay.lr_at(epoch=7, step=1000) == pytest.approx(1e-3 * 0.96 ** 0.5)
    assert decay.lr_at(epoch=0, step=2000) == pytest.approx(0.96e-3)
    assert decay.lr_at(epoch=0, step=10 ** 7) == 1e-6          # the floor
    for kind, every, message in (("cosine", 2000, "unknown learning-rate schedule"),
                                 ("per-step", 0, "decay interval must be >= 1")):
        with pytest.raises(OptimizerError, match=message):
            ExponentialDecay(1e-3, 0.96, kind, every=every)
