"""The host overlapping the device: each step's loss read one step late, batches copied
through host_to_device's writers, evaluation through a recorded forward pass, and the
pinned device-to-host reader. On the CPU the recordings are the reference's
(train_step.Replayed, forced by ``simulate``), so every number can be compared with a
loop that reads each step at once and an evaluation that runs op by op."""
from __future__ import annotations

import functools
import signal
from types import SimpleNamespace

import numpy as np
import pytest

import capsflow
from capsflow.backends import Backend
from capsflow.backends.cuda.layout import DeviceToHost
from capsflow.options import Options
from capsflow.runners.data import BatchIterator
from capsflow.runners.training import (Data, Trainer, TrainConfig, TrainingDiverged, _Sums,
                                       correct_predictions, count_correct, evaluate_split,
                                       read_checkpoint, read_metrics, targets_k)
from capsflow.training import train_step as ts_module
from capsflow.training.optim import make_optimizer
from capsflow.training.train_step import RecordedForward, TrainStep, device_to_host

GRAPH = """\
name: tiny-overlap
inputs:
  x: {shape: [N, 1, 28, 28]}
  y: {shape: [N, 10], optional: true}
params:
  w: {shape: [81, 10], init: {normal: 0.3}}
  b: {shape: [10], init: zeros}
nodes:
  - {id: pooled, op: max_pool2d, in: [x], attrs: {kernel: 4}}                       # (N, 1, 7, 7)
  - {id: windows, op: unfold, in: [pooled], attrs: {kernel: 3, stride: 2}}  # (N, 1, 3, 3, 3, 3)
  - {id: flat, op: reshape, in: [windows], attrs: {shape: [-1, 81]}}
  - {id: logits, op: linear, in: [flat, w, b]}
  - {id: lengths, op: sigmoid, in: [logits]}
  - {id: margin, op: margin_loss, in: [lengths, y]}
  - {id: loss, op: mean, in: [margin]}
outputs: {loss: loss, lengths: lengths}
"""


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    path = tmp_path_factory.mktemp("graph") / "tiny.yaml"
    path.write_text(GRAPH)
    return capsflow.compile(path)


def make_data(labels_per_image: int = 1, nan_at: int | None = None) -> Data:
    """18 training images (4 steps of 4 and one of 2 per epoch), 14 test images (three
    batches of 4 and one of 2); MultiMNIST-like labels (N, 2) for ``labels_per_image=2``."""
    rng = np.random.default_rng(0)
    images = rng.random((32, 1, 28, 28), dtype=np.float32)
    shape = (32,) if labels_per_image == 1 else (32, labels_per_image)
    labels = rng.integers(0, 10, shape)
    if nan_at is not None:
        images[nan_at, 0, 14, 14] = np.nan  # the middle pixel: a 2-pixel shift keeps it
    return Data(images[:18], labels[:18], images[18:], labels[18:])


def config(**changes) -> TrainConfig:
    settings = dict(batch_size=4, num_epochs=2, seed=3, disp=1, lr=0.05, lr_schedule="per-step",
                    decay_steps=1)  # a new learning rate at every step
    settings.update(changes)
    return TrainConfig(**settings)


@pytest.fixture(params=["eager", "replay"])
def mode(request, monkeypatch):
    """Eager steps, or steps and evaluation replayed (the reference recording)."""
    if request.param == "replay":
        for cls in (TrainStep, RecordedForward):
            monkeypatch.setattr(cls, "__init__", functools.partialmethod(cls.__init__,
                                                                         simulate=True))
    return request.param


def fit(graph, data, cfg, save_dir, resume=None) -> Trainer:
    trainer = Trainer(graph, data, cfg, save_dir, log=lambda line: None, progress_bar=False)
    if resume is not None:
        trainer.restore(read_checkpoint(resume))
    trainer.fit()
    return trainer


def without_time(records: list) -> list:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def immediate_reads(graph, data, cfg, simulate) -> tuple:
    """What the trainer must write, from a loop that reads every step's numbers at once
    (the trainer before the late read) and evaluates op by op: (records, params)."""
    cfg.check()
    params = graph.init_params(cfg.seed, cfg.dtype)
    opt = make_optimizer(cfg.optimizer, cfg.lr)
    step = TrainStep(graph, params, opt, opt.init_state(graph.trainable(params)),
                     outputs=["loss", "lengths"], simulate=simulate)
    batches = BatchIterator(data.train_images, data.train_labels, cfg.batch_size,
                            augment_shift=cfg.shift, rng=np.random.default_rng(cfg.seed),
                            num_classes=10)
    schedule, records, iteration = cfg.lr_schedule_fn(), [], 0
    for epoch in range(cfg.num_epochs):
        sums = _Sums()
        for x, y in batches:
            lr = schedule.lr_at(epoch, iteration)
            out = step.gradients({"x": x, "y": y})
            step.update(lr)
            loss = float(np.asarray(out["loss"]))
            correct = int(correct_predictions(np.asarray(out["lengths"]), y).sum())
            iteration += 1
            window = _Sums()
            window.add(loss, correct, y.shape[0])
            sums.add(loss, correct, y.shape[0])
            records.append({"kind": "train", "epoch": epoch + 1, "iteration": iteration,
                            "loss": window.means()[0], "acc": window.means()[1], "lr": lr})
        test = evaluate_split(graph, params, data.test_images, data.test_labels,
                              cfg.batch_size, Options(replay_steps=False))
        records.append({"kind": "epoch", "epoch": epoch + 1, "iteration": iteration,
                        "train_loss": sums.means()[0], "train_acc": sums.means()[1],
                        "test_loss": test["loss"], "test_acc": test["acc"], "lr": lr})
    return records, params


# -- the count on the device -------------------------------------------------------------
def test_count_correct_is_correct_predictions_on_ties_nans_and_two_labels():
    rng = np.random.default_rng(1)
    for k in (1, 2):
        for trial in range(20):
            scores = rng.integers(0, 4, (12, 10)).astype(np.float32)  # many ties
            scores[rng.random((12, 10)) < 0.1] = np.nan
            scores[rng.random((12, 10)) < 0.05] = np.inf
            labels = np.stack([rng.choice(10, k, replace=False) for _ in range(12)])
            targets = np.zeros((12, 10), np.float32)
            np.put_along_axis(targets, labels, 1.0, axis=1)
            assert targets_k(targets) == k
            with np.errstate(invalid="ignore"):
                got = int(count_correct(np, scores, targets, k))
            assert got == int(correct_predictions(scores, targets).sum()), (k, trial)


# -- the trainer -------------------------------------------------------------------------
@pytest.mark.parametrize("labels_per_image", [1, 2])
def test_late_reads_write_the_numbers_of_immediate_reads(graph, mode, labels_per_image, tmp_path):
    data = make_data(labels_per_image)
    trainer = fit(graph, data, config(), tmp_path)
    want, params = immediate_reads(graph, data, config(), simulate=mode == "replay")
    assert without_time(read_metrics(tmp_path / "metrics.jsonl")) == want
    assert trainer.train_step.mode == mode and trainer._forward.mode == mode
    for name, value in params.items():
        np.testing.assert_array_equal(trainer.params[name], value)
    assert read_checkpoint(tmp_path / "last.npz").meta["progress"]["iteration"] == 10
    assert set(trainer.clock.seconds) == {"batches", "steps", "reads", "evaluation", "epoch_end"}


@pytest.mark.parametrize("where", ["gradients", "update"])
def test_ctrl_c_reads_the_pending_step_and_a_resumed_run_is_uninterrupted(graph, mode, where,
                                                                          tmp_path, monkeypatch):
    """Ctrl-C during step 8 (epoch 2): raised at once in its forward/backward pass, or
    deferred until its update is done. The step queued before it (and step 8 itself when
    its update ran) is read and counted, then saved; resuming gives the uninterrupted run."""
    data = make_data()
    straight = fit(graph, data, config(), tmp_path / "straight")
    calls = {"n": 0}
    real = getattr(TrainStep, where)

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 8 and where == "gradients":
            raise KeyboardInterrupt
        result = real(self, *args, **kwargs)
        if calls["n"] == 8:
            signal.raise_signal(signal.SIGINT)  # held until the update's block ends
        return result

    monkeypatch.setattr(TrainStep, where, interrupted)
    stopped = fit(graph, data, config(), tmp_path / "b")
    monkeypatch.setattr(TrainStep, where, real)
    assert stopped.stopped_early
    saved = read_checkpoint(tmp_path / "b" / "last.npz")
    done = 7 if where == "gradients" else 8
    assert saved.meta["progress"]["iteration"] == int(saved.optim["t"]) == done
    assert saved.progress.iterator["position"] == done - 5  # epoch 1 had 5 steps

    resumed = fit(graph, data, config(), tmp_path / "b", resume=tmp_path / "b" / "last.npz")
    assert without_time(read_metrics(tmp_path / "b" / "metrics.jsonl")) == \
        without_time(read_metrics(tmp_path / "straight" / "metrics.jsonl"))
    for name, value in straight.params.items():
        np.testing.assert_array_equal(resumed.params[name], value)


def test_a_non_finite_loss_stops_at_its_own_iteration_and_saves_nothing(graph, mode, tmp_path):
    cfg = config()
    # The batch iterator draws its order first from the run's seed: put the NaN image in
    # the third batch of epoch 1.
    nan_at = int(np.random.default_rng(cfg.seed).permutation(18)[9])
    trainer = Trainer(graph, make_data(nan_at=nan_at), cfg, tmp_path, log=lambda line: None,
                      progress_bar=False)
    with pytest.raises(TrainingDiverged, match=r"the loss became nan at iteration 3 \(epoch 1"):
        trainer.fit()
    assert trainer.state.iteration == 2
    assert [r["iteration"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
    assert not (tmp_path / "last.npz").exists()


# -- evaluation --------------------------------------------------------------------------
def test_evaluation_through_the_recorded_forward_pass_equals_op_by_op(graph):
    data = make_data(2)
    params = graph.init_params(1, "float32")
    forward = RecordedForward(graph, params, Options(), ["loss", "lengths"], simulate=True)
    replayed = evaluate_split(graph, params, data.test_images, data.test_labels, 4,
                              forward=forward)
    assert forward.mode == "replay"
    eager = evaluate_split(graph, params, data.test_images, data.test_labels, 4,
                           Options(replay_steps=False))
    assert replayed["loss"] == eager["loss"] and replayed["acc"] == eager["acc"]
    np.testing.assert_array_equal(replayed["pred"], eager["pred"])
    # The parameters are read where they are: changed in place, the next replay sees it.
    params["b"] += 0.5
    again = evaluate_split(graph, params, data.test_images, data.test_labels, 4, forward=forward)
    moved = evaluate_split(graph, params, data.test_images, data.test_labels, 4)
    assert again["loss"] == moved["loss"] != eager["loss"]


def test_a_failed_forward_recording_says_so_once_and_runs_op_by_op(graph, monkeypatch, capsys):
    def refuse(xp, fn):
        raise ts_module.RecordError("NotImplementedError: no recording here")
    monkeypatch.setattr(ts_module.record_step, "reference", refuse)
    data = make_data()
    params = graph.init_params(1, "float32")
    forward = RecordedForward(graph, params, Options(), ["loss", "lengths"], simulate=True)
    got = evaluate_split(graph, params, data.test_images, data.test_labels, 4, forward=forward)
    want = evaluate_split(graph, params, data.test_images, data.test_labels, 4,
                          Options(replay_steps=False))
    assert got["loss"] == want["loss"] and forward.mode == "eager"
    assert capsys.readouterr().err.count("recording the forward pass failed") == 1


# -- the copies between host and device ----------------------------------------------------
def test_the_reference_reader_copies_at_once():
    read = device_to_host(Backend(Options(), np), (2,), np.float64)
    src = np.array([1.5, 3.0])
    got = read.start(src)
    src[...] = 0.0  # rewritten by the next step: the value read is the one started
    np.testing.assert_array_equal(got(), [1.5, 3.0])


def _fake_cupy(calls: list):
    """A stand-in for CuPy that records the calls of the pinned copies."""
    class Event:
        def __init__(self, k):
            self.k = k

        def synchronize(self):
            calls.append(("wait", self.k))

    recorded = []

    def record():
        recorded.append(Event(len(recorded)))
        calls.append(("record", len(recorded) - 1))
        return recorded[-1]

    stream = SimpleNamespace(record=record)

    def asnumpy(a, stream=None, out=None, blocking=True):
        calls.append(("copy", tuple(a), stream is not None, blocking))
        out[...] = a
        return out

    cuda = SimpleNamespace(alloc_pinned_memory=lambda n: bytearray(n),
                           get_current_stream=lambda: stream)
    return SimpleNamespace(__name__="cupy", cuda=cuda, asnumpy=asnumpy,
                           ascontiguousarray=np.ascontiguousarray)


def test_device_to_host_copies_asynchronously_and_waits_for_its_own_copy_only():
    calls = []
    reader = device_to_host(Backend(Options(backend="cupy"), _fake_cupy(calls)), (2,), np.float64)
    assert isinstance(reader, DeviceToHost)
    step1 = reader.start(np.array([0.5, 3.0]))
    step2 = reader.start(np.array([0.25, 4.0]))  # queued before step 1 is read
    assert calls == [("copy", (0.5, 3.0), True, False), ("record", 0),
                     ("copy", (0.25, 4.0), True, False), ("record", 1)]
    with pytest.raises(RuntimeError, match="read a copy"):
        reader.start(np.array([1.0, 1.0]))  # into step 1's buffer, not read yet
    np.testing.assert_array_equal(step1(), [0.5, 3.0])
    assert calls[-1] == ("wait", 0)  # step 1's copy, not step 2's
    step3 = reader.start(np.array([0.125, 5.0]))  # into step 1's buffer, read by now
    np.testing.assert_array_equal(step1(), [0.5, 3.0])  # read once, kept
    np.testing.assert_array_equal(step2(), [0.25, 4.0])
    np.testing.assert_array_equal(step3(), [0.125, 5.0])
    assert [c for c in calls if c[0] == "wait"] == [("wait", 0), ("wait", 1), ("wait", 2)]


def test_a_recorded_step_loads_host_batches_through_host_to_device(monkeypatch):
    """The static input buffers are filled by host_to_device's writers (on CuPy, pinned
    and asynchronous); an input that is no host array (already on the device) is copied
    by an assignment on the device."""
    written = []

    class Writer:
        def __init__(self, xp, dst):
            self.dst = dst

        def write(self, values):
            written.append(values.shape)
            self.dst[...] = values

    monkeypatch.setattr(ts_module.host_to_device, "reference", Writer)
    inputs = ts_module._StaticInputs(Backend(Options(), np),
                                     {"x": np.zeros((2, 3)), "y": np.zeros(4)}, np.float32)
    inputs.load({"x": np.ones((2, 3)), "y": np.arange(4.0)})
    assert written == [(2, 3), (4,)]
    inputs.load({"x": np.full((2, 3), 2.0), "y": [5.0, 6.0, 7.0, 8.0]})  # y: not a host array
    assert written == [(2, 3), (4,), (2, 3)]
    np.testing.assert_array_equal(inputs.buffers["x"], np.full((2, 3), 2.0))
    np.testing.assert_array_equal(inputs.buffers["y"], [5.0, 6.0, 7.0, 8.0])
