"""Numbered run folders (``reports/train-1``, ``reports/test-2``) and metric files."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from casrap.errors import InputError


def new_run_dir(root: Path, kind: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    numbers = [int(m.group(1)) for p in root.iterdir() if (m := re.fullmatch(rf"{kind}-(\d+)", p.name))]
    path = root / f"{kind}-{max(numbers, default=0) + 1}"
    path.mkdir()
    return path


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, default=float) + "\n")
        handle.flush()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise InputError(f"{run_dir} has no metrics.jsonl: not a casrap run folder")
    records = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if number == len(lines):
                break  # a run killed mid-write leaves a partial last line; keep the rest
            raise InputError(f"{path}:{number}: invalid JSON") from None
    return records
