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
        kept = ffn_importance[l].argsort(descending=True)[: width - drop]
        plan[l] = sorted(kept.tolist())
    return plan, drop * n_layers


def build_mlp(mlp: nn.Module, kept: list[int], functional: bool) -> nn.Module:
    new = shell(mlp)
    if functional:
        new.down_proj = InputMaskedLinear(mlp.down_proj, keep_mask(mlp.down_proj.in_features, kept))
        return new
    new.gate_proj = sliced_linear(mlp.gate_proj, rows=kept)
    new.up_proj = sliced_linear(mlp.up_proj, rows=kept)
    new.down_proj = sliced_linear(mlp.down_proj, cols=kept)
    new.intermediate_size = len(kept)
    return new
