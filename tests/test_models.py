from __future__ import annotations

import json

import pytest
import torch

from casrap.errors import ModelLoadError, UnsupportedModelError
from casrap.models import describe, load_model, resolve_device
from casrap.models.embedded import MARKER, _cache_is_complete


def test_describe_tiny_counts_gqa_and_parameters(tiny):
    info = describe(tiny.model)
    assert (info.layers, info.query_heads, info.kv_heads, info.group_size, info.head_dim) == (4, 8, 2, 4, 8)
    assert info.ffn_width == 128
    assert info.tied_embeddings
    p = info.parameters
    assert p.attention + p.mlp + p.embeddings + p.lm_head + p.norms == p.total
    assert p.total == sum(t.numel() for t in tiny.model.parameters())
    assert info.prunable_units["kv_groups"] == 8
    assert abs(sum(info.parameters.percentages().values()) - 100.0) < 1e-6


def test_unsupported_architecture_names_what_is_supported():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="LLaMA-family"):
        describe(model)


@pytest.mark.parametrize("spec", ["not a model", "./missing-dir-xyz", "missing.gguf"])
def test_bad_specs_fail_with_one_line(spec):
    with pytest.raises(ModelLoadError) as err:
        load_model(spec, device="cpu")
    assert "\n" not in str(err.value)


def test_local_checkpoint_dir_roundtrip(tiny, tmp_path):
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    lm = load_model(str(tmp_path), device="cpu")
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(lm.model(ids).logits, tiny.model(ids).logits)
    assert lm.dtype == torch.float32


def test_dir_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(str(tmp_path), device="cpu")


def test_device_resolution():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") in {"cpu", "cuda"}
    with pytest.raises(ModelLoadError):
        resolve_device("tpu")


def test_partial_or_corrupt_cache_is_detected(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x" * 10)
    assert not _cache_is_complete(tmp_path)  # no marker: partial
    (tmp_path / MARKER).write_text(json.dumps({"files": {"model.safetensors": 10}}))
    assert _cache_is_complete(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"x" * 5)  # truncated
    assert not _cache_is_complete(tmp_path)
    (tmp_path / MARKER).write_text("{not json")
    assert not _cache_is_complete(tmp_path)
