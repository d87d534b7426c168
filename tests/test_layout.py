"""The model's layout (reorder, importance, lock) is an explicit ModelLayout shared by its banks, not module attributes."""

from __future__ import annotations

import pytest

from casrap.errors import InputError
from casrap.models.architecture import model_key
from casrap.models.tiny import tiny_llama
from casrap.profiles.bank import ModelLayout, ProfileBank, bank_fingerprint
from casrap.profiles.catalogue import FULL, build_plan
from casrap.pruners.importance import weight_norm_importance


def _casrap_attributes(module) -> list[str]:
    return [k for m in module.modules() for k in vars(m) if k.startswith("casrap_")]


def test_reorder_through_the_layout_is_seen_by_every_later_bank(tiny):
    before = model_key(tiny.model)
    importance = weight_norm_importance(tiny.model)
    layout = ModelLayout.of(tiny.model)
    info = layout.reorder(tiny.model, importance)
    assert info["max_abs_logit_diff"] < 1e-3 and layout.reordered
    bank = ProfileBank(tiny.model, base_model="tiny")  # no importance given: it shares the model's layout
    assert bank.layout is layout and bank.reorder_info == info and bank.importance is importance
    assert bank.fingerprint == before == bank_fingerprint(tiny.model)  # kept across the reorder
    assert bank.sibling().layout is layout
    assert not [k for k in vars(tiny.model) if k.startswith("casrap_")]  # nothing stored on the nn.Module


def test_a_locked_layout_refuses_a_reorder_from_any_bank():
    lm = tiny_llama()
    importance = weight_norm_importance(lm.model)
    bank = ProfileBank(lm.model, base_model="tiny", lazy_reorder=False)
    bank.add(build_plan("ffn-25", importance, bank.info, base_model="tiny"))  # sliced by copying from today's order
    assert bank.layout.locked and ModelLayout.of(lm.model).locked
    with pytest.raises(InputError, match="reorder the model before"):
        ProfileBank(lm.model, base_model="tiny").reorder(importance)
    with pytest.raises(InputError, match="reorder the model before"):
        ProfileBank(lm.model, base_model="tiny", importance=importance)


def test_a_layout_of_another_model_is_refused(tiny):
    other = tiny_llama()
    with pytest.raises(InputError, match="another model"):
        ProfileBank(tiny.model, layout=ModelLayout.of(other.model))
    assert ProfileBank(tiny.model, layout=ModelLayout.of(tiny.model)).layout is ModelLayout.of(tiny.model)


def test_importance_is_resolved_in_one_place_cache_fallback_then_calibration(tiny, tmp_path, monkeypatch):
    from casrap.profiles.resolve import bank_for, resolve_importance

    monkeypatch.setenv("CASRAP_HOME", str(tmp_path))  # no cached calibration for this model
    shipped = weight_norm_importance(tiny.model)
    assert resolve_importance(tiny.model, tiny.tokenizer, fallback=lambda m: shipped) is shipped
    announced: list[int] = []
    calibrated = resolve_importance(tiny.model, tiny.tokenizer, on_calibrate=lambda path, n: announced.append(n))
    assert announced and calibrated.source.startswith("calibrated")
    again = resolve_importance(tiny.model, tiny.tokenizer, fallback=lambda m: shipped, on_calibrate=lambda p, n: announced.append(n))
    assert len(announced) == 1 and again.source == calibrated.source  # cached now: neither the fallback nor a new run
    bank = bank_for(tiny.model, tiny.tokenizer, [FULL, "ffn-25"], base_model="tiny")
    assert bank.reorder_info["importance"] == calibrated.source and bank.copied_modules["ffn-25"] == 0  # views of the base
