"""Plans shipped inside the package, addressable by name (``-p ga-rates-40``).

Every JSON plan under ``casrap/data/plans/<model dir>/`` is a shipped plan: the
searched plans (``ga-rates-20``, ``ga-layers-40``, ...) that ``casrap search`` found for
that model, and healed plans (whose ``meta`` names an adapter). The directory name is
the model spec the plans were made for (``smollm2-135m``); each plan's ``fingerprint``
(:func:`casrap.models.architecture.model_key`) pins the exact weights. A shipped plan
asked for by name on a model with another fingerprint is refused with a one-line
error naming the model it was made for, because plan indices only mean something on
the weights they were searched on.

Why a registry and not just paths: the env's default action catalogue should offer
the precomputed searched plans for the model it runs (:func:`default_catalogue`),
and every command should accept them by name, without the user locating files.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from casrap.errors import CheckpointError
from casrap.profiles.plan import PLAN_FORMAT, PruningPlan

log = logging.getLogger(__name__)

PLANS_DIR = "plans"  # under the casrap.data package


@dataclass(frozen=True)
class ShippedPlan:
    """One plan file in the package: where it is and which model it belongs to."""

    name: str
    model_dir: str  # the model spec it was made for (its directory name)
    fingerprint: str  # model_key of the weights; "" = not pinned (matched by model dir only)
    base_model: str
    description: str
    resource: str  # "<model dir>/<file>", relative to casrap/data/plans

    def load(self) -> PruningPlan:
        text = resources.files("casrap.data").joinpath(PLANS_DIR, *self.resource.split("/")).read_text(encoding="utf-8")
        plan = PruningPlan.from_dict(json.loads(text))
        plan.meta = {**plan.meta, "shipped": self.resource}
        return plan


@lru_cache(maxsize=1)
def shipped_index() -> dict[str, tuple[ShippedPlan, ...]]:
    """Plan name -> every shipped plan of that name (one per model dir), read once.

    Files that are not casrap plans are skipped with a warning rather than breaking
    every command that parses a profile spec.
    """
    root = resources.files("casrap.data").joinpath(PLANS_DIR)
    index: dict[str, list[ShippedPlan]] = {}
    if not root.is_dir():
        return {}
    for model_dir in sorted((d for d in root.iterdir() if d.is_dir()), key=lambda d: d.name):
        for item in sorted((f for f in model_dir.iterdir() if f.name.endswith(".json")), key=lambda f: f.name):
            try:
                data = json.loads(item.read_text(encoding="utf-8"))
                if data.get("format") != PLAN_FORMAT:
                    raise ValueError(f"format {data.get('format')!r}")
                entry = ShippedPlan(str(data["name"]), model_dir.name, str(data.get("fingerprint", "")),
                                    str(data.get("base_model", "")), str(data.get("description", "")),
                                    f"{model_dir.name}/{item.name}")
            except (OSError, ValueError, KeyError) as err:
                log.warning("skipping shipped plan %s/%s: %s", model_dir.name, item.name, err)
                continue
            index.setdefault(entry.name, []).append(entry)
    return {name: tuple(entries) for name, entries in index.items()}


def is_shipped(name: str) -> bool:
    """Whether ``name`` is a shipped plan's name (for any model)."""
    return name in shipped_index()


def _model_identity(model: Any) -> tuple[str, str]:
    """(fingerprint, spec) of a model given as a fingerprint, a spec, a loaded model or a LoadedModel."""
    if isinstance(model, str):
        return (model, "") if _looks_like_fingerprint(model) else ("", model)
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "config") and not hasattr(model, "config"):
        spec = str(getattr(model, "spec", "") or getattr(model, "model_name", "") or "")
        model = inner
    else:
        spec = ""
    from casrap.models.architecture import model_key

    return model_key(model), spec


def _looks_like_fingerprint(text: str) -> bool:
    """``llama-30L-9bbf4f5308ee``: model type, layer count, 12 hex digits."""
    parts = text.rsplit("-", 2)
    return len(parts) == 3 and parts[1].endswith("L") and parts[1][:-1].isdigit() and len(parts[2]) == 12 and all(
        c in "0123456789abcdef" for c in parts[2])


def _matches(entry: ShippedPlan, fingerprint: str, spec: str) -> bool:
    if fingerprint:
        return entry.fingerprint == fingerprint if entry.fingerprint else spec in {entry.model_dir, entry.base_model}
    return spec in {entry.model_dir, entry.base_model}


def shipped_names(model: Any) -> list[str]:
    """Names of the shipped plans made for ``model`` (fingerprint, spec, or a loaded model), sorted."""
    fingerprint, spec = _model_identity(model)
    return sorted(name for name, entries in shipped_index().items() if any(_matches(e, fingerprint, spec) for e in entries))


def load_shipped(name: str, fingerprint: str | None = None, spec: str = "") -> PruningPlan:
    """The shipped plan ``name`` for the model with ``fingerprint`` (one-line error if it was made for another).

    Without a fingerprint the plan is matched by model spec; if that is unknown too and
    only one model has a plan of that name, that plan is returned (the bank still checks
    its fingerprint when it is added).
    """
    entries = shipped_index().get(name)
    if not entries:
        raise CheckpointError(f"no shipped plan named {name!r}")
    for entry in entries:
        if _matches(entry, fingerprint or "", spec):
            return entry.load()
    if not fingerprint and not spec and len(entries) == 1:
        return entries[0].load()
    made_for = ", ".join(f"{e.model_dir} (fingerprint {e.fingerprint or '?'})" for e in entries)
    loaded = fingerprint or spec or "unknown"
    raise CheckpointError(f"shipped plan {name!r} was made for {made_for}, not the loaded model ({loaded})")


def package_plans_dir(model_dir: str) -> Path:
    """``casrap/data/plans/<model_dir>/`` in the source tree (where ``casrap search --ship`` writes)."""
    path = Path(str(resources.files("casrap.data").joinpath(PLANS_DIR))) / model_dir
    path.mkdir(parents=True, exist_ok=True)
    shipped_index.cache_clear()
    return path
