"""Prompt complexity: token count and perplexity under the full model.

complexity = 0.6 * min(1, tokens / 200) + 0.4 * min(1, ppl / 50), as in CASRAP.
The perplexity is computed on at most ``max_tokens`` leading tokens (one short
forward pass) and cached per prompt, which keeps the analysis a few percent of a
50-token generation; ``casrap bench``-style figures for that cost are in the README.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from casrap.errors import InputError


@dataclass(frozen=True)
class PromptFeatures:
    tokens: int
    ppl: float
    complexity: float
    analysis_s: float


def complexity_score(tokens: int, ppl: float) -> float:
    return 0.6 * min(1.0, tokens / 200.0) + 0.4 * min(1.0, ppl / 50.0)


class PromptAnalyzer:
    def __init__(self, model: Any, tokenizer: Any, max_tokens: int = 64, clock: Callable[[], float] = time.perf_counter) -> None:
        self.model = model
        self.clock = clock
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self._cache: dict[str, PromptFeatures] = {}

    def encode(self, prompt: str) -> torch.Tensor:
        if not prompt.strip():
            raise InputError("empty prompt")
        messages = [{"role": "user", "content": prompt}]
        if getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
            ids = ids if torch.is_tensor(ids) else ids["input_ids"]
        else:
            ids = self.tokenizer(prompt, return_tensors="pt").input_ids
        return ids

    def bound_cache(self, limit: int) -> None:
        """Forget every cached prompt once more than ``limit`` are kept (a server sees unbounded prompts)."""
        if len(self._cache) > limit:
            self._cache.clear()

    def forget(self, prompt: str) -> None:
        """Drop one prompt's cached features, so the next analysis is measured afresh."""
        self._cache.pop(prompt, None)

    @torch.inference_mode()
    def analyze(self, prompt: str, ids: torch.Tensor | None = None) -> PromptFeatures:
        cached = self._cache.get(prompt)
        if cached is not None:
            return cached
        start = self.clock()
        raw = self.tokenizer(prompt, return_tensors="pt").input_ids[0]
        if raw.numel() == 0:
            raise InputError("empty prompt")
        head = raw[: self.max_tokens]
        if head.numel() >= 2:
            device = next(self.model.parameters()).device
            logits = self.model(head.unsqueeze(0).to(device), use_cache=False).logits[0, :-1].float()
            ppl = math.exp(float(F.cross_entropy(logits, head[1:].to(device))))
        else:
            ppl = 1.0
        tokens = int(raw.numel())
        features = PromptFeatures(tokens, ppl, complexity_score(tokens, ppl), self.clock() - start)
        self._cache[prompt] = features
        return features
