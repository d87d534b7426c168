"""GQA-safe structural attention-head pruning.

Two unit types, both keeping the query->kv mapping intact:

- ``query``: remove the same number of query heads from every kv group of a layer,
  so the group size stays uniform (``num_key_value_groups`` shrinks);
- ``group``: remove whole kv groups (a kv head together with all its query heads).

Kept query heads are laid out group by group, so that query head ``j`` of the pruned
layer belongs to kv head ``j // new_group_size`` — the layout ``repeat_kv`` and SDPA's
``enable_gqa`` both assume. head_dim and RoPE are untouched.
"""

from __future__ import annotations

import heapq
import math
from typing import Any

import torch
from torch import nn

from casrap.pruners.modules import InputMaskedLinear, keep_mask, shell, sliced_linear


def _channels(heads: list[int], head_dim: int) -> list[int]:
    return [h * head_dim + i for h in heads for i in range(head_dim)]


def plan_query_heads(
    head_importance: torch.Tensor, kv_heads: int, fraction: float, scope: str = "global"
) -> tuple[dict[int, dict[str, list[int]]], int]:
    """Rank "one query head out of every group" units globally or per layer.

    Returns (per-layer kept heads, number of query heads removed). A unit in layer l
    removes the s-th least important query head of every group; each group keeps at
    least one query head. ``scope="layer"`` removes the same number of units from
    every layer (uniform shapes, exportable); ``"global"`` lets layers differ.
    """
    n_layers, q_heads = head_importance.shape
    group = q_heads // kv_heads
    target = math.floor(fraction * n_layers * q_heads + 1e-9)
    units = target // kv_heads
    order = [head_importance[l].view(kv_heads, group).argsort(dim=1) for l in range(n_layers)]  # per group, ascending

    def unit_score(l: int, s: int) -> float:
        imp = head_importance[l].view(kv_heads, group)
        return float(imp.gather(1, order[l][:, s : s + 1]).sum())

    taken = [0] * n_layers
    if scope == "layer":
        per_layer = min(units // n_layers, group - 1)
        taken = [per_layer] * n_layers
        units = 0
    heap = [(unit_score(l, taken[l]), l) for l in range(n_layers) if taken[l] < group - 1] if group > 1 else []
    heapq.heapify(heap)
    for _ in range(units):
        if not heap:
            break
        _, l = heapq.heappop(heap)
        taken[l] += 1
        if taken[l] < group - 1:
            heapq.heappush(heap, (unit_score(l, taken[l]), l))
    plan: dict[int, dict[str, list[int]]] = {}
    for l in range(n_layers):
        if taken[l] == 0:
            continue
        removed = order[l][:, : taken[l]]
        kept_q = [
            g * group + h
            for g in range(kv_heads)
            for h in range(group)
            if h not in set(removed[g].tolist())
        ]
        plan[l] = {"kv": list(range(kv_heads)), "q": kept_q}
    return plan, sum(taken) * kv_heads


def plan_kv_groups(
    group_importance: torch.Tensor, group_size: int, fraction: float
) -> tuple[dict[int, dict[str, list[int]]], int]:
    """Global ranking of whole kv groups; every layer keeps at least one group."""
    n_layers, kv_heads = group_importance.shape
    target = math.floor(fraction * n_layers * kv_heads + 1e-9)
    candidates = sorted(
        ((float(group_importance[l, g]), l, g) for l in range(n_layers) for g in range(kv_heads)),
    )
    removed: dict[int, set[int]] = {}
    count = 0
    for _, l, g in candidates:
        if count >= target:
            break
        if len(removed.get(l, set())) >= kv_heads - 1:
            continue
        removed.setdefault(l, set()).add(g)
        count += 1
    plan = {}
    for l, gone in removed.items():
        kept_kv = [g for g in range(kv_heads) if g not in gone]
        plan[l] = {"kv": kept_kv, "q": [g * group_size + h for g in kept_kv for h in range(group_size)]}
    return plan, count * group_size


def build_attention(attn: nn.Module, kept: dict[str, list[int]], head_dim: int, functional: bool) -> nn.Module:
    """A shell of ``attn`` running only the kept heads (or masking the others)."""
    kv, q = kept["kv"], kept["q"]
    new = shell(attn)
    if functional:
        total_q = attn.q_proj.out_features // head_dim
        new.o_proj = InputMaskedLinear(attn.o_proj, keep_mask(total_q * head_dim, _channels(q, head_dim)))
        return new
    old_group = attn.num_key_value_groups
    if len(q) % len(kv):
        raise ValueError("kept query heads must divide evenly over kept kv heads")
    for head in q:
        if head // old_group not in kv:
            raise ValueError(f"query head {head} belongs to a removed kv head")
    new.q_proj = sliced_linear(attn.q_proj, rows=_channels(q, head_dim))
    new.k_proj = sliced_linear(attn.k_proj, rows=_channels(kv, head_dim))
    new.v_proj = sliced_linear(attn.v_proj, rows=_channels(kv, head_dim))
    new.o_proj = sliced_linear(attn.o_proj, cols=_channels(q, head_dim))
    new.num_key_value_groups = len(q) // len(kv)
    assert new.q_proj.out_features == new.k_proj.out_features * new.num_key_value_groups
    return new


def check_gqa_integrity(attn: Any, head_dim: int) -> None:
    """Raise if q/k projections and the group size disagree (SDPA would hide it)."""
    q = attn.q_proj.out_features
    k = attn.k_proj.out_features
    if q != k * attn.num_key_value_groups or q % head_dim or k % head_dim:
        raise AssertionError(f"GQA mismatch: q={q}, k={k}, groups={attn.num_key_value_groups}")
