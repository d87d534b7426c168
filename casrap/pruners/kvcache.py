"""KV-cache compression for long prompts (the original system's Phase D, ``--kv-keep-ratio``).

After the prompt's prefill, each layer's cache keeps ``keep_ratio`` of the prompt's
tokens: the first ``sinks`` tokens (attention sinks: every head attends to them and
dropping them breaks the model), the last ``recent`` tokens (local context), and the
prompt tokens the last ``observation`` prompt positions attended to most (SnapKV:
the end of the prompt predicts which tokens the answer will look at). Scores are per
kv head (summed over its query heads), so each kv head keeps its own tokens; all heads
of a layer keep the same number, as the cache's tensors require.

Positions: keys are cached after RoPE, so a kept key keeps its original position; new
tokens are given their true positions (``prompt_len + step``), not the compressed
cache length. That is why decoding goes through :func:`decode_steps` (explicit
``position_ids``) instead of ``generate``, which would derive positions from the
cache length. Everything runs on transformers' own ``DynamicCache`` and layers; only
the cache's tensors are replaced.

Quality is measured teacher-forced on the full model's own answer (the answer the
full cache gives), never on the compressed run's own generation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from casrap.errors import InputError
from casrap.models.architecture import decoder_layers, head_dim_of


@dataclass
class KVCompression:
    """What the compressed cache keeps of a prompt."""

    keep_ratio: float = 0.5  # share of prompt tokens kept per layer and kv head
    sinks: int = 4  # first tokens always kept (attention sinks)
    recent: int = 32  # last prompt tokens always kept
    observation: int = 16  # last prompt positions whose attention ranks the rest

    def budget(self, prompt_len: int) -> int:
        if not 0 < self.keep_ratio <= 1:
            raise InputError(f"--kv-keep-ratio must be in (0, 1], got {self.keep_ratio}")
        return max(min(prompt_len, self.sinks + self.recent), math.ceil(self.keep_ratio * prompt_len))


def _observed_queries(model: Any, window: int) -> tuple[dict[int, torch.Tensor], list[Any]]:
    """Forward pre-hooks that keep each layer's RoPE'd queries of the last ``window`` positions."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    queries: dict[int, torch.Tensor] = {}
    handles = []
    d = head_dim_of(model)

    def hook(i: int) -> Any:
        def inner(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            cos, sin = kwargs["position_embeddings"]
            h = hidden[:, -window:]
            q = module.q_proj(h).view(h.shape[0], h.shape[1], -1, d).transpose(1, 2)
            q, _ = apply_rotary_pos_emb(q, q, cos[:, -window:], sin[:, -window:])
            queries[i] = q
        return inner

    for i, layer in enumerate(decoder_layers(model)):
        handles.append(layer.self_attn.register_forward_pre_hook(hook(i), with_kwargs=True))
    return queries, handles


def token_scores(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """[B, kv_heads, T]: attention the observed queries ([B, q_heads, W, d]) pay to each
    cached key ([B, kv_heads, T, d]), causally, summed over the window and each group."""
    b, hq, w, d = query.shape
    hkv, t = keys.shape[1], keys.shape[2]
    group = hq // hkv
    q = query.reshape(b, hkv, group * w, d).float()
    logits = q @ keys.float().transpose(-1, -2) / math.sqrt(d)  # [B, hkv, group*W, T]
    qpos = (t - w + torch.arange(w, device=keys.device)).repeat(group)
    causal = torch.arange(t, device=keys.device).unsqueeze(0) <= qpos.unsqueeze(1)
    logits = logits.masked_fill(~causal, float("-inf"))
    return logits.softmax(-1).sum(2)


def keep_indices(scores: torch.Tensor, budget: int, sinks: int, recent: int) -> torch.Tensor:
    """[B, kv_heads, budget] sorted token indices: sinks + recent window + top scores."""
    t = scores.shape[-1]
    if budget >= t:
        return torch.arange(t, device=scores.device).expand(*scores.shape[:-1], t)
    forced = torch.zeros(t, dtype=torch.bool, device=scores.device)
    forced[: min(sinks, t)] = True
    forced[max(0, t - recent):] = True
    ranked = scores.masked_fill(forced, float("inf"))
    return ranked.topk(budget, dim=-1).indices.sort(dim=-1).values


def cache_argument(model: Any) -> str:
    """The keyword a causal LM's ``forward`` takes its KV cache under: ``cache`` from
    transformers 5.24, ``past_key_values`` before. Passing the wrong one is silent (it
    falls into ``**kwargs`` and every step runs without context), so it is looked up."""
    import inspect

    names = inspect.signature(model.forward).parameters
    return "cache" if "cache" in names else "past_key_values"


def output_cache(out: Any) -> Any:
    """The cache a forward returned (``out.cache`` from transformers 5.24, ``out.past_key_values`` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@torch.inference_mode()
def prefill_compressed(model: Any, input_ids: torch.Tensor, config: KVCompression) -> tuple[Any, torch.Tensor]:
    """Prefill ``input_ids`` and compress the cache; returns (cache, last position's logits).

    The returned logits come from the full prefill (compression only affects later tokens).
    """
    prompt_len = int(input_ids.shape[-1])
    budget = config.budget(prompt_len)
    queries, handles = _observed_queries(model, min(config.observation, prompt_len)) if budget < prompt_len else ({}, [])
    try:
        out = model(input_ids, use_cache=True)
    finally:
        for handle in handles:
            handle.remove()
    cache = output_cache(out)
    if budget < prompt_len:
        for i, layer in enumerate(cache.layers):
            scores = token_scores(queries[i], layer.keys)
            idx = keep_indices(scores, budget, config.sinks, config.recent)
            gather = idx.unsqueeze(-1).expand(-1, -1, -1, layer.keys.shape[-1])
            layer.keys = layer.keys.gather(2, gather)
            layer.values = layer.values.gather(2, gather)
    return cache, out.logits[:, -1].float()


@torch.inference_mode()
def decode_steps(model: Any, cache: Any, tokens: torch.Tensor, prompt_len: int, greedy: bool = False) -> torch.Tensor:
    """Feed ``tokens`` ([1, N]) one at a time at their true positions; returns [N, vocab] logits.

    ``greedy=True`` feeds each step's argmax instead (only the first token is used).
    """
    device = tokens.device
    logits = []
    current = tokens[:, :1]
    argument = cache_argument(model)
    for step in range(tokens.shape[1]):
        pos = torch.tensor([[prompt_len + step]], device=device)
        out = model(current, position_ids=pos, use_cache=True, **{argument: cache})
        last = out.logits[:, -1].float()
        logits.append(last[0])
        if step + 1 < tokens.shape[1]:
            current = last.argmax(-1, keepdim=True) if greedy else tokens[:, step + 1 : step + 2]
    return torch.stack(logits)
