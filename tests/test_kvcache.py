"""KV-cache compression (casrap.pruners.kvcache) on the tiny GQA model."""

from __future__ import annotations

import pytest
import torch

from casrap.errors import InputError
from casrap.measure.perplexity import mean_kl
from casrap.pruners.kvcache import (
    KVCompression,
    decode_steps,
    keep_indices,
    prefill_compressed,
    token_scores,
)

PROMPT = torch.arange(3, 83).unsqueeze(0) % 300 + 1  # 80 tokens


def test_keep_indices_hold_sinks_recent_and_top_scores():
    scores = torch.zeros(1, 2, 20)
    scores[0, 0, 7] = 5.0
    scores[0, 1, 11] = 5.0
    idx = keep_indices(scores, budget=8, sinks=2, recent=3)
    assert idx.shape == (1, 2, 8)
    for head, hot in ((0, 7), (1, 11)):
        kept = idx[0, head].tolist()
        assert kept == sorted(kept) and {0, 1, 17, 18, 19, hot} <= set(kept)
    assert keep_indices(scores, budget=20, sinks=2, recent=3).shape[-1] == 20


def test_scores_are_causal_attention_mass():
    torch.manual_seed(0)
    q, k = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 10, 8)
    scores = token_scores(q, k)
    assert scores.shape == (1, 2, 10)
    # 2 query heads per kv head x 3 window queries, each a distribution over keys
    torch.testing.assert_close(scores.sum(-1), torch.full((1, 2), 6.0))


@pytest.mark.parametrize("fixture", ["tiny", "tiny_eager"])
def test_uncompressed_loop_equals_generate(request, fixture):
    lm = request.getfixturevalue(fixture)
    with torch.inference_mode():
        ref = lm.model.generate(PROMPT, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    cache, last = prefill_compressed(lm.model, PROMPT, KVCompression(keep_ratio=1.0))
    first = last.argmax(-1, keepdim=True)
    logits = decode_steps(lm.model, cache, first.expand(1, 6), PROMPT.shape[1], greedy=True)
    ours = torch.cat([first, logits.argmax(-1)[:-1].unsqueeze(0)], 1)
    assert torch.equal(ours, ref[:, PROMPT.shape[1]:])


def test_compressed_cache_keeps_the_budget_and_stays_close(tiny):
    cfg = KVCompression(keep_ratio=0.5, sinks=4, recent=8, observation=8)
    cache, _ = prefill_compressed(tiny.model, PROMPT, cfg)
    assert all(layer.keys.shape[-2] == 40 for layer in cache.layers)
    full, _ = prefill_compressed(tiny.model, PROMPT, KVCompression(keep_ratio=1.0))
    answer = torch.tensor([[5, 9, 13, 2]])
    a = decode_steps(tiny.model, full, answer, PROMPT.shape[1])
    b = decode_steps(tiny.model, cache, answer, PROMPT.shape[1])
    assert torch.isfinite(b).all() and mean_kl(a, b) < 1.0
    with pytest.raises(InputError):
        KVCompression(keep_ratio=1.5).budget(10)
