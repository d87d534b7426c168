"""Prompt datasets: the bundled set, a user's CSV/JSONL, or a hub dataset id.

Splits are fixed and grouped, independent of every seed. The bundled ``prompts.csv``
(541 prompts, six categories) carries ``group`` and ``split`` columns written by
:mod:`casrap.data.build_prompts`: near-duplicates (one template, one task, one source
passage) share a group, and a group lies wholly on one side (413 train, 122 test, 6
left out because their passage straddles the border). A user file may carry the same
columns; without ``split``, a prompt's group (its ``group`` column, else its text) is
hashed, and about 20% of groups go to test. A user file needs a ``prompt`` or
``Prompt`` column; a malformed one gets an error naming the line or column.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

from casrap.errors import InputError

Split = Literal["train", "test", "all"]
PROMPT_COLUMNS = ("prompt", "Prompt")
TEST_FRACTION = 0.2


def text_key(text: str) -> str:
    """A short, stable key of a prompt's text (checkpoints store these, not the prompts)."""
    return hashlib.sha1(text.strip().encode("utf-8")).hexdigest()[:16]


def hashed_split(group: str) -> str:
    """``test`` for about 20% of group names, fixed by their hash (no seed involved)."""
    bucket = int(hashlib.sha1(group.encode("utf-8")).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "test" if bucket < TEST_FRACTION else "train"


@dataclass(frozen=True)
class Prompt:
    """One prompt; ``group`` is its near-duplicate family, ``split`` train | test | none."""

    id: str
    text: str
    category: str = ""
    group: str = ""
    split: str = ""

    @property
    def key(self) -> str:
        return text_key(self.text)


def _make(id_: str, text: str, category: str, group: str, split: str, where: str) -> Prompt:
    group = group or text
    split = split or hashed_split(group)
    if split not in {"train", "test", "none"}:
        raise InputError(f"{where}: split must be train, test or none, not {split!r}")
    return Prompt(id_, text, category, group, split)


def _split(prompts: list[Prompt], split: Split) -> list[Prompt]:
    if split == "all":
        return [p for p in prompts if p.split != "none"]
    return [p for p in prompts if p.split == split]


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
            prompts.append(_make(str(row.get("id") or len(prompts)), value, row.get("category") or row.get("type") or "",
                                 (row.get("group") or "").strip(), (row.get("split") or "").strip(), f"{where}:{line}"))
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
        prompts.append(_make(str(record.get("id", len(prompts))), value, str(record.get("category", "")),
                             str(record.get("group", "")).strip(), str(record.get("split", "")).strip(), f"{where}:{number}"))
    return prompts


def _read_hub(dataset_id: str) -> list[Prompt]:
    try:
        from datasets import load_dataset

        from casrap.hub import hub_reachable

        if not hub_reachable():
            raise ConnectionError("the Hugging Face hub is not reachable")
        data = load_dataset(dataset_id, split="train")
    except Exception as err:  # noqa: BLE001
        raise InputError(
            f"cannot load dataset {dataset_id!r} from the hub ({type(err).__name__}); "
            "offline, omit the option to use the bundled prompts, or pass a local CSV/JSONL"
        ) from err
    column = _prompt_column(list(data.column_names), dataset_id)
    return [_make(str(i), str(t).strip(), "", "", "", dataset_id) for i, t in enumerate(data[column]) if str(t).strip()]


def load_prompts(source: str | Path | None = None, split: Split = "all") -> list[Prompt]:
    """Load prompts; ``source`` None means the bundled set. ``split`` is fixed (see module doc)."""
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
    chosen = _split(prompts, split)
    if not chosen:
        raise InputError(f"no {split!r} prompts in {source or 'the bundled set'}")
    return chosen
