"""A healing adapter on disk, and the one place that applies it to a profile's modules.

The adapter is a PEFT LoRA folder (``adapter_config.json`` + ``adapter_model.safetensors``)
trained on a standalone copy of the pruned variant, so its module names count the
*profile's* layers (``layers.{j}`` is the j-th kept layer) and every weight with a
channel or head dimension is in the order of the plan's index lists
(``PruningPlan.ffn[layer]``, ``heads[layer]["q"]`` / ``["kv"]``), which is the order the
pruners slice in. :func:`apply_adapter` is the only place that maps adapter weights onto
modules: the permutation to a reordered base's module order happens here and nowhere else.

Two ways to run a healed profile (reading an adapter needs only safetensors, no PEFT):

- **unmerged** (the default): each adapted projection becomes a :class:`LoraLinear` that
  runs the (shared, zero-copy) base projection plus the rank-r path ``(x A^T) (s B)^T``.
  A healed profile then holds only its LoRA factors (about 4 MB at rank 8 on SmolLM2)
  instead of a copy of every adapted projection (about 310 MB).
- **merged** (``CASRAP_HEAL_MERGE=1``): ``W + s B A`` is written into *new* Linear modules
  that the profile owns; as fast as an unhealed profile, at the cost of those copies.

Either way the base model's tensors are never written.

Adapters travel with their plans: a relative ``meta["adapter"]`` is resolved beside the
plan file (``PruningPlan.source``), ``casrap-data:`` inside the installed package, and
``meta["adapter_sha256"]`` pins the adapter's bytes (:func:`adapter_digest`): a changed
adapter is refused in one line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from casrap.errors import CheckpointError
from casrap.pruners.modules import shell
from casrap.pruners.reorder import add_state_dict_hook

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PACKAGE_PREFIX = "casrap-data:"
DIGEST_KEY = "adapter_sha256"
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
_KEY = re.compile(r"layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$")
_MODULE = re.compile(r"^(?:base_model\.model\.)?(.*)\.lora_[AB](?:\.default)?\.weight$")


@dataclass
class LoraAdapter:
    """LoRA factors per (profile layer, projection): ``delta = scale * B @ A``.

    ``scales`` holds a module's own scale where PEFT's ``rank_pattern``/``alpha_pattern``
    gave it one different from ``scale``.
    """

    factors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    scale: float
    rank: int
    path: Path | None = None
    scales: dict[tuple[int, str], float] = field(default_factory=dict)

    def scale_of(self, layer: int, name: str) -> float:
        return self.scales.get((layer, name), self.scale)

    def delta(self, layer: int, name: str) -> torch.Tensor | None:
        pair = self.factors.get((layer, name))
        if pair is None:
            return None
        a, b = pair
        return (b.float() @ a.float()) * self.scale_of(layer, name)

    @property
    def parameters(self) -> int:
        return sum(a.numel() + b.numel() for a, b in self.factors.values())


# ------------------------------------------------------------------ locating
def package_data_root() -> Path:
    return Path(str(resources.files("casrap.data")))


def inside(path: Path, root: Path) -> bool:
    """Whether ``path`` (after resolving ``..`` and links) lies within ``root``."""
    try:
        Path(path).resolve().relative_to(Path(root).resolve())
        return True
    except ValueError:
        return False


def package_path(reference: str) -> Path:
    """The file or folder a ``casrap-data:`` reference names, refused if it leaves the package data."""
    root = package_data_root()
    relative = reference[len(PACKAGE_PREFIX):]
    path = root / relative
    if Path(relative).is_absolute() or not inside(path, root):
        raise CheckpointError(f"{reference!r} points outside casrap's package data; refusing it")
    return path


def resolve_adapter(reference: str, plan_dir: Path | None = None, confine: Path | None = None) -> Path:
    """The adapter folder a plan's ``meta["adapter"]`` names.

    ``casrap-data:plans/...`` is inside the installed package (shipped adapters), an
    absolute path is used as is, and a relative one is looked up beside the plan file.
    Only a plan built in memory (no file, so no ``plan_dir``) falls back to the working
    directory and the shipped plans. ``confine`` (a bundle's folder) refuses any
    reference that is absolute or leaves that folder.
    """
    if reference.startswith(PACKAGE_PREFIX):
        candidates = [package_path(reference)]
    else:
        path = Path(reference).expanduser()
        if confine is not None and (path.is_absolute() or plan_dir is None or not inside(plan_dir / path, confine)):
            raise CheckpointError(f"healing adapter {reference!r} leaves the bundle folder {confine}; a bundle holds its adapters")
        if path.is_absolute():
            candidates = [path]
        elif plan_dir is not None:
            candidates = [plan_dir / path]
        else:
            candidates = [Path.cwd() / path, *[Path(str(d)) / path for d in _shipped_plan_dirs()]]
    for candidate in candidates:
        if (candidate / ADAPTER_WEIGHTS).is_file():
            return candidate
    raise CheckpointError(f"healing adapter {reference!r} not found (looked in {', '.join(str(c) for c in candidates)}); re-run casrap heal")


def _shipped_plan_dirs() -> list[Any]:
    root = resources.files("casrap.data").joinpath("plans")
    return [d for d in root.iterdir() if d.is_dir()] if root.is_dir() else []


def adapter_digest(path: Path) -> str:
    """SHA-256 of an adapter folder: its weights file, then its config file (both change what runs)."""
    digest = hashlib.sha256()
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        try:
            with open(Path(path) / name, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
        except OSError as err:
            raise CheckpointError(f"cannot read healing adapter {path}: {err}") from err
    return digest.hexdigest()


def check_digest(path: Path, plan: Any) -> None:
    """Raise one line unless the adapter's bytes are those the plan pins (no pin: nothing to check)."""
    expected = str((plan.meta or {}).get(DIGEST_KEY, "") or "")
    if not expected:
        log.debug("plan %r does not pin its adapter (no %s)", plan.name, DIGEST_KEY)
        return
    actual = adapter_digest(path)
    if actual != expected:
        raise CheckpointError(f"healing adapter {path} is not the one plan {plan.name!r} was healed with "
                              f"(sha256 {actual[:16]}..., the plan pins {expected[:16]}...); restore it or re-run casrap heal")


def plan_adapter_path(plan: Any, confine: Path | None = None) -> Path | None:
    """The resolved, digest-checked adapter folder of a healed plan, or None for a plain plan."""
    reference = plan.meta.get("adapter") if plan.meta else None
    if not reference:
        return None
    source = getattr(plan, "source", None)
    path = resolve_adapter(str(reference), Path(source).parent if source else None, confine)
    check_digest(path, plan)
    return path


# ------------------------------------------------------------------- reading
def _pattern_value(patterns: dict[str, Any], module: str) -> Any:
    """PEFT's rule: the first pattern key that is a dotted suffix of the module name."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?({key})", module):
            return value
    return None


def load_adapter(path: Path) -> LoraAdapter:
    """Read a PEFT LoRA folder into per-module factors (float32, CPU).

    Honours ``rank_pattern`` and ``alpha_pattern``: a module's scale is its own alpha over
    its own rank (or over its square root with ``use_rslora``).
    """
    from safetensors.torch import load_file

    path = Path(path)
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
        tensors = load_file(str(path / ADAPTER_WEIGHTS))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read healing adapter {path}: {err}") from err
    rank = int(config.get("r", 8))
    alpha = float(config.get("lora_alpha", rank))
    rank_pattern = dict(config.get("rank_pattern") or {})
    alpha_pattern = dict(config.get("alpha_pattern") or {})
    rslora = bool(config.get("use_rslora"))

    def scale_for(r: int, a: float) -> float:
        return a / (r ** 0.5) if rslora else a / r

    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    modules: dict[tuple[int, str], str] = {}
    for key, tensor in tensors.items():
        match = _KEY.search(key)
        if not match:
            raise CheckpointError(f"healing adapter {path}: unexpected tensor {key!r} (only LoRA on q/k/v/o/gate/up/down)")
        layer, _, name, which = match.groups()
        parts.setdefault((int(layer), name), {})[which] = tensor.float()
        named = _MODULE.match(key)
        modules[(int(layer), name)] = named.group(1) if named else key
    factors, scales = {}, {}
    default = scale_for(rank, alpha)
    for key, pair in parts.items():
        if set(pair) != {"A", "B"}:
            raise CheckpointError(f"healing adapter {path}: layer {key[0]} {key[1]} lacks lora_A or lora_B")
        module_rank = _pattern_value(rank_pattern, modules[key])
        module_rank = rank if module_rank is None else int(module_rank)
        if pair["A"].shape[0] != module_rank:
            raise CheckpointError(f"healing adapter {path}: {modules[key]} has rank {pair['A'].shape[0]}, its config says {module_rank}")
        module_alpha = _pattern_value(alpha_pattern, modules[key])
        module_alpha = alpha if module_alpha is None else float(module_alpha)
        own = scale_for(module_rank, module_alpha)
        if own != default:
            scales[key] = own
        factors[key] = (pair["A"], pair["B"])
    return LoraAdapter(factors, default, rank, path, scales)


# ------------------------------------------------------------------ applying
def _plain_lora_state(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """State dicts show an unmerged LoRA projection as the plain Linear it computes
    (merged ``weight``), so exporting a healed profile gives a plain checkpoint."""
    for key in [k for k in state_dict if k.startswith(prefix + "base.") or k in (prefix + "lora_a", prefix + "lora_b")]:
        del state_dict[key]
    state_dict[prefix + "weight"] = module.weight.detach()
    if module.bias is not None:
        state_dict[prefix + "bias"] = module.bias.detach()


class LoraLinear(nn.Module):
    """``base(x) + (x A^T) B'^T`` with ``B' = scale * B``: a healed projection that shares
    the base projection's weight (a view or the base tensor itself) and owns only the
    rank-r factors."""

    def __init__(self, base: nn.Module, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        super().__init__()
        weight = base.weight
        self.base = base
        self.lora_a = nn.Parameter(a.to(weight.device, weight.dtype).contiguous(), requires_grad=False)
        self.lora_b = nn.Parameter((b.float() * scale).to(weight.device, weight.dtype).contiguous(), requires_grad=False)
        self.in_features = int(getattr(base, "in_features", weight.shape[1]))
        self.out_features = int(getattr(base, "out_features", weight.shape[0]))
        if tuple(self.lora_b.shape[:1]) + tuple(self.lora_a.shape[1:]) != (self.out_features, self.in_features):
            raise CheckpointError(f"healing adapter does not fit: B @ A is {tuple(self.lora_b.shape[:1]) + tuple(self.lora_a.shape[1:])}, "
                                  f"the projection {(self.out_features, self.in_features)}")
        add_state_dict_hook(self, _plain_lora_state)

    @property
    def bias(self) -> torch.Tensor | None:  # type: ignore[override]
        return getattr(self.base, "bias", None)

    @property
    def weight(self) -> torch.Tensor:
        """The merged weight (a copy): for shape-reading and exporting code only."""
        base = self.base.weight.detach()
        return (base.float() + self.lora_b.float() @ self.lora_a.float()).to(base.dtype)

    def __deepcopy__(self, memo: dict[int, Any]) -> nn.Linear:
        return _merged_linear(self.base, (self.lora_b.float() @ self.lora_a.float()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_a), self.lora_b)


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


def merge_by_default() -> bool:
    """``CASRAP_HEAL_MERGE=1`` builds healed profiles merged (copies) instead of unmerged."""
    return os.environ.get("CASRAP_HEAL_MERGE", "0").strip().lower() in {"1", "true", "yes"}


def apply_adapter(layers: nn.ModuleList, plan: Any, adapter: LoraAdapter, merged: bool = False) -> int:
    """Apply ``adapter`` to the profile's ``layers`` in place; returns projections replaced.

    Each adapted projection's parent (attention or MLP) is re-shelled first, so a parent
    still shared with the base model is never modified. Unmerged, the projection becomes
    a :class:`LoraLinear` around the existing one; merged, a new Linear holding
    ``W + s B A``. Adapter weights are in the plan's index order, laid out in the module's
    own order by :func:`casrap.pruners.reorder.delta_in_module_order` (the identity unless
    the base model was reordered for zero-copy profiles).
    """
    from casrap.pruners.reorder import delta_in_module_order
    from casrap.pruners.sparse24 import sparse24_layers

    if plan.functional or plan.ranks or sparse24_layers(plan):
        raise CheckpointError(f"plan {plan.name!r}: healing adapters apply to structural head/FFN/layer plans only")
    unknown = [k for k in adapter.factors if k[0] >= len(layers)]
    if unknown:
        raise CheckpointError(f"healing adapter names layer {unknown[0][0]}, the profile has {len(layers)} layers")
    replaced = 0
    originals = [i for i in range(len(layers) + len(plan.skip_layers)) if i not in set(plan.skip_layers)]
    for j, layer in enumerate(layers):
        for group, names in (("self_attn", ATTENTION), ("mlp", MLP)):
            present = [n for n in names if (j, n) in adapter.factors]
            if not present:
                continue
            parent = shell(getattr(layer, group))
            for name in present:
                module = getattr(parent, name)
                if merged:
                    # plan index order -> the order this module holds its channels/heads in
                    delta = delta_in_module_order(adapter.delta(j, name), name, parent, plan, originals[j])
                    setattr(parent, name, _merged_linear(module, delta))
                else:
                    a, b = adapter.factors[(j, name)]
                    if name in ("o_proj", "down_proj"):  # the input dimension carries the channels/heads
                        a = delta_in_module_order(a, name, parent, plan, originals[j])
                    else:
                        b = delta_in_module_order(b, name, parent, plan, originals[j])
                    setattr(parent, name, LoraLinear(module, a, b, adapter.scale_of(j, name)))
                replaced += 1
            setattr(layer, group, parent)
    return replaced


def merge_adapter_into(layers: nn.ModuleList, plan: Any, adapter: LoraAdapter) -> int:
    """Merge ``adapter`` into the profile's ``layers`` (new Linears owning ``W + s B A``)."""
    return apply_adapter(layers, plan, adapter, merged=True)


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
