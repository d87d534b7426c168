"""One timed generation with the KV cache compressed after the prompt (the ``kv-R`` actions).

:func:`casrap.decide.generation.generate_timed` goes through ``model.generate``, which
derives each new token's position from the cache length; a compressed cache is shorter
than the text it stands for, so positions would drift. Here the prompt is prefilled and
compressed by :func:`casrap.pruners.kvcache.prefill_compressed`, and every new token is
fed at its true position (``prompt_len + step``), the same contract as
:func:`casrap.pruners.kvcache.decode_steps`. The timing fields are those of
``generate_timed`` (clock read when each new token exists; TTFT = prefill, compression
and the first token), so a ``kv-R`` action is recorded and rewarded like every other.
At keep ratio 1 nothing is dropped and greedy decoding gives ``generate_timed``'s tokens.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import TextStreamer

from casrap.decide.generation import GenerationOutput
from casrap.profiles.catalogue import KV_META  # plan.meta key written for ``kv-R`` and ``SPEC+kvR``
from casrap.pruners.kvcache import KVCompression, prefill_compressed


def kv_keep_of(plan: Any) -> float | None:
    """The KV keep ratio a plan asks for (``kv-50`` -> 0.5), or None for a plain plan.

    A ratio of 1 or more keeps every prompt token, so it is reported as None too: such
    a plan generates through the ordinary path.
    """
    meta = getattr(plan, "meta", None) or {}
    keep = meta.get(KV_META)
    if keep is None:
        return None
    keep = float(keep)
    return keep if keep < 1.0 else None


class _Streamer(TextStreamer):
    """transformers' TextStreamer (incremental detokenisation) handing text to a callback."""

    def __init__(self, tokenizer: Any, on_text: Callable[[str], None]) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._on_text = on_text

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self._on_text(text)


def _cache_keyword(model: Any) -> str:
    """``cache`` on recent transformers, ``past_key_values`` before it was renamed."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def _next_token(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float) -> torch.Tensor:
    """[1, 1] next token from [1, vocab] logits: argmax, or temperature / nucleus sampling."""
    if not do_sample:
        return logits.argmax(-1, keepdim=True)
    probs = torch.softmax(logits.float() / max(temperature, 1e-5), dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest prefix reaching top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1)


@torch.inference_mode()
def generate_timed_kv(
    model: Any,
    tokenizer: Any,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    keep_ratio: float,
    clock: Callable[[], float] = time.perf_counter,
    on_text: Callable[[str], None] | None = None,
    ignore_eos: bool = False,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    compression: KVCompression | None = None,
) -> GenerationOutput:
    """Generate on the active profile with the prompt's KV cache compressed to ``keep_ratio``.

    ``compression`` overrides the sinks / recent / observation window (its keep ratio is
    replaced by ``keep_ratio``). ``ignore_eos`` fixes the length (for timing).
    """
    from dataclasses import replace

    config = replace(compression or KVCompression(), keep_ratio=keep_ratio)
    device = next(model.parameters()).device
    ids = input_ids.to(device)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    prompt_len = int(ids.shape[1])
    eos = None if ignore_eos else tokenizer.eos_token_id
    streamer = _Streamer(tokenizer, on_text) if on_text else None
    if streamer:
        streamer.put(ids.cpu())  # the prompt: skipped by the streamer, as in generate
    times: list[float] = []
    new: list[int] = []
    finish = "length"
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = clock()
    if max_new_tokens > 0:
        cache, last = prefill_compressed(model, ids, config)  # a DynamicCache: decoding appends to it in place
        cache_kw = _cache_keyword(model)
        token = _next_token(last, do_sample, temperature, top_p)
        while True:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(clock())
            value = int(token.item())
            new.append(value)
            if eos is not None and value == eos:
                finish = "stop"
                break
            if streamer:
                streamer.put(token.cpu())
            if len(new) >= max_new_tokens:
                break
            position = torch.tensor([[prompt_len + len(new) - 1]], device=device)
            out = model(token.to(device), position_ids=position, use_cache=True, **{cache_kw: cache})
            token = _next_token(out.logits[:, -1].float(), do_sample, temperature, top_p)
    if streamer:
        streamer.end()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    end = clock()
    if finish == "stop":
        new = new[:-1]
    text = tokenizer.decode(new, skip_special_tokens=True)
    steps = [b - a for a, b in zip(times, times[1:])]
    return GenerationOutput(new, text, (times[0] if times else end) - start, end - start, finish, steps)
