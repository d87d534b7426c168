"""Healing text: the calibration text plus the full model's own answers to training prompts.

Data hygiene: nothing here ever reads an evaluation text. The calibration text
(:func:`casrap.data.calibration.calibration_texts`, ~4k tokens) is too small to heal on,
so the full model writes more in-distribution text itself: batched sampling on the
*train*-split prompts (never a test prompt, never a ``summarise`` prompt whose passage
comes from the evaluation prose). The samples are cached under ``$CASRAP_HOME/heal``,
keyed to the model, so every profile of one model heals on the same text.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from casrap.paths import casrap_home

log = logging.getLogger(__name__)
SAMPLES_VERSION = 1
CONTINUATIONS_VERSION = 2


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
    progress: Callable[[int, int], None] | None = None, chat: bool = True, partial: Path | None = None,
) -> list[str]:
    """The model's own samples at temperature 1: answers (chat template, where it has one)
    or, with ``chat=False``, plain-text continuations returned with their prefix.

    Each batch is seeded on its own (``seed`` + its start), so with ``partial`` (a JSON file
    rewritten after every batch) an interrupted run resumes where it stopped and gives the
    same samples as an uninterrupted one.
    """
    generator_state = torch.get_rng_state()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    answers: list[str] = []
    if partial is not None and partial.is_file():
        saved = json.loads(partial.read_text())
        if saved.get("prompts") == prompts[:len(saved.get("prompts", []))] and saved.get("batch") == batch:
            answers = list(saved["answers"])
            log.info("resuming sampling after %d of %d", len(answers), len(prompts))
    try:
        for start in range(len(answers) - len(answers) % batch, len(prompts), batch):
            torch.manual_seed(seed * 1_000_003 + start)
            chunk = prompts[start:start + batch]
            if chat and getattr(tokenizer, "chat_template", None):
                texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) for p in chunk]
            else:
                texts = chunk
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            out = model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=new_tokens, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                 pad_token_id=tokenizer.pad_token_id)
            for prefix, row in zip(chunk, out[:, enc.input_ids.shape[1]:]):
                text = tokenizer.decode(row, skip_special_tokens=True).strip()
                answers.append(text if chat else f"{prefix} {text}")
            if partial is not None:
                partial.parent.mkdir(parents=True, exist_ok=True)
                partial.write_text(json.dumps({"prompts": prompts[:len(answers)], "batch": batch, "answers": answers}))
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
    (+ ``continuations`` prose continuations of calibration sentence openings, each
    returned with its opening)."""
    from casrap.data.calibration import calibration_corpus

    texts = calibration_corpus().paragraphs()
    if samples <= 0 and continuations <= 0:
        return texts
    path = samples_path(model_key, samples, new_tokens, seed)
    if samples > 0 and not path.is_file():
        prompts = training_prompts()
        picked = [prompts[(i * 7919) % len(prompts)] for i in range(samples)] if len(prompts) < samples else prompts[:: max(1, len(prompts) // samples)][:samples]
        partial = path.with_suffix(".partial")
        answers = sample_answers(model, tokenizer, picked, new_tokens=new_tokens, seed=seed, progress=progress, partial=partial)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"answers": answers, "prompts": "train split", "new_tokens": new_tokens, "seed": seed}))
        partial.unlink(missing_ok=True)
        log.info("cached %d healing samples at %s", len(answers), path)
    answers = json.loads(path.read_text())["answers"] if samples > 0 else []
    if not continuations:
        return texts + answers
    cont_path = casrap_home() / "heal" / f"{model_key}-continuations{CONTINUATIONS_VERSION}-n{continuations}-t{new_tokens}-s{seed + 1}.json"
    if not cont_path.is_file():
        prefixes = continuation_prefixes(texts, continuations)
        partial = cont_path.with_suffix(".partial")
        more = sample_answers(model, tokenizer, prefixes, new_tokens=new_tokens, seed=seed + 1, progress=progress, chat=False, partial=partial)
        cont_path.parent.mkdir(parents=True, exist_ok=True)
        cont_path.write_text(json.dumps({"answers": more, "prompts": "calibration sentence openings", "new_tokens": new_tokens, "seed": seed + 1}))
        partial.unlink(missing_ok=True)
        log.info("cached %d healing continuations at %s", len(more), cont_path)
    return texts + answers + json.loads(cont_path.read_text())["answers"]


def continuation_prefixes(paragraphs: list[str], count: int, min_words: int = 16) -> list[str]:
    """``count`` openings for prose continuations, spread over the calibration sentences.

    Why: continuing only the 16 paragraph openings gives 16 topics sampled many times;
    starting from sentences all through the paragraphs gives the model's own prose on
    as many contexts as there are sentences (still calibration text only).
    """
    import re

    sentences = [(pi, s) for pi, p in enumerate(paragraphs) for s in re.split(r"(?<=[.!?])\s+", p) if s.strip()]
    if not sentences or count <= 0:
        return []
    stride = max(1, len(sentences) // count) if count < len(sentences) else 1
    prefixes = []
    for i in range(count):
        start = (i * stride + i // max(1, len(sentences))) % len(sentences)
        para, words = sentences[start][0], []
        j = start
        while j < len(sentences) and sentences[j][0] == para and len(words) < min_words:
            words.extend(sentences[j][1].split())
            j += 1
        prefixes.append(" ".join(words[:48]))
    return prefixes


def token_blocks(tokenizer: Any, texts: list[str], length: int) -> torch.Tensor:
    """Texts joined by EOS into one stream, cut into ``length``-token rows (N x length)."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False).input_ids)
        stream.append(eos)
    rows = len(stream) // length
    return torch.tensor(stream[: rows * length], dtype=torch.long).view(rows, length)


TEACHER_VERSION = 1


@dataclass
class TeacherTargets:
    """The full model's top-k next-token log-probabilities on every healing block.

    Why: the teacher forward pass is a third of a healing step's cost and identical for
    every profile, learning rate and step count; computed once per (model, text) and kept
    on disk, it makes a learning-rate sweep and the next profile's healing cheaper.
    ``logprobs`` (N x L x k, float16) are log-softmax values of the full distribution
    at ``indices`` (N x L x k, int32), so the tail mass 1 - sum(exp) is known too.
    """

    logprobs: torch.Tensor
    indices: torch.Tensor
    path: Path | None = None

    @property
    def k(self) -> int:
        return int(self.indices.shape[-1])


def healing_blocks(lm: Any, model_key: str, cfg: Any, progress: Callable[[str, int, int, float], None] | None = None) -> torch.Tensor:
    """The healing text of ``cfg`` (:func:`healing_texts`) cut into ``cfg.seq_len``-token blocks;
    one-line error when there are fewer blocks than a batch. ``progress`` gets the "sampling" stage."""
    from casrap.errors import InputError

    texts = healing_texts(lm.model, lm.tokenizer, model_key, samples=cfg.samples, new_tokens=cfg.sample_tokens,
                          seed=cfg.seed, progress=(lambda i, n: progress("sampling", i, n, 0.0)) if progress else None,
                          continuations=cfg.continuations)
    blocks = token_blocks(lm.tokenizer, texts, cfg.seq_len)
    if len(blocks) < cfg.batch:
        raise InputError(f"only {len(blocks)} healing blocks of {cfg.seq_len} tokens; lower --batch or raise the samples")
    return blocks


def blocks_digest(blocks: torch.Tensor) -> str:
    """A short content hash of the token blocks (the teacher cache's key with the model)."""
    return hashlib.sha256(blocks.to(torch.int64).numpy().tobytes() + str(list(blocks.shape)).encode()).hexdigest()[:16]


def teacher_path(model_key: str, blocks: torch.Tensor, k: int) -> Path:
    return casrap_home() / "heal" / f"{model_key}-teacher{TEACHER_VERSION}-k{k}-{blocks_digest(blocks)}.pt"


@torch.inference_mode()
def teacher_targets(
    model: Any, blocks: torch.Tensor, model_key: str, k: int = 64, batch: int = 8,
    progress: Callable[[int, int], None] | None = None, cache: bool = True,
) -> TeacherTargets:
    """Top-``k`` log-probabilities of ``model`` (the full model: run it with no profile
    active) on ``blocks``, loaded from ``$CASRAP_HOME/heal`` when cached."""
    path = teacher_path(model_key, blocks, k)
    if cache and path.is_file():
        state = torch.load(path, weights_only=True)
        if list(state["indices"].shape[:2]) == list(blocks.shape):
            return TeacherTargets(state["logprobs"], state["indices"], path)
        log.warning("ignoring %s: shape does not match the healing blocks", path)
    device = next(model.parameters()).device
    values, indices = [], []
    for start in range(0, len(blocks), batch):
        ids = blocks[start:start + batch].to(device)
        logp = torch.log_softmax(model(ids, use_cache=False).logits.float(), dim=-1)
        top = logp.topk(k, dim=-1)
        values.append(top.values.half().cpu())
        indices.append(top.indices.int().cpu())
        if progress:
            progress(min(start + batch, len(blocks)), len(blocks))
    targets = TeacherTargets(torch.cat(values), torch.cat(indices), path if cache else None)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"logprobs": targets.logprobs, "indices": targets.indices}, tmp)
        tmp.replace(path)
        log.info("cached teacher top-%d log-probabilities at %s", k, path)
    return targets
