"""Named pruning intensities turned into plans.

A profile spec is ``KIND-PERCENT``:

- ``heads-P``   query heads removed within every kv group (GQA ratio kept), P% of all;
- ``kvheads-P`` whole kv groups removed, P% of all groups;
- ``ffn-P``     P% of FFN channels sliced from every layer;
- ``ffnmask-P`` the same channels masked (functional, no shape change);
- ``layers-P``  P% of layers skipped by lowest block influence;
- ``lowrank-P`` P% of the decoder's projection parameters (q/k/v/o/gate/up/down)
  removed by LLM-Sieve low-rank projections, ranks allocated to minimise the summed
  relative output error on calibration text (:func:`casrap.pruners.lowrank.allocate_ranks`);
  always structural (there is no masked form), needs the model's cached PCA basis;
- ``sparse24-P`` the MLP weights of the P% least influential layers made 2:4 sparse
  (semi-structured sparse tensors: NVIDIA GPUs, compute capability >= 8.0; elsewhere a
  one-line error, and with ``STRUCTURAL_PRUNING=0`` a masked form for quality only);
- ``none``      the full model;
- a shipped plan's name (``ga-rates-40``, ``ga-layers-20``, ...): a plan JSON inside the
  package for one model (:mod:`casrap.profiles.shipped`), refused on another model.

Head specs rank units globally across layers; a ``:layer`` suffix (``heads-33:layer``)
removes the same number from every layer instead (uniform shapes, exportable).

Percentages round *down* to whole units; when that leaves zero units, the profile's
description says so rather than pretending to prune.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

from casrap.errors import CheckpointError, InputError
from casrap.models.architecture import ArchitectureInfo
from casrap.profiles.plan import PruningPlan
from casrap.pruners.ffn import plan_ffn_channels
from casrap.pruners.heads import plan_kv_groups, plan_query_heads
from casrap.pruners.importance import Importance
from casrap.pruners.layers import plan_skip_layers
from casrap.pruners.lowrank import LowRankBasis, allocate_ranks, removed_fraction
from casrap.profiles.shipped import is_shipped, load_shipped, shipped_names

FULL = "none"
CASRAP_V22 = ["none", "heads-5", "heads-10", "heads-15", "layers-5", "layers-10", "ffn-5", "ffn-8"]
TRADE_OFF = ["heads-25", "heads-50", "kvheads-33", "layers-25", "layers-50", "ffn-25", "ffn-50"]
KINDS = ("heads", "kvheads", "ffn", "ffnmask", "layers", "lowrank", "sparse24")
SHIPPED = "shipped"  # parse_spec's kind for a shipped plan's name
_SPEC = re.compile(r"^(heads|kvheads|ffn|ffnmask|layers|lowrank|sparse24)-(\d+(?:\.\d+)?)(:layer)?$")


def structural_default() -> bool:
    """``STRUCTURAL_PRUNING=0`` in the environment (or .env) selects functional masks."""
    return os.environ.get("STRUCTURAL_PRUNING", "1").strip().lower() not in {"0", "false", "no"}


def parse_spec(spec: str) -> tuple[str, float]:
    if spec == FULL:
        return FULL, 0.0
    match = _SPEC.match(spec.strip())
    if not match:
        if is_shipped(spec.strip()):
            return SHIPPED, 0.0
        raise InputError(f"unknown profile {spec!r}: use none, KIND-PERCENT with KIND in {', '.join(KINDS)}, or a shipped plan's name")
    percent = float(match.group(2))
    if not 0 < percent < 100:
        raise InputError(f"profile {spec!r}: percentage must be between 0 and 100")
    return match.group(1), percent / 100.0


def build_plan(
    spec: str,
    importance: Importance | None,
    info: ArchitectureInfo,
    base_model: str = "",
    structural: bool | None = None,
    lowrank_basis: LowRankBasis | None = None,
    fingerprint: str | None = None,
) -> PruningPlan:
    """Turn a spec like ``heads-10`` into a plan for this model and importance.

    ``lowrank-P`` uses ``lowrank_basis`` (PCA eigenvalues) instead of importance. A
    shipped plan's name loads that plan, checked against ``fingerprint`` (else the
    importance's model key): a plan made for another model is a one-line error.
    """
    kind, fraction = parse_spec(spec)
    if kind == SHIPPED:
        return load_shipped(spec.strip(), fingerprint or (importance.model_key if importance else None), base_model)
    functional = not (structural_default() if structural is None else structural)
    meta = {"spec": spec, "kind": kind, "fraction": fraction, "importance": importance.source if importance else ""}
    plan = PruningPlan(name=spec, base_model=base_model, meta=meta)
    if kind == FULL:
        plan.description = "full model"
        return plan
    if kind == "lowrank":
        if lowrank_basis is None:
            raise CheckpointError(f"profile {spec!r} needs the model's low-rank PCA basis (build it through build_bank)")
        plan.ranks = allocate_ranks(lowrank_basis, fraction)
        plan.meta.update(importance="", basis=lowrank_basis.source, allocation="min summed relative output error")
        ranks = [r for layer in plan.ranks.values() for r in layer.values()]
        total = len(lowrank_basis.matrices)
        plan.description = (f"{100 * removed_fraction(plan.ranks, lowrank_basis.shapes):.1f}% of projection parameters removed: "
                            f"{len(ranks)}/{total} projections factorised (ranks {min(ranks, default=0)}-{max(ranks, default=0)})")
        return plan
    if importance is None:
        raise CheckpointError(f"profile {spec!r} needs calibrated importance")
    if kind in {"heads", "kvheads"}:
        if kind == "heads":
            heads, removed = plan_query_heads(importance.heads, info.kv_heads, fraction, "layer" if spec.endswith(":layer") else "global")
            unit = f"query heads (one per kv group per unit, {info.kv_heads} per unit)"
        else:
            heads, removed = plan_kv_groups(importance.kv_groups(info.group_size), info.group_size, fraction)
            unit = "query heads in whole kv groups"
        total = info.layers * info.query_heads
        plan.heads = heads
        plan.functional = functional
        plan.description = f"{removed}/{total} {unit} removed ({100 * removed / total:.1f}%) in {len(heads)} layers"
    elif kind in {"ffn", "ffnmask"}:
        ffn, removed = plan_ffn_channels(importance.ffn, fraction)
        plan.ffn = ffn
        plan.functional = functional or kind == "ffnmask"
        per_layer = removed // info.layers if info.layers else 0
        plan.description = f"{per_layer}/{info.ffn_width} FFN channels per layer {'masked' if plan.functional else 'sliced'}"
    elif kind == "sparse24":  # 2:4 semi-structured MLPs (GPU kernels; masked form anywhere): casrap.pruners.sparse24
        from casrap.pruners.sparse24 import META_KEY, plan_sparse24_layers

        plan.meta[META_KEY] = plan_sparse24_layers(importance.layers, fraction)
        plan.functional = functional
        plan.description = (f"2:4 sparse MLP weights ({'masked' if functional else 'semi-structured'}) in "
                            f"{len(plan.meta[META_KEY])}/{info.layers} layers: {plan.meta[META_KEY]}")
        return plan
    else:
        plan.skip_layers = plan_skip_layers(importance.layers, fraction)
        plan.description = f"{len(plan.skip_layers)}/{info.layers} layers skipped: {plan.skip_layers}"
    if plan.is_identity:
        wanted = math.floor(fraction * 100)
        plan.description = f"{spec}: {wanted}% rounds to zero units on this model; runs the full model"
    if plan.functional and plan.heads:
        plan.description += " (masked)"
    return plan


def default_catalogue(model: Any = None) -> list[str]:
    """The env's default action catalogue: CASRAP v2.2 plus every shipped plan for ``model``.

    ``model``: a fingerprint (``llama-30L-...``), a model spec (``smollm2-135m``), or a
    loaded model; ``None`` gives CASRAP v2.2 alone.
    """
    if model is None:
        return list(CASRAP_V22)
    return [*CASRAP_V22, *(n for n in shipped_names(model) if n not in CASRAP_V22)]
