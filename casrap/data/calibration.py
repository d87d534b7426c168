"""Calibration text: what importance (and later healing and low-rank fitting) learn from.

Data hygiene: calibration text is the project's own ``calibration.txt`` (16 paragraphs
on subjects the evaluation prose never touches) plus short *training-split* prompts
(never a ``summarise`` prompt, whose passages come from the evaluation prose). It never
overlaps the evaluation text of :func:`casrap.measure.corpus.prose_split`, WikiText-2,
the test prompts, or the bundled lm-eval task.
"""

from __future__ import annotations

from importlib import resources

from casrap.measure.corpus import Corpus

CALIBRATION_CORPUS = "casrap-calibration"
PASSAGE_CATEGORIES = frozenset({"summarise"})


def calibration_corpus() -> Corpus:
    """The bundled calibration prose (written for casrap, ~2,000 words)."""
    text = resources.files("casrap.data").joinpath("calibration.txt").read_text(encoding="utf-8")
    return Corpus(CALIBRATION_CORPUS, text)


def evaluation_questions() -> set[str]:
    """Questions of the bundled lm-eval task: never calibration text."""
    import json

    lines = resources.files("casrap.data").joinpath("casrap_local.jsonl").read_text(encoding="utf-8").splitlines()
    return {json.loads(line)["question"].strip() for line in lines if line.strip()}


def calibration_texts(samples: int = 64) -> list[str]:
    """Every calibration paragraph, then training prompts (no passages, none that an
    evaluation task asks) up to ``samples`` texts."""
    from casrap.data.prompts import load_prompts

    paragraphs = calibration_corpus().paragraphs()
    asked = evaluation_questions()
    prompts = [p.text for p in load_prompts(None, split="train") if p.category not in PASSAGE_CATEGORIES and p.text not in asked]
    room = max(0, samples - len(paragraphs))
    # spread the prompts over categories instead of taking the first (all factual) ones
    step = max(1, len(prompts) // room) if room else len(prompts) + 1
    return paragraphs[:samples] + prompts[::step][:room]
