"""One loader for every way a user names a model.

Accepted specs: the alias ``smollm2-135m`` (the embedded default), a local HF
checkpoint directory, a ``.gguf`` file, a Hugging Face hub id, or
``tiny-random-llama`` (a random GQA model built in-process, for tests and smoke runs). The hub token is
taken from ``HF_TOKEN`` / ``HUGGINGFACE_HUB_TOKEN`` (the CLI reads ``.env`` into the
environment; this module never logs it).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from casrap.errors import ModelLoadError
from casrap.models.loaded import LoadedModel
from casrap.models.embedded import EMBEDDED_ALIAS, ProgressCallback, ensure_embedded_checkpoint

log = logging.getLogger(__name__)

DEFAULT_MODEL = EMBEDDED_ALIAS


def resolve_device(device: str = "auto") -> str:
    """Map ``auto|cpu|cuda|gpu`` to a torch device string."""
    import torch

    choice = device.lower()
    if choice == "gpu":
        choice = "cuda"
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for but no CUDA GPU is visible")
    if choice not in {"cpu", "cuda"}:
        raise ModelLoadError(f"unknown device {device!r}; use auto, cpu or cuda")
    return choice


def default_dtype(device: str) -> Any:
    """float32 on CPU (bf16 matmuls are slow there), bfloat16 on GPU."""
    import torch

    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def _hub_token() -> str | None:
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGINGFACE_HUB_TOKEN")


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def load_model(
    spec: str = DEFAULT_MODEL,
    device: str = "auto",
    dtype: Any = None,
    attn_implementation: str | None = None,
    progress: ProgressCallback | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer, in eval mode, on ``device``.

    Raises :class:`ModelLoadError` with a one-line message for anything the user can
    fix (unknown spec, missing embedded package, unreachable hub).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved_device = resolve_device(device)
    torch_dtype = dtype or default_dtype(resolved_device)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation

    path = Path(spec).expanduser()
    if spec == "tiny-random-llama":  # in-process random model for tests and smoke runs
        from casrap.models.tiny import tiny_llama

        return tiny_llama()
    try:
        if spec == EMBEDDED_ALIAS:
            directory = ensure_embedded_checkpoint(progress)
            try:
                tokenizer = AutoTokenizer.from_pretrained(directory)
                model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
            except (OSError, ValueError, RuntimeError) as err:  # corrupt cache
                log.warning("embedded cache unreadable (%s); rebuilding", err)
                (directory / "casrap-complete.json").unlink(missing_ok=True)
                directory = ensure_embedded_checkpoint(progress)
                tokenizer = AutoTokenizer.from_pretrained(directory)
                model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
        elif path.suffix == ".gguf":
            if not path.is_file():
                raise ModelLoadError(f"GGUF file not found: {path}")
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **kwargs)
        elif path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelLoadError(f"{path} is a directory but holds no config.json")
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        elif _looks_like_hub_id(spec):
            from casrap.hub import hub_reachable

            token = _hub_token()
            local_only = not hub_reachable()  # offline: use the local HF cache, fail fast
            try:
                tokenizer = AutoTokenizer.from_pretrained(spec, token=token, local_files_only=local_only)
                model = AutoModelForCausalLM.from_pretrained(spec, token=token, local_files_only=local_only, **kwargs)
            except OSError as err:
                raise ModelLoadError(
                    f"cannot load {spec!r} from the Hugging Face hub ({type(err).__name__}); "
                    f"offline, or without access, use --model {EMBEDDED_ALIAS} (the embedded model)"
                ) from err
        else:
            raise ModelLoadError(
                f"unknown model spec {spec!r}: give {EMBEDDED_ALIAS}, a checkpoint directory, "
                "a .gguf file, or a hub id like meta-llama/Llama-3.2-1B"
            )
    except ModelLoadError:
        raise
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not load {spec!r}: {str(err).splitlines()[0]}") from err

    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(resolved_device)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, device=resolved_device, dtype=torch_dtype)
