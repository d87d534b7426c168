"""Zero-copy profiles: reorder the base model once so that pruned profiles are views.

Why: a sliced FFN used to hold its kept channels as a new contiguous copy, so the
default catalogue held ~2x the model's weight bytes beyond the model. If the base
model's FFN channels are laid out by decreasing calibrated importance, every FFN
profile built from the same importance keeps a *prefix* of them: its ``gate``/``up``
rows and ``down`` columns are then views of the base tensors, and cost nothing.
Likewise for attention: kv groups are laid out by decreasing group importance and
the query heads inside each group by decreasing head importance, so ``kvheads-P``
keeps a prefix of groups and ``heads-P`` a prefix of every group.

The permutation is function-preserving (only the summation order of ``down_proj``
and ``o_proj`` changes, a float-rounding difference that the bank reports). It is
recorded on the base modules (``casrap_ffn_order``, ``casrap_q_order``,
``casrap_kv_order``: the ORIGINAL index held at each position), so plans keep naming
original indices (replayable, comparable across runs) and every consumer maps them:
the bank when it builds, calibration and PCA fitting when they run on a reordered
model (their results stay in original order), low-rank factorisation (basis rows).

Layout: a column prefix ``W[:, :k]`` of a row-major ``down_proj`` weight is a strided
view, and ``F.linear`` on it measured 7-11% slower than on a contiguous copy (1 thread,
576 x 1536, k = 768/1152). So ``down_proj`` and ``o_proj`` are stored column-major
(``Wt.contiguous().t()``): their column prefixes are contiguous row blocks of ``Wt`` and
ran as fast as copies.

Built profile modules carry, for healing and any other code that works per module,
the order of the channels/heads they hold in original indices: ``mlp.casrap_kept``
(FFN channels, in the module's row order), ``self_attn.casrap_kept_q`` and
``self_attn.casrap_kept_kv`` (heads). :func:`plan_to_module_order` turns a plan's
index list into the permutation that lays per-plan-index data (LoRA deltas) out in
module order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from casrap.errors import CheckpointError

FFN_ORDER = "casrap_ffn_order"
Q_ORDER = "casrap_q_order"
KV_ORDER = "casrap_kv_order"
KEPT_FFN = "casrap_kept"
KEPT_Q = "casrap_kept_q"
KEPT_KV = "casrap_kept_kv"


# ------------------------------------------------------------------ orders
def ffn_order(mlp: nn.Module) -> torch.Tensor | None:
    """Original FFN channel at each position of a (base) MLP; None = identity."""
    return getattr(mlp, FFN_ORDER, None)


def head_orders(attn: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(original query head, original kv head) at each position; None = identity."""
    return getattr(attn, Q_ORDER, None), getattr(attn, KV_ORDER, None)


def is_reordered(model: Any) -> bool:
    from casrap.models.architecture import decoder_layers

    layer = decoder_layers(model)[0]
    return ffn_order(layer.mlp) is not None or head_orders(layer.self_attn)[0] is not None


def inverse(order: torch.Tensor | None, size: int) -> torch.Tensor:
    """Position of every original index (identity when ``order`` is None)."""
    if order is None:
        return torch.arange(size)
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel())
    return inv


def to_original(values: torch.Tensor, order: torch.Tensor | None, dim: int = -1) -> torch.Tensor:
    """Per-position values (e.g. importance measured on a reordered model) in original order."""
    if order is None:
        return values
    return values.index_select(dim, inverse(order, order.numel()).to(values.device))


def channels(heads: Sequence[int] | torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row/column indices of whole heads."""
    heads = torch.as_tensor(heads, dtype=torch.long)
    return (heads.unsqueeze(1) * head_dim + torch.arange(head_dim)).reshape(-1)


def output_order(layer: nn.Module, name: str) -> torch.Tensor | None:
    """Original output index at each output position of a base projection (None = identity).

    gate/up outputs are FFN channels; q/k/v outputs are head channels; o/down outputs
    are the hidden size, never permuted.
    """
    if name in ("gate_proj", "up_proj"):
        return ffn_order(layer.mlp)
    if name in ("q_proj", "k_proj", "v_proj"):
        q, kv = head_orders(layer.self_attn)
        order = q if name == "q_proj" else kv
        return None if order is None else channels(order, int(layer.self_attn.head_dim))
    return None


# ---------------------------------------------------------------- permuting
def column_major(weight: torch.Tensor) -> torch.Tensor:
    """The same matrix stored column-major, so that column prefixes are contiguous."""
    return weight.t().contiguous().t()


def _set(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    linear.weight.data = weight
    if bias is not None:
        linear.bias.data = bias


@torch.no_grad()
def reorder_layer(layer: nn.Module, ffn_importance: torch.Tensor | None, head_importance: torch.Tensor | None, head_dim: int) -> None:
    """Permute one base decoder layer in place (same Parameter objects, new storage)."""
    if ffn_importance is not None and ffn_order(layer.mlp) is None:
        mlp = layer.mlp
        order = ffn_importance.float().argsort(descending=True, stable=True).cpu()
        idx = order.to(mlp.gate_proj.weight.device)
        for lin in (mlp.gate_proj, mlp.up_proj):
            _set(lin, lin.weight.index_select(0, idx).contiguous(), lin.bias.index_select(0, idx) if lin.bias is not None else None)
        _set(mlp.down_proj, column_major(mlp.down_proj.weight.index_select(1, idx)))
        setattr(mlp, FFN_ORDER, order)
    attn = layer.self_attn
    if head_importance is not None and head_orders(attn)[0] is None:
        q_heads = attn.q_proj.out_features // head_dim
        kv_heads = attn.k_proj.out_features // head_dim
        group = q_heads // kv_heads
        imp = head_importance.float().cpu().view(kv_heads, group)
        kv_order = imp.sum(1).argsort(descending=True, stable=True)
        q_order = torch.cat([g * group + imp[g].argsort(descending=True, stable=True) for g in kv_order.tolist()])
        dev = attn.q_proj.weight.device
        qc, kvc = channels(q_order, head_dim).to(dev), channels(kv_order, head_dim).to(dev)
        for lin, idx in ((attn.q_proj, qc), (attn.k_proj, kvc), (attn.v_proj, kvc)):
            _set(lin, lin.weight.index_select(0, idx).contiguous(), lin.bias.index_select(0, idx) if lin.bias is not None else None)
        _set(attn.o_proj, column_major(attn.o_proj.weight.index_select(1, qc)))
        setattr(attn, Q_ORDER, q_order)
        setattr(attn, KV_ORDER, kv_order)


def reorder_model(model: Any, importance: Any, head_dim: int) -> None:
    """Lay out every layer's FFN channels and heads by decreasing ``importance``."""
    from casrap.models.architecture import decoder_layers

    for i, layer in enumerate(decoder_layers(model)):
        reorder_layer(layer, importance.ffn[i], importance.heads[i], head_dim)


# ------------------------------------------------------- views over the base
def _plain_copy(module: nn.Module) -> nn.Linear:
    """An nn.Linear owning a copy of a grouped view's weight: what a deep copy should be
    (a standalone model owns its weights; PEFT and exporters expect plain Linears)."""
    weight = module.weight.detach().clone().contiguous()
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None, device="meta")
    out.weight = nn.Parameter(weight, requires_grad=False)
    if module.bias is not None:
        out.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
    return out


def add_state_dict_hook(module: nn.Module, hook: Any) -> None:
    """Run ``hook(module, state_dict, prefix, local_metadata)`` after ``module`` writes its state
    dict: ``register_state_dict_post_hook`` from torch 2.5, the older private name before."""
    register = getattr(module, "register_state_dict_post_hook", None) or module._register_state_dict_hook
    register(hook)


def _plain_state(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """State dicts name a grouped view's weight ``weight`` (2-D, as a Linear's), so that
    exporting a profile loads into a plain checkpoint."""
    state_dict.pop(prefix + "weight3", None)
    state_dict[prefix + "weight"] = module.weight.detach()


class GroupedRowsLinear(nn.Module):
    """Output rows ``[g*G*d, g*G*d + m*d)`` of every kept kv group ``g``: a q projection
    keeping the first ``m`` query heads of each group, as a view of the base weight.

    One batched matmul over the groups; outputs laid out group by group, as
    ``repeat_kv`` expects.
    """

    def __init__(self, base: nn.Linear, groups: int, group_rows: int, kept_rows: int) -> None:
        super().__init__()
        view = base.weight.detach().view(-1, group_rows, base.in_features)[:groups, :kept_rows]
        self.weight3 = nn.Parameter(view, requires_grad=False)
        self.bias = None
        if base.bias is not None:
            self.bias = nn.Parameter(base.bias.detach().view(-1, group_rows)[:groups, :kept_rows].reshape(-1).contiguous(), requires_grad=False)
        self.in_features = base.in_features
        self.out_features = groups * kept_rows
        add_state_dict_hook(self, _plain_state)

    @property
    def weight(self) -> torch.Tensor:
        """The 2-D weight (a copy): for shape-reading and exporting code only."""
        return self.weight3.reshape(self.out_features, self.in_features)

    def __deepcopy__(self, memo: dict[int, Any]) -> nn.Linear:
        return _plain_copy(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(1, -1, self.in_features).expand(self.weight3.shape[0], -1, -1)
        y = torch.bmm(flat, self.weight3.transpose(1, 2))  # [groups, tokens, kept_rows]
        y = y.transpose(0, 1).reshape(*lead, self.out_features)
        return y + self.bias if self.bias is not None else y


class GroupedColsLinear(nn.Module):
    """Input columns of the first ``m`` heads of every kept kv group: the o projection
    matching :class:`GroupedRowsLinear`, as a view of the (column-major) base weight."""

    def __init__(self, base: nn.Linear, groups: int, group_cols: int, kept_cols: int) -> None:
        super().__init__()
        view = base.weight.detach().view(base.out_features, -1, group_cols)[:, :groups, :kept_cols]
        self.weight3 = nn.Parameter(view.permute(1, 2, 0), requires_grad=False)  # [groups, kept_cols, out]
        self.bias = base.bias
        self.in_features = groups * kept_cols
        self.out_features = base.out_features
        add_state_dict_hook(self, _plain_state)

    @property
    def weight(self) -> torch.Tensor:
        return self.weight3.permute(2, 0, 1).reshape(self.out_features, self.in_features)

    def __deepcopy__(self, memo: dict[int, Any]) -> nn.Linear:
        return _plain_copy(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        groups, cols, _ = self.weight3.shape
        flat = x.reshape(-1, groups, cols).transpose(0, 1)  # [groups, tokens, cols]
        y = torch.bmm(flat, self.weight3).sum(0)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)


def view_linear(base: nn.Linear, rows: int | None = None, cols: int | None = None) -> nn.Linear:
    """A Linear whose weight is the first ``rows`` rows / ``cols`` columns of ``base``'s
    weight: a view sharing its storage (no copy)."""
    weight = base.weight.detach()
    bias = base.bias.detach() if base.bias is not None else None
    if rows is not None:
        weight = weight[:rows]
        bias = bias[:rows] if bias is not None else None
    if cols is not None:
        weight = weight[:, :cols]
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    out.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        out.bias = nn.Parameter(bias, requires_grad=False)
    return out


def prefix_length(positions: Sequence[int]) -> int | None:
    """``len(positions)`` if they are exactly ``0..n-1`` (sorted), else None."""
    return len(positions) if list(positions) == list(range(len(positions))) else None


# ------------------------------------------------------------ healing contract
def plan_to_module_order(plan_indices: Sequence[int], module_kept: Sequence[int]) -> torch.Tensor:
    """Permutation ``p`` with ``module_kept[j] == plan_indices[p[j]]``.

    Data stored per plan index (e.g. LoRA delta rows in the order of a plan's ``ffn[l]``
    or ``heads[l]["q"]`` list) is laid out in a built module's order by ``data[p]``.
    Raises :class:`CheckpointError` (one line) when the module holds an index the plan lacks.
    """
    where = {int(c): i for i, c in enumerate(plan_indices)}
    try:
        return torch.tensor([where[int(c)] for c in module_kept], dtype=torch.long)
    except KeyError as err:
        raise CheckpointError(f"module holds index {err.args[0]} that the plan does not keep: the data does not fit this module") from None


def kept_order(layer: nn.Module) -> dict[str, list[int]]:
    """Original indices held by a built (or base) layer's modules, in module order."""
    found: dict[str, list[int]] = {}
    for key, module, attr in (("ffn", layer.mlp, KEPT_FFN), ("q", layer.self_attn, KEPT_Q), ("kv", layer.self_attn, KEPT_KV)):
        value = getattr(module, attr, None)
        if value is not None:
            found[key] = list(value)
    return found


def delta_in_module_order(delta: torch.Tensor, name: str, parent: nn.Module, plan: Any, layer: int) -> torch.Tensor:
    """A weight-shaped delta (e.g. a merged LoRA ``B @ A``) whose channel/head dimension is
    in the plan's index order, laid out in the order ``parent``'s module holds them.

    ``parent`` is the built (or shared base) ``mlp`` / ``self_attn`` of original layer
    ``layer``; unsliced modules count as keeping every unit in original order. Identity
    when the base was never reordered and the plan's lists are sorted.
    """
    if name in ("gate_proj", "up_proj", "down_proj"):
        module_kept = getattr(parent, KEPT_FFN, None)
        if module_kept is None:
            order = ffn_order(parent)
            width = delta.shape[1] if name == "down_proj" else delta.shape[0]
            module_kept = order.tolist() if order is not None else list(range(width))
        plan_kept = plan.ffn.get(layer, sorted(module_kept))
        perm = plan_to_module_order(plan_kept, module_kept)
        return delta[:, perm] if name == "down_proj" else delta[perm]
    head_dim = int(parent.head_dim)
    if name in ("k_proj", "v_proj"):
        key, attr, order_attr = "kv", KEPT_KV, KV_ORDER
    else:
        key, attr, order_attr = "q", KEPT_Q, Q_ORDER
    module_kept = getattr(parent, attr, None)
    if module_kept is None:
        order = getattr(parent, order_attr, None)
        size = (delta.shape[1] if name == "o_proj" else delta.shape[0]) // head_dim
        module_kept = order.tolist() if order is not None else list(range(size))
    plan_kept = plan.heads[layer][key] if layer in plan.heads else sorted(module_kept)
    perm = channels(plan_to_module_order(plan_kept, module_kept), head_dim)
    return delta[:, perm] if name == "o_proj" else delta[perm]

