"""lm-evaluation-harness on live profiles, with the bundled offline task."""

from __future__ import annotations

import pytest

pytest.importorskip("lm_eval")


def test_local_task_scores_full_model_and_profiles(tiny):
    from casrap.evaluation.lm_eval_tasks import LOCAL_TASK, run_lm_eval
    from casrap.profiles.factory import build_bank

    bank = build_bank(tiny.model, ["layers-25"])
    results = run_lm_eval(bank, tiny.tokenizer, [LOCAL_TASK], ["layers-25"], limit=4)
    assert set(results) == {"none", "layers-25"}
    for scores in results.values():
        assert 0.0 <= scores[LOCAL_TASK] <= 1.0
    assert bank.active == "none"
