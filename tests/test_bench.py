"""``capsflow bench`` on a tiny batch: the table, the ratio, the profile and the errors.

No timing is asserted: only that every figure is there and well formed."""
import importlib.util
import json
import re
from dataclasses import asdict

import pytest

from capsflow.cli import main
from capsflow.options import Options
from conftest import CAPSNET, SHARED_DATA

NUMBER = r"\d+\.\d+"


def run(capsys, *argv):
    code = main(["bench", str(CAPSNET), "--bs", "2", "--repeats", "1", "--warmup", "1",
                 "--set", "routing_iters=1", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs PyTorch")
def test_bench_prints_both_frameworks_and_their_ratio(capsys, tmp_path):
    code, out, _ = run(capsys, "--json", str(tmp_path / "bench.json"))
    assert code == 0, out
    rows = {m.group(1): m for m in re.finditer(
        rf"^(capsflow|pytorch)\s+({NUMBER})\s+({NUMBER})\s+({NUMBER})\s+(\d+|-)\s+(\d+|-)$",
        out, re.M)}
    assert set(rows) == {"capsflow", "pytorch"}, out
    assert rows["capsflow"].group(6) != "-"             # capsflow's live-bytes peak
    assert re.search(rf"^ratio capsflow/pytorch: {NUMBER} \(median\), {NUMBER} \(min\)", out, re.M)
    # same weights and batch: both frameworks start from the same loss
    losses = re.findall(r"loss at step 1 (\d+\.\d+)", out)
    assert len(losses) == 2 and abs(float(losses[0]) - float(losses[1])) < 1e-4
    fig = json.loads((tmp_path / "bench.json").read_text())
    assert fig["ratio_median"] > 0 and set(fig["frameworks"]) == {"capsflow", "pytorch"}
    assert len(fig["frameworks"]["pytorch"]["seconds"]) == 1


def test_bench_profile_lists_forward_and_vjp_per_op(capsys):
    code, out, _ = run(capsys, "--no-torch", "--profile", "--top", "3")
    assert code == 0, out
    assert "pytorch" not in out and "ratio" not in out
    assert re.search(rf"^forward\s+conv2d\s+2\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}%", out, re.M), out
    assert re.search(rf"^vjp\s+conv2d\s+2\s+{NUMBER}", out, re.M)
    # the routing's weighted sum runs fused, and the profile says so
    assert re.search(r"^forward\s+einsum \(expand_dims\+mul\+sum\)\s+1\s", out, re.M)
    assert "slowest 3 nodes" in out


def test_bench_reports_user_errors_in_one_line(capsys):
    code, _, err = run(capsys, "--set", "routing=leaky")
    assert code == 2 and "PyTorch reference mirrors" in err and "--no-torch" in err
    assert len(err.strip().splitlines()) == 1
    if importlib.util.find_spec("cupy") is None:
        code, _, err = run(capsys, "--backend", "cupy")
        assert code == 2 and "cupy" in err.lower() and len(err.strip().splitlines()) == 1


def test_a_json_path_that_is_a_folder_is_refused_before_timing(capsys, tmp_path, monkeypatch):
    from capsflow.runners import bench
    monkeypatch.setattr(bench, "run_bench", lambda args: pytest.fail("it timed first"))
    code, _, err = run(capsys, "--json", str(tmp_path))
    assert code == 2 and f"--json {tmp_path} is a folder; name a file" in err


def test_bench_rejects_bad_numbers(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", str(CAPSNET), "--repeats", "0"])
    assert exc.value.code == 2
    assert "positive integer" in capsys.readouterr().err


def test_report_gives_gpu_steps_in_milliseconds():
    """A GPU step is a few ms: the table says ms/step with two places, not 0.004 s."""
    from capsflow.runners.bench import report
    row = {"info": "x", "first_loss": 0.5, "median": 0.00427, "min": 0.0041,
           "cpu_median": 0.00431, "rss_peak": None, "live_peak": None, "device_peak": 476e6}
    fig = {"graph": "g", "bs": 100, "options": asdict(Options(backend="cupy", replay_steps=False)),
           "repeats": 3, "warmup": 1, "machine": "m", "frameworks": {"capsflow": row},
           "profile": None}
    text = report(fig, 5)
    assert "median ms/step" in text and re.search(r"^capsflow\s+4\.27\s+4\.10\s+4\.31\s", text, re.M)
    assert "backend cupy fp32, --no-replay, 3 timed steps" in text
    assert "median s/step" in report(dict(fig, options=asdict(Options())), 5)
    assert "not finite" not in text
    nan_row = dict(row, first_loss=float("nan"))
    said = report(dict(fig, frameworks={"capsflow": nan_row}), 5)
    assert "note: capsflow's loss is nan: the times stand" in said


@pytest.mark.skipif(not (SHARED_DATA / "mnist").is_dir(), reason="needs real MNIST")
def test_bench_epoch_splits_each_epoch_between_host_phases(capsys, tmp_path):
    """--epoch trains through the trainer on real images and prints, per epoch, the wall
    time and the host's seconds per phase (which add up to it with 'other')."""
    code = main(["bench", str(CAPSNET), "--epoch", "--epochs", "2", "--bs", "4",
                 "--set", "routing_iters=1", "--data-dir", str(SHARED_DATA),
                 "--limit-train", "6", "--limit-test", "4", "--json", str(tmp_path / "e.json")])
    out, _ = capsys.readouterr()
    assert code == 0, out
    assert "mnist (6 training, 4 test images), batch 4, 2 steps per epoch, backend numpy" in out
    rows = re.findall(rf"^([12])\s+({NUMBER})((?:\s+{NUMBER}){{6}})$", out, re.M)
    assert [r[0] for r in rows] == ["1", "2"], out
    for _, wall, phases in rows:
        parts = [float(v) for v in phases.split()]
        assert float(wall) > 0 and abs(sum(parts) - float(wall)) < 2e-3 * 7
    assert re.search(r"^epoch 2: train loss \d+\.\d{4}, test accuracy \d+\.\d\d%$", out, re.M)
    fig = json.loads((tmp_path / "e.json").read_text())
    assert len(fig["epochs"]) == 2 and fig["epochs"][0]["device"] is None
    assert set(fig["epochs"][1]["host"]) == {"batches", "steps", "reads", "evaluation",
                                             "epoch_end"}


@pytest.mark.skipif(not (SHARED_DATA / "mnist").is_dir(), reason="needs real MNIST")
def test_an_interrupted_bench_epoch_says_so(capsys, tmp_path):
    """Ctrl-C in epoch 2 of 3 printed epoch 1's table as though it were the run, status 0."""
    from conftest import ctrl_c_in_call
    with ctrl_c_in_call(3):  # epoch 2's first step (2 steps an epoch)
        code = main(["bench", str(CAPSNET), "--epoch", "--epochs", "3", "--bs", "4",
                     "--set", "routing_iters=1", "--data-dir", str(SHARED_DATA),
                     "--limit-train", "6", "--limit-test", "4", "--json",
                     str(tmp_path / "e.json")])
    out, _ = capsys.readouterr()
    assert code == 130, out
    assert "interrupted: 1 of the 3 epochs asked for ended, and only they are shown" in out
    fig = json.loads((tmp_path / "e.json").read_text())
    assert fig["interrupted"] and len(fig["epochs"]) == 1


def test_bench_epoch_clock_times_the_device_by_events_on_cupy():
    """On CuPy each step's and each evaluation's work lies between two events on the
    stream; an epoch's device seconds are the sums of those spans (a stand-in records)."""
    from types import SimpleNamespace
    from capsflow.runners.bench import _epoch_clock
    times = iter([0.0, 2.0, 2.5, 3.0, 10.0, 14.0])  # ms at which the device reached each event

    class Event:
        def __init__(self):
            self.ms = next(times)

    stream = SimpleNamespace(record=Event)
    cuda = SimpleNamespace(get_current_stream=lambda: stream,
                           get_elapsed_time=lambda a, b: b.ms - a.ms)
    be = SimpleNamespace(name="cupy", xp=SimpleNamespace(cuda=cuda), synchronize=lambda: None)
    clock = _epoch_clock(be)
    for phase in ("steps", "steps", "evaluation", "epoch_end"):
        with clock.phase(phase):
            pass
    [epoch] = clock.epochs
    assert epoch["device"] == {"steps": pytest.approx(2.5e-3), "evaluation": pytest.approx(4e-3)}
    assert set(epoch["host"]) == {"steps", "evaluation", "epoch_end"} and epoch["wall"] > 0


@pytest.mark.parametrize("nproc", [[], ["--nproc", "2"]])
def test_a_step_too_big_for_the_machine_is_refused_before_any_worker_starts(nproc, capsys,
                                                                          monkeypatch):
    monkeypatch.setattr("capsflow.core.memory.physical_memory", lambda: 2**30)
    assert main(["bench", str(CAPSNET), "--bs", "10000", "--no-torch", *nproc]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "a training step of capsnet at batch 10000 keeps at " \
        "least" in err and "more than this machine's 1.0 GiB of memory" in err


def test_a_graph_with_no_class_scores_is_benched(capsys, tmp_path):
    """bench's step needs 'loss' alone; the memory check must not ask for more."""
    graph = tmp_path / "loss-only.yaml"
    graph.write_text("name: loss-only\ninputs:\n  x: {shape: [N, 1, 28, 28]}\n"
                     "  y: {shape: [N, 10], optional: true}\n"
                     "params:\n  w: {shape: [784, 10], init: {normal: 0.01}}\n"
                     "nodes:\n  - {id: flat, op: reshape, in: [x], attrs: {shape: [-1, 784]}}\n"
                     "  - {id: z, op: matmul, in: [flat, w]}\n"
                     "  - {id: e, op: sub, in: [z, y]}\n  - {id: e2, op: mul, in: [e, e]}\n"
                     "  - {id: loss, op: mean, in: [e2]}\noutputs:\n  loss: loss\n")
    assert main(["bench", str(graph), "--bs", "2", "--repeats", "1", "--warmup", "1",
                 "--no-torch"]) == 0, capsys.readouterr().err
