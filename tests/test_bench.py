"""``capsflow bench`` on a tiny batch: the table, the ratio, the profile and the errors.

No timing is asserted: only that every figure is there and well formed."""
import importlib.util
import json
import re
from dataclasses import asdict

import pytest

from capsflow.cli import main
from capsflow.options import Options
from conftest import CAPSNET

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
