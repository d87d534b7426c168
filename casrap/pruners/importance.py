"""Importance of heads, FFN channels and layers, from activations on calibration text.

- Head importance: mean L2 norm of each query head's contribution to the attention
  output, ``W_o[:, h] @ x_h`` (what removing the head takes out of the residual).
- FFN channel importance (Wanda-style): RMS of the channel's activation entering
  ``down_proj`` times the L2 norm of its ``down_proj`` column.
- Layer block influence (ShortGPT): ``1 - cos(input, output)`` of the decoder layer,
  averaged over tokens; low influence means the layer barely changes the residual.

Mean attention probability per head is deliberately not used: it is 1/L for every
head and carries no information. Without calibration, weight norms are the fallback.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from casrap.errors import CheckpointError
from casrap.models.architecture import decoder_layers, head_dim_of, model_key
from casrap.paths import casrap_home

log = logging.getLogger(__name__)


@dataclass
class Importance:
    heads: torch.Tensor  # [layers, query_heads]
    ffn: torch.Tensor  # [layers, ffn_width]
    layers: torch.Tensor  # [layers] block influence
    source: str  # "calibrated:N" or "weight-norm"
    model_key: str

    def kv_groups(self, group_size: int) -> torch.Tensor:
        """[layers, kv_heads]: summed importance of each kv head's query heads."""
        return self.heads.view(self.heads.shape[0], -1, group_size).sum(-1)

    def save(self, path: Path) -> Path:
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"heads": self.heads.contiguous(), "ffn": self.ffn.contiguous(), "layers": self.layers.contiguous()}
        save_file(tensors, str(path), metadata={"source": self.source, "model_key": self.model_key})
        return path

    @classmethod
    def load(cls, path: Path, expected_key: str | None = None) -> Importance:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
                tensors = {k: handle.get_tensor(k) for k in ("heads", "ffn", "layers")}
        except Exception as err:
            raise CheckpointError(f"calibration file {path} is unreadable: {err}") from err
        if expected_key and meta.get("model_key") != expected_key:
            raise CheckpointError(
                f"calibration file {path} was made for another model ({meta.get('model_key')}); "
                "re-run `casrap calibrate`"
            )
        return cls(tensors["heads"], tensors["ffn"], tensors["layers"], meta.get("source", "?"), meta.get("model_key", ""))


CALIBRATION_VERSION = 2  # bump when the calibration text or statistics change: old caches are not reused


def default_calibration_path(model: Any) -> Path:
    return casrap_home() / "calibration" / f"{model_key(model)}-cal{CALIBRATION_VERSION}.safetensors"


def weight_norm_importance(model: Any) -> Importance:
    """Fallback importance from weights alone (no data); only on explicit request.

    Profiles built from it are broken, not just worse (ffn-5: KL 4.6 against the full
    model, calibrated 0.11), so using it is always logged as a warning.
    """
    log.warning("importance from weight norms (no calibration data): pruned profiles will be much worse than calibrated ones")
    layers = decoder_layers(model)
    d = head_dim_of(model)
    heads, ffn = [], []
    for layer in layers:
        wo = layer.self_attn.o_proj.weight.detach().float()
        heads.append(wo.view(wo.shape[0], -1, d).norm(dim=(0, 2)))
        down = layer.mlp.down_proj.weight.detach().float().norm(dim=0)
        gate = layer.mlp.gate_proj.weight.detach().float().norm(dim=1)
        up = layer.mlp.up_proj.weight.detach().float().norm(dim=1)
        ffn.append(down * gate * up)
    heads_t, ffn_t = _in_original_order(layers, torch.stack(heads), torch.stack(ffn))
    heads, ffn = list(heads_t), list(ffn_t)
    n = len(layers)
    # without data, later layers are assumed less influential (a weak prior, stated)
    influence = torch.linspace(1.0, 0.5, n)
    influence[0] = influence[-1] = 2.0
    return Importance(torch.stack(heads), torch.stack(ffn), influence, "weight-norm", model_key(model))


def _in_original_order(layers: Any, heads: torch.Tensor, ffn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position statistics of a reordered model (casrap.pruners.reorder) in original
    head/channel order: importance always names original units, like plans."""
    from casrap.pruners.reorder import ffn_order, head_orders, to_original

    heads = torch.stack([to_original(h, head_orders(layer.self_attn)[0]) for h, layer in zip(heads, layers)])
    ffn = torch.stack([to_original(f, ffn_order(layer.mlp)) for f, layer in zip(ffn, layers)])
    return heads, ffn


@torch.inference_mode()
def forward_over_texts(
    model: Any,
    tokenizer: Any,
    texts: list[str],
    handles: list[Any],
    max_tokens: int = 256,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Run the full model over each text (truncated to ``max_tokens``) so that the forward
    hooks behind ``handles`` see its activations; remove the hooks however it ends.

    Returns the number of tokens seen. Shared by every calibration statistic (importance
    here, PCA bases in :mod:`casrap.pruners.lowrank`).
    """
    device = next(model.parameters()).device
    tokens = 0
    try:
        for step, text in enumerate(texts):
            ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_tokens).input_ids.to(device)
            model(ids, use_cache=False)
            tokens += ids.numel()
            if progress:
                progress(step + 1, len(texts))
    finally:
        for handle in handles:
            handle.remove()
    return tokens


@torch.inference_mode()
def calibrate(
    model: Any,
    tokenizer: Any,
    texts: Iterable[str],
    max_tokens: int = 256,
    progress: Callable[[int, int], None] | None = None,
) -> Importance:
    """Accumulate activation statistics over ``texts`` with forward hooks."""
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise CheckpointError("calibration needs at least one non-empty text")
    layers = decoder_layers(model)
    d = head_dim_of(model)
    n = len(layers)
    head_sum = [torch.zeros(layer.self_attn.o_proj.in_features // d) for layer in layers]
    ffn_sq = [torch.zeros(layer.mlp.down_proj.in_features) for layer in layers]
    influence = torch.zeros(n)
    layer_inputs: dict[int, torch.Tensor] = {}
    handles = []

    def head_hook(i: int) -> Callable[..., None]:
        def hook(module: Any, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].float()
            w = module.weight.float().view(module.weight.shape[0], -1, d)  # [D, H, d]
            contrib = torch.einsum("bthd,Dhd->bthD", x.view(*x.shape[:2], -1, d), w)
            head_sum[i] += contrib.norm(dim=-1).sum(dim=(0, 1)).cpu()
        return hook

    def ffn_hook(i: int) -> Callable[..., None]:
        def hook(module: Any, args: tuple[torch.Tensor, ...]) -> None:
            ffn_sq[i] += args[0].float().pow(2).sum(dim=(0, 1)).cpu()
        return hook

    def layer_pre(i: int) -> Callable[..., None]:
        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            layer_inputs[i] = (args[0] if args else kwargs["hidden_states"]).detach()
        return hook

    def layer_post(i: int) -> Callable[..., None]:
        def hook(module: Any, args: Any, kwargs: Any, output: Any) -> None:
            out = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(layer_inputs[i].float(), out.float(), dim=-1)
            influence[i] += (1.0 - cos).sum().cpu()
        return hook

    for i, layer in enumerate(layers):
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(head_hook(i)))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(ffn_hook(i)))
        handles.append(layer.register_forward_pre_hook(layer_pre(i), with_kwargs=True))
        handles.append(layer.register_forward_hook(layer_post(i), with_kwargs=True))
    token_count = forward_over_texts(model, tokenizer, texts, handles, max_tokens, progress)
    heads = torch.stack(head_sum) / token_count
    ffn = torch.stack([
        (sq / token_count).sqrt() * layer.mlp.down_proj.weight.detach().float().norm(dim=0).cpu()
        for sq, layer in zip(ffn_sq, layers)
    ])
    heads, ffn = _in_original_order(layers, heads, ffn)
    return Importance(heads, ffn, influence / token_count, f"calibrated:{len(texts)}", model_key(model))


def load_or_calibrate(
    model: Any,
    tokenizer: Any = None,
    path: Path | None = None,
    texts: list[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Importance, bool]:
    """The saved calibration for this model, or a new one made (and saved) now.

    Returns ``(importance, calibrated_now)``. Calibration runs on
    :func:`casrap.data.calibration.calibration_texts` unless ``texts`` are given (~12 s
    for SmolLM2 on 2 CPU cores) and is cached under ``CASRAP_HOME`` keyed to the
    model's fingerprint. Without a tokenizer it cannot run: that is a one-line error,
    never a silent weight-norm fallback.
    """
    target = path or default_calibration_path(model)
    if target.is_file():
        return Importance.load(target, expected_key=model_key(model)), False
    if tokenizer is None:
        raise CheckpointError(f"no calibration for this model at {target}; run `casrap calibrate` or pass a tokenizer")
    from casrap.data.calibration import calibration_texts

    log.info("no calibration for this model yet: calibrating once, saving to %s", target)
    importance = calibrate(model, tokenizer, texts or calibration_texts(), progress=progress)
    importance.save(target)
    return importance, True
