"""The GPU check's and the kernel profile's logic (capsflow/backends/cuda/check.py and
kernel_profile.py, run by runners/gpu_check.py and runners/gpu_kernels.py), on the CPU
with the emulated CuPy of tests/cuda_emulator.py. (Its CapsNet parity and fast-path
checks run in tests/test_cuda_emulated.py.)"""
import functools
import importlib
from types import SimpleNamespace

import pytest

import capsflow.backends as backends
from capsflow.backends.cuda import check, kernel_profile
from capsflow.options import options_from_args


def test_op_check_passes_and_reports(emu, capsys):
    assert check.check_ops()
    out = capsys.readouterr().out
    assert "[1] op VJPs on CuPy vs finite differences" in out and "-> ok" in out


def test_a_broken_variant_fails_the_op_check(emu, monkeypatch, capsys):
    from capsflow.backends.cuda.elementwise import gpu_relu
    monkeypatch.setattr(gpu_relu, "vjp_fn", lambda be, saved, g, needs: (2 * g,))
    assert not check.check_ops()
    assert "FAILED: relu" in capsys.readouterr().out


def test_chunked_conv_check_passes_and_fails(emu, monkeypatch, capsys):
    """The large-batch check on a small convolution with a small budget: 3 images in
    chunks of 1 pass; a variant that drops the last chunk's gradient fails."""
    from capsflow.backends.cuda import conv
    shapes = ((3, 4, 7, 7), (5, 4, 3, 3), 2)
    monkeypatch.setattr(conv, "DEVICE_CHUNK_BYTES", 3 * 3 * 36 * 4)  # one image's windows
    assert check.check_conv_chunks(shapes)
    assert "conv2d of 3 images in chunks of 1 vs the reference" in capsys.readouterr().out
    vjp = conv.gpu_conv2d.vjp_fn

    def broken(be, saved, g, needs, **attrs):
        gx, gw, gb = vjp(be, saved, g, needs, **attrs)
        gx[-1] = 0
        return gx, gw, gb
    monkeypatch.setattr(conv.gpu_conv2d, "vjp_fn", broken)
    assert not check.check_conv_chunks(shapes)
    assert "(dx) -> FAILED" in capsys.readouterr().out


@pytest.mark.parametrize("program", ["gpu_check", "gpu_kernels"])
def test_without_a_gpu_it_says_so_and_exits_2(program, capsys):
    try:
        backends.get_backend("cupy")
        pytest.skip("CuPy and a GPU are present")
    except backends.BackendError:
        pass
    assert importlib.import_module(f"capsflow.runners.{program}").main([]) == 2
    assert f"{program}: backend 'cupy'" in capsys.readouterr().err


def test_replay_check_passes_with_recorded_steps(emu, monkeypatch, capsys):
    """Replayed steps against op-by-op plain ones, on the emulator, where the steps are
    recorded by the reference (it cannot capture CUDA graphs), which replay the same
    update half with the fused Adam kernel."""
    from capsflow.training import train_step
    monkeypatch.setattr(train_step.record_step, "variants", [])
    monkeypatch.setattr(train_step.TrainStep, "__init__", functools.partialmethod(
        train_step.TrainStep.__init__, simulate=True))
    assert check.check_graphs()
    out = capsys.readouterr().out
    assert "GEMMs through capsflow's own cuBLAS call (capturable): NO" in out  # no cuBLAS here
    assert "5 Adam steps as CUDA graphs (mode: replay) vs eager plain xp, float64: worst" in out


def test_speed_table_rows_and_their_options(monkeypatch, capsys):
    """The table's plumbing, with the bench stubbed: each row's bench runs with the
    options of its label, given as the bench's own command-line flags."""
    from capsflow.runners import bench
    seen = []

    def fake_run_bench(args):
        seen.append(options_from_args(args))
        assert (args.bs, args.repeats, args.graph) == (100, 1, str(check.CAPSNET))
        ms = 0.004 + 0.001 * len(seen)
        return {"machine": "a test", "ratio_median": ms / 0.01,
                "frameworks": {"capsflow": {"median": ms, "info": "capsflow", "device_peak": 2**20},
                               "pytorch": {"median": 0.01, "info": "pytorch"}}}

    monkeypatch.setattr(bench, "run_bench", fake_run_bench)
    check.bench_table(repeats=1)
    fast = check.FAST
    assert seen == [fast, fast.replace(precision="tf32"), fast.replace(factored_grads=False),
                    fast.replace(replay_steps=False),
                    fast.replace(replay_steps=False, fast_paths=False, factored_grads=False)]
    lines = capsys.readouterr().out.splitlines()
    table = lines[lines.index(next(l for l in lines if l.startswith("precision"))) + 1:]
    assert [row.split("  ")[0].strip() for row in table[:5]] == [
        "fp32", "tf32", "fp32, unfactored", "fp32, eager", "fp32, eager, xp only"]
    assert table[2].split()[-5:] == ["7.00", "10.00", "0.70", "1", "-"]


def test_a_check_or_row_that_raises_is_a_failed_line_and_the_rest_still_run(monkeypatch,
                                                                           capsys):
    """An error in one check (say a CuPy API the emulator did not know) or one bench row
    loses neither the checks nor the rows after it, and the run reports a failure."""
    from capsflow.runners import bench
    ran = []

    def make(name, outcome):
        def check_fn():
            ran.append(name)
            if outcome == "raise":
                raise AttributeError("module 'cupy' has no attribute 'frobnicate'")
            return outcome
        check_fn.__name__ = name
        return check_fn
    names = ("check_ops", "check_parity", "check_kernels", "check_conv_chunks", "check_graphs")
    for name in names:
        monkeypatch.setattr(check, name, make(name, "raise" if name == "check_parity" else True))
    monkeypatch.setattr(check, "cupy_or_say_why", lambda program: True)
    rows = []

    def fake_run_bench(args):
        rows.append(args)
        if len(rows) == 1:
            raise RuntimeError("cuBLAS said no")
        return {"machine": "a test", "ratio_median": 0.4,
                "frameworks": {"capsflow": {"median": 0.004, "info": "capsflow"},
                               "pytorch": {"median": 0.01, "info": "pytorch"}}}
    monkeypatch.setattr(bench, "run_bench", fake_run_bench)
    assert check.run(repeats=1) == 1
    out = capsys.readouterr().out
    assert ran == list(names) and len(rows) == len(check.BENCH_ROWS)
    assert "[check_parity] FAILED: AttributeError: module 'cupy' has no attribute" in out
    assert "Traceback" in out
    assert "fp32                 FAILED: RuntimeError: cuBLAS said no" in out
    assert "tf32" in out.split("[4] training step")[1]
    assert "SOME CHECKS FAILED" in out


def test_kernel_table_from_profiler_averages():
    """The profile's table: per-step figures, slowest kernel first, a total."""
    events = [SimpleNamespace(key="squash_fwd", count=8, device_time_total=400.0),
              SimpleNamespace(key="sgemm_128x64", count=12, device_time_total=9000.0),
              SimpleNamespace(key="cpu_only", count=2, device_time_total=0.0)]
    rows = kernel_profile.kernel_rows(events, steps=2)
    assert rows == [("sgemm_128x64", 6, 4.5), ("squash_fwd", 4, 0.2)]
    text = kernel_profile.format_rows(rows, 1, "title")
    assert "sgemm_128x64" in text and "squash_fwd" not in text
    assert text.splitlines()[-1].split()[:2] == ["4.700", "10"]


def test_kernel_timeline_in_start_order_with_idle_time():
    """--timeline: one step's kernels in the order they ran, the short ones left out of
    the list but not out of the busy and idle figures."""
    def event(kind, start, dur, name):
        span = SimpleNamespace(start=start, elapsed_us=lambda: dur)
        return SimpleNamespace(device_type=f"DeviceType.{kind}", time_range=span, name=name)

    events = [event("CUDA", 130.0, 40.0, "col2im"), event("CPU", 0.0, 500.0, "aten::mm"),
              event("CUDA", 100.0, 20.0, "sgemm"), event("CUDA", 125.0, 2.0, "tiny")]
    rows = kernel_profile.kernel_timeline(events)
    assert [r[2] for r in rows] == ["sgemm", "tiny", "col2im"]
    lines = kernel_profile.format_timeline(rows, 5.0, "title").splitlines()
    assert [line.split()[-1] for line in lines[2:4]] == ["sgemm", "col2im"]
    assert lines[3].split()[:2] == ["30.0", "40.0"]
    assert lines[-1] == ("3 kernels over 0.070 ms: busy 0.062 ms, idle 0.008 ms "
                         "(shorter kernels not listed)")
