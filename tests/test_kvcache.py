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


LONG = torch.arange(7, 207).unsqueeze(0) * 13 % 300 + 1  # 200 tokens


@pytest.mark.parametrize("fixture", ["tiny", "tiny_eager"])
def test_generate_timed_kv_at_keep_one_is_generate_timed(request, fixture):
    """Keeping every prompt token, the true-position decode loop gives generate's tokens."""
    from casrap.decide.generation import generate_timed
    from casrap.decide.kv_generation import generate_timed_kv

    lm = request.getfixturevalue(fixture)
    ref = generate_timed(lm.model, lm.tokenizer, LONG, 10, ignore_eos=True)
    pieces: list[str] = []
    ours = generate_timed_kv(lm.model, lm.tokenizer, LONG, 10, keep_ratio=1.0, ignore_eos=True, on_text=pieces.append)
    assert ours.token_ids == ref.token_ids and ours.text == ref.text == "".join(pieces)
    assert ours.finish_reason == "length" and len(ours.decode_steps_s) == 9
    assert 0 < ours.ttft_s <= ours.generation_s


def test_generate_timed_kv_compresses_the_prompt_cache(tiny, monkeypatch):
    """At keep 0.5 the cache holds half the prompt (plus the new tokens), and the answer
    comes from that smaller cache: its logits are not the full cache's."""
    import math

    from casrap.decide import kv_generation
    from casrap.pruners import kvcache

    caches, firsts = [], []

    def spy(model, ids, config):
        cache, last = kvcache.prefill_compressed(model, ids, config)
        caches.append(cache)
        return cache, last

    monkeypatch.setattr(kv_generation, "prefill_compressed", spy)
    new = 8
    full = kv_generation.generate_timed_kv(tiny.model, tiny.tokenizer, LONG, new, keep_ratio=1.0, ignore_eos=True)
    half = kv_generation.generate_timed_kv(tiny.model, tiny.tokenizer, LONG, new, keep_ratio=0.5, ignore_eos=True)
    assert len(full.token_ids) == len(half.token_ids) == new
    kept = math.ceil(0.5 * LONG.shape[1])
    assert caches[0].get_seq_length() == LONG.shape[1] + new - 1
    assert caches[1].get_seq_length() == kept + new - 1
    # the same answer fed to both caches: the compressed one predicts differently
    answer = torch.tensor([full.token_ids])
    for cache in caches:
        firsts.append(kvcache.decode_steps(tiny.model, cache, answer[:, :2], LONG.shape[1] + new - 1))
    assert not torch.allclose(firsts[0], firsts[1])


def test_generate_timed_kv_stops_at_eos(tiny):
    """Without ignore_eos an EOS ends the answer ("stop") and is not returned."""
    from casrap.decide.kv_generation import generate_timed_kv

    probe = generate_timed_kv(tiny.model, tiny.tokenizer, PROMPT, 3, keep_ratio=0.5, ignore_eos=True)
    eos = probe.token_ids[1]
    tiny.tokenizer.eos_token_id = eos
    out = generate_timed_kv(tiny.model, tiny.tokenizer, PROMPT, 3, keep_ratio=0.5)
    assert out.finish_reason == "stop" and out.token_ids == probe.token_ids[:1]


def test_kv_specs_parse_combine_and_carry_the_keep_ratio():
    from casrap.decide.kv_generation import kv_keep_of
    from casrap.models.tiny import tiny_llama
    from casrap.models import describe
    from casrap.profiles import build_plan, parse_spec
    from casrap.profiles.catalogue import split_kv
    from casrap.pruners.importance import weight_norm_importance

    assert split_kv("layers-10+kv50") == ("layers-10", 0.5)
    assert split_kv("kv-25") == ("none", 0.25) and split_kv("ffn-25") == ("ffn-25", None)
    assert parse_spec("kv-50") == ("kv", 0.5) and parse_spec("layers-10+kv50") == ("layers", 0.1)
    lm = tiny_llama()
    info, imp = describe(lm.model), weight_norm_importance(lm.model)
    alone = build_plan("kv-50", imp, info)
    assert alone.is_identity and kv_keep_of(alone) == 0.5 and alone.name == "kv-50"
    combined = build_plan("layers-50+kv25", imp, info)
    assert combined.skip_layers == build_plan("layers-50", imp, info).skip_layers and combined.skip_layers
    assert kv_keep_of(combined) == 0.25 and combined.name == "layers-50+kv25"
    assert kv_keep_of(build_plan("layers-50", imp, info)) is None and kv_keep_of(build_plan("kv-100", imp, info)) is None
    for bad in ("kv-0", "kv-150", "layers-10+kv0"):
        with pytest.raises(InputError):
            parse_spec(bad)


def test_default_catalogue_offers_kv_actions_on_request():
    from casrap.profiles.catalogue import KV_ACTIONS, default_catalogue

    assert not set(KV_ACTIONS) & set(default_catalogue())
    with_kv = default_catalogue(kv=True)
    assert with_kv[: len(default_catalogue())] == default_catalogue() and set(KV_ACTIONS) <= set(with_kv)


def test_kv_actions_build_in_a_bank(tiny):
    """``kv-50`` runs the full model's modules; ``layers-50+kv50`` the layer cut's."""
    from casrap.decide.kv_generation import kv_keep_of
    from casrap.profiles.factory import build_bank
    from casrap.pruners.importance import weight_norm_importance

    bank = build_bank(tiny.model, ["none", "kv-50", "layers-50", "layers-50+kv50"], importance=weight_norm_importance(tiny.model))
    assert kv_keep_of(bank.profile("kv-50").plan) == 0.5 and bank.memory_overhead_bytes("kv-50") == 0
    combined = bank.profile("layers-50+kv50")
    assert combined.plan.skip_layers == bank.profile("layers-50").plan.skip_layers
    assert len(combined.layers) == len(bank.profile("layers-50").layers) < len(bank.profile("none").layers)
