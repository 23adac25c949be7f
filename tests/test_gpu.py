"""CuPy on a real GPU: the same op code as NumPy, checked the same way. Skipped without one."""
import numpy as np
import pytest

from capsflow.backends import get_backend, to_numpy
from capsflow.errors import BackendError


def _cupy_or_skip():
    try:
        return get_backend("cupy")
    except BackendError as exc:
        pytest.skip(f"no CuPy GPU backend here ({exc})")


pytestmark = pytest.mark.gpu


def test_op_vjps_on_cupy_match_finite_differences():
    _cupy_or_skip()
    from capsflow.core.gradcheck import op_gradcheck
    from capsflow.core.gradcases import CASES
    for name, args, attrs in CASES:
        for e in op_gradcheck(name, args, attrs, backend="cupy"):
            assert e is None or e <= 1e-6, (name, attrs, e)


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 1e-4)])
def test_capsnet_on_cupy_matches_numpy(capsnet, batch64, dtype, tol):
    _cupy_or_skip()
    x, y = batch64
    params = capsnet.init_params(seed=2, dtype=dtype)
    out_np, g_np = capsnet.value_and_grad(params, {"x": x, "y": y}, backend="numpy")
    out_cp, g_cp = capsnet.value_and_grad(params, {"x": x, "y": y}, backend="cupy")
    for k in out_np:
        np.testing.assert_allclose(to_numpy(out_cp[k]), out_np[k], rtol=tol, atol=tol * 1e-2)
    for k in g_np:
        err = np.linalg.norm(to_numpy(g_cp[k]) - g_np[k]) / max(np.linalg.norm(g_np[k]), 1e-30)
        assert err <= tol, (k, err)
