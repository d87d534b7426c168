"""A healing adapter on disk, and the one function that merges it into a profile's modules.

The adapter is a PEFT LoRA folder (``adapter_config.json`` + ``adapter_model.safetensors``)
trained on a standalone copy of the pruned variant, so its module names count the
*profile's* layers (``layers.{j}`` is the j-th kept layer) and every weight with a
channel or head dimension is in the order of the plan's index lists
(``PruningPlan.ffn[layer]``, ``heads[layer]["q"]`` / ``["kv"]``), which is the order the
pruners slice in. :func:`merge_adapter_into` is the only place that maps adapter weights
onto modules: if the base model's channel or head order ever changes (issue 15's prefix
views), the permutation belongs here and nowhere else.

Reading an adapter needs only safetensors (no PEFT): the bank merges ``W + s * B @ A``
into *new* Linear modules that the healed profile owns, so healed variants run exactly as
fast as unhealed ones and the base model's tensors are never written.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from casrap.errors import CheckpointError
from casrap.pruners.modules import shell

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PACKAGE_PREFIX = "casrap-data:"
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
_KEY = re.compile(r"layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$")


@dataclass
class LoraAdapter:
    """LoRA factors per (profile layer, projection): ``delta = scale * B @ A``."""

    factors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    scale: float
    rank: int
    path: Path | None = None

    def delta(self, layer: int, name: str) -> torch.Tensor | None:
        pair = self.factors.get((layer, name))
        if pair is None:
            return None
        a, b = pair
        return (b.float() @ a.float()) * self.scale

    @property
    def parameters(self) -> int:
        return sum(a.numel() + b.numel() for a, b in self.factors.values())


def resolve_adapter(reference: str, plan_dir: Path | None = None) -> Path:
    """The adapter folder a plan's ``meta["adapter"]`` names.

    ``casrap-data:plans/...`` is inside the installed package (shipped adapters), an
    absolute path is used as is, and a relative one is looked up beside the plan file
    (when known), in the working directory, then among the shipped plans.
    """
    if reference.startswith(PACKAGE_PREFIX):
        path = Path(str(resources.files("casrap.data").joinpath(reference[len(PACKAGE_PREFIX):])))
        candidates = [path]
    else:
        path = Path(reference).expanduser()
        candidates = [path] if path.is_absolute() else [
            *([plan_dir / path] if plan_dir else []), Path.cwd() / path,
            *[Path(str(d)) / path for d in _shipped_plan_dirs()],
        ]
    for candidate in candidates:
        if (candidate / ADAPTER_WEIGHTS).is_file():
            return candidate
    raise CheckpointError(f"healing adapter {reference!r} not found (looked in {', '.join(str(c) for c in candidates)}); re-run casrap heal")


def _shipped_plan_dirs() -> list[Any]:
    root = resources.files("casrap.data").joinpath("plans")
    return [d for d in root.iterdir() if d.is_dir()] if root.is_dir() else []


def load_adapter(path: Path) -> LoraAdapter:
    """Read a PEFT LoRA folder into per-module factors (float32, CPU)."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
        tensors = load_file(str(path / ADAPTER_WEIGHTS))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read healing adapter {path}: {err}") from err
    rank = int(config.get("r", 8))
    alpha = float(config.get("lora_alpha", rank))
    scale = alpha / (rank ** 0.5) if config.get("use_rslora") else alpha / rank
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.search(key)
        if not match:
            raise CheckpointError(f"healing adapter {path}: unexpected tensor {key!r} (only LoRA on q/k/v/o/gate/up/down)")
        layer, _, name, which = match.groups()
        parts.setdefault((int(layer), name), {})[which] = tensor.float()
    factors = {}
    for key, pair in parts.items():
        if set(pair) != {"A", "B"}:
            raise CheckpointError(f"healing adapter {path}: layer {key[0]} {key[1]} lacks lora_A or lora_B")
        factors[key] = (pair["A"], pair["B"])
    return LoraAdapter(factors, scale, rank, path)


def _merged_linear(linear: nn.Module, delta: torch.Tensor) -> nn.Linear:
    """A new Linear owning ``W + delta`` (the original, shared or sliced, is left as is)."""
    weight = linear.weight.detach()
    if tuple(delta.shape) != tuple(weight.shape):
        raise CheckpointError(f"healing adapter does not fit: delta {tuple(delta.shape)} vs weight {tuple(weight.shape)}")
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None, device="meta")
    out.weight = nn.Parameter((weight.float() + delta.to(weight.device)).to(weight.dtype).contiguous(), requires_grad=False)
    if linear.bias is not None:
        out.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return out


def merge_adapter_into(layers: nn.ModuleList, plan: Any, adapter: LoraAdapter) -> int:
    """Merge ``adapter`` into the profile's ``layers`` in place; returns modules replaced.

    Each adapted projection becomes a new Linear holding the merged weight; its parent
    (attention or MLP) is re-shelled first, so a parent still shared with the base model
    (an unsliced MLP) is never modified. Adapter weights are in the plan's index order,
    laid out in the module's own order by :func:`casrap.pruners.reorder.delta_in_module_order`
    (the identity unless the base model was reordered for zero-copy profiles).
    """
    from casrap.pruners.sparse24 import sparse24_layers

    if plan.functional or plan.ranks or sparse24_layers(plan):
        raise CheckpointError(f"plan {plan.name!r}: healing adapters apply to structural head/FFN/layer plans only")
    from casrap.pruners.reorder import delta_in_module_order

    replaced = 0
    originals = [i for i in range(len(layers) + len(plan.skip_layers)) if i not in set(plan.skip_layers)]
    for j, layer in enumerate(layers):
        for group, names in (("self_attn", ATTENTION), ("mlp", MLP)):
            deltas = {n: adapter.delta(j, n) for n in names}
            deltas = {n: d for n, d in deltas.items() if d is not None}
            if not deltas:
                continue
            parent = shell(getattr(layer, group))
            for name, delta in deltas.items():
                # plan index order -> the order this module holds its channels/heads in (issue 15)
                delta = delta_in_module_order(delta, name, parent, plan, originals[j])
                setattr(parent, name, _merged_linear(getattr(parent, name), delta))
                replaced += 1
            setattr(layer, group, parent)
    unknown = [k for k in adapter.factors if k[0] >= len(layers)]
    if unknown:
        raise CheckpointError(f"healing adapter names layer {unknown[0][0]}, the profile has {len(layers)} layers")
    return replaced


def plan_adapter_path(plan: Any) -> Path | None:
    """The resolved adapter folder of a healed plan, or None for a plain plan."""
    reference = plan.meta.get("adapter") if plan.meta else None
    if not reference:
        return None
    source = getattr(plan, "source", None)
    return resolve_adapter(str(reference), Path(source).parent if source else None)


def factors_to_plan_order(state: dict[str, torch.Tensor], layers: nn.ModuleList, plan: Any, inverse: bool = False) -> dict[str, torch.Tensor]:
    """LoRA factors trained on a copy of ``layers`` (module order) re-laid in plan index order
    (``inverse``: plan order to the order ``layers`` hold, e.g. for an unmerged export).

    ``B`` of q/k/v/gate/up (output channels) and ``A`` of o/down (input channels) carry a
    channel/head dimension; the permutation is the inverse of the one merging applies.
    """
    from casrap.pruners.reorder import delta_in_module_order

    originals = [i for i in range(len(layers) + len(plan.skip_layers)) if i not in set(plan.skip_layers)]
    out = {}
    for key, tensor in state.items():
        match = _KEY.search(key)
        if not match:
            out[key] = tensor
            continue
        j, group, name, which = int(match.group(1)), match.group(2), match.group(3), match.group(4)
        columns = name in ("o_proj", "down_proj")
        if (which == "A") != columns:  # the rank dimension: nothing to permute
            out[key] = tensor
            continue
        size = tensor.shape[1] if columns else tensor.shape[0]
        probe = torch.arange(size).unsqueeze(0) if columns else torch.arange(size).unsqueeze(1)
        perm = delta_in_module_order(probe, name, getattr(layers[j], group), plan, originals[j]).reshape(-1)
        order = perm if inverse else torch.argsort(perm)
        out[key] = tensor[:, order].contiguous() if columns else tensor[order].contiguous()
    return out
