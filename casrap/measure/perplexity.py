"""Perplexity with a sliding window, and quality of a variant against a reference.

Quality of a pruned variant is always judged against the full model on the same text:
perplexity on held-out prose, KL between next-token distributions, or the
teacher-forced perplexity of the full model's own answer. Never on the variant's
own generation, which a collapsed model can make look fluent.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from casrap.errors import InputError


@dataclass
class PerplexityResult:
    ppl: float
    mean_nll: float
    tokens: int
    corpus: str = ""


def _device_of(model: Any) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def perplexity(
    model: Any,
    input_ids: torch.Tensor,
    window: int = 512,
    stride: int = 256,
    corpus: str = "",
) -> PerplexityResult:
    """Sliding-window perplexity of a 1-D (or 1 x T) token sequence.

    Each window scores only the tokens not scored by the previous window, so every
    token is predicted once with up to ``window - stride`` tokens of context.
    """
    ids = input_ids.reshape(-1)
    if ids.numel() < 2:
        raise InputError("text too short for perplexity: need at least 2 tokens")
    window = min(window, int(getattr(model.config, "max_position_embeddings", window)))
    stride = min(stride, window)
    device = _device_of(model)
    total_nll = 0.0
    total_tokens = 0
    previous_end = 0
    for begin in range(0, ids.numel(), stride):
        end = min(begin + window, ids.numel())
        target_len = end - previous_end
        chunk = ids[begin:end].unsqueeze(0).to(device)
        logits = model(chunk, use_cache=False).logits.float()
        log_probs = F.log_softmax(logits[0, :-1], dim=-1)
        targets = chunk[0, 1:]
        nll = -log_probs.gather(1, targets.unsqueeze(1)).squeeze(1)
        scored = nll[-target_len:] if target_len < nll.numel() else nll
        total_nll += float(scored.sum())
        total_tokens += scored.numel()
        previous_end = end
        if end == ids.numel():
            break
    mean = total_nll / total_tokens
    return PerplexityResult(ppl=math.exp(mean), mean_nll=mean, tokens=total_tokens, corpus=corpus)


def text_perplexity(model: Any, tokenizer: Any, text: str, corpus: str = "", **kwargs: Any) -> PerplexityResult:
    if not text.strip():
        raise InputError("empty text: nothing to score")
    ids = tokenizer(text, return_tensors="pt").input_ids
    return perplexity(model, ids, corpus=corpus, **kwargs)


@torch.inference_mode()
def next_token_logits(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Float32 logits for every position of a 1 x T sequence (no cache)."""
    return model(input_ids.to(_device_of(model)), use_cache=False).logits.float()[0]


def kl_from_log_probs(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """Mean over positions of KL(reference || candidate), both [T, V] log-probabilities.

    The one place casrap writes the KL formula; clamped at 0 (float summation can read
    a hair below it for identical distributions). The mean of no positions is nan.
    """
    kl = (reference.exp() * (reference - candidate)).sum(dim=-1)
    return float(kl.mean().clamp_min(0.0))


def mean_kl(reference_logits: torch.Tensor, candidate_logits: torch.Tensor) -> float:
    """Mean over positions of KL(reference || candidate) of next-token distributions."""
    return kl_from_log_probs(F.log_softmax(reference_logits.float(), dim=-1), F.log_softmax(candidate_logits.float(), dim=-1))


def perplexity_ci95(nll: torch.Tensor | Any) -> tuple[float, float]:
    """95% interval of a perplexity from its per-token negative log-likelihoods.

    Normal interval of the mean NLL (sample standard deviation), exponentiated: the
    interval is asymmetric around the perplexity, as the perplexity's own spread is.
    """
    values = torch.as_tensor(nll, dtype=torch.float64).reshape(-1)
    mean = float(values.mean())
    se = float(values.std() / math.sqrt(values.numel()))
    return math.exp(mean - 1.96 * se), math.exp(mean + 1.96 * se)


@torch.inference_mode()
def teacher_forced_ppl(model: Any, prompt_ids: torch.Tensor, answer_ids: torch.Tensor) -> float:
    """Perplexity of ``answer_ids`` given ``prompt_ids``, scoring the answer tokens only."""
    prompt = prompt_ids.reshape(-1)
    answer = answer_ids.reshape(-1)
    if answer.numel() == 0:
        raise InputError("empty reference answer: nothing to score")
    ids = torch.cat([prompt, answer]).unsqueeze(0).to(_device_of(model))
    logits = model(ids, use_cache=False).logits.float()[0]
    log_probs = F.log_softmax(logits[prompt.numel() - 1 : -1], dim=-1)
    nll = -log_probs.gather(1, ids[0, prompt.numel() :].unsqueeze(1)).mean()
    return float(torch.exp(nll))


@dataclass
class Divergence:
    kl: float
    ppl_reference: float
    ppl_candidate: float


def divergence(
    reference: Callable[[torch.Tensor], torch.Tensor],
    candidate: Callable[[torch.Tensor], torch.Tensor],
    input_ids: torch.Tensor,
) -> Divergence:
    """Compare two logits functions on the same tokens: KL and both perplexities.

    ``reference`` and ``candidate`` map a 1 x T id tensor to T x V logits; with a
    ProfileBank they are the same model under two profiles.
    """
    ref_logits = reference(input_ids)
    cand_logits = candidate(input_ids)
    targets = input_ids.reshape(-1)[1:].to(ref_logits.device)

    def ppl(logits: torch.Tensor) -> float:
        lp = F.log_softmax(logits[:-1].float(), dim=-1)
        return math.exp(float(-lp.gather(1, targets.unsqueeze(1)).mean()))

    return Divergence(mean_kl(ref_logits, cand_logits), ppl(ref_logits), ppl(cand_logits))
