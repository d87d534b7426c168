"""Evaluation text: WikiText-2 where the hub is reachable, the bundled prose otherwise.

Every result carries the name of the text it was computed on, so a perplexity on the
offline corpus is never mistaken for a WikiText-2 figure.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from casrap.errors import InputError
from casrap.hub import hub_reachable

log = logging.getLogger(__name__)

OFFLINE_CORPUS = "casrap-prose"
WIKITEXT = "wikitext-2-raw-v1/test"
EVALUATION_SPLITS = ("search", "validation", "test")


@dataclass(frozen=True)
class Corpus:
    name: str
    text: str

    def paragraphs(self) -> list[str]:
        return [p.strip() for p in self.text.split("\n\n") if p.strip()]


def offline_corpus() -> Corpus:
    """The English prose bundled with casrap (written for the project, ~2,200 words)."""
    text = resources.files("casrap.data").joinpath("corpus.txt").read_text(encoding="utf-8")
    return Corpus(OFFLINE_CORPUS, text)


def prose_split(split: str) -> Corpus:
    """One of three disjoint, fixed thirds of the bundled prose (interleaved paragraphs).

    ``search`` feeds genetic-search fitness, ``validation`` picks a search's winner,
    ``test`` is what bench, ``casrap test`` and README report offline. None of them is
    ever calibration text: calibration has its own file (:mod:`casrap.data.calibration`).
    """
    if split not in EVALUATION_SPLITS:
        raise InputError(f"unknown prose split {split!r}; choose one of {', '.join(EVALUATION_SPLITS)}")
    paragraphs = offline_corpus().paragraphs()[EVALUATION_SPLITS.index(split)::3]
    return Corpus(f"{OFFLINE_CORPUS}/{split}", "\n\n".join(paragraphs))


def wikitext2(max_chars: int | None = None) -> Corpus:
    """WikiText-2 raw test split through ``datasets`` (needs the hub)."""
    if not hub_reachable():
        raise ConnectionError("the Hugging Face hub is not reachable")
    from datasets import load_dataset  # optional dependency ([eval] extra)

    data = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
    text = "\n\n".join(line for line in data["text"] if line.strip())
    return Corpus(WIKITEXT, text[:max_chars] if max_chars else text)


def load_corpus(source: str = "auto", max_chars: int | None = None) -> Corpus:
    """Resolve ``auto | wikitext2 | offline | PATH`` to a :class:`Corpus` for evaluation.

    ``auto`` tries WikiText-2 (test split) and falls back to the *test* third of the
    bundled prose (:func:`prose_split`) when ``datasets`` is missing or the hub is
    unreachable; ``offline`` is that test third directly.
    """
    if source in {"auto", "wikitext2", "wikitext"}:
        try:
            return wikitext2(max_chars)
        except Exception as err:  # noqa: BLE001 - any failure means "not reachable here"
            if source != "auto":
                raise InputError(
                    f"WikiText-2 is not reachable ({type(err).__name__}); use --corpus offline"
                ) from err
            log.info("WikiText-2 unavailable (%s); using the bundled prose", type(err).__name__)
            source = "offline"
    if source == "offline":
        corpus = prose_split("test")
    else:
        path = Path(source).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(f"cannot read corpus {path}: {err}") from err
        corpus = Corpus(path.name, text)
    if not corpus.text.strip():
        raise InputError(f"corpus {corpus.name!r} is empty")
    if max_chars:
        corpus = Corpus(corpus.name, corpus.text[:max_chars])
    return corpus
