"""Model engine: load a LLaMA-family causal LM and describe its prunable structure."""

from casrap.models.architecture import ArchitectureInfo, decoder_layers, describe, head_dim_of
from casrap.models.embedded import EMBEDDED_ALIAS, embedded_gguf_path, ensure_embedded_checkpoint
from casrap.models.loader import DEFAULT_MODEL, LoadedModel, load_model, resolve_device

__all__ = [
    "ArchitectureInfo", "decoder_layers", "describe", "head_dim_of", "EMBEDDED_ALIAS",
    "embedded_gguf_path", "ensure_embedded_checkpoint", "DEFAULT_MODEL", "LoadedModel",
    "load_model", "resolve_device",
]
