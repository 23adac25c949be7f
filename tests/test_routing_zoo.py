"""The routing algorithms written in the graph language do what their papers say, checked on
probes (two-line variants with extra outputs) against NumPy recomputations from the graph's
own votes:

- graphs/capsnet-attention.yaml, inverted dot-product attention routing (Tsai et al. 2020);
- graphs/capsnet-em.yaml and capsnet-em-smallnorb.yaml, matrix capsules with EM routing
  (Hinton, Sabour & Frosst 2018), with the spread loss.
"""
from pathlib import Path

import numpy as np
import pytest

import capsflow
from capsflow.runners.gradcheck import random_batch
from conftest import REPO

GRAPHS = REPO / "graphs"


def probe(tmp_path: Path, stem: str, overrides: dict | None = None, **outputs):
    """graphs/STEM.yaml with extra outputs: a two-line variant of it."""
    path = tmp_path / f"{stem}-probe.yaml"
    lines = [f"extends: {GRAPHS / stem}.yaml", "outputs:"]
    lines += [f"  {name}: {ref}" for name, ref in outputs.items()]
    path.write_text("\n".join(lines) + "\n")
    return capsflow.compile(path, overrides or {})


def softmax(z, axis):
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


# -- inverted dot-product attention routing ----------------------------------------------------
ATTENTION_ITERS = 3   # one more than the graph's default, so that two iterations route


@pytest.fixture(scope="module")
def attention(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("attention")
    outs = {f"c{k}": f"routing/{k}/c" for k in range(ATTENTION_ITERS)}
    outs.update({f"p{k}": f"routing/{k}/v" for k in range(ATTENTION_ITERS)})
    graph = probe(tmp, "capsnet-attention", {"routing_iters": ATTENTION_ITERS},
                  u="u", u_hat="u_hat", **outs)
    params = graph.init_params(seed=0, dtype="float64")
    rng = np.random.default_rng(3)          # a gain and bias that are not the identity
    params["attention.gamma"] = 1 + 0.3 * rng.standard_normal(params["attention.gamma"].shape)
    params["attention.beta"] = 0.2 * rng.standard_normal(params["attention.beta"].shape)
    batch = random_batch(graph, 3, seed=0)
    return graph, params, batch, graph.run(params, batch)


def layer_norm(s, gamma, beta, eps=1e-5):
    d = s - s.mean(-1, keepdims=True)
    return d / np.sqrt((d * d).mean(-1, keepdims=True) + eps) * gamma + beta


def test_attention_votes_are_pose_matrices_times_weight_matrices(attention):
    graph, params, _, out = attention
    n, i, j = out["u_hat"].shape[:3]
    pose = out["u"].reshape(n, i, 4, 4)                    # LayerNorm'd primary poses, 4x4
    votes = np.einsum("niax,ijxd->nijad", pose, params["class.W"])    # v_ij = P_i W_ij
    np.testing.assert_allclose(out["u_hat"], votes.reshape(n, i, j, 16), rtol=1e-10, atol=1e-15)
    # and the primary poses are LayerNorm'd: zero mean, unit variance (gain 1, bias 0)
    np.testing.assert_allclose(out["u"].mean(-1), 0, atol=1e-12)


def test_attention_coefficients_are_a_softmax_over_upper_capsules(attention):
    _, _, _, out = attention
    for k in range(ATTENTION_ITERS):
        c = out[f"c{k}"]                                   # (N, lower i, upper j)
        np.testing.assert_allclose(c.sum(axis=2), 1.0, rtol=1e-12)   # per lower capsule
        if k:                                                        # not over the lower ones
            assert not np.allclose(c.sum(axis=1), c.sum(axis=1).mean())
    np.testing.assert_allclose(out["c0"], 1 / out["c0"].shape[2])    # p_j = 0: uniform
    assert out["c1"].std() > 1e-3                                    # then it routes


def test_attention_recomputed_in_numpy(attention):
    """p_j = 0; a_ij = <p_j, v_ij>; r_ij = softmax_j; p_j = LayerNorm(sum_i r_ij v_ij)."""
    graph, params, batch, out = attention
    v = out["u_hat"]
    gamma, beta = params["attention.gamma"], params["attention.beta"]
    p = np.zeros((v.shape[0], v.shape[2], v.shape[3]))
    for k in range(ATTENTION_ITERS):
        r = softmax(np.einsum("njd,nijd->nij", p, v), axis=2)
        np.testing.assert_allclose(out[f"c{k}"], r, rtol=1e-9, atol=1e-12)
        p = layer_norm(np.einsum("nij,nijd->njd", r, v), gamma, beta)
        np.testing.assert_allclose(out[f"p{k}"], p, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(out["digitcaps"], p, rtol=1e-9, atol=1e-12)
    # the upper poses before LayerNorm's gain and bias: zero mean, unit variance
    xhat = (p - beta) / gamma
    np.testing.assert_allclose(xhat.mean(-1), 0, atol=1e-9)
    np.testing.assert_allclose(xhat.var(-1), 1, rtol=1e-3)
    # one linear classifier shared by the class capsules gives the logits
    scores = np.einsum("njd,d->nj", p, params["classifier.w"][:, 0])
    np.testing.assert_allclose(out["scores"], scores, rtol=1e-9)
    xent = -(batch["y"] * np.log(softmax(scores, 1))).sum(1).mean()
    np.testing.assert_allclose(out["loss"], xent, rtol=1e-9)


# -- EM routing ----------------------------------------------------------------------------------
EM_LAYERS = ("convcaps1", "class")
EM_ITERS = 3
EM_PER_ITERATION = ("R", "Ra", "mu", "var", "act_in", "act_logit", "a_out")


@pytest.fixture(scope="module")
def em(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("em")
    outs = {"primary_poses": "primary_poses", "primary_acts": "primary_acts"}
    for layer in EM_LAYERS:
        key = layer.replace("convcaps1", "conv")
        outs.update({f"{key}_votes": f"{layer}/votes", f"{key}_a_in": f"{layer}/a_in",
                     f"{key}_R0": f"{layer}/R0"})
        for k in range(EM_ITERS):
            for name in EM_PER_ITERATION[1:]:
                outs[f"{key}_{name}{k}"] = f"{layer}/routing/{k}/{name}"
            if k < EM_ITERS - 1:
                outs[f"{key}_R{k + 1}"] = f"{layer}/routing/{k}/R_next"
    graph = probe(tmp, "capsnet-em", **outs)
    params = graph.init_params(seed=0, dtype="float64")
    rng = np.random.default_rng(5)          # betas away from their zero init
    for layer in EM_LAYERS:
        for beta in ("beta_u", "beta_a"):
            name = f"{layer}/routing.{beta}"
            params[name] = 0.5 * rng.standard_normal(params[name].shape)
    batch = random_batch(graph, 2, seed=0)
    return graph, params, batch, graph.run(params, batch)


def em_lambda(k, final_lambda=0.01):
    """The inverse temperature schedule: the authors' OpenReview answer."""
    return final_lambda * (1 - 0.95 ** (k + 1))


@pytest.mark.parametrize("layer", EM_LAYERS)
def test_em_assignments_sum_to_one_over_the_output_capsules(em, layer):
    _, _, _, out = em
    key = layer.replace("convcaps1", "conv")
    for k in range(EM_ITERS):
        R = out[f"{key}_R{k}"]                              # (N, P, I, J)
        np.testing.assert_allclose(R.sum(axis=3), 1.0, rtol=1e-12)
    np.testing.assert_allclose(out[f"{key}_R0"], 1 / out[f"{key}_R0"].shape[3])   # uniform
    assert out[f"{key}_R1"].std() > 1e-4                                           # then not


@pytest.mark.parametrize("layer", EM_LAYERS)
def test_em_steps_recomputed_in_numpy(em, layer):
    """M-step and E-step of Procedure 1, from the graph's own votes and activations."""
    graph, params, _, out = em
    key = layer.replace("convcaps1", "conv")
    V, a_in = out[f"{key}_votes"], out[f"{key}_a_in"]      # (N, P, I, J, H), (N, P, I)
    beta_u, beta_a = params[f"{layer}/routing.beta_u"], params[f"{layer}/routing.beta_a"]
    eps = graph.spec.vars["sigma_eps"]
    assert eps == 1e-9
    H = V.shape[-1]
    R = np.full(V.shape[:4], 1 / V.shape[3])
    for k in range(EM_ITERS):
        np.testing.assert_allclose(out[f"{key}_R{k}"], R, rtol=1e-9, atol=1e-15)
        # M-step
        Ra = R * a_in[..., None]
        np.testing.assert_allclose(out[f"{key}_Ra{k}"], Ra, rtol=1e-12)
        Ra_sum = Ra.sum(axis=2)                             # (N, P, J)
        mu = np.einsum("npij,npijh->npjh", Ra, V) / Ra_sum[..., None]
        var = np.einsum("npij,npijh->npjh", Ra, (V - mu[:, :, None]) ** 2) / Ra_sum[..., None]
        np.testing.assert_allclose(out[f"{key}_mu{k}"], mu, rtol=1e-9, atol=1e-14)
        np.testing.assert_allclose(out[f"{key}_var{k}"], var, rtol=1e-9)
        sigma = np.sqrt(var + eps)
        cost = ((beta_u + np.log(sigma)) * Ra_sum[..., None]).sum(-1)    # sum_h cost_h
        act_in = beta_a - cost
        np.testing.assert_allclose(out[f"{key}_act_in{k}"], act_in, rtol=1e-9, atol=1e-12)
        a = sigmoid(em_lambda(k) * act_in)
        np.testing.assert_allclose(out[f"{key}_a_out{k}"], a, rtol=1e-9)
        if k == EM_ITERS - 1:
            break
        # E-step: R_ij = softmax over j of ln a_j + ln N(V_ij; mu_j, sigma_j^2)
        ln_p = (-((V - mu[:, :, None]) ** 2 / (2 * sigma[:, :, None] ** 2)).sum(-1)
                - np.log(sigma).sum(-1)[:, :, None] - H / 2 * np.log(2 * np.pi))
        R = softmax(np.log(a)[:, :, None] + ln_p, axis=3)
    if layer == "class":   # the last M-step's activations and means are the class capsules
        np.testing.assert_allclose(out["class_activations"], a[:, 0], rtol=1e-9)
        np.testing.assert_allclose(out["class_poses"].reshape(mu[:, 0].shape), mu[:, 0],
                                   rtol=1e-9, atol=1e-14)


def test_em_inverse_temperature_follows_its_schedule(tmp_path, em):
    _, _, _, out = em
    for layer in ("conv", "class"):
        for k in range(EM_ITERS):
            ratio = out[f"{layer}_act_logit{k}"] / out[f"{layer}_act_in{k}"]
            np.testing.assert_allclose(ratio, em_lambda(k), rtol=1e-12)
    # final_lambda is a var; the schedule follows it
    graph = probe(tmp_path, "capsnet-em", {"final_lambda": 0.5},
                  logit="class/routing/1/act_logit", act_in="class/routing/1/act_in")
    params = graph.init_params(seed=0, dtype="float64")
    o = graph.run(params, random_batch(graph, 2, seed=0))
    np.testing.assert_allclose(o["logit"] / o["act_in"], em_lambda(1, 0.5), rtol=1e-12)


def test_em_votes_are_pose_matrices_times_weights_per_window(em):
    """ConvCaps1: K=3, stride 2 windows of the primary grid, V_ij = M_i W_(k,l,b),j; the
    class capsules: one W per input type and class, shared by every position."""
    graph, params, _, out = em
    poses, acts = out["primary_poses"], out["primary_acts"]     # (N, B*16, 12, 12), (N, B, 12, 12)
    W = params["convcaps1/W"]                                    # (K, K, B, C, 4, 4)
    K, _, B = W.shape[:3]
    OW = int(round(np.sqrt(out["conv_votes"].shape[1])))
    rng = np.random.default_rng(0)
    for _ in range(20):
        n, o, q, k, l, b = (int(rng.integers(0, s)) for s in (2, OW, OW, K, K, B))
        c = int(rng.integers(0, W.shape[3]))
        M = poses[n, b * 16:(b + 1) * 16, 2 * o + k, 2 * q + l].reshape(4, 4)
        i = (k * K + l) * B + b
        np.testing.assert_allclose(out["conv_votes"][n, o * OW + q, i, c].reshape(4, 4),
                                   M @ W[k, l, b, c], rtol=1e-12)
        np.testing.assert_allclose(out["conv_a_in"][n, o * OW + q, i], acts[n, b, 2 * o + k, 2 * q + l])
    # class capsules: input capsule (h, w, c) of ConvCaps1's 5x5 grid votes M W_c,j
    mu, a = out["conv_mu2"], out["conv_a_out2"]                  # (N, 25, C, 16), (N, 25, C)
    Wc = params["class/W"]                                        # (C, classes, 4, 4)
    C = Wc.shape[0]
    for _ in range(20):
        n, pos, c, j = (int(rng.integers(0, s)) for s in (2, mu.shape[1], C, Wc.shape[1]))
        np.testing.assert_allclose(out["class_votes"][n, 0, pos * C + c, j].reshape(4, 4),
                                   mu[n, pos, c].reshape(4, 4) @ Wc[c, j], rtol=1e-12)
        np.testing.assert_allclose(out["class_a_in"][n, 0, pos * C + c], a[n, pos, c])


@pytest.mark.parametrize("margin,epoch", [(None, 0), (None, 3), (0.5, 9)])
def test_spread_loss_is_the_papers_formula(tmp_path, margin, epoch):
    """With the margin m the trainer sets in ``epoch``: 0.2 + 0.1 per epoch up to 0.9."""
    overrides = {} if margin is None else {"margin": margin}
    graph = probe(tmp_path, "capsnet-em", overrides)
    m = {(None, 0): 0.2, (None, 3): 0.5, (0.5, 9): 0.9}[margin, epoch]
    params = graph.init_params(seed=2, dtype="float64")
    params["spread.margin"].fill(graph.scheduled_values(epoch)["spread.margin"])
    batch = random_batch(graph, 4, seed=2)
    out = graph.run(params, batch)
    a, y = out["scores"], batch["y"]
    t = y.argmax(1)
    expected = np.mean([sum(max(0.0, m - (a[n, t[n]] - a[n, i])) ** 2
                            for i in range(a.shape[1]) if i != t[n]) for n in range(len(a))])
    np.testing.assert_allclose(out["loss"], expected, rtol=1e-12)
    assert expected > 0


def test_smallnorb_variant_differs_only_in_its_input_vars():
    base = capsflow.compile(GRAPHS / "capsnet-em.yaml")
    norb = capsflow.compile(GRAPHS / "capsnet-em-smallnorb.yaml")
    changed = {k for k in base.spec.vars if base.spec.vars[k] != norb.spec.vars[k]}
    derived = {"grid_h", "grid_w", "conv_h", "conv_w"}
    assert changed - derived == {"channels", "height", "width", "classes"}
    assert set(base.dag.nodes) == set(norb.dag.nodes)
    shapes = norb.dag.nodes
    assert shapes["x"]["shape"] == ("N", 2, 32, 32)
    assert shapes["convcaps1/poses_out"]["shape"] == ("N", 16 * 16, 6, 6)    # the paper's 6x6
    assert shapes["class/class_acts"]["shape"] == ("N", 5)
    assert shapes["class/votes"]["shape"] == ("N", 1, 6 * 6 * 16, 5, 16)
