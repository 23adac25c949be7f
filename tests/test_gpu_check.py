"""The GPU check script's logic, run on the CPU with NumPy standing in for CuPy."""
import os

import pytest

import capsflow.backends as backend
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
    from capsflow.core.opdef import get_op
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
    from capsflow.training import train_step
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


def test_kernel_timeline_in_start_order_with_idle_time():
    """--timeline: one step's kernels in the order they ran, the short ones left out of
    the list but not out of the busy and idle figures."""
    from types import SimpleNamespace
    from capsflow.runners import gpu_kernels

    def event(kind, start, dur, name):
        span = SimpleNamespace(start=start, elapsed_us=lambda: dur)
        return SimpleNamespace(device_type=f"DeviceType.{kind}", time_range=span, name=name)

    events = [event("CUDA", 130.0, 40.0, "col2im"), event("CPU", 0.0, 500.0, "aten::mm"),
              event("CUDA", 100.0, 20.0, "sgemm"), event("CUDA", 125.0, 2.0, "tiny")]
    rows = gpu_kernels.kernel_timeline(events)
    assert [r[2] for r in rows] == ["sgemm", "tiny", "col2im"]
    lines = gpu_kernels.format_timeline(rows, 5.0, "title").splitlines()
    assert [line.split()[-1] for line in lines[2:4]] == ["sgemm", "col2im"]
    assert lines[3].split()[:2] == ["30.0", "40.0"]
    assert lines[-1] == ("3 kernels over 0.070 ms: busy 0.062 ms, idle 0.008 ms "
                         "(shorter kernels not listed)")



def test_speed_table_rows_and_their_switches(monkeypatch, capsys):
    """The table's plumbing, with the bench stubbed: each row's bench runs with its
    switches in the environment (which the bench workers inherit) and leaves none behind."""
    from capsflow.runners import bench
    seen = []

    def fake_run_bench(args):
        switches = {k: v for k, v in os.environ.items() if k.startswith("CAPSFLOW_")}
        seen.append((args.precision, args.no_cuda_graph, switches))
        ms = 0.004 + 0.001 * len(seen)
        return {"machine": "a test", "ratio_median": ms / 0.01,
                "frameworks": {"capsflow": {"median": ms, "info": "capsflow", "device_peak": 2**20},
                               "pytorch": {"median": 0.01, "info": "pytorch"}}}

    for key in ("CAPSFLOW_CUDA_KERNELS", "CAPSFLOW_OUTER_GRADS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(bench, "run_bench", fake_run_bench)
    gpu_check.bench_table(repeats=1)
    assert seen == [("fp32", False, {}), ("tf32", False, {}),
                    ("fp32", False, {"CAPSFLOW_OUTER_GRADS": "0"}), ("fp32", True, {}),
                    ("fp32", True, {"CAPSFLOW_CUDA_KERNELS": "0", "CAPSFLOW_OUTER_GRADS": "0"})]
    assert not any(k.startswith("CAPSFLOW_") for k in os.environ)
    lines = capsys.readouterr().out.splitlines()
    table = lines[lines.index(next(l for l in lines if l.startswith("precision"))) + 1:]
    assert [row.split("  ")[0].strip() for row in table[:5]] == [
        "fp32", "tf32", "fp32, unfactored", "fp32, eager", "fp32, eager, xp only"]
    assert table[2].split()[-5:] == ["7.00", "10.00", "0.70", "1", "-"]
