"""capsflow's CapsNet against a PyTorch autograd implementation fed the same weights."""
import numpy as np
import pytest

pytest.importorskip("torch")
from capsflow.runners.torch_ref import reference_outputs, reference_value_and_grad  # noqa: E402


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - b) / max(np.linalg.norm(b), 1e-300))


def test_outputs_and_every_gradient_match_pytorch_float64(capsnet, batch64):
    x, y = batch64
    params = capsnet.init_params(seed=3, dtype="float64")
    outputs, grads = capsnet.value_and_grad(params, {"x": x, "y": y})
    ref_out, ref_grads = reference_value_and_grad(params, x, y)
    assert rel(outputs["loss"], ref_out["loss"]) <= 1e-8
    assert rel(outputs["lengths"], ref_out["lengths"]) <= 1e-8
    assert rel(outputs["recon"], ref_out["recon"]) <= 1e-8
    assert rel(outputs["digitcaps"], ref_out["v"]) <= 1e-8
    assert set(grads) == set(ref_grads) == set(params)
    for name in params:
        assert rel(grads[name], ref_grads[name]) <= 1e-8, name


@pytest.mark.parametrize("iters", [1, 5])
def test_routing_iterations_match_pytorch(batch64, iters):
    import capsflow
    from conftest import CAPSNET
    graph = capsflow.compile(CAPSNET, overrides={"routing_iters": iters})
    x, y = batch64
    params = graph.init_params(seed=4, dtype="float64")
    outputs, grads = graph.value_and_grad(params, {"x": x, "y": y})
    ref_out, ref_grads = reference_value_and_grad(params, x, y, routing_iters=iters)
    assert rel(outputs["loss"], ref_out["loss"]) <= 1e-8
    assert rel(grads["digit.W"], ref_grads["digit.W"]) <= 1e-8
    assert rel(grads["conv1.w"], ref_grads["conv1.w"]) <= 1e-8


def test_inference_masks_with_the_predicted_class(capsnet, batch64):
    x, _ = batch64
    params = capsnet.init_params(seed=5, dtype="float64")
    outputs = capsnet.run(params, {"x": x})
    assert "loss" not in outputs  # no labels, no loss
    ref = reference_outputs(params, x, None)
    assert rel(outputs["recon"], ref["recon"]) <= 1e-8
    assert rel(outputs["lengths"], ref["lengths"]) <= 1e-8


def test_float32_stays_close_to_float64(capsnet, batch64):
    x, y = batch64
    p64 = capsnet.init_params(seed=6, dtype="float64")
    p32 = {k: v.astype(np.float32) for k, v in p64.items()}
    out32, g32 = capsnet.value_and_grad(p32, {"x": x, "y": y})
    out64, g64 = capsnet.value_and_grad(p64, {"x": x, "y": y})
    assert out32["loss"].dtype == np.float32 and g32["digit.W"].dtype == np.float32
    assert rel(out32["loss"], out64["loss"]) < 1e-5
    assert rel(g32["primary.w"], g64["primary.w"]) < 1e-3
