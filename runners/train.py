"""``capsflow train GRAPH.yaml``: train a graph on any dataset of docs/data.md.

The seed's flags keep their names and meaning (``--bs --lr --opt --disp --num_epochs
--val_epoch --save_dir``); the loop itself lives in ``capsflow.runners.training``.

The graph adapts to the data: a graph that declares the input vars ``channels``,
``height``, ``width`` and ``classes`` (graphs/capsnet.yaml does) is compiled with them
set from the dataset, and the checkpoint records them as overrides, like --set values.
A graph that cannot take the dataset's images is one line naming both shapes.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import re
from pathlib import Path

from capsflow.backends import get_backend
from capsflow.cli import (add_graph_arguments, check_output_dir, compile_from_args,
                          non_negative_float, non_negative_int, positive_float,
                          positive_int)
from capsflow.errors import CapsflowError
from capsflow.options import add_option_arguments, options_from_args
from capsflow.training.optim import OPTIMIZERS
from capsflow.lang.yamlio import parse_override
from capsflow.runners.data import DATASETS, EMNIST_SPLITS
from capsflow.runners.distributed import DEFAULT_TIMEOUT, World, env_config, launch, strip_nproc
from capsflow.runners.signals import terminate_as_interrupt
from capsflow.runners.training import (BEST, INPUT_VARS, LAST, TrainConfig, Trainer,
                                       class_scores, fit_graph_to_data, load_data,
                                       read_checkpoint, run_files, state_digest)

# Flags whose default is None so that a resumed run can tell "not given" (take the
# checkpoint's value) from "given" (must match it); TrainConfig holds the real defaults.
# The option flags (--backend, --precision, --no-replay...) work the same way.
_CONFIG_FLAGS = {"bs": "batch_size", "lr": "lr", "opt": "optimizer", "lr_decay": "lr_decay",
                 "lr_schedule": "lr_schedule", "decay_steps": "decay_steps", "min_lr": "min_lr",
                 "num_epochs": "num_epochs", "val_epoch": "val_epoch", "disp": "disp",
                 "seed": "seed", "shift": "shift", "flip": "flip", "dataset": "dataset",
                 "data_dir": "data_dir",
                 "limit_train": "limit_train", "limit_test": "limit_test",
                 "emnist_split": "emnist_split", "image_size": "image_size", "crop": "crop",
                 "channels": "channels", "multimnist_count": "multimnist_count",
                 "multimnist_fresh": "multimnist_fresh"}


def add_augmentation_arguments(parser: argparse.ArgumentParser, default: int) -> None:
    """--shift PIXELS / --no-shift, --flip: the training augmentation (also used by compare)."""
    shift = parser.add_mutually_exclusive_group()
    shift.add_argument("--shift", type=non_negative_int, metavar="PIXELS",
                       help=f"random shifts of up to PIXELS in training (default {default})")
    shift.add_argument("--no-shift", dest="shift", action="store_const", const=0,
                       help="no shift augmentation")
    parser.add_argument("--flip", action="store_true", default=None,
                        help="mirror each training image left to right with probability 1/2 "
                             "(for Fashion-MNIST, as the Keras port; not for digits)")


def add_schedule_arguments(parser: argparse.ArgumentParser) -> None:
    """--lr-schedule, --lr-decay, --decay-steps, --min-lr (train, compare)."""
    defaults = TrainConfig.DECAY_DEFAULTS
    a = parser.add_argument
    a("--lr-schedule", dest="lr_schedule", choices=list(defaults),
      help="per-epoch: lr * F**epoch (default; the Keras port's x0.9); per-step: the paper's "
           "official code, lr * F**(step/STEPS), never below --min-lr (docs/training.md)")
    a("--lr-decay", dest="lr_decay", type=float, metavar="F",
      help=f"the decay factor F (default {defaults['per-epoch'][0]} per epoch, "
           f"{defaults['per-step'][0]} per-step; 1 = constant)")
    a("--decay-steps", dest="decay_steps", type=positive_int, metavar="STEPS",
      help=f"per-step: the lr is multiplied by F every STEPS updates "
           f"(default {TrainConfig.decay_steps})")
    a("--min-lr", dest="min_lr", type=non_negative_float, metavar="LR",
      help=f"per-step: the floor (default {defaults['per-step'][1]:g})")


def image_size(text: str) -> list:
    """``N`` (N x N) or ``HxW`` -> [height, width] (the --image-size and --crop flags)."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", text)
    if not match or int(match.group(1)) < 1 or int(match.group(2) or 1) < 1:
        raise argparse.ArgumentTypeError(f"must be a size N or HxW of positive integers, "
                                         f"got '{text}'")
    h = int(match.group(1))
    return [h, int(match.group(2) or h)]


def add_data_arguments(parser: argparse.ArgumentParser, default: str) -> None:
    """The flags that choose the data and how its images are made (train, compare)."""
    a = parser.add_argument
    a("--dataset", choices=list(DATASETS), help=f"dataset (default {default}; docs/data.md)")
    a("--data-dir", dest="data_dir", metavar="ROOT",
      help="data root holding mnist/, cifar10/... (else $CAPSFLOW_DATA, then "
           "~/.cache/capsflow/data); for --dataset folder: ROOT/train/CLASS/*.png, ROOT/test/...")
    a("--download", action="store_true",
      help="download the dataset through torchvision into ~/.cache/capsflow/data when it is "
           "found nowhere")
    a("--emnist-split", dest="emnist_split", choices=EMNIST_SPLITS,
      help="EMNIST's split (default balanced)")
    a("--image-size", dest="image_size", type=image_size, metavar="N|HxW",
      help="resize every image (folder; smallnorb: default 48)")
    a("--crop", type=image_size, metavar="N|HxW",
      help="then crop (folder: the centre; smallnorb: default 32, random in training)")
    a("--channels", type=int, choices=(1, 3),
      help="folder: 1 grey or 3 colour (default: colour when any training image is)")
    a("--multimnist-count", dest="multimnist_count", type=positive_int, metavar="N",
      help="multimnist examples per split (default: one per MNIST digit)")
    a("--multimnist-fresh", dest="multimnist_fresh", action="store_true", default=None,
      help="multimnist: draw new training overlays for every epoch (the paper made 1,000 "
           "per digit; default: one set for all epochs)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    add_graph_arguments(parser)
    a = parser.add_argument
    a("--bs", type=positive_int, metavar="N", help=f"batch size (default {d.batch_size})")
    a("--lr", type=positive_float, metavar="LR", help=f"learning rate (default {d.lr:g})")
    a("--opt", choices=OPTIMIZERS, help=f"optimizer (default {d.optimizer})")
    add_schedule_arguments(parser)
    a("--num_epochs", type=positive_int, metavar="N",
      help=f"epochs to train (default {d.num_epochs})")
    a("--val_epoch", type=positive_int, metavar="N",
      help=f"validate on the test split every N epochs, and after the last "
           f"(default {d.val_epoch})")
    a("--disp", type=positive_int, metavar="N",
      help=f"log running loss/accuracy every N iterations (default {d.disp})")
    a("--save_dir", metavar="DIR",
      help="checkpoints and metrics.jsonl go here (default: runs/<graph name>, or the "
           "checkpoint's folder with --resume)")
    add_option_arguments(parser, keep_unset=True)
    add_data_arguments(parser, d.dataset)
    a("--limit-train", dest="limit_train", type=positive_int, metavar="N",
      help="train on the first N training examples only")
    a("--limit-test", dest="limit_test", type=positive_int, metavar="N",
      help="validate on the first N test examples only")
    a("--seed", type=non_negative_int, metavar="S",
      help=f"seed of parameter init, batch order, shifts and flips (default {d.seed})")
    add_augmentation_arguments(parser, d.shift)
    a("--resume", metavar="CHECKPOINT", help="continue the run saved in CHECKPOINT (last.npz)")
    a("--auto-resume", dest="auto_resume", action="store_true",
      help="continue from --save_dir's last.npz when there is one, else start afresh: the "
           "same command restarts a run (torchrun --max-restarts, a requeued job)")
    a("--overwrite", action="store_true",
      help="start afresh in a --save_dir that holds another run (its checkpoints and "
           "metrics.jsonl are replaced); without it that is refused")
    a("--no-progress", dest="progress", action="store_false",
      help="no progress bars (epoch lines are still printed)")
    a("--nproc", type=positive_int, metavar="N",
      help="data-parallel: train with N processes on this machine (gloo on CPUs, NCCL "
           "with --backend cupy), each on its share of every --bs batch; under torchrun "
           "leave it out (docs/distributed.md)")
    a("--dist-timeout", dest="dist_timeout", type=positive_float, metavar="SECONDS",
      default=DEFAULT_TIMEOUT,
      help=f"data-parallel: the longest a rank waits for the others (default "
           f"{DEFAULT_TIMEOUT:g}); a rank that dies stops the job within it")


def config_from_args(args: argparse.Namespace, saved: dict | None = None) -> TrainConfig:
    """Defaults, then the checkpoint's settings (when resuming), then the flags given."""
    config = TrainConfig.from_json(saved or {})
    for flag, name in _CONFIG_FLAGS.items():
        value = getattr(args, flag, None)  # commands built on train (compare) lack some flags
        if value is not None:
            setattr(config, name, value)
    config.options = options_from_args(args, config.options)
    if config.lr_schedule == "per-epoch":
        given = [flag for flag, dest in (("--decay-steps", "decay_steps"), ("--min-lr", "min_lr"))
                 if getattr(args, dest, None) is not None]
        if given:  # silently unused, they would read as though they had been applied
            raise CapsflowError(f"{' and '.join(given)} belong to --lr-schedule per-step; "
                                f"the per-epoch schedule multiplies the rate by --lr-decay "
                                f"once an epoch")
    config.check()
    return config


def main(args: argparse.Namespace) -> int:
    env = env_config()  # set by torchrun or --nproc; a broken environment is one line
    nproc = getattr(args, "nproc", None) or 1
    if env is not None and nproc > 1:
        raise CapsflowError(f"--nproc {nproc} under a launcher (WORLD_SIZE={env['world_size']} "
                            f"is set): the launcher starts the ranks, drop --nproc")
    ranks = env["world_size"] if env is not None else nproc
    if getattr(args, "auto_resume", False):
        if args.resume:
            raise CapsflowError("--auto-resume picks the checkpoint itself: drop --resume")
        if not args.save_dir:
            raise CapsflowError("--auto-resume needs --save_dir (the folder whose last.npz "
                                "it continues from)")
        if (Path(args.save_dir) / LAST).is_file():
            args.resume = str(Path(args.save_dir) / LAST)
    ckpt = read_checkpoint(args.resume) if args.resume else None
    from_checkpoint = ckpt is not None and not args.overrides
    if from_checkpoint:  # the run's own --set values
        args.overrides = [f"{k}={json.dumps(v)}" for k, v in ckpt.overrides.items()]
    graph = compile_from_args(args)
    class_scores(graph)  # a graph without class scores fails before the data loads
    config = config_from_args(args, ckpt.meta.get("config") if ckpt else None)
    if config.batch_size % ranks:
        raise CapsflowError(f"--bs {config.batch_size} is the global batch and must be "
                            f"divisible by the {ranks} ranks")
    get_backend(config.options)  # an unusable backend fails before the data is loaded
    if args.save_dir:
        save_dir = Path(args.save_dir)
    else:
        save_dir = ckpt.path.parent if ckpt else Path("runs") / graph.spec.name
    check_output_dir(save_dir, "--save_dir")
    # --auto-resume names the folder as this run's own: a restart before its first
    # last.npz (torchrun --max-restarts, a requeued job) starts it afresh there.
    if not (getattr(args, "overwrite", False) or getattr(args, "auto_resume", False)):
        check_no_other_run(save_dir, ckpt)
    if nproc > 1:  # this process starts the ranks and waits for them
        argv = getattr(args, "command_argv", None)
        if argv is None:
            raise CapsflowError("--nproc needs the command line (capsflow.cli.main)")
        return launch(strip_nproc(argv), nproc)
    timeout = getattr(args, "dist_timeout", DEFAULT_TIMEOUT)
    world = World.from_env(config.options.backend, timeout) if env else None
    try:
        return _train(args, ckpt, from_checkpoint, graph, config, save_dir, world)
    finally:
        if world is not None:
            world.close()


def check_no_other_run(save_dir: Path, ckpt) -> None:
    """One line when ``save_dir`` holds a run that this one would overwrite: a fresh run
    empties metrics.jsonl and replaces last.npz and best.npz, and a run resumed into
    another run's folder trims that folder's metrics to its own."""
    if ckpt is not None and save_dir.resolve() == ckpt.path.parent.resolve():
        return  # continuing the run in its own folder
    found = run_files(save_dir)
    if found:
        how = (f"continue it with --resume {save_dir / LAST} (or --auto-resume), "
               if LAST in found and ckpt is None else "")
        raise CapsflowError(f"{save_dir} already holds a training run ({', '.join(found)}); "
                            f"{how}train into another --save_dir, or pass --overwrite to "
                            f"replace it")


def _train(args, ckpt, from_checkpoint, graph, config, save_dir, world) -> int:
    main_rank = world is None or world.is_main
    if world is not None:  # mixed backends or settings would silently train apart
        world.same_everywhere(json.dumps([config.to_json(), args.overrides], sort_keys=True),
                              "settings (backend, batch, seed, --set values...)")
    data = load_data(config, download=args.download)
    # The graph adapts to the data: its input vars set from the dataset (docs/data.md).
    given = dict(parse_override(o) for o in args.overrides)
    if from_checkpoint:  # its input vars come from the data; restore() compares the data
        given = {k: v for k, v in given.items() if k not in INPUT_VARS}
    graph = fit_graph_to_data(graph, data.info, given)
    trainer = Trainer(graph, data, config, save_dir, progress_bar=args.progress, world=world)
    if ckpt is not None:
        trainer.restore(ckpt)
    if world is not None:
        world.same_everywhere(state_digest(trainer), "training state",
                              "every rank must resume from the same checkpoint (one "
                              "--save_dir that all machines share), or all start afresh")
    if ckpt is not None and main_rank:
        print(f"resuming {ckpt.path}: {trainer.state.epoch} epoch(s) and "
              f"{trainer.state.iteration} iteration(s) done")
    if main_rank:
        print(describe(graph, config, data, save_dir)
              + (f"; {world.world_size} ranks ({world.backend}), batch "
                 f"{config.batch_size // world.world_size} each" if world else ""))
    # A rank's SIGTERM is a stop request the ranks agree on (Trainer.fit, StopRequests).
    with terminate_as_interrupt() if world is None else contextlib.nullcontext():
        trainer.fit()
    if trainer.stopped_early:
        return 130
    if world is not None:  # no rank leaves while another may still need it
        world.barrier()
    st = trainer.state
    if st.best_acc is not None and main_rank:
        # Resumed into another folder, the best epoch may be one its first folder saved.
        best = (trainer.best_path if trainer.best_path.is_file() or ckpt is None
                else ckpt.path.parent / BEST)
        print(f"best test accuracy {100 * st.best_acc:.2f}% (epoch {st.best_epoch}); "
              f"checkpoints: {save_dir / LAST}, {best}")
    return 0


def describe(graph, config: TrainConfig, data, save_dir: Path) -> str:
    """What is about to be trained, on what, and where it is saved: one line, and a
    second one for MultiMNIST saying how its accuracy counts."""
    sets = "".join(f" {k}={v}" for k, v in graph.spec.vars.items())
    what = data.info.describe() if data.info is not None else config.dataset
    line = (f"training {graph.spec.name} ({graph.param_count():,} parameters;{sets}) on "
            f"{what}: {data.train_images.shape[0]} train / "
            f"{data.test_images.shape[0]} test examples, batch {config.batch_size}, "
            f"{config.optimizer} {config.describe_lr()}, {config.describe_augmentation()}, "
            f"{config.options.backend} {config.dtype}, seed {config.seed}; saving to {save_dir}")
    if data.info is not None and data.info.labels_per_example > 1:
        line += ("\naccuracy (the paper's MultiMNIST measure): an example counts as right "
                 "when its two longest capsules are its two digits; the decoder learns the "
                 "overlay, masked by both digit capsules")
    return line
