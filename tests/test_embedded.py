"""Integration tests on the embedded SmolLM2-135M (marked; they still run in CI)."""

from __future__ import annotations

import math

import pytest
import torch

from casrap.measure import offline_corpus, perplexity

pytestmark = pytest.mark.embedded


def test_embedded_architecture(embedded):
    from casrap.models import describe

    info = describe(embedded.model)
    assert (info.layers, info.query_heads, info.kv_heads, info.head_dim, info.ffn_width) == (30, 9, 3, 64, 1536)
    assert abs(info.parameters.total - 134.5e6) < 0.1e6


def test_embedded_answers_paris(embedded):
    tok = embedded.tokenizer
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
    out = embedded.model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_embedded_perplexity_on_offline_corpus_is_plausible(embedded):
    ids = embedded.tokenizer(offline_corpus().text, return_tensors="pt").input_ids[0][:1024]
    result = perplexity(embedded.model, ids, window=512, stride=256)
    assert math.isfinite(result.ppl) and 5 < result.ppl < 80


def test_embedded_profiles_restore_exactly(embedded):
    from casrap.profiles.factory import build_bank

    ids = embedded.tokenizer("The river that runs through the town", return_tensors="pt").input_ids
    with torch.inference_mode():
        original = embedded.model(ids).logits.clone()
        bank = build_bank(embedded.model, ["heads-10", "layers-10", "ffn-8"], base_model="smollm2-135m", tokenizer=embedded.tokenizer)
        # the bank reorders channels and heads once (zero-copy prefixes): the reordered model is
        # the full model from then on, equal to the original up to float summation order ...
        before = embedded.model(ids).logits.clone()
        torch.testing.assert_close(before, original, rtol=0, atol=1e-3)
        for name in bank.names * 3:
            bank.activate(name)
            embedded.model(ids)
        bank.activate("none")
        assert torch.equal(embedded.model(ids).logits, before)  # ... and switching back to it is bitwise


def test_first_use_calibrates_and_profiles_stay_close(embedded, casrap_home):
    """Empty CASRAP_HOME (no calibration): the normal path calibrates, and ffn-5 stays close
    to the full model (uncalibrated weight-norm importance gave KL 4.6 here)."""
    from casrap.measure import mean_kl, next_token_logits
    from casrap.measure.corpus import prose_split
    from casrap.profiles.factory import build_bank
    from casrap.pruners.importance import default_calibration_path

    assert not default_calibration_path(embedded.model).exists()
    bank = build_bank(embedded.model, ["ffn-5"], base_model="smollm2-135m", tokenizer=embedded.tokenizer)
    assert default_calibration_path(embedded.model).is_file()
    assert bank.profile("ffn-5").plan.meta["importance"].startswith("calibrated:")
    ids = embedded.tokenizer(prose_split("test").text, return_tensors="pt").input_ids[:, :256]
    with torch.inference_mode():
        full = next_token_logits(embedded.model, ids)
        with bank.using("ffn-5"):
            pruned = next_token_logits(embedded.model, ids)
    assert mean_kl(full, pruned) < 0.5
