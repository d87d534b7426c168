"""Quality of profiles before and after healing, on held-out test prose only.

Perplexity and KL to the full model on :func:`casrap.measure.corpus.prose_split("test")`
(never calibration or healing text), and the share of the log-perplexity gap healing
recovers: (ln ppl_pruned - ln ppl_healed) / (ln ppl_pruned - ln ppl_full).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from casrap.measure.perplexity import mean_kl, perplexity


@dataclass
class ProfileQuality:
    name: str
    ppl: float
    kl: float
    tokens: int
    corpus: str


def test_ids(tokenizer: Any, max_tokens: int | None = None) -> tuple[torch.Tensor, str]:
    """Token ids of the test third of the bundled prose, and its name."""
    from casrap.measure.corpus import prose_split

    corpus = prose_split("test")
    ids = tokenizer(corpus.text, return_tensors="pt").input_ids[0]
    return (ids[:max_tokens] if max_tokens else ids), corpus.name


@torch.inference_mode()
def profile_quality(bank: Any, names: list[str], ids: torch.Tensor, corpus: str, window: int = 512) -> list[ProfileQuality]:
    """Sliding-window perplexity and mean KL(full || profile) over non-overlapping windows."""
    device = next(bank.model.parameters()).device
    chunks = [ids[i:i + window] for i in range(0, len(ids), window) if len(ids[i:i + window]) > 1]
    previous = bank.active
    bank.activate("none")
    reference = [bank.model(c.unsqueeze(0).to(device), use_cache=False).logits.float()[0] for c in chunks]
    results = []
    try:
        for name in names:
            bank.activate(name)
            ppl = perplexity(bank.model, ids, window=window, stride=window // 2, corpus=corpus)
            kls, counts = [], []
            for chunk, ref in zip(chunks, reference):
                logits = bank.model(chunk.unsqueeze(0).to(device), use_cache=False).logits.float()[0]
                kls.append(mean_kl(ref, logits) * len(chunk))
                counts.append(len(chunk))
            results.append(ProfileQuality(name, ppl.ppl, sum(kls) / sum(counts), ppl.tokens, corpus))
    finally:
        bank.activate(previous)
    return results


def gap_recovered(ppl_full: float, ppl_pruned: float, ppl_healed: float) -> float:
    """Share of the log-perplexity gap closed by healing (1 = back to the full model)."""
    gap = math.log(ppl_pruned) - math.log(ppl_full)
    return (math.log(ppl_pruned) - math.log(ppl_healed)) / gap if gap > 0 else float("nan")
