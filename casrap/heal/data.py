"""Healing text: the calibration text plus the full model's own answers to training prompts.

Data hygiene: nothing here ever reads an evaluation text. The calibration text
(:func:`casrap.data.calibration.calibration_texts`, ~4k tokens) is too small to heal on,
so the full model writes more in-distribution text itself: batched sampling on the
*train*-split prompts (never a test prompt, never a ``summarise`` prompt whose passage
comes from the evaluation prose). The samples are cached under ``$CASRAP_HOME/heal``,
keyed to the model, so every profile of one model heals on the same text.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from casrap.paths import casrap_home

log = logging.getLogger(__name__)
SAMPLES_VERSION = 1


def samples_path(model_key: str, count: int, new_tokens: int, seed: int) -> Path:
    return casrap_home() / "heal" / f"{model_key}-samples{SAMPLES_VERSION}-n{count}-t{new_tokens}-s{seed}.json"


def training_prompts() -> list[str]:
    """Train-split prompts that are safe to learn from (the calibration rules)."""
    from casrap.data.calibration import PASSAGE_CATEGORIES, evaluation_questions
    from casrap.data.prompts import load_prompts

    asked = evaluation_questions()
    return [p.text for p in load_prompts(None, split="train") if p.category not in PASSAGE_CATEGORIES and p.text not in asked]


@torch.inference_mode()
def sample_answers(
    model: Any, tokenizer: Any, prompts: list[str], new_tokens: int = 128, batch: int = 16, seed: int = 0,
    progress: Callable[[int, int], None] | None = None, chat: bool = True,
) -> list[str]:
    """The model's own samples at temperature 1: answers (chat template, where it has one)
    or, with ``chat=False``, plain-text continuations returned with their prefix."""
    generator_state = torch.get_rng_state()
    torch.manual_seed(seed)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    answers: list[str] = []
    try:
        for start in range(0, len(prompts), batch):
            chunk = prompts[start:start + batch]
            if chat and getattr(tokenizer, "chat_template", None):
                texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) for p in chunk]
            else:
                texts = chunk
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                 pad_token_id=tokenizer.pad_token_id)
            for prefix, row in zip(chunk, out[:, enc.input_ids.shape[1]:]):
                text = tokenizer.decode(row, skip_special_tokens=True).strip()
                answers.append(text if chat else f"{prefix} {text}")
            if progress:
                progress(min(start + batch, len(prompts)), len(prompts))
    finally:
        tokenizer.padding_side = side
        torch.set_rng_state(generator_state)
    return [a for a in answers if a]


def healing_texts(
    model: Any, tokenizer: Any, model_key: str, samples: int = 256, new_tokens: int = 128, seed: int = 0,
    progress: Callable[[int, int], None] | None = None, continuations: int = 0,
) -> list[str]:
    """Calibration paragraphs + ``samples`` cached answers of the full model to train prompts
    (+ ``continuations`` prose continuations of calibration paragraph openings)."""
    from casrap.data.calibration import calibration_corpus

    texts = calibration_corpus().paragraphs()
    if samples <= 0:
        return texts
    path = samples_path(model_key, samples, new_tokens, seed)
    if not path.is_file():
        prompts = training_prompts()
        picked = [prompts[(i * 7919) % len(prompts)] for i in range(samples)] if len(prompts) < samples else prompts[:: max(1, len(prompts) // samples)][:samples]
        answers = sample_answers(model, tokenizer, picked, new_tokens=new_tokens, seed=seed, progress=progress)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"answers": answers, "prompts": "train split", "new_tokens": new_tokens, "seed": seed}))
        log.info("cached %d healing samples at %s", len(answers), path)
    answers = json.loads(path.read_text())["answers"]
    if not continuations:
        return texts + answers
    cont_path = path.with_name(path.name.replace("-samples", "-continuations").replace(f"-n{samples}-", f"-n{continuations}-"))
    if not cont_path.is_file():
        prefixes = [" ".join(texts[i % len(texts)].split()[:24]) for i in range(continuations)]
        more = sample_answers(model, tokenizer, prefixes, new_tokens=new_tokens, seed=seed + 1, progress=progress, chat=False)
        cont_path.write_text(json.dumps({"answers": more, "prompts": "calibration paragraph openings", "new_tokens": new_tokens, "seed": seed + 1}))
    return texts + answers + json.loads(cont_path.read_text())["answers"]


def token_blocks(tokenizer: Any, texts: list[str], length: int) -> torch.Tensor:
    """Texts joined by EOS into one stream, cut into ``length``-token rows (N x length)."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False).input_ids)
        stream.append(eos)
    rows = len(stream) // length
    return torch.tensor(stream[: rows * length], dtype=torch.long).view(rows, length)
