"""2:4 semi-structured sparsity: mask construction (CPU, functional) and a clean refusal off GPU."""

from __future__ import annotations

import pytest
import torch

from casrap.errors import UnsupportedModelError
from casrap.models import describe
from casrap.profiles import ProfileBank, build_plan
from casrap.pruners.importance import weight_norm_importance
from casrap.pruners.sparse24 import META_KEY, is_24, mask_24, semi_structured_blocker

IDS = torch.tensor([[5, 17, 42, 8, 99, 3, 77, 12, 64, 31, 2, 250]])


def test_mask_keeps_the_two_largest_of_every_four():
    torch.manual_seed(0)
    w = torch.randn(6, 16)
    mask = mask_24(w)
    assert is_24(mask) and mask.sum() == w.numel() // 2
    groups = w.abs().reshape(6, 4, 4)
    kept = groups.masked_fill(~mask.reshape(6, 4, 4), float("inf")).amin(-1)
    dropped = groups.masked_fill(mask.reshape(6, 4, 4), -1.0).amax(-1)
    assert (kept >= dropped).all()  # every kept weight outweighs every dropped one of its group


def test_mask_follows_calibrated_input_scale():
    w = torch.ones(3, 8)
    w[:, 0] = 5.0  # largest by magnitude...
    scale = torch.tensor([0.01, 1.0, 1.0, 3.0, 1.0, 1.0, 1.0, 1.0])
    by_magnitude = mask_24(w)
    by_activation = mask_24(w, input_scale=scale)  # ...but its input is almost always zero
    assert by_magnitude[:, 0].all() and not by_activation[:, 0].any() and by_activation[:, 3].all()
    assert is_24(by_activation)
    with pytest.raises(ValueError, match="divisible by 4"):
        mask_24(torch.ones(2, 6))


def test_structural_sparse24_is_refused_off_gpu_in_one_line(tiny):
    plan = build_plan("sparse24-50", weight_norm_importance(tiny.model), describe(tiny.model), structural=True)
    assert len(plan.meta[META_KEY]) == 2
    bank = ProfileBank(tiny.model)
    with pytest.raises(UnsupportedModelError) as err:
        bank.add(plan)
    assert "\n" not in str(err.value) and "GPU" in str(err.value)
    assert semi_structured_blocker(torch.ones(64, 64)) is not None
    assert bank.names == ["none"]


def test_masked_sparse24_profile_runs_on_cpu_and_leaves_the_base_alone(tiny):
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    with torch.inference_mode():
        full = tiny.model(IDS, use_cache=False).logits
    plan = build_plan("sparse24-50", weight_norm_importance(tiny.model), describe(tiny.model), structural=False)
    bank = ProfileBank(tiny.model)
    bank.add(plan)
    layers = bank.profile("sparse24-50").layers
    for i in plan.meta[META_KEY]:
        for name in ("gate_proj", "up_proj", "down_proj"):
            assert is_24(getattr(layers[i].mlp, name).weight != 0)
    with bank.using("sparse24-50"), torch.inference_mode():
        assert not torch.allclose(tiny.model(IDS, use_cache=False).logits, full)
    with torch.inference_mode():
        assert torch.equal(tiny.model(IDS, use_cache=False).logits, full)
    for key, value in tiny.model.state_dict().items():
        assert torch.equal(value, before[key]), key
