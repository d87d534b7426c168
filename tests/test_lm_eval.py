"""lm-evaluation-harness on live profiles: the bundled offline task and a user's own task folder."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("lm_eval")


def test_local_task_scores_full_model_and_profiles(tiny):
    from casrap.evaluation.lm_eval_tasks import LOCAL_TASK, run_lm_eval
    from casrap.profiles.factory import build_bank

    bank = build_bank(tiny.model, ["layers-25"], tokenizer=tiny.tokenizer)
    results = run_lm_eval(bank, tiny.tokenizer, [LOCAL_TASK], ["layers-25"], limit=4)
    assert set(results) == {"none", "layers-25"}
    for scores in results.values():
        assert 0.0 <= scores[LOCAL_TASK] <= 1.0
    assert bank.active == "none"


def test_user_task_keyed_to_the_full_model_separates_a_broken_profile(tiny, tmp_path):
    """Answers are the full model's own choices, so the full model scores 1.0 and a profile
    that really runs pruned (half the layers of a random model) does not; if the bank did
    not switch, both would score 1.0 and this test would fail."""
    from casrap.evaluation.lm_eval_tasks import multiple_choice_yaml, run_lm_eval
    from casrap.profiles.factory import build_bank
    from casrap.pruners.importance import weight_norm_importance

    import torch

    bank = build_bank(tiny.model, ["layers-50"], importance=weight_norm_importance(tiny.model))
    words = ["river", "bread", "garden", "winter", "music", "stone", "letter", "market", "school", "forest", "candle", "window"]
    docs = []
    for i in range(12):
        question = f"Which word follows {words[i]} and {words[(i + 5) % 12]}?"
        choices = [words[(i + k) % 12] for k in (1, 3, 7, 9)]
        context = tiny.tokenizer(f"Question: {question}\nAnswer:", return_tensors="pt").input_ids
        scores = []
        with torch.inference_mode():
            for choice in choices:
                cont = tiny.tokenizer(f" {choice}", return_tensors="pt").input_ids
                ids = torch.cat([context, cont], dim=1)
                logp = torch.log_softmax(tiny.model(ids).logits[0, :-1].float(), -1)
                scores.append(float(logp[torch.arange(context.shape[1] - 1, ids.shape[1] - 1), ids[0, context.shape[1]:]].sum()))
        docs.append({"question": question, "choices": choices, "answer": int(torch.tensor(scores).argmax())})
    data = tmp_path / "my_mc.jsonl"
    data.write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "my_mc.yaml").write_text(multiple_choice_yaml("my_mc", data))
    results = run_lm_eval(bank, tiny.tokenizer, ["my_mc"], ["layers-50"], include_paths=[folder])
    assert results["none"]["my_mc"] == 1.0
    assert results["layers-50"]["my_mc"] < 1.0
