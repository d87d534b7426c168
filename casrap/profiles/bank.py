"""ProfileBank: one loaded model, many pruned variants, O(1) switching.

Each profile owns a ModuleList of decoder-layer *shells* (see
:mod:`casrap.pruners.modules`): untouched tensors are shared with the base model,
only sliced projections are new. Activating a profile assigns its list to
``model.model.layers`` and sets ``config.num_hidden_layers`` — no reload, no
re-slicing, no weight copy — and activating ``none`` puts the original list back, so
the full model's outputs are bitwise those of the untouched model.

Pick the profile once per request, before prefill: a KV cache built under one
profile is invalid under another.

Zero-copy layout: a bank given an :class:`Importance` reorders the base model by it
*when the bank is created*, before any profile exists, so which profiles share the base
weights depends only on that importance and the plans, never on the order profiles are
added in or on what a user's ``$CASRAP_HOME`` holds. How the base is laid out is an
explicit :class:`ModelLayout` (fingerprint before the reorder, the importance it was
reordered by, the reorder's report, and the lock), one per model: every bank on a model
shares it (pass ``layout=``, or the model's own is found with :meth:`ModelLayout.of`);
nothing is stored on the ``nn.Module``. A model on which any bank has built a
layout-dependent profile (sliced, masked, factorised, healed) is locked and never
reordered again: those profiles would go stale.
"""

from __future__ import annotations

import os
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from casrap.errors import CheckpointError, InputError, UnsupportedModelError
from casrap.profiles.adapter import apply_adapter, load_adapter, merge_by_default, plan_adapter_path
from casrap.models.architecture import decoder_layers, describe, head_dim_of, model_key
from casrap.paths import casrap_home
from casrap.profiles.catalogue import FULL
from casrap.profiles.plan import PruningPlan
from casrap.pruners.ffn import build_mlp
from casrap.pruners.heads import build_attention, check_gqa_integrity
from casrap.pruners.importance import CALIBRATION_VERSION, Importance
from casrap.pruners.lowrank import LowRankBasis, factorise_layer, load_or_fit_basis
from casrap.pruners.modules import shell
from casrap.pruners.quantize import (
    ACT_DTYPES,
    KernelCheck,
    allow_slow_default,
    drop_unused,
    packed_modules,
    quantize_layers,
    require_kernel,
)
from casrap.pruners.reorder import is_reordered, kept_order, reorder_model
from casrap.pruners.sparse24 import (
    check_sparse24_supported,
    sparse24_layers,
    sparsify_mlp,
)


_LAYOUTS: weakref.WeakKeyDictionary[Any, ModelLayout] = weakref.WeakKeyDictionary()  # one layout per live model


@dataclass
class ModelLayout:
    """How one model's base tensors are laid out; every bank on the model shares it.

    Attributes:
        fingerprint: the model's :func:`model_key` before any reorder (plans, bundles and
            caches are keyed to it; a reorder changes float summation order only).
        importance: the :class:`Importance` the base was reordered by (None: not reordered
            by this process, or unknown).
        reorder_info: the reorder's report (``{}``: not reordered).
        locked: a bank built layout-dependent modules (sliced, masked, factorised, healed)
            on the model; a reorder now would leave them stale, so it is refused.
    """

    fingerprint: str
    importance: Importance | None = None
    reorder_info: dict[str, Any] = field(default_factory=dict)
    locked: bool = False

    @property
    def reordered(self) -> bool:
        return bool(self.reorder_info)

    @classmethod
    def of(cls, model: Any) -> ModelLayout:
        """The model's layout: the one its banks share, else a new one (call with the full model active)."""
        layout = _LAYOUTS.get(model)
        if layout is None:
            layout = cls(model_key(model))
            if is_reordered(model):  # laid out by code that kept no layout: the importance is unknown
                layout.reorder_info = {"importance": "unknown"}
            _LAYOUTS[model] = layout
        return layout

    def reorder(self, model: Any, importance: Importance, probe_ids: torch.Tensor | None = None) -> dict[str, Any]:
        """Lay the base model's FFN channels and heads out by ``importance`` (once; refused when locked).

        Returns (and keeps in ``reorder_info``) the largest logit difference of the
        reordered model from the original on ``probe_ids`` (default: 32 fixed token ids):
        float summation order only. The model must run its full layers.
        """
        if self.reordered:
            return self.reorder_info
        if self.locked:
            raise InputError("reorder the model before building head, FFN, low-rank or healed profiles on it (in any bank)")
        if probe_ids is None:
            vocab = int(model.config.vocab_size)
            probe_ids = (torch.arange(1, 33) * 7919 % vocab).unsqueeze(0)
        device = next(model.parameters()).device
        with torch.inference_mode():
            before = model(probe_ids.to(device), use_cache=False).logits.float()
        start = time.perf_counter()
        reorder_model(model, importance, head_dim_of(model))
        seconds = time.perf_counter() - start
        with torch.inference_mode():
            after = model(probe_ids.to(device), use_cache=False).logits.float()
        self.reorder_info = {
            "importance": importance.source, "max_abs_logit_diff": float((after - before).abs().max()),
            "probe_tokens": int(probe_ids.numel()), "seconds": seconds,
        }
        self.importance = importance
        return self.reorder_info


def reorder_enabled() -> bool:
    """Whether zero-copy reordering is on (``CASRAP_REORDER=0`` turns it off: modules are then copied)."""
    return os.environ.get("CASRAP_REORDER", "1").strip().lower() not in {"0", "false", "no"}


def bank_fingerprint(model: Any) -> str:
    """The fingerprint plans, bundles and caches are keyed to: the base model's
    :func:`model_key`, kept across a zero-copy reorder (which changes float summation
    order, and so could change a probe of the weights). Call it with the full model active."""
    layout = _LAYOUTS.get(model)
    return layout.fingerprint if layout is not None else model_key(model)


def layout_dependent(plan: PruningPlan) -> bool:
    """Whether a plan's built modules depend on the base model's channel/head order."""
    return bool(plan.heads or plan.ffn or plan.ranks or (plan.meta or {}).get("adapter") or sparse24_layers(plan))


def needs_reorder(plans: Any) -> bool:
    """Whether any plan would share base weights after a reorder (structural head/FFN plans)."""
    return any((p.heads or p.ffn) and not p.functional for p in plans)


@dataclass
class Profile:
    plan: PruningPlan
    layers: nn.ModuleList
    build_s: float

    @property
    def name(self) -> str:
        return self.plan.name


def _unique_storages(modules: nn.Module) -> dict[int, int]:
    """Storage address -> bytes of every distinct storage the modules' tensors live in.

    Keyed by storage, not tensor: a profile's view of a base weight (zero-copy slice)
    has its own ``data_ptr`` but shares the base's storage, and costs nothing.
    """
    found: dict[int, int] = {}
    for tensor in list(modules.parameters()) + list(modules.buffers()):
        storage = tensor.untyped_storage()
        found[storage.data_ptr()] = storage.nbytes()
    return found


def refuse_hooked_model(model: Any) -> None:
    """Raise for a model dispatched with accelerate hooks (``device_map=...``).

    accelerate replaces each hooked module's ``forward`` with a bound method stored on
    the instance; a layer shell would copy that method, still bound to the original
    module, and every profile would silently run the unpruned layer.
    """
    for name, module in model.named_modules():
        if hasattr(module, "_hf_hook") or "forward" in vars(module):
            raise UnsupportedModelError(
                f"module {name or 'model'} carries accelerate hooks (loaded with device_map?): profiles would run unpruned; "
                "load the model without device_map and move it to one device"
            )


class ProfileBank:
    """Holds the full model and any number of profiles; switches in microseconds."""

    def __init__(self, model: Any, base_model: str = "", importance: Importance | None = None,
                 lazy_reorder: bool = True, merge_healed: bool | None = None, layout: ModelLayout | None = None) -> None:
        """``importance``: reorder the base model by it now (zero-copy profiles), unless
        ``CASRAP_REORDER=0``. ``lazy_reorder``: without one, reorder on the first calibrated
        head/FFN plan from the calibration cached under ``$CASRAP_HOME`` (library callers;
        bundles and the CLI pass their importance instead). ``merge_healed``: build healed
        profiles merged (copies) rather than unmerged (default: ``CASRAP_HEAL_MERGE``).
        ``layout``: the model's :class:`ModelLayout` (default: :meth:`ModelLayout.of`); a
        layout of another model is refused."""
        refuse_hooked_model(model)
        if layout is not None and (_LAYOUTS.get(model, layout) is not layout
                                   or any(v is layout and m is not model for m, v in _LAYOUTS.items())):
            raise InputError("this layout belongs to another model (every bank on a model shares one ModelLayout)")
        self.layout = layout or ModelLayout.of(model)
        _LAYOUTS[model] = self.layout
        self.model = model
        self.base_model = base_model
        self.info = describe(model)
        # a reordered model keeps the fingerprint it had before (plans and caches are keyed to it)
        self.fingerprint = self.layout.fingerprint
        self.head_dim = head_dim_of(model)
        self._full_layers = decoder_layers(model)
        self._full_count = int(model.config.num_hidden_layers)
        self._profiles: dict[str, Profile] = {
            FULL: Profile(PruningPlan(name=FULL, base_model=base_model, description="full model"), self._full_layers, 0.0)
        }
        self._active = FULL
        # PCA bases for rank plans; loaded from the cache on the first rank plan, or set
        # by build_bank (which can fit it, having a tokenizer). Not needed after building.
        self.lowrank_basis: LowRankBasis | None = None
        self.auto_reorder = reorder_enabled()
        self.lazy_reorder = lazy_reorder
        self.merge_healed = merge_by_default() if merge_healed is None else merge_healed
        self.copied_modules: dict[str, int] = {}
        # int4 profiles (casrap.pruners.quantize): the machine's kernel check, run before the
        # first one; packed projections shared by every int4 profile holding the same weights
        self.allow_slow_quant = allow_slow_default()
        self.quant_check: KernelCheck | None = None
        self._packed: dict[tuple, nn.Module] = {}
        if importance is not None and self.auto_reorder and not self.layout.reordered:
            self.reorder(importance)

    @property
    def reorder_info(self) -> dict[str, Any]:
        """The base model's reorder report (``{}``: modules are built by copying)."""
        return self.layout.reorder_info

    @property
    def importance(self) -> Importance | None:
        """The importance the base model was reordered by (None when not, or unknown)."""
        return self.layout.importance

    def sibling(self) -> ProfileBank:
        """An empty bank on the same model with the same layout and settings (no second reorder)."""
        return ProfileBank(self.model, base_model=self.base_model, lazy_reorder=self.lazy_reorder, merge_healed=self.merge_healed,
                           layout=self.layout)

    def require_lowrank_basis(self) -> LowRankBasis:
        """The PCA basis rank plans build from: the one set, else the cached one (one-line error if none)."""
        if self.lowrank_basis is None:
            self.lowrank_basis = load_or_fit_basis(self.model, key=self.fingerprint)
        return self.lowrank_basis

    # ---------------------------------------------------------------- building
    def add(self, plan: PruningPlan) -> Profile:
        """Build a plan's modules once (slicing happens here, never at switch time)."""
        if plan.name in self._profiles:
            raise InputError(f"profile {plan.name!r} already exists in the bank")
        if plan.fingerprint and plan.fingerprint != self.fingerprint:
            raise CheckpointError(
                f"plan {plan.name!r} was made for another model (fingerprint {plan.fingerprint}, "
                f"loaded model {self.fingerprint}); rebuild it for this model"
            )
        info = self.info
        plan.validate(info.layers, info.query_heads, info.kv_heads, info.ffn_width)
        sparse = sparse24_layers(plan)
        if sparse and not plan.functional:
            reason = check_sparse24_supported(self._full_layers, sparse)
            if reason:
                raise UnsupportedModelError(f"profile {plan.name!r}: {reason}")
        if plan.quant and self.quant_check is None:
            self.quant_check = require_kernel(self._full_layers, plan.name, self.allow_slow_quant)
        if not plan.functional:
            self._maybe_reorder(plan)
        start = time.perf_counter()
        adapter = plan_adapter_path(plan)  # healed plans: resolved beside the plan, digest checked
        if plan.is_identity and adapter is None and not sparse and not plan.quant:
            layers = self._full_layers
        else:
            kept = [i for i in range(len(self._full_layers)) if i not in set(plan.skip_layers)]
            built = []
            for new_index, i in enumerate(kept):
                original = self._full_layers[i]
                layer = shell(original)
                if i in plan.heads:
                    layer.self_attn = build_attention(original.self_attn, plan.heads[i], self.head_dim, plan.functional)
                    if not plan.functional:
                        check_gqa_integrity(layer.self_attn, self.head_dim)
                else:
                    layer.self_attn = shell(original.self_attn)
                layer.self_attn.layer_idx = new_index
                if i in plan.ffn:
                    layer.mlp = build_mlp(original.mlp, plan.ffn[i], plan.functional)
                if i in sparse:
                    sparsify_mlp(layer, original, plan.functional)
                if i in plan.ranks:
                    factorise_layer(layer, original, plan.ranks[i], self.require_lowrank_basis(), i)
                built.append(layer)
            layers = nn.ModuleList(built)
            self.copied_modules[plan.name] = sum(
                1 for layer in built for m in (layer.self_attn, layer.mlp) if getattr(m, "casrap_zero_copy", None) is False)
            if adapter is not None:
                replaced = apply_adapter(layers, plan, load_adapter(adapter), merged=self.merge_healed)
                if self.merge_healed:
                    self.copied_modules[plan.name] += replaced
            if plan.quant:  # after slicing and healing: packs exactly the map the profile runs
                quantize_layers(layers, ACT_DTYPES[self.quant_check.act_dtype], self._packed, layout=is_reordered(self.model))
        if layout_dependent(plan):
            self.layout.locked = True
        profile = Profile(plan, layers, time.perf_counter() - start)
        self._profiles[plan.name] = profile
        return profile

    def remove(self, name: str) -> None:
        if name == FULL:
            raise InputError("the full model cannot be removed from the bank")
        if self._active == name:
            self.activate(FULL)
        self._profiles.pop(name, None)
        if self._packed:
            drop_unused(self._packed, [p.layers for p in self._profiles.values()])

    # --------------------------------------------------------------- switching
    @property
    def names(self) -> list[str]:
        return list(self._profiles)

    @property
    def active(self) -> str:
        return self._active

    def profile(self, name: str) -> Profile:
        try:
            return self._profiles[name]
        except KeyError:
            raise InputError(f"no profile named {name!r}; have {', '.join(self._profiles)}") from None

    def activate(self, name: str) -> float:
        """Make ``name`` the running variant; returns the switch time in seconds."""
        start = time.perf_counter()
        profile = self.profile(name)
        self.model.model.layers = profile.layers
        self.model.config.num_hidden_layers = len(profile.layers)
        self._active = name
        return time.perf_counter() - start

    @contextmanager
    def using(self, name: str) -> Iterator[Profile]:
        previous = self._active
        self.activate(name)
        try:
            yield self._profiles[name]
        finally:
            self.activate(previous)

    @contextmanager
    def scratch(self, plan: PruningPlan, name: str | None = None) -> Iterator[Profile]:
        """Run ``plan`` as a temporary profile: add it (a copy, under a scratch name),
        activate it, yield it, then remove it and put back the profile that ran before,
        even when the body raises.

        Scoring a candidate plan (search, evaluation) needs exactly this, and a profile
        left behind would sit in the bank's action list and memory. The caller's plan is
        not renamed; the scratch name is free (``__scratch__``, ``__scratch-2__``, ... when
        scratch profiles nest) unless ``name`` is given.
        """
        if name is None:
            name, n = "__scratch__", 1
            while name in self._profiles:
                n += 1
                name = f"__scratch-{n}__"
        previous = self._active
        profile = self.add(replace(plan, name=name))
        try:
            self.activate(name)
            yield profile
        finally:
            self.remove(name)
            self.activate(previous if previous in self._profiles else FULL)

    # ------------------------------------------------------------- accounting
    def parameter_count(self, name: str) -> int:
        """Parameters the profile runs: its layers plus embeddings, final norm and head."""
        layers = self.profile(name).layers
        shared = sum(p.numel() for n, p in self.model.named_parameters() if ".layers." not in n)
        packed = sum(m.logical_numel for m in packed_modules(layers))  # int4 weights are buffers
        return shared + packed + sum(p.numel() for p in layers.parameters())

    def weight_bytes_per_token(self, name: str) -> int:
        """Bytes of weights one decoded token must read: layers, final norm, LM head.

        The input embedding is a row lookup (negligible); a tied LM head is the full
        vocab x hidden matrix.
        """
        layers = self.profile(name).layers
        total = sum(p.numel() * p.element_size() for p in layers.parameters())
        total += sum(b.numel() * b.element_size() for b in layers.buffers())  # packed int4 weights, masks
        total += sum(p.numel() * p.element_size() for p in self.model.model.norm.parameters())
        head = self.model.get_output_embeddings()
        total += head.weight.numel() * head.weight.element_size()
        return total

    def params_removed(self, name: str) -> float:
        return 1.0 - self.parameter_count(name) / self.parameter_count(FULL)

    def ideal_speedup(self, name: str) -> float:
        return self.weight_bytes_per_token(FULL) / self.weight_bytes_per_token(name)

    def memory_overhead_bytes(self, name: str | None = None) -> int:
        """Bytes held by profile(s) beyond the base model's own tensors (unique storages)."""
        base = _unique_storages(self._full_layers)
        names = [name] if name else [n for n in self._profiles if n != FULL]
        extra: dict[int, int] = {}
        for n in names:
            for ptr, size in _unique_storages(self._profiles[n].layers).items():
                if ptr not in base:
                    extra[ptr] = size
        return sum(extra.values())

    def profile_weight_bytes(self, name: str) -> int:
        """Bytes of the storages a profile runs on (its layers, embeddings, norm, head):
        what must stay resident for it, shared or not."""
        found = _unique_storages(self.profile(name).layers)
        for key, tensor in list(self.model.named_parameters()) + list(self.model.named_buffers()):
            if ".layers." not in key:
                storage = tensor.untyped_storage()
                found[storage.data_ptr()] = storage.nbytes()
        return sum(found.values())

    def packed_bytes(self, name: str | None = None) -> int:
        """Bytes of packed int4 weights (codes, scales and zeros) one profile holds, or the
        whole bank (each shared packed copy counted once): part of :meth:`memory_overhead_bytes`."""
        names = [name] if name else list(self._profiles)
        found = {m.packed.untyped_storage().data_ptr(): m.nbytes for n in names for m in packed_modules(self._profiles[n].layers)}
        return sum(found.values())

    def base_weight_bytes(self) -> int:
        """Bytes of the base model's own tensors (every unique storage of the model)."""
        return sum(_unique_storages(self.model).values())

    def kept_order(self, name: str, layer: int) -> dict[str, list[int]]:
        """Original FFN channels / query heads / kv heads held by a built profile's module
        of base layer ``layer``, in the module's order (``{}`` where nothing is sliced).

        Healing and other per-module code use it to lay data stored in a plan's index
        order out in module order (:func:`casrap.pruners.reorder.plan_to_module_order`).
        """
        plan = self.profile(name).plan
        if layer in plan.skip_layers:
            raise InputError(f"profile {name!r} skips layer {layer}")
        position = sum(1 for i in range(layer) if i not in set(plan.skip_layers))
        return kept_order(self.profile(name).layers[position])

    # ------------------------------------------------------------- reordering
    def reorder(self, importance: Any, probe_ids: torch.Tensor | None = None) -> dict[str, Any]:
        """Lay the base model's FFN channels and heads out by ``importance`` (once), so that
        profiles built from the same importance are views of the base tensors.

        Refused once any bank on this model holds sliced, masked, factorised or healed
        modules (their layouts would go stale). Returns (and keeps in ``reorder_info``) the largest logit
        difference of the reordered model from the original on ``probe_ids`` (default: 32
        fixed token ids): float summation order only.
        """
        self.activate(FULL)
        return self.layout.reorder(self.model, importance, probe_ids)

    def _maybe_reorder(self, plan: PruningPlan) -> None:
        """Library fallback for banks created without importance: reorder by the cached
        calibration this plan was built from, if there is one and nothing blocks it.

        ``CASRAP_REORDER=0`` or ``lazy_reorder=False`` turns it off (bundles and the CLI
        reorder at creation instead, from their own calibration). A plan from other
        importance (weight norms, another calibration) is built by copying, as before.
        """
        if self.reorder_info or not self.auto_reorder or not self.lazy_reorder or not (plan.ffn or plan.heads) or plan.ranks:
            return
        if self.layout.reordered or self.layout.locked:
            return
        source = str(plan.meta.get("importance", ""))
        if not source.startswith("calibrated"):
            return
        path = casrap_home() / "calibration" / f"{self.fingerprint}-cal{CALIBRATION_VERSION}.safetensors"
        if not path.is_file():
            return
        try:
            importance = Importance.load(path, expected_key=self.fingerprint)
        except CheckpointError:
            return
        if importance.source == source:
            self.reorder(importance)
