"""The GPU check script's logic, run on the CPU with NumPy standing in for CuPy."""
import pytest

import capsflow.backend as backend
from capsflow.runners import gpu_check


@pytest.fixture
def numpy_as_cupy(monkeypatch):
    monkeypatch.setitem(backend._cache, "cupy", backend.get_backend("numpy"))


def test_op_and_parity_checks_pass_and_report(numpy_as_cupy, capsys):
    assert gpu_check.check_ops()
    assert gpu_check.check_parity()
    out = capsys.readouterr().out
    assert "[1] op VJPs on CuPy vs finite differences" in out and "-> ok" in out
    assert "CuPy vs NumPy, float64" in out and "CuPy vs NumPy, float32" in out
    assert "vs finite differences: worst" in out


def test_a_broken_vjp_fails_the_op_check(numpy_as_cupy, monkeypatch, capsys):
    from capsflow.opdef import get_op
    relu = get_op("relu")
    monkeypatch.setattr(relu, "vjp_fn", lambda xp, saved, g, needs: (2 * g,))
    assert not gpu_check.check_ops()
    assert "FAILED: relu" in capsys.readouterr().out


def test_without_a_gpu_it_says_so_and_exits_2(capsys):
    try:
        backend.get_backend("cupy")
        pytest.skip("CuPy and a GPU are present")
    except backend.BackendError:
        pass
    assert gpu_check.main([]) == 2
    assert "gpu_check: backend 'cupy'" in capsys.readouterr().err
