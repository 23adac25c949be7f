"""The CUDA backend on a real GPU: every op on CuPy, its variant and its reference,
against finite differences, and the whole CapsNet on CuPy against NumPy. Skipped
without CuPy and a GPU (``bash runners/gpu_check.sh`` checks more, and times it)."""
import numpy as np
import pytest

from capsflow.backends import get_backend, to_numpy
from capsflow.errors import BackendError
from capsflow.options import Options

FAST = Options(backend="cupy")
pytestmark = pytest.mark.gpu


def _cupy_or_skip():
    try:
        return get_backend(FAST)
    except BackendError as exc:
        pytest.skip(f"no CuPy GPU backend here ({exc})")


@pytest.mark.parametrize("options", [FAST, FAST.plain], ids=["variants", "reference"])
def test_op_vjps_on_cupy_match_finite_differences(options):
    _cupy_or_skip()
    from capsflow.core.gradcheck import op_gradcheck
    from capsflow.core.gradcases import CASES
    for name, args, attrs in CASES:
        for e in op_gradcheck(name, args, attrs, backend=options):
            assert e is None or e <= 1e-6, (name, attrs, e)


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 1e-4)])
def test_capsnet_on_cupy_matches_numpy(capsnet, batch64, dtype, tol):
    _cupy_or_skip()
    x, y = batch64
    params = capsnet.init_params(seed=2, dtype=dtype)
    out_np, g_np = capsnet.value_and_grad(params, {"x": x, "y": y}, backend="numpy")
    out_cp, g_cp = capsnet.value_and_grad(params, {"x": x, "y": y}, backend=FAST)
    for k in out_np:
        np.testing.assert_allclose(to_numpy(out_cp[k]), out_np[k], rtol=tol, atol=tol * 1e-2)
    for k in g_np:
        err = np.linalg.norm(to_numpy(g_cp[k]) - g_np[k]) / max(np.linalg.norm(g_np[k]), 1e-30)
        assert err <= tol, (k, err)
