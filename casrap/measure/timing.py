"""Generation timing by the project's protocol.

Warm-up first; a fixed number of new tokens with EOS ignored; several repetitions,
median; time to first token (prefill + one token) measured separately from the
per-token decode time; variants compared in interleaved pairs (A B A B) with the
ratio taken per pair, so drift in machine load hits both sides equally.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from casrap.errors import InputError

Clock = Callable[[], float]


@dataclass
class GenerationTiming:
    ttft_s: float
    total_s: float
    decode_ms_per_token: float
    tokens_per_s: float
    new_tokens: int
    repetitions: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_prompt_fits(model: Any, prompt_tokens: int, new_tokens: int) -> None:
    """Raise a one-line error for an empty prompt or one the context cannot hold."""
    if prompt_tokens == 0:
        raise InputError("empty prompt")
    limit = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    if limit and prompt_tokens + new_tokens > limit:
        raise InputError(
            f"prompt of {prompt_tokens} tokens plus {new_tokens} new tokens exceeds the "
            f"model's context window of {limit}"
        )


@torch.inference_mode()
def generate_fixed(model: Any, input_ids: torch.Tensor, new_tokens: int, pad_token_id: int | None = None,
                   **generate_kwargs: Any) -> torch.Tensor:
    """Greedy generation of exactly ``new_tokens`` tokens (EOS ignored); ``generate_kwargs``
    pass through (e.g. a static cache and compile config)."""
    device = next(model.parameters()).device
    ids = input_ids.to(device)
    return model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=pad_token_id if pad_token_id is not None else 0,
        eos_token_id=None,
        **generate_kwargs,
    )


def timed_generate(
    model: Any, input_ids: torch.Tensor, new_tokens: int, clock: Clock = time.perf_counter, pad_token_id: int | None = None,
    **generate_kwargs: Any,
) -> tuple[float, torch.Tensor]:
    """One timed greedy generation; returns (seconds, output ids)."""
    device = next(model.parameters()).device
    _sync(device)
    start = clock()
    out = generate_fixed(model, input_ids, new_tokens, pad_token_id, **generate_kwargs)
    _sync(device)
    return clock() - start, out


def time_generation(
    model: Any,
    input_ids: torch.Tensor,
    new_tokens: int = 32,
    repetitions: int = 3,
    warmup: int = 1,
    clock: Clock = time.perf_counter,
) -> GenerationTiming:
    """Median time to first token, total time and decode ms/token over repetitions."""
    if new_tokens < 2:
        raise InputError("timing needs at least 2 new tokens to separate prefill from decode")
    check_prompt_fits(model, int(input_ids.shape[-1]), new_tokens)
    for _ in range(warmup):
        timed_generate(model, input_ids, new_tokens, clock)
    ttfts, totals = [], []
    for _ in range(repetitions):
        ttfts.append(timed_generate(model, input_ids, 1, clock)[0])
        totals.append(timed_generate(model, input_ids, new_tokens, clock)[0])
    ttft = statistics.median(ttfts)
    total = statistics.median(totals)
    decode = max(total - ttft, 0.0) / (new_tokens - 1)
    return GenerationTiming(
        ttft_s=ttft,
        total_s=total,
        decode_ms_per_token=1000.0 * decode,
        tokens_per_s=new_tokens / total if total > 0 else float("inf"),
        new_tokens=new_tokens,
        repetitions=repetitions,
    )


@dataclass
class InterleavedComparison:
    baseline_s: list[float]
    candidate_s: list[float]

    @property
    def ratios(self) -> list[float]:
        """Per-pair speedups: baseline time / candidate time."""
        return [b / c for b, c in zip(self.baseline_s, self.candidate_s) if c > 0]

    @property
    def speedup(self) -> float:
        return statistics.median(self.ratios) if self.ratios else float("nan")


def compare_interleaved(
    run_baseline: Callable[[], float],
    run_candidate: Callable[[], float],
    pairs: int = 5,
    warmup: int = 1,
) -> InterleavedComparison:
    """Run A B A B …; each callable returns its own elapsed seconds."""
    for _ in range(warmup):
        run_baseline()
        run_candidate()
    base, cand = [], []
    for i in range(pairs):
        # alternate which side goes first so neither always follows the other
        if i % 2 == 0:
            base.append(run_baseline())
            cand.append(run_candidate())
        else:
            cand.append(run_candidate())
            base.append(run_baseline())
    return InterleavedComparison(base, cand)
