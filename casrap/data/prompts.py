"""Prompt datasets: the bundled set, a user's CSV/JSONL, or a hub dataset id.

The bundled ``prompts.csv`` (541 prompts, six categories) splits 80/20 into train and
test with a fixed seed. A user file needs a ``prompt`` or ``Prompt`` column; a
malformed one gets an error naming the line or column.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

import numpy as np

from casrap.errors import InputError

Split = Literal["train", "test", "all"]
PROMPT_COLUMNS = ("prompt", "Prompt")
TRAIN_FRACTION = 0.8


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    category: str = ""


def _split(prompts: list[Prompt], split: Split, seed: int) -> list[Prompt]:
    if split == "all":
        return prompts
    order = np.random.default_rng(seed).permutation(len(prompts))
    cut = int(round(TRAIN_FRACTION * len(prompts)))
    chosen = order[:cut] if split == "train" else order[cut:]
    return [prompts[i] for i in sorted(chosen)]


def _prompt_column(fields: list[str] | None, where: str) -> str:
    for name in PROMPT_COLUMNS:
        if fields and name in fields:
            return name
    raise InputError(f"{where}: no prompt column (expected one of {', '.join(PROMPT_COLUMNS)}; found {fields})")


def _read_csv(text: str, where: str) -> list[Prompt]:
    reader = csv.DictReader(io.StringIO(text))
    column = _prompt_column(reader.fieldnames, where)
    prompts = []
    try:
        for row in reader:
            line = reader.line_num
            if None in row:
                raise InputError(f"{where}:{line}: more fields than the header has")
            value = (row.get(column) or "").strip()
            if not value:
                raise InputError(f"{where}:{line}: empty {column!r}")
            prompts.append(Prompt(str(row.get("id") or len(prompts)), value, row.get("category") or row.get("type") or ""))
    except csv.Error as err:
        raise InputError(f"{where}:{reader.line_num}: {err}") from err
    return prompts


def _read_jsonl(text: str, where: str) -> list[Prompt]:
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            raise InputError(f"{where}:{number}: invalid JSON ({err.args[0]})") from err
        if not isinstance(record, dict):
            raise InputError(f"{where}:{number}: expected a JSON object")
        column = _prompt_column(list(record), f"{where}:{number}")
        value = str(record[column]).strip()
        if not value:
            raise InputError(f"{where}:{number}: empty {column!r}")
        prompts.append(Prompt(str(record.get("id", len(prompts))), value, str(record.get("category", ""))))
    return prompts


def _read_hub(dataset_id: str) -> list[Prompt]:
    try:
        from datasets import load_dataset

        from casrap.measure.corpus import hub_reachable

        if not hub_reachable():
            raise ConnectionError("the Hugging Face hub is not reachable")
        data = load_dataset(dataset_id, split="train")
    except Exception as err:  # noqa: BLE001
        raise InputError(
            f"cannot load dataset {dataset_id!r} from the hub ({type(err).__name__}); "
            "offline, omit the option to use the bundled prompts, or pass a local CSV/JSONL"
        ) from err
    column = _prompt_column(list(data.column_names), dataset_id)
    return [Prompt(str(i), str(t).strip()) for i, t in enumerate(data[column]) if str(t).strip()]


def load_prompts(source: str | Path | None = None, split: Split = "all", seed: int = 0) -> list[Prompt]:
    """Load prompts; ``source`` None means the bundled set."""
    if source is None:
        text = resources.files("casrap.data").joinpath("prompts.csv").read_text(encoding="utf-8")
        prompts = _read_csv(text, "prompts.csv")
    else:
        path = Path(source).expanduser()
        if path.suffix.lower() in {".csv", ".jsonl", ".json"} or path.exists():
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as err:
                raise InputError(f"cannot read {path}: {err}") from err
            reader = _read_jsonl if path.suffix.lower() in {".jsonl", ".json"} else _read_csv
            prompts = reader(text, path.name)
        else:
            prompts = _read_hub(str(source))
    if not prompts:
        raise InputError(f"no prompts in {source or 'the bundled set'}")
    return _split(prompts, split, seed)
