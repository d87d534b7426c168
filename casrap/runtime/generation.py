"""One timed generation on whatever profile is active, with optional text streaming.

Text pieces reach the caller through transformers' own streamer (incremental
detokenisation that never splits a multi-byte character), and the time to first
token is read when the first new token exists, so streaming and plain requests are
timed by the same code.
"""

from __future__ import annotations

import time
from collections.abc import Callable
import statistics
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer


class _TokenClock(StoppingCriteria):
    """Notes the clock each time a new token exists: the first is prefill plus one token.

    Per-token times let the reward use the *median* decode step, so one scheduler
    hiccup during a generation does not decide what a profile costs.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.times: list[float] = []

    @property
    def first(self) -> float | None:
        return self.times[0] if self.times else None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        self.times.append(self.clock())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class _CallbackStreamer(TextStreamer):
    """transformers' TextStreamer, handing finished text pieces to a callback instead of stdout."""

    def __init__(self, tokenizer: Any, on_text: Callable[[str], None]) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._on_text = on_text

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self._on_text(text)


@dataclass
class GenerationOutput:
    token_ids: list[int]
    text: str
    ttft_s: float
    generation_s: float
    finish_reason: str  # "stop" (EOS) or "length"
    decode_steps_s: list[float] = field(default_factory=list)  # seconds between consecutive new tokens

    @property
    def decode_median_s(self) -> float:
        """Median seconds per decode step (0 with fewer than two new tokens)."""
        return float(statistics.median(self.decode_steps_s)) if self.decode_steps_s else 0.0

    @property
    def robust_latency_s(self) -> float:
        """TTFT plus the median decode step for every further token: what the reward trusts."""
        return self.ttft_s + self.decode_median_s * max(len(self.decode_steps_s), 0)


@torch.inference_mode()
def generate_timed(
    model: Any,
    tokenizer: Any,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    clock: Callable[[], float] = time.perf_counter,
    on_text: Callable[[str], None] | None = None,
    ignore_eos: bool = False,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> GenerationOutput:
    """Generate on the active profile; ``ignore_eos`` fixes the length (for timing)."""
    device = next(model.parameters()).device
    ids = input_ids.to(device)
    timer = _TokenClock(clock)
    eos = None if ignore_eos else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    kwargs: dict[str, Any] = {"do_sample": do_sample}
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    if ignore_eos:
        kwargs["min_new_tokens"] = max_new_tokens
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = clock()
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad,
        stopping_criteria=StoppingCriteriaList([timer]),
        streamer=_CallbackStreamer(tokenizer, on_text) if on_text else None, **kwargs,
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    end = clock()
    new = out[0, ids.shape[1]:].tolist()
    finish = "stop" if (eos is not None and new and new[-1] == eos and len(new) <= max_new_tokens) else "length"
    if finish == "stop":
        new = new[:-1]
    text = tokenizer.decode(new, skip_special_tokens=True)
    steps = [b - a for a, b in zip(timer.times, timer.times[1:])]
    return GenerationOutput(new, text, (timer.first if timer.first is not None else end) - start, end - start, finish, steps)
