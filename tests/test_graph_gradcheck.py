"""The whole CapsNet's gradients against finite differences (float64)."""
import numpy as np
import pytest

import capsflow
from capsflow.core.gradcheck import graph_gradcheck
from capsflow.runners.gradcheck import DEFAULT_TOLERANCE, random_batch
from conftest import CAPSNET


@pytest.mark.parametrize("iters", [1, 3])
def test_capsnet_gradients_match_finite_differences(iters):
    graph = capsflow.compile(CAPSNET, overrides={"routing_iters": iters})
    params = graph.init_params(seed=1, dtype="float64")
    report = graph_gradcheck(graph, params, random_batch(graph, 2, seed=1), directions=1)
    assert set(report) == set(params)
    worst = max(report, key=report.get)
    assert report[worst] <= DEFAULT_TOLERANCE, (worst, report[worst])


def test_gradcheck_catches_a_wrong_vjp(monkeypatch):
    """A check that cannot fail proves nothing: break squash's VJP and watch it fail
    (the reference VJP, which runs with the fast paths off)."""
    from capsflow.core.opdef import get_op
    graph = capsflow.compile(CAPSNET, overrides={"routing_iters": 1})
    squash = get_op("squash")
    original = squash.vjp_fn
    monkeypatch.setattr(squash, "vjp_fn", lambda xp, saved, g, needs, **a:
                        tuple(1.01 * t for t in original(xp, saved, g, needs, **a)))
    params = graph.init_params(seed=1, dtype="float64")
    report = graph_gradcheck(graph, params, random_batch(graph, 2, seed=1), directions=1,
                             backend=capsflow.Options(fast_paths=False))
    assert report["digit.W"] > 1e-3

