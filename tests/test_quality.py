"""The one quality measure, the scratch profile and the shared confidence intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from casrap.measure.perplexity import perplexity_ci95, teacher_forced_ppl
from casrap.measure.quality import (
    FullModelReference,
    active_quality,
    bootstrap_ci,
    group_bootstrap_ci,
    score_profiles,
)
from casrap.profiles.bank import ProfileBank
from casrap.profiles.catalogue import FULL
from casrap.profiles.plan import PruningPlan


def _direct(model, prompt, answer):
    """Log-probs at the answer positions, written out by hand."""
    seq = torch.cat([prompt, answer]).unsqueeze(0)
    with torch.no_grad():
        logits = model(seq, use_cache=False).logits[0].float()
    return F.log_softmax(logits[prompt.numel() - 1 : -1], dim=-1)


def test_score_profiles_equals_a_direct_computation(tiny):
    bank = ProfileBank(tiny.model)
    bank.add(PruningPlan(name="skip1", skip_layers=[1]))
    prompt, answer = torch.randint(0, 300, (9,)), torch.randint(0, 300, (7,))
    full_lp = _direct(tiny.model, prompt, answer)
    with bank.using("skip1"):
        pruned_lp = _direct(tiny.model, prompt, answer)
    scores = score_profiles(bank, prompt, answer, [FULL, "skip1"], FULL)
    kl = float((full_lp.exp() * (full_lp - pruned_lp)).sum(-1).mean())
    assert scores["skip1"].kl == pytest.approx(kl, rel=1e-5) and kl > 0
    ppl = math.exp(float(F.nll_loss(pruned_lp, answer)))
    assert scores["skip1"].ppl == pytest.approx(ppl, rel=1e-5)
    assert scores[FULL].kl == 0.0
    assert scores[FULL].ppl == pytest.approx(teacher_forced_ppl(tiny.model, prompt, answer), rel=1e-6)
    assert scores["skip1"].tokens == 7 and bank.active == FULL


def test_full_model_is_scored_once_and_each_profile_once(tiny):
    bank = ProfileBank(tiny.model)
    for i in range(3):
        bank.add(PruningPlan(name=f"s{i}", skip_layers=[i]))
    calls = []
    handle = tiny.model.register_forward_hook(lambda *_: calls.append(bank.active))
    try:
        score_profiles(bank, torch.randint(0, 300, (5,)), torch.randint(0, 300, (4,)), [FULL, "s0", "s1", "s2"], FULL)
    finally:
        handle.remove()
    assert calls == [FULL, "s0", "s1", "s2"]


def test_block_reference_scores_every_token_after_the_first(tiny):
    bank = ProfileBank(tiny.model)
    ids = torch.randint(0, 300, (30,))
    ref = FullModelReference.on_block(bank, ids, FULL)
    with torch.no_grad():
        logits = tiny.model(ids.unsqueeze(0)).logits[0, :-1]
    assert ref.full.ppl == pytest.approx(math.exp(float(F.cross_entropy(logits, ids[1:]))), rel=1e-5)
    assert ref.tokens == 29 and ref.full.kl == 0.0
    alone = active_quality(tiny.model, ids[:1], ids[1:])  # no reference pass: perplexity only
    assert alone.ppl == pytest.approx(ref.full.ppl, rel=1e-6) and math.isnan(alone.kl)
    with bank.scratch(PruningPlan(name="x", skip_layers=[0])):
        assert ref.score().kl > 0


def test_scratch_removes_the_profile_and_restores_bitwise_even_when_the_body_raises(tiny):
    bank = ProfileBank(tiny.model)
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        before = tiny.model(ids).logits.clone()
    plan = PruningPlan(name="mine", skip_layers=[0, 2])
    with pytest.raises(RuntimeError, match="boom"):
        with bank.scratch(plan) as profile:
            assert bank.active == profile.name and profile.name in bank.names
            assert len(tiny.model.model.layers) == 2
            raise RuntimeError("boom")
    assert bank.names == [FULL] and bank.active == FULL and plan.name == "mine"
    with torch.no_grad():
        assert torch.equal(tiny.model(ids).logits, before)


def test_scratch_puts_back_the_profile_that_ran_before_and_nests(tiny):
    bank = ProfileBank(tiny.model)
    bank.add(PruningPlan(name="kept", skip_layers=[3]))
    bank.activate("kept")
    with bank.scratch(PruningPlan(name="a", skip_layers=[0])) as outer:
        with bank.scratch(PruningPlan(name="b", skip_layers=[1])) as inner:
            assert outer.name != inner.name and bank.active == inner.name
        assert bank.active == outer.name
    assert bank.active == "kept" and bank.names == [FULL, "kept"]


def test_perplexity_ci_brackets_the_perplexity_and_narrows_with_n():
    rng = np.random.default_rng(0)
    small, large = rng.exponential(2.0, 50), rng.exponential(2.0, 5000)
    lo, hi = perplexity_ci95(torch.tensor(small))
    assert lo < math.exp(small.mean()) < hi
    lo2, hi2 = perplexity_ci95(large)
    assert hi2 - lo2 < hi - lo
    se = small.std(ddof=1) / math.sqrt(len(small))
    assert lo == pytest.approx(math.exp(small.mean() - 1.96 * se))


def test_bootstrap_is_seeded_drops_nan_and_resamples_whole_groups():
    values = np.arange(20, dtype=float)
    assert bootstrap_ci(lambda i: values[i].mean(), 20, seed=3) == bootstrap_ci(lambda i: values[i].mean(), 20, seed=3)
    assert bootstrap_ci(lambda i: float("nan"), 5) != bootstrap_ci(lambda i: float("nan"), 5)  # (nan, nan)
    assert all(math.isnan(v) for v in bootstrap_ci(lambda i: float("nan"), 5))
    # two prompts, each with many identical decisions: the interval must stay as wide as two samples allow
    grouped = np.array([0.0] * 50 + [1.0] * 50)
    lo, hi = group_bootstrap_ci(grouped, np.array([0] * 50 + [1] * 50))
    assert lo == 0.0 and hi == 1.0
    lo_i, hi_i = group_bootstrap_ci(grouped, np.arange(100))
    assert 0.3 < lo_i < hi_i < 0.7
