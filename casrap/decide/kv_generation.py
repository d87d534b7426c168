"""One timed generation with the KV cache compressed after the prompt (the ``kv-R`` actions).

:func:`casrap.decide.generation.generate_timed` goes through ``model.generate``, which
derives each new token's position from the cache length; a compressed cache is shorter
than the text it stands for, so positions would drift. Here the prompt is prefilled and
compressed by :func:`casrap.pruners.kvcache.prefill_compressed`, and every new token is
fed at its true position (``prompt_len + step``), the same contract as
:func:`casrap.pruners.kvcache.decode_steps`.

Everything else is the dense path's own (:func:`casrap.decide.generation.prepare_request`):
the same logits processors pick each token (sampling with a per-request seed, penalties,
``logit_bias``, logprobs of the raw distribution), the same step watcher runs after every
token (clock, ``on_decode_step``, stop strings, streaming, the cancel flag and its
deadline), and generation ends on every end id of the model's generation config. So a
``kv-R`` action honours every request option, is timed, recorded and rewarded like every
other, and at keep ratio 1 greedy decoding gives ``generate_timed``'s tokens.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from casrap.decide.generation import GenerationOutput, finish_request, prepare_request
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


def _cache_keyword(model: Any) -> str:
    """``cache`` on recent transformers, ``past_key_values`` before it was renamed."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


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
    compression: KVCompression | None = None,
    **options: Any,
) -> GenerationOutput:
    """Generate on the active profile with the prompt's KV cache compressed to ``keep_ratio``.

    ``compression`` overrides the sinks / recent / observation window (its keep ratio is
    replaced by ``keep_ratio``). ``ignore_eos`` fixes the length (for timing); ``options``
    are :func:`~casrap.decide.generation.prepare_request`'s (cancel, on_step, stop, seed,
    logprobs, sampling, penalties, on_decode_step).
    """
    config = replace(compression or KVCompression(), keep_ratio=keep_ratio)
    request = prepare_request(model, tokenizer, input_ids, clock=clock, on_text=on_text, ignore_eos=ignore_eos, **options)
    ids, device, ends = request.ids, request.device, set(request.ends)
    seq = ids
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = clock()
    if max_new_tokens > 0:
        cache, last = prefill_compressed(model, ids, config)  # a DynamicCache: decoding appends to it in place
        cache_kw = _cache_keyword(model)
        token = request.next_token(seq, last)
        while True:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seq = torch.cat([seq, token.to(seq.dtype)], dim=1)
            done = bool(request.watch(seq, None)[0])  # clock, per-step hook, logprob, stop strings, stream, cancel
            if done or int(token) in ends or seq.shape[1] - request.prompt_len >= max_new_tokens:
                break
            position = torch.tensor([[seq.shape[1] - 1]], device=device)
            out = model(token, position_ids=position, use_cache=True, **{cache_kw: cache})
            token = request.next_token(seq, out.logits[:, -1])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    end = clock()
    return finish_request(request, tokenizer, seq[0, request.prompt_len:].tolist(), start, end)
