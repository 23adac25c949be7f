"""``capsflow reproduce RECIPE``: run one row of the results table and write the row.

A recipe (runners/recipe.py, graphs/recipes/) fixes the graph, the data and every
training setting. The run goes to ``--out`` (default runs/reproduce/NAME): checkpoints,
metrics.jsonl (one record per epoch, the test accuracy among them), a copy of the recipe,
and ``row.json``, the row: final and best test accuracy, the paper's figure, epochs,
wall time, the command and the machine. ``capsflow reproduce --table DIR`` gathers the
rows under DIR into the markdown table of docs/results.md.

The same command resumes: when ``--out`` holds a run of this recipe it continues from its
last.npz (a run killed, or stopped by ``--max-minutes``, loses at most the epoch it was
in); a run of another recipe there is one line and nothing is touched.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Optional

from capsflow.backends import get_backend
from capsflow.cli import check_output_dir, positive_float, positive_int
from capsflow.errors import CapsflowError
from capsflow.options import add_option_arguments, option_arguments, options_from_args
from capsflow.runners.pictures import save_figure
from capsflow.runners.recipe import Recipe, load_recipe, recipe_names, RECIPES_DIR
from capsflow.runners.train import describe
from capsflow.runners.signals import terminate_as_interrupt
from capsflow.training.json_fields import hint_name, json_type_name, matches_hint, shown
from capsflow.runners.training import (LAST, METRICS, Trainer, fit_graph_to_data, load_data,
                                       read_checkpoint, read_metrics, run_files)

ROW = "row.json"
RECIPE_COPY = "recipe.yaml"
DEVIATIONS = "deviations.json"  # every sitting's flags that change the recipe's numbers
#: The most row files ``--table`` reads (a table, not a crawl of the disk).
MAX_ROWS = 200
MAX_ROW_BYTES = 1 << 20
#: What the table reads from a row, with the JSON types it must have.
ROW_FIELDS = {"recipe": str, "row": str, "final_test_acc": Optional[float],
              "best_test_acc": Optional[float], "best_epoch": Optional[int],
              "paper_test_acc": Optional[float], "epochs": int, "train_seconds": float,
              "complete": bool}
PERCENTAGES = ("final_test_acc", "best_test_acc", "paper_test_acc")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("recipe", nargs="?", metavar="RECIPE",
      help=f"a recipe file, or the name of one in graphs/recipes/ ({', '.join(recipe_names())})")
    a("--list", action="store_true", help="list the recipes and what each reproduces")
    a("--table", metavar="DIR",
      help="print the results table of the runs under DIR (their row.json files)")
    a("--plot", metavar="FILE.png",
      help="with --table: also draw each row's test error per epoch, the paper's as a dashed line")
    a("--out", metavar="DIR", help="the run's folder (default runs/reproduce/NAME); an "
                                   "existing run of the recipe there is continued")
    a("--epochs", type=positive_int, metavar="N",
      help="train N epochs instead of the recipe's (the row then says so)")
    a("--max-minutes", dest="max_minutes", type=positive_float, metavar="M",
      help="stop after the first epoch that ends past M minutes; the same command goes on")
    a("--data-dir", dest="data_dir", metavar="ROOT",
      help="data root (else $CAPSFLOW_DATA, then ~/.cache/capsflow/data; docs/data.md)")
    a("--download", action="store_true", help="download the dataset through torchvision")
    a("--limit-train", dest="limit_train", type=positive_int, metavar="N",
      help="train on the first N examples only (a smoke test: the row says so)")
    a("--limit-test", dest="limit_test", type=positive_int, metavar="N",
      help="test on the first N examples only (a smoke test: the row says so)")
    a("--no-progress", dest="progress", action="store_false", help="no progress bars")
    add_option_arguments(parser, keep_unset=True)


def main(args: argparse.Namespace) -> int:
    if args.list:
        print(list_recipes())
        return 0
    if args.plot and not args.table:
        raise CapsflowError("--plot draws the rows of --table DIR: give --table too")
    if args.table:
        rows = collect_rows(Path(args.table))
        print(results_table(rows))
        if args.plot:
            check_output_dir(Path(args.plot).parent, "--plot")
            print(f"curves: {curves_figure(rows, Path(args.plot))}")
        return 0
    if not args.recipe:
        raise CapsflowError("name a recipe (capsflow reproduce --list shows them), or give "
                            "--list or --table DIR")
    recipe = load_recipe(args.recipe)
    changes = {k: getattr(args, k) for k in ("limit_train", "limit_test", "data_dir")
               if getattr(args, k) is not None}
    deviations = [f"--{k.replace('_', '-')} {changes[k]}" for k in ("limit_train", "limit_test")
                  if k in changes]
    if args.epochs is not None:
        changes["num_epochs"] = args.epochs
        if args.epochs != recipe.own_epochs:
            deviations.append(f"--epochs {args.epochs} (the recipe says {recipe.own_epochs})")
    changes["options"] = options_from_args(args)
    recipe = recipe.with_changes(**changes)
    out = Path(args.out) if args.out else Path("runs") / "reproduce" / recipe.name
    check_output_dir(out, "--out")
    get_backend(recipe.config.options)  # an unusable backend fails before the data loads
    trainer = prepare(recipe, out, args.download, args.progress)
    note_deviations(out, deviations)
    command = command_line(args)
    if trainer.state.epoch >= recipe.config.num_epochs:
        print(f"{out} already holds all {recipe.config.num_epochs} epochs of {recipe.name}")
    else:
        seconds = None if args.max_minutes is None else 60 * args.max_minutes
        with terminate_as_interrupt():
            trainer.fit(seconds)
        if trainer.stopped_early:
            write_row(recipe, out, command, trainer)
            return 130
    row = write_row(recipe, out, command, trainer)
    print(format_row(row))
    print(f"row written to {out / ROW}")
    return 0


def prepare(recipe: Recipe, out: Path, download: bool, progress: bool) -> Trainer:
    """The recipe's Trainer, continued from ``out``'s last.npz when it holds a run of the
    same recipe; a copy of the recipe is kept in ``out`` to tell."""
    from capsflow.core.graph import compile as compile_graph
    copy, last = out / RECIPE_COPY, out / LAST
    if copy.is_file() and copy.read_text() != recipe.text:
        raise CapsflowError(f"--out {out} holds a run of another recipe, or of another "
                            f"version of {recipe.file.name} (see {copy}); give another --out")
    others = [] if copy.is_file() else run_files(out)
    if others:  # a capsflow train run, say: a sitting would replace its files
        raise CapsflowError(f"--out {out} holds a training run that is no recipe's (its "
                            f"{', '.join(others)}, no {RECIPE_COPY}); give another --out")
    ckpt = read_checkpoint(last) if last.is_file() else None
    graph = compile_graph(recipe.graph, recipe.overrides)
    data = load_data(recipe.config, download=download)
    graph = fit_graph_to_data(graph, data.info, recipe.overrides)
    trainer = Trainer(graph, data, recipe.config, out, progress_bar=progress)
    trainer.how_to_continue = "the same command (reproduce continues from last.npz)"
    if ckpt is not None:
        trainer.restore(ckpt)  # one line when its settings are not the recipe's
        print(f"continuing {last}: {trainer.state.epoch} of {recipe.config.num_epochs} "
              f"epoch(s) done")
    out.mkdir(parents=True, exist_ok=True)
    copy.write_text(recipe.text)
    print(f"reproducing {recipe.name}: {recipe.row}; {recipe.config.num_epochs} epochs\n"
          + describe(graph, recipe.config, data, out))
    return trainer


# ------------------------------------------------------------------------------ the row
def note_deviations(out: Path, deviations: list) -> list:
    """Add this sitting's flags that depart from the recipe to ``out``'s record of them, and
    return them all: a row is the recipe's full run only if no sitting departed (epoch 1
    tested on 3 images, or run to 3 epochs, stays in the numbers a later plain sitting
    reports)."""
    path = out / DEVIATIONS
    noted = []
    if path.is_file():
        try:
            noted = json.loads(path.read_text())
        except (ValueError, RecursionError):
            noted = None
        if not (isinstance(noted, list) and all(isinstance(d, str) for d in noted)):
            raise CapsflowError(f"{path}: not the list of deviations reproduce keeps; the "
                                f"folder is damaged (give another --out)")
    merged = noted + [d for d in deviations if d not in noted]
    if merged != noted:
        path.write_text(json.dumps(merged) + "\n")
    return merged


def write_row(recipe: Recipe, out: Path, command: str, trainer: Trainer) -> dict:
    """``out/row.json`` from the run's metrics.jsonl: what the results table shows."""
    epochs = [r for r in read_metrics(out / METRICS) if r.get("kind") == "epoch"]
    tested = [r for r in epochs if r.get("test_acc") is not None]
    planned = recipe.config.num_epochs
    caveats = []
    if len(epochs) < planned:
        caveats.append(f"{len(epochs)} of {planned} epochs")
    if len(epochs) > recipe.own_epochs:
        caveats.append(f"{len(epochs)} epochs, more than the recipe's {recipe.own_epochs}")
    caveats += [d for d in note_deviations(out, []) if d not in caveats]
    best = max(tested, key=lambda r: r["test_acc"], default=None)
    row = {
        "recipe": recipe.name, "row": recipe.row, "recipe_file": str(recipe.file),
        "complete": not caveats, "caveats": caveats,
        "epochs": len(epochs), "epochs_planned": planned,
        "final_test_acc": _percent(tested[-1]["test_acc"]) if tested else None,
        "best_test_acc": _percent(best["test_acc"]) if best else None,
        "best_epoch": best["epoch"] if best else None,
        "paper_test_acc": recipe.paper, "paper_source": recipe.source,
        "schedule": recipe.config.describe_lr(), "batch_size": recipe.config.batch_size,
        "train_seconds": round(sum(r.get("seconds", 0.0) for r in epochs), 1),
        "command": command, "card": machine_card(trainer),
    }
    (out / ROW).write_text(json.dumps(row, indent=1) + "\n")
    return row


def _percent(fraction: float) -> float:
    return round(100 * fraction, 2)


def machine_card(trainer: Trainer) -> dict:
    """What the figures were made on."""
    from capsflow.runners.bench import machine
    options = trainer.config.options
    card = {"machine": machine(), "backend": options.backend, "precision": options.precision,
            "flags": option_arguments(options), "dtype": trainer.config.dtype,
            "python": sys.version.split()[0]}
    if options.backend == "cupy":
        card["device"] = device_name(trainer.backend.xp)
    blas = {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if k in os.environ}
    if blas:
        card["openblas_env"] = blas  # a pinned, older kernel: timings are not the fastest
    return card


def device_name(xp: Any) -> str:
    """The GPU's name as CUDA reports it (bytes in CuPy), or why it is not known."""
    try:
        name = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)["name"]
    except (AttributeError, KeyError, RuntimeError) as exc:  # e.g. the tests' emulator
        return f"unknown ({type(exc).__name__})"
    return name.decode(errors="replace") if isinstance(name, bytes) else str(name)


def command_line(args: argparse.Namespace) -> str:
    argv = getattr(args, "command_argv", None)
    if argv is None:
        return "capsflow reproduce " + (args.recipe or "")
    return " ".join(shlex.quote(w) for w in ["capsflow", *argv])


def format_row(row: dict) -> str:
    acc = "-" if row["final_test_acc"] is None else f"{row['final_test_acc']:.2f}%"
    best = ("" if row["best_test_acc"] is None else
            f" (best {row['best_test_acc']:.2f}% at epoch {row['best_epoch']})")
    paper = "" if row["paper_test_acc"] is None else \
        f"; {_paper_or_target(row['paper_source'])} {row['paper_test_acc']:.2f}%"
    caveat = "" if row["complete"] else f"; not the recipe's full run: {', '.join(row['caveats'])}"
    return (f"{row['recipe']}: test accuracy {acc}{best} after {row['epochs']} epoch(s){paper}, "
            f"{row['train_seconds']:.0f} s{caveat}")


# ---------------------------------------------------------------------------- the table
def collect_rows(folder: Path) -> list:
    """The row.json files under ``folder`` (sorted by path), each checked to be a row."""
    if not folder.is_dir():
        raise CapsflowError(f"--table {folder} is not a folder")
    paths = sorted(folder.rglob(ROW))[:MAX_ROWS + 1]
    if len(paths) > MAX_ROWS:
        raise CapsflowError(f"--table {folder}: more than {MAX_ROWS} {ROW} files below it; "
                            f"point at the folder of one table")
    rows = []
    for path in paths:
        size = path.stat().st_size
        if size > MAX_ROW_BYTES:  # a row is a kilobyte: never read GBs
            raise CapsflowError(f"{path}: {size:,} bytes, not a row written by capsflow "
                                f"reproduce")
        try:
            row = json.loads(path.read_text())
        except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, a 4,300-digit number
            raise CapsflowError(f"{path}: not a row written by capsflow reproduce ({exc})") from None
        if not isinstance(row, dict) or any(k not in row for k in ROW_FIELDS):
            raise CapsflowError(f"{path}: not a row written by capsflow reproduce (it needs "
                                f"{', '.join(ROW_FIELDS)})")
        for name, hint in ROW_FIELDS.items():
            value = row[name]
            if not matches_hint(value, hint) or (name in PERCENTAGES and value is not None
                                                 and not 0 <= value <= 100):
                raise CapsflowError(f"{path}: '{name}' is {json_type_name(value)} "
                                    f"{shown(value)}, expected {hint_name(hint)}"
                                    f"{' in [0, 100]' if name in PERCENTAGES else ''}")
        caveats = row.get("caveats", [])
        if not (isinstance(caveats, list) and all(isinstance(c, str) for c in caveats)):
            raise CapsflowError(f"{path}: 'caveats' is {json_type_name(caveats)}, expected a "
                                f"list of strings")
        row["path"] = str(path.parent)
        rows.append(row)
    return rows


def results_table(rows: list) -> str:
    """The markdown table of docs/results.md."""
    lines = ["| row | recipe | test acc. (final) | best (epoch) | paper | epochs | train time | run on |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        final = _cell(r["final_test_acc"])
        best = "-" if r["best_test_acc"] is None else f"{r['best_test_acc']:.2f}% ({r['best_epoch']})"
        note = "" if r["complete"] else " (partial: " + ", ".join(r.get("caveats", [])) + ")"
        paper = _cell(r["paper_test_acc"])
        if _paper_or_target(r.get("paper_source")) == "target":
            paper += " (target)"
        lines.append(f"| {r['row']}{note} | `{r['recipe']}` | {final} | {best} | "
                     f"{paper} | {r['epochs']} | "
                     f"{_duration(r['train_seconds'])} | {_ran_on(r.get('card'))} |")
    return "\n".join(lines)


def curves_figure(rows: list, path: Path) -> Path:
    """Each row's test error (100 - accuracy, in %, log scale) after every epoch, and the
    paper's error as a dashed line of the same colour."""
    import matplotlib  # lazy: only --plot draws
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    errors = []  # every point drawn: a log axis needs one above 0
    for r in rows:
        epochs = [e for e in read_metrics(Path(r["path"]) / METRICS)
                  if e.get("kind") == "epoch" and e.get("test_acc") is not None]
        if not epochs:
            continue
        error = [100 * (1 - e["test_acc"]) for e in epochs]
        errors += error
        line, = ax.plot([e["epoch"] for e in epochs], error, marker="o",
                        markersize=3, label=f"{r['recipe']} ({r['card'].get('backend', '?')})"
                        if isinstance(r.get("card"), dict) else r["recipe"])
        if r["paper_test_acc"] is not None:
            ax.axhline(100 - r["paper_test_acc"], color=line.get_color(), linestyle="--",
                       linewidth=1)
    log = any(e > 0 for e in errors)  # not for tiny runs with no test error at all
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test error (%), log scale" if log else "test error (%)")
    ax.set_title("test error per epoch (dashed: the paper's)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def _ran_on(card: Any) -> str:
    """'numpy, AMD EPYC, 2 CPUs' or 'cupy, NVIDIA H200': where a row was measured."""
    if not isinstance(card, dict):
        return "-"
    where = card.get("device") or ", ".join(str(card.get("machine", "?")).split(", ")[:2])
    return f"{card.get('backend', '?')}, {where}"


def _cell(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}%"


def _duration(seconds: Any) -> str:
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _paper_or_target(source: Any) -> str:
    """What a recipe's figure is: the paper's, or a target where the paper gives none
    (its source then starts with 'target')."""
    return "target" if str(source or "").startswith("target") else "paper"


def list_recipes() -> str:
    lines = [f"recipes in {RECIPES_DIR}:"]
    names = recipe_names()
    width = max(map(len, names), default=0) + 1
    for name in names:
        try:
            r = load_recipe(name)
        except CapsflowError as exc:
            lines.append(f"  {name:<{width}} (cannot be read: {exc})")
            continue
        paper = "" if r.paper is None else f"; {_paper_or_target(r.source)} {r.paper:.2f}%"
        lines.append(f"  {name:<{width}} {r.row} ({r.config.dataset}, {r.config.num_epochs} epochs, "
                     f"{r.config.describe_lr()}{paper})")
    return "\n".join(lines)
