"""2:4 semi-structured sparsity (the original system's Phase B): ``sparse24-P`` profiles.

In every group of 4 consecutive input weights of a row, 2 are kept. NVIDIA GPUs from
Ampere on (compute capability >= 8.0) multiply such matrices with sparse tensor cores
from a compressed form (the kept values plus 2-bit indices: ~56% of the dense bytes in
float16), which PyTorch exposes as ``torch.sparse.to_sparse_semi_structured``. On any
other device there is no kernel: a masked dense matrix is exactly as slow as the dense
one (DESIGN.md: unstructured zeros give no speedup), so the structural profile is
refused with one line, while the masked (functional) form stays available for quality
measurements on CPU.

``sparse24-P``: the MLP projections (gate/up/down) of the P% of layers with the lowest
block influence (the same ranking as ``layers-P``) are made 2:4 sparse. Which weights
are kept is decided per row by ``|w| * s`` where ``s`` is a per-input-channel scale:
1 (magnitude, replayable from the weights alone; what profiles use) or the calibrated
RMS of the input activations (Wanda-style, :func:`mask_24` with ``input_scale``).
The plan records the layers in ``meta["sparse24"]`` so that it replays on the base model.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from casrap.pruners.modules import shell

META_KEY = "sparse24"
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def mask_24(weight: torch.Tensor, input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask keeping the 2 highest-scoring of every 4 consecutive inputs per row.

    ``input_scale`` ([in_features]) weighs each input channel (e.g. its activation RMS on
    calibration text); None scores by magnitude alone. ``in_features`` must be a multiple of 4.
    """
    rows, cols = weight.shape
    if cols % 4:
        raise ValueError(f"2:4 sparsity needs in_features divisible by 4, got {cols}")
    score = weight.detach().abs().float()
    if input_scale is not None:
        score = score * input_scale.detach().abs().float().to(score.device).unsqueeze(0)
    groups = score.reshape(rows, cols // 4, 4)
    top = groups.topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
    return mask.reshape(rows, cols)


def is_24(mask: torch.Tensor) -> bool:
    """True if every group of 4 consecutive entries of every row keeps exactly 2."""
    rows, cols = mask.shape
    return bool((mask.reshape(rows, cols // 4, 4).sum(-1) == 2).all())


def semi_structured_blocker(weight: torch.Tensor) -> str | None:
    """Why ``weight`` cannot become a semi-structured sparse tensor here, or None."""
    if weight.device.type != "cuda":
        return (f"2:4 sparse profiles need an NVIDIA GPU with sparse tensor cores (compute capability >= 8.0); "
                f"the model is on {weight.device.type}: use the masked form (--functional) for quality only")
    major, minor = torch.cuda.get_device_capability(weight.device)
    if major < 8:
        return f"2:4 sparse profiles need compute capability >= 8.0; this GPU has {major}.{minor}"
    if weight.dtype not in (torch.float16, torch.bfloat16):
        return f"2:4 sparse profiles need a float16/bfloat16 model (semi-structured kernels), not {str(weight.dtype).replace('torch.', '')}"
    rows, cols = weight.shape
    if rows % 32 or cols % 64:
        return f"a {rows}x{cols} projection is not a multiple of the 32x64 blocks semi-structured kernels need"
    return None


def plan_sparse24_layers(block_influence: torch.Tensor, fraction: float) -> list[int]:
    """The ``floor(fraction * L)`` layers with the lowest block influence (at least one)."""
    n = block_influence.numel()
    count = max(1, min(n, math.floor(fraction * n + 1e-9)))
    return sorted(sorted(range(n), key=lambda i: float(block_influence[i]))[:count])


def sparse24_layers(plan: Any) -> list[int]:
    return [int(i) for i in (plan.meta or {}).get(META_KEY, [])]


def _sparse_linear(linear: nn.Linear, functional: bool) -> nn.Linear:
    weight = linear.weight.detach()
    masked = (weight * mask_24(weight).to(weight.dtype)).contiguous()
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None, device="meta")
    if functional:
        out.weight = nn.Parameter(masked, requires_grad=False)
    else:
        from torch.sparse import to_sparse_semi_structured

        out.weight = nn.Parameter(to_sparse_semi_structured(masked), requires_grad=False)
    if linear.bias is not None:
        out.bias = linear.bias
    return out


def check_sparse24_supported(model_layers: Any, layers: list[int]) -> str | None:
    """The first reason the structural profile cannot be built on this model, or None."""
    for i in layers:
        for name in PROJECTIONS:
            reason = semi_structured_blocker(getattr(model_layers[i].mlp, name).weight)
            if reason:
                return reason
    return None


def sparsify_mlp(layer: nn.Module, original: nn.Module, functional: bool) -> None:
    """Give a layer *shell* 2:4-sparse copies of its MLP projections (masked dense if
    ``functional``); the base model's MLP is never touched."""
    if layer.mlp is original.mlp:
        layer.mlp = shell(original.mlp)
    for name in PROJECTIONS:
        setattr(layer.mlp, name, _sparse_linear(getattr(layer.mlp, name), functional))
