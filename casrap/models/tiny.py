"""A tiny random LLaMA with GQA, built in-process, for tests and demos.

Group size 4 (8 query heads over 2 kv heads) so that GQA mistakes show. The
tokenizer is a byte-level BPE trained in milliseconds on the bundled prose, so text
round-trips without touching the hub.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from casrap.models.loaded import LoadedModel

TINY_ALIAS = "tiny-random-llama"


@functools.lru_cache(maxsize=4)
def tiny_tokenizer(vocab_size: int = 320) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from casrap.measure.corpus import offline_corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(offline_corpus().paragraphs(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    return fast


def tiny_llama(
    seed: int = 0,
    layers: int = 4,
    hidden: int = 64,
    heads: int = 8,
    kv_heads: int = 2,
    ffn: int = 128,
    attn_implementation: str = "sdpa",
    max_positions: int = 4096,
) -> LoadedModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # random init with std 0.02 gives near-uniform logits; widen it so that tokens differ
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, spec=TINY_ALIAS, device="cpu", dtype=torch.float32)
