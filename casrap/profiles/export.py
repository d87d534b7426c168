"""Export a profile as a standalone Hugging Face checkpoint, where shapes allow.

A plain ``LlamaConfig`` has one head count and one FFN width for all layers, so only
profiles whose pruned layers are uniform export: skipped layers, the same FFN width in
every layer, the same head counts in every layer. Other profiles are saved as plan
JSON and re-applied on the base model; ``export_checkpoint`` says why.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from casrap.errors import InputError
from casrap.profiles.bank import ProfileBank


def export_blocker(bank: ProfileBank, name: str) -> str | None:
    """Why the profile cannot be a plain checkpoint, or None if it can."""
    plan = bank.profile(name).plan
    if plan.functional:
        return "functional (masked) profiles have no smaller shape to export; use a structural profile"
    if plan.ranks:
        return "low-rank (factorised) projections have no LlamaConfig form; keep it as a plan JSON"
    if getattr(plan, "quant", None):
        return f"{plan.quant} (packed) profiles have no plain-checkpoint form; export the structural plan, keep the plan JSON"
    layers = bank.profile(name).layers
    widths = {layer.mlp.gate_proj.out_features for layer in layers}
    if len(widths) > 1:
        return f"FFN widths differ across layers ({sorted(widths)}); LlamaConfig has one intermediate_size"
    q = {layer.self_attn.q_proj.out_features for layer in layers}
    kv = {layer.self_attn.k_proj.out_features for layer in layers}
    if len(q) > 1 or len(kv) > 1:
        return "attention head counts differ across layers; LlamaConfig has one num_attention_heads"
    heads = q.pop() // bank.head_dim
    if bank.model.config.hidden_size % heads:
        return (f"{heads} query heads do not divide hidden_size {bank.model.config.hidden_size}, "
                "which LlamaConfig requires; keep it as a plan JSON")
    return None


def export_checkpoint(bank: ProfileBank, name: str, directory: Path, tokenizer: Any | None = None, merge: bool = True) -> Path:
    """Write ``directory`` loadable by ``AutoModelForCausalLM.from_pretrained``.

    A healed profile (its plan names a LoRA adapter) is written with the adapter merged
    into the weights (``merge``, the default: a plain checkpoint), or as the unhealed
    pruned checkpoint plus the PEFT adapter in ``directory/adapter``, loadable with
    ``PeftModel.from_pretrained(model, directory / "adapter")``.
    """
    plan = bank.profile(name).plan
    if plan.meta.get("adapter") and not merge:
        return _export_unmerged(bank, name, Path(directory), tokenizer)
    reason = export_blocker(bank, name)
    if reason:
        raise InputError(f"profile {name!r} cannot be exported as a plain checkpoint: {reason}")
    from transformers import AutoModelForCausalLM

    layers = bank.profile(name).layers
    config = copy.deepcopy(bank.model.config)
    first = layers[0]
    config.num_hidden_layers = len(layers)
    config.intermediate_size = first.mlp.gate_proj.out_features
    config.num_attention_heads = first.self_attn.q_proj.out_features // bank.head_dim
    config.num_key_value_heads = first.self_attn.k_proj.out_features // bank.head_dim
    config.head_dim = bank.head_dim
    try:
        fresh = AutoModelForCausalLM.from_config(config, dtype=next(bank.model.parameters()).dtype)
    except ValueError as err:
        raise InputError(f"profile {name!r} cannot be exported: {str(err).splitlines()[0]}") from err
    with bank.using(name):
        state = {k: v for k, v in bank.model.state_dict().items()}
    fresh.load_state_dict(state, strict=True)
    directory = Path(directory)
    fresh.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def _export_unmerged(bank: ProfileBank, name: str, directory: Path, tokenizer: Any | None) -> Path:
    """The pruned checkpoint without the adapter, and the adapter folder beside it."""
    import json
    import shutil

    from casrap.profiles.adapter import plan_adapter_path

    plan = bank.profile(name).plan
    adapter = plan_adapter_path(plan)
    bare = copy.deepcopy(plan)
    bare.name = f"{plan.name} (unhealed)"
    bare.meta = {k: v for k, v in plan.meta.items() if k != "adapter"}
    scratch = bank.sibling()  # same model and layout, shares every tensor; built for this export only
    scratch.add(bare)
    export_checkpoint(scratch, bare.name, directory, tokenizer)
    target = directory / "adapter"
    shutil.copytree(adapter, target, dirs_exist_ok=True)
    # the adapter is stored in plan order; the checkpoint holds the (possibly reordered) module order
    from safetensors.torch import load_file, save_file

    from casrap.profiles.adapter import ADAPTER_WEIGHTS, factors_to_plan_order

    weights = target / ADAPTER_WEIGHTS
    state = factors_to_plan_order(load_file(str(weights)), scratch.profile(bare.name).layers, bare, inverse=True)
    save_file(state, str(weights), metadata={"format": "pt"})
    config_path = target / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = str(directory.resolve())
    config_path.write_text(json.dumps(config, indent=2))
    return directory
