"""Recipes: one row of the results table (docs/results.md) as a small YAML file.

A recipe names a graph and its ``--set`` values, the data, and every training setting
(optimizer, learning-rate schedule, batch, epochs, seed, augmentation), plus the paper's
figure for the row. ``capsflow reproduce RECIPE`` runs it (runners/reproduce.py)::

    name: mnist-capsnet
    row: "MNIST: CapsNet, 3 routing iterations, reconstruction"
    graph: ../capsnet.yaml               # relative to the recipe
    set: {routing_iters: 3}
    data: {dataset: mnist}
    train: {optimizer: adam, lr: 1.0e-3, lr_schedule: per-step, batch_size: 100, epochs: 100}
    paper: {test_acc: 99.75, source: "Sabour et al. 2017, Table 1"}

The keys of ``data`` and ``train`` are TrainConfig's fields (``epochs`` is num_epochs);
a key that is not one, or a value of the wrong kind, is one line naming the file and line.
Recipes live in graphs/recipes/ and are read like graphs: bounded, plain data only.
"""
from __future__ import annotations

import math
import typing
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

from capsflow.errors import CapsflowError
from capsflow.lang.spec import NAME_PATTERN
from capsflow.lang.yamlio import LocDict, load_yaml
from capsflow.runners.training import TrainConfig
from capsflow.training.json_fields import hint_name, json_type_name, matches_hint, shown

#: Where recipes live; ``capsflow reproduce NAME`` looks here for NAME.yaml.
RECIPES_DIR = Path(__file__).resolve().parent.parent / "graphs" / "recipes"

TOP_KEYS = ("name", "row", "graph", "set", "data", "train", "paper", "notes")
REQUIRED = ("name", "row", "graph", "data", "train")
DATA_KEYS = ("dataset", "emnist_split", "image_size", "crop", "channels", "multimnist_count",
             "multimnist_fresh", "limit_train", "limit_test")
#: train: TrainConfig's fields under these names (``epochs`` is ``num_epochs``).
TRAIN_KEYS = {"optimizer": "optimizer", "lr": "lr", "lr_schedule": "lr_schedule",
              "lr_decay": "lr_decay", "decay_steps": "decay_steps", "min_lr": "min_lr",
              "batch_size": "batch_size", "epochs": "num_epochs", "val_epoch": "val_epoch",
              "shift": "shift", "flip": "flip", "seed": "seed", "dtype": "dtype"}


class RecipeError(CapsflowError):
    """A recipe file that cannot be run, with the file and line."""


@dataclass
class Recipe:
    name: str
    row: str                 # the row's label in the results table
    file: Path
    text: str                # the file as read: a rerun checks it is the same recipe
    graph: Path
    overrides: dict          # the graph's --set values
    config: TrainConfig      # data and training settings, checked
    paper: Optional[float]   # the paper's (or the target) test accuracy in %, if any
    source: str              # where that figure comes from
    notes: str
    own_epochs: int          # the file's epochs, whatever with_changes sets

    def with_changes(self, **config_changes: Any) -> "Recipe":
        """This recipe with some settings changed (fewer epochs, a data subset, another
        backend); the row then says it is not the recipe's own."""
        config = replace(self.config, **config_changes)
        config.check()
        return replace(self, config=config)


def find_recipe(name_or_path: str) -> Path:
    """A recipe file: ``name_or_path`` itself when it names a file, else
    graphs/recipes/NAME.yaml; one line listing the recipes when neither exists."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    named = RECIPES_DIR / f"{name_or_path}.yaml"
    if "/" not in name_or_path and named.is_file():
        return named
    raise RecipeError(f"no recipe {name_or_path!r}: not a file, and not one of "
                      f"{', '.join(recipe_names())} (graphs/recipes/)")


def recipe_names() -> list:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str) -> Recipe:
    """Read and check a recipe (see the module docstring)."""
    path = find_recipe(name_or_path)
    doc = load_yaml(path)
    where = _Where(path)
    if not isinstance(doc, LocDict):
        raise RecipeError(f"{path}: a recipe is a mapping of {', '.join(TOP_KEYS)}")
    where.known_keys(doc, TOP_KEYS, "a recipe")
    for key in REQUIRED:
        if key not in doc:
            raise RecipeError(f"{path}:{doc.line}: the recipe has no '{key}' (it needs "
                              f"{', '.join(REQUIRED)})")
    name, row = where.text(doc, "name"), where.text(doc, "row")
    if not NAME_PATTERN.fullmatch(name):
        raise RecipeError(f"{where.at(doc, 'name')}: 'name' must be a plain file name "
                          f"(letters, digits, '_', '.', '-'; not starting with '.' or '-'), "
                          f"got {json_type_name(name)} {shown(name)}: it names the run's folder")
    graph = (path.parent / where.text(doc, "graph")).resolve()
    if not graph.is_file():
        raise RecipeError(f"{where.at(doc, 'graph')}: graph {doc['graph']!r} is not a file "
                          f"(looked for {graph})")
    overrides = dict(where.mapping(doc, "set")) if "set" in doc else {}
    values = {}
    data = where.mapping(doc, "data")
    where.known_keys(data, DATA_KEYS, "data")
    if "dataset" not in data:
        raise RecipeError(f"{where.at(doc, 'data')}: data has no 'dataset'")
    values.update({k: where.typed(data, k, k, "data") for k in data})
    train = where.mapping(doc, "train")
    where.known_keys(train, TRAIN_KEYS, "train")
    values.update({TRAIN_KEYS[k]: where.typed(train, k, TRAIN_KEYS[k], "train") for k in train})
    config = TrainConfig(**values)
    try:
        config.check()
    except CapsflowError as exc:
        raise RecipeError(f"{path}: {exc}") from None
    paper, source = None, ""
    if "paper" in doc:
        target = where.mapping(doc, "paper")
        where.known_keys(target, ("test_acc", "source"), "paper")
        if "test_acc" in target:
            paper = target["test_acc"]
            if not (matches_hint(paper, float) and 0 <= paper <= 100):
                raise RecipeError(f"{where.at(target, 'test_acc')}: paper.test_acc is a "
                                  f"test accuracy in %, got {paper!r}")
        source = where.text(target, "source") if "source" in target else ""
    notes = where.text(doc, "notes") if "notes" in doc else ""
    return Recipe(name, row, path, path.read_text(), graph, overrides, config,
                  None if paper is None else float(paper), source, notes, config.num_epochs)


class _Where:
    """Checks of one recipe's values, each failing with ``FILE:LINE: ...``."""

    def __init__(self, path: Path) -> None:
        self.path, self.hints = path, typing.get_type_hints(TrainConfig)

    def at(self, mapping: Any, key: str) -> str:
        line = mapping.key_line(key) if isinstance(mapping, LocDict) else None
        return f"{self.path}:{line}" if line else str(self.path)

    def known_keys(self, mapping: dict, known: Any, what: str) -> None:
        for key in mapping:
            if key not in known:
                raise RecipeError(f"{self.at(mapping, key)}: unknown key {key!r} in {what}; "
                                  f"known: {', '.join(known)}")

    def text(self, mapping: dict, key: str) -> str:
        value = mapping[key]
        if not isinstance(value, str) or not value.strip():
            raise RecipeError(f"{self.at(mapping, key)}: '{key}' must be a non-empty string, "
                              f"got {json_type_name(value)}")
        return value

    def mapping(self, mapping: dict, key: str) -> dict:
        value = mapping[key]
        if not isinstance(value, dict):
            raise RecipeError(f"{self.at(mapping, key)}: '{key}' must be a mapping, "
                              f"got {json_type_name(value)}")
        return value

    def typed(self, mapping: dict, key: str, field: str, what: str) -> Any:
        """``mapping[key]`` as TrainConfig's ``field`` takes it (an int where a float is
        wanted is a float)."""
        value, hint = mapping[key], self.hints[field]
        if isinstance(value, int) and not isinstance(value, bool) and matches_hint(1.0, hint) \
                and not matches_hint(1, hint):
            value = float(value)
        if not matches_hint(value, hint) or (isinstance(value, float) and not math.isfinite(value)):
            raise RecipeError(f"{self.at(mapping, key)}: {what}.{key} is {json_type_name(value)} "
                              f"{value!r}, expected {hint_name(hint)}")
        return value

