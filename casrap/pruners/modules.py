"""Module surgery that never touches the original model.

Profiles are built from *shells*: shallow clones of transformers modules whose
sub-module, parameter and hook dictionaries are copied, so a shell can take a
different child (a sliced projection) or attribute (``layer_idx``) while sharing
every untouched tensor with the original. Nothing here re-implements a transformers
``forward``; shells run the library's own code.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn


def shell(module: nn.Module) -> nn.Module:
    """A shallow clone sharing parameters but owning its own child/attribute tables."""
    new = copy.copy(module)
    for key, value in module.__dict__.items():
        if isinstance(value, dict):
            new.__dict__[key] = type(value)(value) if not (value is None) else value
    return new


def sliced_linear(
    linear: nn.Linear, rows: Sequence[int] | None = None, cols: Sequence[int] | None = None
) -> nn.Linear:
    """A new Linear holding copies of the kept output rows / input columns.

    A column slice is stored column-major (``F.linear`` on it ran as fast as on a
    row-major copy, and its layout matches the reordered base's ``down``/``o``).
    """
    weight = linear.weight.detach()
    bias = linear.bias.detach() if linear.bias is not None else None
    if rows is not None:
        index = torch.as_tensor(list(rows), dtype=torch.long, device=weight.device)
        weight = weight.index_select(0, index)
        bias = bias.index_select(0, index) if bias is not None else None
    if cols is not None:
        index = torch.as_tensor(list(cols), dtype=torch.long, device=weight.device)
        weight = weight.index_select(1, index)
    weight = weight.t().contiguous().t() if cols is not None else weight.contiguous()
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    out.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        out.bias = nn.Parameter(bias.contiguous(), requires_grad=False)
    return out


class InputMaskedLinear(nn.Module):
    """``linear(x * mask)``: functional pruning of input features with no shape change.

    Zeroing inputs of ``down_proj`` masks FFN channels; zeroing inputs of ``o_proj``
    masks attention heads. The wrapped Linear is shared, not copied.
    """

    def __init__(self, linear: nn.Linear, keep: torch.Tensor) -> None:
        super().__init__()
        self.linear = linear
        self.register_buffer("mask", keep.to(dtype=linear.weight.dtype, device=linear.weight.device))

    @property
    def weight(self) -> torch.Tensor:  # lets shape-reading code treat it as a Linear
        return self.linear.weight

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x * self.mask)


def keep_mask(size: int, kept: Sequence[int]) -> torch.Tensor:
    mask = torch.zeros(size)
    mask[list(kept)] = 1.0
    return mask
