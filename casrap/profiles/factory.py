"""Build a ProfileBank from specs and plan files in one call (CLI, env, bench)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from casrap.models.architecture import describe
from casrap.profiles.bank import ProfileBank
from casrap.profiles.catalogue import FULL, build_plan, parse_spec
from casrap.profiles.plan import PruningPlan
from casrap.pruners.importance import Importance, load_or_calibrate
from casrap.pruners.lowrank import load_or_fit_basis

log = logging.getLogger(__name__)


def is_plan_file(item: str) -> bool:
    return item.endswith(".json")


def build_bank(
    model: Any,
    profiles: Iterable[str],
    base_model: str = "",
    importance: Importance | None = None,
    structural: bool | None = None,
    tokenizer: Any = None,
) -> ProfileBank:
    """A bank holding ``none`` plus every spec (``ffn-25``) or plan file (``x.json``).

    Importance is ``importance`` if given, else the saved calibration for this model,
    else a calibration run now on the calibration text (needs ``tokenizer``; see
    :func:`load_or_calibrate`). The source is recorded in each plan's ``meta.importance``.
    ``lowrank-P`` specs and plans with ranks use the model's PCA basis instead: the
    cached one, else one fitted now on the calibration text (needs ``tokenizer``; see
    :func:`load_or_fit_basis`); it is released once the profiles are built.
    """
    bank = ProfileBank(model, base_model=base_model)
    info = describe(model)
    imp = importance
    for item in profiles:
        if item == FULL:
            continue
        if is_plan_file(item):
            plan = PruningPlan.load(Path(item))
            if plan.ranks and bank.lowrank_basis is None:
                bank.lowrank_basis = load_or_fit_basis(model, tokenizer, key=bank.fingerprint)
        elif parse_spec(item)[0] == "lowrank":
            if bank.lowrank_basis is None:
                bank.lowrank_basis = load_or_fit_basis(model, tokenizer, key=bank.fingerprint)
                log.info("low-rank basis: %s", bank.lowrank_basis.source)
            plan = build_plan(item, imp, info, base_model=base_model, structural=structural, lowrank_basis=bank.lowrank_basis)
            plan.fingerprint = bank.fingerprint
        else:
            if imp is None:
                imp, _ = load_or_calibrate(model, tokenizer)
                log.info("importance source: %s", imp.source)
            plan = build_plan(item, imp, info, base_model=base_model, structural=structural)
            plan.fingerprint = bank.fingerprint
        bank.add(plan)
    bank.lowrank_basis = None  # ~115 MB for SmolLM2; reloaded from the cache if another rank plan comes
    return bank
