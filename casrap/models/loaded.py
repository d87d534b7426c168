"""What every loader returns: a model with its tokenizer and where it came from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and where it came from."""

    model: Any
    tokenizer: Any
    spec: str
    device: str
    dtype: Any

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))
