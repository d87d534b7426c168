"""Quality of profiles against the full model on one text: teacher-forced perplexity and KL.

The env's reward, the recorder's quality pass, the load test and the plan search all
judge a variant the same way, so they call the same code: the full model's
log-probabilities along the text are computed once, then each profile runs one forward
pass over the same tokens, which gives both its teacher-forced perplexity of the text
and its mean KL(full || profile) per token. Never the profile's own generation, which a
collapsed model can make look fluent.

The text is a prompt and the full model's answer to it (only the answer's tokens are
scored), or a block of held-out prose (the block's first token is the "prompt", the
rest is scored).

This module is ground: it sees a bank only through ``bank.model`` and
``bank.using(name)``, and the caller names the bank's full-model profile.

Confidence intervals for the figures reported beside these measures live here too:
:func:`bootstrap_ci` (resampling, whole groups when the samples are not independent).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from casrap.measure.perplexity import kl_from_log_probs, perplexity_ci95


@dataclass(frozen=True)
class Quality:
    """One profile on one text, against the full model.

    Attributes:
        ppl: teacher-forced perplexity of the scored tokens under the profile.
        kl: mean over the scored tokens of KL(full || profile) of the next-token
            distributions (0 for the full model itself; nan when not measured).
        nll: per-token negative log-likelihood (CPU, float32), for confidence intervals.
    """

    ppl: float
    kl: float
    nll: torch.Tensor = field(repr=False, compare=False)

    @property
    def tokens(self) -> int:
        return int(self.nll.numel())

    def ppl_ci95(self) -> tuple[float, float]:
        """95% interval of :attr:`ppl` (normal interval of the mean NLL, exponentiated)."""
        return perplexity_ci95(self.nll)


@torch.inference_mode()
def answer_log_probs(model: Any, prompt_ids: torch.Tensor, answer_ids: torch.Tensor) -> torch.Tensor:
    """[A, V] float32 log-probabilities, under the model as it runs now, at the positions
    that predict each of the A answer tokens (one forward pass over prompt + answer, no cache)."""
    prompt, answer = prompt_ids.reshape(-1), answer_ids.reshape(-1)
    device = next(model.parameters()).device
    seq = torch.cat([prompt.to(device), answer.to(device)]).unsqueeze(0)
    logits = model(seq, use_cache=False).logits[0, prompt.numel() - 1 : -1].float()
    return F.log_softmax(logits, dim=-1)


def quality_of(log_probs: torch.Tensor, answer_ids: torch.Tensor, reference: torch.Tensor | None) -> Quality:
    """Perplexity and KL from answer log-probabilities (``reference``: the full model's, or None for no KL)."""
    targets = answer_ids.reshape(-1).to(log_probs.device)
    nll = -log_probs.gather(1, targets.unsqueeze(1))[:, 0]
    kl = kl_from_log_probs(reference, log_probs) if reference is not None else float("nan")
    return Quality(ppl=math.exp(float(nll.mean())), kl=kl, nll=nll.detach().cpu())


def active_quality(model: Any, prompt_ids: torch.Tensor, answer_ids: torch.Tensor) -> Quality:
    """Teacher-forced perplexity of ``answer_ids`` under the model as it runs now, with no
    reference (KL nan): for perplexity-only fitness, where no full-model pass is wanted."""
    return quality_of(answer_log_probs(model, prompt_ids, answer_ids), answer_ids, None)


class FullModelReference:
    """The full model's log-probabilities along one text, computed once; scores the
    profile that runs now against them.

    Use it directly where the profile is a temporary one (``with bank.scratch(plan):
    ref.score()``); :func:`score_profiles` wraps it for named profiles.
    """

    def __init__(self, bank: Any, prompt_ids: torch.Tensor, answer_ids: torch.Tensor, full: str) -> None:
        self.bank = bank
        self.prompt_ids = prompt_ids.reshape(-1)
        self.answer_ids = answer_ids.reshape(-1)
        with bank.using(full):
            self.log_probs = answer_log_probs(bank.model, self.prompt_ids, self.answer_ids)
        own = quality_of(self.log_probs, self.answer_ids, None)
        self.full = Quality(own.ppl, 0.0, own.nll)  # the reference against itself

    @classmethod
    def on_block(cls, bank: Any, ids: torch.Tensor, full: str) -> FullModelReference:
        """A reference on a block of prose: every token after the first is scored."""
        ids = ids.reshape(-1)
        return cls(bank, ids[:1], ids[1:], full)

    @property
    def tokens(self) -> int:
        return int(self.answer_ids.numel())

    def score(self) -> Quality:
        """The profile active in the bank now, on this text."""
        return quality_of(answer_log_probs(self.bank.model, self.prompt_ids, self.answer_ids), self.answer_ids, self.log_probs)


def score_profiles(bank: Any, prompt_ids: torch.Tensor, answer_ids: torch.Tensor, profiles: Sequence[str],
                   full: str) -> dict[str, Quality]:
    """Teacher-forced perplexity and KL(full || profile) of each profile along ``answer_ids``.

    One forward pass for the full model, one per other profile; the full model's own
    entry (when listed) is its reference pass, with KL 0. The bank's active profile is
    restored afterwards.
    """
    reference = FullModelReference(bank, prompt_ids, answer_ids, full)
    scores: dict[str, Quality] = {}
    for name in profiles:
        if name == full:
            scores[name] = reference.full
            continue
        with bank.using(name):
            scores[name] = reference.score()
    return scores


def bootstrap_ci(stat: Callable[[np.ndarray], float], n: int, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of ``stat(indices)`` over ``resamples`` draws of n indices with replacement.

    ``stat`` gets one row of resampled indices into the caller's samples; resamples
    where it is nan (an AUROC with one class missing) are dropped, and no valid
    resample gives (nan, nan). Same seed, same interval.
    """
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n, size=(resamples, n))
    values = [v for v in (float(stat(row)) for row in picks) if v == v]
    if not values:
        return float("nan"), float("nan")
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def group_bootstrap_ci(values: np.ndarray, groups: np.ndarray, resamples: int = 2000, seed: int = 0) -> list[float]:
    """95% interval of the mean of ``values`` when whole ``groups`` (prompts) are resampled.

    The decisions of one prompt are not independent; resampling them one by one would
    make a handful of prompts look like hundreds. Returns ``[lo, hi]``.
    """
    labels, inverse = np.unique(groups, return_inverse=True)
    sums = np.bincount(inverse, weights=values, minlength=len(labels))
    counts = np.bincount(inverse, minlength=len(labels)).astype(float)
    lo, hi = bootstrap_ci(lambda pick: sums[pick].sum() / counts[pick].sum(), len(labels), resamples, seed)
    return [lo, hi]
