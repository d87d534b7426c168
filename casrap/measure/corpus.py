"""Evaluation text: WikiText-2 where the hub is reachable, the bundled prose otherwise.

Every result carries the name of the text it was computed on, so a perplexity on the
offline corpus is never mistaken for a WikiText-2 figure.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from casrap.errors import InputError

log = logging.getLogger(__name__)

OFFLINE_CORPUS = "casrap-prose"
WIKITEXT = "wikitext-2-raw-v1/test"


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


def hub_reachable(timeout: float = 2.0) -> bool:
    """Cheap check before asking ``datasets`` (whose retries take ~30 s offline)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def wikitext2(max_chars: int | None = None) -> Corpus:
    """WikiText-2 raw test split through ``datasets`` (needs the hub)."""
    if not hub_reachable():
        raise ConnectionError("the Hugging Face hub is not reachable")
    from datasets import load_dataset  # optional dependency ([eval] extra)

    data = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
    text = "\n\n".join(line for line in data["text"] if line.strip())
    return Corpus(WIKITEXT, text[:max_chars] if max_chars else text)


def load_corpus(source: str = "auto", max_chars: int | None = None) -> Corpus:
    """Resolve ``auto | wikitext2 | offline | PATH`` to a :class:`Corpus`.

    ``auto`` tries WikiText-2 and falls back to the bundled prose when ``datasets`` is
    missing or the hub is unreachable.
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
        corpus = offline_corpus()
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
