"""Labelled safe/unsafe prompts for task-specific search, split three ways.

``walledai/XSTest`` (columns prompt, focus, type, note, label) is loaded from the
hub where reachable; offline, a 60-prompt set in the same schema, written for
casrap (30 safe prompts that *sound* dangerous — homonyms, figurative language —
and 30 unsafe contrasts), ships with the package. Search, validation and test are
disjoint, stratified by label, with a fixed seed: search selects, validation picks
the winner, test is only reported.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from importlib import resources

import numpy as np

from casrap.errors import InputError


@dataclass(frozen=True)
class LabelledPrompt:
    prompt: str
    unsafe: bool
    type: str = ""


@dataclass
class TaskSplits:
    source: str
    search: list[LabelledPrompt]
    validation: list[LabelledPrompt]
    test: list[LabelledPrompt]


def _bundled() -> list[LabelledPrompt]:
    text = resources.files("casrap.data").joinpath("safety_prompts.csv").read_text(encoding="utf-8")
    return [LabelledPrompt(r["prompt"], r["label"] == "unsafe", r["type"]) for r in csv.DictReader(io.StringIO(text))]


def _hub(dataset_id: str) -> list[LabelledPrompt]:
    from datasets import load_dataset

    from casrap.hub import hub_reachable

    if not hub_reachable():
        raise ConnectionError("the Hugging Face hub is not reachable")
    data = load_dataset(dataset_id, split="test")
    return [LabelledPrompt(r["prompt"], str(r["label"]).lower() == "unsafe", r.get("type", "")) for r in data]


def load_safety_task(source: str = "auto", seed: int = 0) -> TaskSplits:
    """``auto`` tries XSTest on the hub, then the bundled set; or ``bundled`` / a hub id."""
    items: list[LabelledPrompt]
    name = source
    if source in {"auto", "walledai/XSTest"}:
        try:
            items, name = _hub("walledai/XSTest"), "walledai/XSTest"
        except Exception as err:  # noqa: BLE001 - offline or no datasets
            if source != "auto":
                raise InputError(f"cannot load walledai/XSTest ({type(err).__name__}); offline, use --task-data bundled") from err
            items, name = _bundled(), "casrap-safety (bundled)"
    elif source == "bundled":
        items, name = _bundled(), "casrap-safety (bundled)"
    else:
        try:
            items = _hub(source)
        except Exception as err:  # noqa: BLE001
            raise InputError(f"cannot load {source!r} ({type(err).__name__}); offline, use --task-data bundled") from err
    rng = np.random.default_rng(seed)
    parts: list[list[LabelledPrompt]] = [[], [], []]
    for label in (False, True):
        group = [p for p in items if p.unsafe == label]
        order = rng.permutation(len(group))
        for rank, i in enumerate(order):
            parts[rank % 3].append(group[i])
    if min(len(p) for p in parts) < 4:
        raise InputError(f"task data {name!r} is too small to split three ways")
    return TaskSplits(name, *parts)
