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


@pytest.mark.parametrize("program", ["gpu_check", "gpu_kernels"])
def test_without_a_gpu_it_says_so_and_exits_2(program, capsys):
    import importlib
    try:
        backend.get_backend("cupy")
        pytest.skip("CuPy and a GPU are present")
    except backend.BackendError:
        pass
    assert importlib.import_module(f"capsflow.runners.{program}").main([]) == 2
    assert f"{program}: backend 'cupy'" in capsys.readouterr().err


def test_kernel_check_runs_and_reports(numpy_as_cupy, capsys):
    """With NumPy standing in, both sides take the xp path: this checks the script's
    plumbing (three Adam steps, the report line); the GPU run compares real kernels."""
    assert gpu_check.check_kernels()
    assert "CUDA kernels and factored gradients vs the ops' xp code on CuPy, float64, 3 Adam steps" in capsys.readouterr().out


def test_graph_check_passes_with_simulated_graphs(numpy_as_cupy, monkeypatch, capsys):
    """Graphs against eager steps, with NumPy standing in for CuPy and
    cudagraph.Replayed for a captured graph."""
    import functools
    from capsflow import train_step
    monkeypatch.setattr(train_step.TrainStep, "__init__", functools.partialmethod(
        train_step.TrainStep.__init__, simulate=True))
    assert gpu_check.check_graphs()
    out = capsys.readouterr().out
    assert "5 Adam steps as CUDA graphs (mode: cuda graph) vs eager plain xp, float64: worst" in out


def test_kernel_table_from_profiler_averages():
    """runners/gpu_kernels.py's table: per-step figures, slowest kernel first, a total."""
    from types import SimpleNamespace
    from capsflow.runners import gpu_kernels
    events = [SimpleNamespace(key="squash_fwd", count=8, device_time_total=400.0),
              SimpleNamespace(key="sgemm_128x64", count=12, device_time_total=9000.0),
              SimpleNamespace(key="cpu_only", count=2, device_time_total=0.0)]
    rows = gpu_kernels.kernel_rows(events, steps=2)
    assert rows == [("sgemm_128x64", 6, 4.5), ("squash_fwd", 4, 0.2)]
    text = gpu_kernels.format_rows(rows, 1, "title")
    assert "sgemm_128x64" in text and "squash_fwd" not in text
    assert text.splitlines()[-1].split()[:2] == ["4.700", "10"]

