"""Quality and speed of KV-cache compression against prompt length (``casrap bench-kv``).

For each prompt length L (the first L tokens of search prose followed by calibration
text: never test prose, which README's quality figures are reported on) and keep ratio:

- quality: the full model's greedy answer (N tokens, full cache) is the reference;
  the compressed cache is fed that same answer teacher-forced, and the mean KL of the
  full cache's next-token distributions to the compressed cache's is reported over the
  N-1 answer tokens compression can affect, with top-1 agreement;
- speed: decode ms/token of the compressed cache against the full cache through the
  same decode loop (:func:`casrap.pruners.kvcache.decode_steps`), interleaved pairs,
  median of per-pair ratios; prefill time with and without compression (the scoring
  is extra work at prefill).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from casrap.errors import InputError
from casrap.measure.perplexity import mean_kl
from casrap.measure.timing import compare_interleaved
from casrap.pruners.kvcache import KVCompression, decode_steps, prefill_compressed


@dataclass
class KVResult:
    prompt_tokens: int
    keep_ratio: float
    kept_tokens: int
    kl: float  # mean KL(full cache || compressed) over the answer tokens
    top1_agreement: float
    answer_tokens: int
    decode_ms_full: float
    decode_ms_compressed: float
    speedup: float
    speedup_pairs: list[float]
    prefill_ms_full: float
    prefill_ms_compressed: float


def long_prompt_ids(tokenizer: Any, tokens: int) -> torch.Tensor:
    """[1, tokens] ids of search prose then calibration text (never test prose)."""
    from casrap.data.calibration import calibration_texts
    from casrap.measure.corpus import prose_split

    text = prose_split("search").text + "\n\n" + "\n\n".join(calibration_texts())
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :tokens]
    if ids.shape[1] < tokens:
        raise InputError(f"only {ids.shape[1]} tokens of search and calibration text; ask for fewer prompt tokens")
    return ids


def _timed(fn: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


@torch.inference_mode()
def kv_study(
    model: Any,
    tokenizer: Any,
    prompt_lengths: list[int],
    keep_ratios: list[float],
    new_tokens: int = 32,
    pairs: int = 3,
    base: KVCompression | None = None,
) -> list[KVResult]:
    """Rows of (prompt length, keep ratio): quality and speed as the module docstring says."""
    template = base or KVCompression()
    device = next(model.parameters()).device
    results = []
    for length in prompt_lengths:
        limit = int(getattr(model.config, "max_position_embeddings", 0) or 0)
        if limit and length + new_tokens > limit:
            raise InputError(f"{length} prompt tokens + {new_tokens} new exceed the model's context of {limit}")
        ids = long_prompt_ids(tokenizer, length).to(device)
        full = KVCompression(1.0, template.sinks, template.recent, template.observation)
        cache, last = prefill_compressed(model, ids, full)
        first = last.argmax(-1, keepdim=True)
        if new_tokens < 2:
            raise InputError("KV-compression quality needs at least 2 new tokens")
        answer_logits = decode_steps(model, cache, first.expand(1, new_tokens), length, greedy=True)
        answer = torch.cat([first, answer_logits.argmax(-1)[:-1].unsqueeze(0)], dim=1)  # N tokens
        cache, _ = prefill_compressed(model, ids, full)
        reference = decode_steps(model, cache, answer[:, :-1], length)  # predicts answer[1:]
        for ratio in keep_ratios:
            cfg = KVCompression(ratio, template.sinks, template.recent, template.observation)
            cache, _ = prefill_compressed(model, ids, cfg)
            kept = int(cache.layers[0].keys.shape[-2])
            candidate = decode_steps(model, cache, answer[:, :-1], length)
            agreement = float((candidate.argmax(-1) == answer[0, 1:]).float().mean())
            prefill = {"full": [], "compressed": []}

            def runner(c: KVCompression, key: str, ids: torch.Tensor = ids, length: int = length,
                       prefill: dict[str, list[float]] = prefill) -> Any:
                def run() -> float:
                    seconds, (kv, lg) = _timed(lambda: prefill_compressed(model, ids, c))
                    prefill[key].append(seconds)
                    tok = lg.argmax(-1, keepdim=True)
                    decode_s, _ = _timed(lambda: decode_steps(model, kv, tok.expand(1, new_tokens), length, greedy=True))
                    return decode_s / new_tokens
                return run

            comparison = compare_interleaved(runner(full, "full"), runner(cfg, "compressed"), pairs=pairs, warmup=1)
            results.append(KVResult(
                prompt_tokens=length, keep_ratio=ratio, kept_tokens=kept, kl=mean_kl(reference, candidate),
                top1_agreement=agreement, answer_tokens=int(answer.shape[1] - 1),
                decode_ms_full=1000 * statistics.median(comparison.baseline_s),
                decode_ms_compressed=1000 * statistics.median(comparison.candidate_s),
                speedup=comparison.speedup, speedup_pairs=comparison.ratios,
                prefill_ms_full=1000 * statistics.median(prefill["full"][1:] or prefill["full"]),
                prefill_ms_compressed=1000 * statistics.median(prefill["compressed"][1:] or prefill["compressed"]),
            ))
    return results


def as_dicts(rows: list[KVResult]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]
