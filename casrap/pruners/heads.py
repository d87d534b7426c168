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
from casrap.pruners.reorder import (
    KEPT_KV,
    KEPT_Q,
    KV_ORDER,
    Q_ORDER,
    GroupedColsLinear,
    GroupedRowsLinear,
    head_orders,
    inverse,
    prefix_length,
    view_linear,
)


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


def build_attention(attn: nn.Module, kept: dict[str, list[int]], head_dim: int, functional: bool, keep_order: bool = False) -> nn.Module:
    """A shell of ``attn`` running only the kept heads (or masking the others).

    ``kept`` names original heads. On a reordered base (:mod:`casrap.pruners.reorder`)
    whose kept kv groups are a prefix of its layout and whose kept query heads are a
    prefix of every kept group, q/k/v/o are views of the base weights
    (``casrap_zero_copy``); k/v are the base modules themselves when every kv head is
    kept. Otherwise the kept heads are copied. ``casrap_kept_q`` / ``casrap_kept_kv``
    list the original heads held at each of the module's head positions. ``keep_order``
    holds the heads in the order of ``kept`` instead (copies on a reordered base).
    """
    kv, q = kept["kv"], kept["q"]
    q_order, kv_order = head_orders(attn)
    total_q = attn.q_proj.out_features // head_dim
    total_kv = attn.k_proj.out_features // head_dim
    old_group = total_q // total_kv
    new = shell(attn)
    for attr in (Q_ORDER, KV_ORDER):
        new.__dict__.pop(attr, None)
    new.casrap_zero_copy = False
    q_pos = inverse(q_order, total_q)[torch.as_tensor(q, dtype=torch.long)].tolist()
    kv_pos = inverse(kv_order, total_kv)[torch.as_tensor(kv, dtype=torch.long)].tolist()
    if not keep_order:
        q_pos, kv_pos = sorted(q_pos), sorted(kv_pos)
    if functional:  # masks copy no weights
        new.casrap_zero_copy = None
        new.o_proj = InputMaskedLinear(attn.o_proj, keep_mask(total_q * head_dim, _channels(q_pos, head_dim)))
        setattr(new, KEPT_Q, q_order.tolist() if q_order is not None else list(range(total_q)))
        setattr(new, KEPT_KV, kv_order.tolist() if kv_order is not None else list(range(total_kv)))
        return new
    if len(q) % len(kv):
        raise ValueError("kept query heads must divide evenly over kept kv heads")
    for head in q:
        if head // old_group not in kv:
            raise ValueError(f"query head {head} belongs to a removed kv head")
    per_group = len(q) // len(kv)
    groups = prefix_length(kv_pos)
    in_group = [p - (p // old_group) * old_group for p in q_pos]
    if groups is not None and in_group == list(range(per_group)) * groups:
        if per_group == old_group:
            new.q_proj = view_linear(attn.q_proj, rows=groups * old_group * head_dim)
            new.o_proj = view_linear(attn.o_proj, cols=groups * old_group * head_dim)
        else:
            new.q_proj = GroupedRowsLinear(attn.q_proj, groups, old_group * head_dim, per_group * head_dim)
            new.o_proj = GroupedColsLinear(attn.o_proj, groups, old_group * head_dim, per_group * head_dim)
        if groups == total_kv:  # every kv head kept: the base k/v modules themselves
            new.k_proj, new.v_proj = attn.k_proj, attn.v_proj
        else:
            new.k_proj = view_linear(attn.k_proj, rows=groups * head_dim)
            new.v_proj = view_linear(attn.v_proj, rows=groups * head_dim)
        new.casrap_zero_copy = True
    else:
        new.q_proj = sliced_linear(attn.q_proj, rows=_channels(q_pos, head_dim))
        if kv_pos == list(range(total_kv)):
            new.k_proj, new.v_proj = attn.k_proj, attn.v_proj
        else:
            new.k_proj = sliced_linear(attn.k_proj, rows=_channels(kv_pos, head_dim))
            new.v_proj = sliced_linear(attn.v_proj, rows=_channels(kv_pos, head_dim))
        new.o_proj = sliced_linear(attn.o_proj, cols=_channels(q_pos, head_dim))
    new.num_key_value_groups = len(q) // len(kv)
    setattr(new, KEPT_Q, q_order[q_pos].tolist() if q_order is not None else q_pos)
    setattr(new, KEPT_KV, kv_order[kv_pos].tolist() if kv_order is not None else kv_pos)
    assert new.q_proj.out_features == new.k_proj.out_features * new.num_key_value_groups
    return new


def check_gqa_integrity(attn: Any, head_dim: int) -> None:
    """Raise if q/k projections and the group size disagree (SDPA would hide it)."""
    q = attn.q_proj.out_features
    k = attn.k_proj.out_features
    if q != k * attn.num_key_value_groups or q % head_dim or k % head_dim:
        raise AssertionError(f"GQA mismatch: q={q}, k={k}, groups={attn.num_key_value_groups}")
