"""Generation timing by the project's protocol.

Warm-up first; a fixed number of new tokens with EOS ignored; several repetitions,
median; variants compared in interleaved pairs (A B A B) with the ratio taken per pair,
so drift in machine load hits both sides equally. Generations themselves are timed by
one clock, the Router's per-token one (:func:`casrap.decide.generation.generate_timed`;
:func:`casrap.bench.router_timing` for a model's TTFT and decode step).
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
