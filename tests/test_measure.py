from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from casrap.errors import InputError
from casrap.measure import (
    compare_interleaved,
    divergence,
    load_corpus,
    mean_kl,
    next_token_logits,
    offline_corpus,
    perplexity,
    teacher_forced_ppl,
    text_perplexity,
)
from casrap.measure.timing import check_prompt_fits


def _manual_ppl(model, ids):
    logits = model(ids.unsqueeze(0)).logits[0, :-1]
    return math.exp(float(F.cross_entropy(logits, ids[1:])))


def test_sliding_window_equals_full_context_when_window_covers_text(tiny):
    ids = torch.randint(0, 300, (60,))
    result = perplexity(tiny.model, ids, window=128, stride=64)
    assert result.tokens == 59
    assert result.ppl == pytest.approx(_manual_ppl(tiny.model, ids), rel=1e-5)


def test_sliding_window_scores_every_token_once(tiny):
    ids = torch.randint(0, 300, (100,))
    result = perplexity(tiny.model, ids, window=32, stride=16)
    assert result.tokens == 99
    assert math.isfinite(result.ppl)


def test_empty_and_short_text_rejected(tiny):
    with pytest.raises(InputError):
        text_perplexity(tiny.model, tiny.tokenizer, "   ")
    with pytest.raises(InputError):
        perplexity(tiny.model, torch.tensor([5]))


def test_kl_is_zero_for_identical_and_positive_otherwise(tiny):
    ids = torch.randint(0, 300, (1, 20))
    logits = next_token_logits(tiny.model, ids)
    assert mean_kl(logits, logits) == pytest.approx(0.0, abs=1e-7)
    assert mean_kl(logits, logits.flip(-1)) > 0.1
    d = divergence(lambda x: next_token_logits(tiny.model, x), lambda x: next_token_logits(tiny.model, x) * 0.5, ids)
    assert d.kl > 0 and d.ppl_reference != d.ppl_candidate


def test_teacher_forced_ppl_scores_only_the_answer(tiny):
    prompt = torch.randint(0, 300, (10,))
    answer = torch.randint(0, 300, (6,))
    full = torch.cat([prompt, answer])
    logits = tiny.model(full.unsqueeze(0)).logits[0]
    expected = math.exp(float(F.cross_entropy(logits[9:-1], answer)))
    assert teacher_forced_ppl(tiny.model, prompt, answer) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(InputError):
        teacher_forced_ppl(tiny.model, prompt, torch.tensor([], dtype=torch.long))


def test_generation_ignores_eos_and_makes_exact_token_count(tiny):
    from casrap.measure import generate_fixed

    out = generate_fixed(tiny.model, torch.tensor([[1, 2, 3]]), 7, pad_token_id=0)
    assert out.shape[1] == 3 + 7


def test_prompt_checks():
    class Cfg:
        max_position_embeddings = 10

    class M:
        config = Cfg()

    with pytest.raises(InputError, match="empty"):
        check_prompt_fits(M(), 0, 5)
    with pytest.raises(InputError, match="context window"):
        check_prompt_fits(M(), 8, 5)


def test_interleaved_ratios_are_per_pair():
    base = iter([0, 10.0, 10.0, 12.0])
    cand = iter([0, 5.0, 4.0, 6.0])
    result = compare_interleaved(lambda: next(base), lambda: next(cand), pairs=3, warmup=1)
    assert result.ratios == [2.0, 2.5, 2.0]
    assert result.speedup == 2.0


def test_offline_corpus_is_real_prose_and_auto_falls_back():
    corpus = offline_corpus()
    assert len(corpus.text.split()) > 2000
    assert len(corpus.paragraphs()) >= 20
    chosen = load_corpus("auto")
    assert chosen.name in {"casrap-prose/test", "wikitext-2-raw-v1/test"}


def test_unreadable_and_empty_corpus(tmp_path):
    with pytest.raises(InputError, match="cannot read"):
        load_corpus(str(tmp_path / "nope.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(InputError, match="empty"):
        load_corpus(str(empty))
