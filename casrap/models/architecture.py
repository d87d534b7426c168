"""What a LLaMA-family model is made of, and which parts of it can be pruned.

Counts are derived from module shapes, never from attributes such as
``attn.num_heads`` (gone in recent transformers) or from the config alone (a pruned
model's modules differ from its config).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from casrap.errors import UnsupportedModelError

SUPPORTED = (
    "LLaMA-family decoders whose layers are model.model.layers[i] with "
    "self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj "
    "(Llama 2/3, SmolLM/SmolLM2, Mistral, Qwen2/Qwen3, TinyLlama)"
)


def decoder_layers(model: Any) -> Any:
    """The ModuleList of decoder layers, or a clear error for other architectures."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or len(layers) == 0:
        raise UnsupportedModelError(
            f"{type(model).__name__} is not supported: casrap prunes {SUPPORTED}"
        )
    first = layers[0]
    attn = getattr(first, "self_attn", None)
    mlp = getattr(first, "mlp", None)
    needed = [(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
        (mlp, n) for n in ("gate_proj", "up_proj", "down_proj")
    ]
    if attn is None or mlp is None or any(getattr(m, n, None) is None for m, n in needed):
        raise UnsupportedModelError(
            f"{type(model).__name__} is not supported: casrap prunes {SUPPORTED}"
        )
    return layers


def head_dim_of(model: Any) -> int:
    config = model.config
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


@dataclass
class ParameterBreakdown:
    attention: int
    mlp: int
    embeddings: int
    lm_head: int
    norms: int
    total: int

    def percentages(self) -> dict[str, float]:
        return {
            k: 100.0 * v / self.total
            for k, v in asdict(self).items()
            if k != "total" and self.total
        }


@dataclass
class ArchitectureInfo:
    """Shapes and prunable units of a loaded model (read from its modules)."""

    model_type: str
    layers: int
    query_heads: int
    kv_heads: int
    group_size: int
    head_dim: int
    hidden_size: int
    ffn_width: int
    vocab_size: int
    tied_embeddings: bool
    parameters: ParameterBreakdown
    prunable_units: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["parameter_percentages"] = self.parameters.percentages()
        return data


def _numel(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


def describe(model: Any) -> ArchitectureInfo:
    """Describe ``model`` (base or pruned) from its modules."""
    layers = decoder_layers(model)
    head_dim = head_dim_of(model)
    first = layers[0].self_attn
    q_heads = first.q_proj.out_features // head_dim
    kv_heads = first.k_proj.out_features // head_dim
    attention = sum(_numel(layer.self_attn) for layer in layers)
    mlp = sum(_numel(layer.mlp) for layer in layers)
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embed.data_ptr()
    embeddings = embed.numel()
    lm_head = 0 if (head is None or tied) else head.weight.numel()
    total = sum(p.numel() for p in model.parameters())  # parameters() de-duplicates tied weights
    norms = total - attention - mlp - embeddings - lm_head
    ffn = layers[0].mlp.gate_proj.out_features
    return ArchitectureInfo(
        model_type=str(getattr(model.config, "model_type", type(model).__name__)),
        layers=len(layers),
        query_heads=q_heads,
        kv_heads=kv_heads,
        group_size=q_heads // max(kv_heads, 1),
        head_dim=head_dim,
        hidden_size=int(model.config.hidden_size),
        ffn_width=ffn,
        vocab_size=int(embed.shape[0]),
        tied_embeddings=tied,
        parameters=ParameterBreakdown(attention, mlp, embeddings, lm_head, norms, total),
        prunable_units={
            "layers": len(layers),
            "kv_groups": kv_heads * len(layers),
            "query_heads_per_group": q_heads // max(kv_heads, 1),
            "query_heads": q_heads * len(layers),
            "ffn_channels": sum(layer.mlp.gate_proj.out_features for layer in layers),
        },
    )


def model_key(model: Any) -> str:
    """A fingerprint of the model's shapes and weights: calibrations and plans are keyed to it.

    Reads the mean magnitude of every decoder layer's q and down projections and of the
    embeddings (one pass over ~half the weights; milliseconds on SmolLM2), so two
    checkpoints of the same architecture differ while the same weights loaded twice
    (any dtype) agree. Call it on the full model, not while a profile is active.
    """
    import hashlib
    import json

    import torch

    info = describe(model)
    layers = decoder_layers(model)
    with torch.no_grad():
        probe = torch.stack([
            *(layer.self_attn.q_proj.weight.float().abs().mean() for layer in layers),
            *(layer.mlp.down_proj.weight.float().abs().mean() for layer in layers),
            model.get_input_embeddings().weight.float().abs().mean(),
        ])
    digest = hashlib.sha1(json.dumps([info.layers, info.query_heads, info.kv_heads, info.ffn_width, info.vocab_size]).encode())
    digest.update(probe.round(decimals=5).cpu().numpy().tobytes())
    return f"{info.model_type}-{info.layers}L-{digest.hexdigest()[:12]}"
