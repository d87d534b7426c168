"""FFN channel pruning: structural slicing, or functional masking for comparison.

Structural: gate/up lose rows, down loses the matching columns; compute shrinks.
Functional: ``down_proj`` sees the dropped channels zeroed; shapes (and speed) stay.
For the same kept set both give the same function (tested to 1e-5).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from casrap.pruners.modules import InputMaskedLinear, keep_mask, shell, sliced_linear
from casrap.pruners.reorder import (
    FFN_ORDER,
    KEPT_FFN,
    ffn_order,
    inverse,
    prefix_length,
    view_linear,
)


def plan_ffn_channels(ffn_importance: torch.Tensor, fraction: float) -> tuple[dict[int, list[int]], int]:
    """Remove the same number of least important channels from every layer.

    Uniform widths keep the pruned model exportable as a plain HF checkpoint.
    """
    n_layers, width = ffn_importance.shape
    drop = math.floor(fraction * width + 1e-9)
    if drop == 0:
        return {}, 0
    drop = min(drop, width - 1)
    plan = {}
    for l in range(n_layers):
        kept = ffn_importance[l].argsort(descending=True, stable=True)[: width - drop]
        plan[l] = sorted(kept.tolist())
    return plan, drop * n_layers


def build_mlp(mlp: nn.Module, kept: list[int], functional: bool, keep_order: bool = False) -> nn.Module:
    """A shell of ``mlp`` running only the ``kept`` channels (original indices).

    On a reordered base (:mod:`casrap.pruners.reorder`) whose kept channels are a
    prefix of its layout, the projections are views of the base weights
    (``casrap_zero_copy`` is True); otherwise the kept channels are copied. Either way
    ``casrap_kept`` lists the original channel held at each of the module's positions.
    ``keep_order`` holds the channels in the order of ``kept`` instead (copies on a
    reordered base): for data laid out in a plan's index order (healing adapters).
    """
    order = ffn_order(mlp)
    width = mlp.down_proj.in_features
    positions = inverse(order, width)[torch.as_tensor(kept, dtype=torch.long)].tolist()
    positions = positions if keep_order else sorted(positions)
    new = shell(mlp)
    new.__dict__.pop(FFN_ORDER, None)
    new.casrap_zero_copy = False
    if functional:  # masks copy no weights
        new.casrap_zero_copy = None
        new.down_proj = InputMaskedLinear(mlp.down_proj, keep_mask(width, positions))
        setattr(new, KEPT_FFN, order.tolist() if order is not None else list(range(width)))
        return new
    prefix = prefix_length(positions)
    if prefix is not None:
        new.gate_proj = view_linear(mlp.gate_proj, rows=prefix)
        new.up_proj = view_linear(mlp.up_proj, rows=prefix)
        new.down_proj = view_linear(mlp.down_proj, cols=prefix)
        new.casrap_zero_copy = True
    else:
        new.gate_proj = sliced_linear(mlp.gate_proj, rows=positions)
        new.up_proj = sliced_linear(mlp.up_proj, rows=positions)
        new.down_proj = sliced_linear(mlp.down_proj, cols=positions)
    new.intermediate_size = len(kept)
    setattr(new, KEPT_FFN, order[positions].tolist() if order is not None else positions)
    return new
