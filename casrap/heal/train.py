"""LoRA / QLoRA healing of one pruned variant by distillation from the full model.

The student is a *standalone* copy of the pruned variant (a deep copy of the model with
the profile active), so PEFT's module injection never touches the bank's shared base
modules; the teacher is the bank's own model with the full profile active. The loss is
KL(full || pruned) of next-token distributions on every position of the healing text
(:mod:`casrap.heal.data`), plus ``lm_weight`` times the LM loss if asked.

Resumable: every ``save_every`` steps the LoRA weights, optimiser state, step and data
order are written to ``OUTPUT/checkpoint.pt``; a rerun with the same settings continues.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from casrap.profiles.catalogue import FULL
from casrap.errors import InputError, UnsupportedModelError
from casrap.profiles.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS

log = logging.getLogger(__name__)
METHODS = ("lora", "qlora")
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
CHECKPOINT = "checkpoint.pt"


@dataclass
class HealConfig:
    """Settings of one healing run.

    Attributes:
        method: ``lora`` (float base) or ``qlora`` (base in 4-bit NF4 via bitsandbytes).
        steps: optimiser steps.
        rank: LoRA rank r (alpha = 2r).
        lr: AdamW learning rate (cosine decay to 10% after a short warm-up).
        batch: sequences per step.
        seq_len: tokens per sequence.
        targets: projections that get a LoRA (q/k/v/o/gate/up/down_proj); empty: chosen by the
            profile's kind (:func:`targets_for_plan`).
        lm_weight: weight of the LM loss added to the KL.
        samples: answers the full model writes to train prompts as extra healing text.
        continuations: prose continuations the full model writes from calibration paragraph openings.
        sample_tokens: new tokens per sampled answer.
        save_every: steps between resumable checkpoints.
        seed: data order and LoRA initialisation.
        topk: teacher log-probabilities kept per position (cached once per model and text);
            0 runs the teacher every step on the full vocabulary.
    """

    method: str = "lora"
    steps: int = 75
    rank: int = 8
    lr: float = 5e-3
    batch: int = 4
    seq_len: int = 128
    targets: list[str] = field(default_factory=list)
    lm_weight: float = 0.0
    samples: int = 256
    continuations: int = 128
    sample_tokens: int = 128
    save_every: int = 20
    seed: int = 0
    topk: int = 64

    def check(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"unknown healing method {self.method!r}; use lora or qlora")
        if self.steps < 1 or self.rank < 1 or self.batch < 1 or self.seq_len < 8 or self.topk < 0:
            raise InputError("healing needs steps >= 1, rank >= 1, batch >= 1, seq_len >= 8 and topk >= 0")
        bad = [t for t in self.targets if t not in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")]
        if bad:
            raise InputError(f"healing targets must be among q/k/v/o/gate/up/down_proj, got {self.targets}")


@dataclass
class HealResult:
    adapter_dir: Path
    steps: int
    train_s: float
    losses: list[float]
    trainable_parameters: int
    tokens_seen: int
    resumed_from: int = 0


def check_qlora() -> None:
    """Raise one line unless bitsandbytes can run NF4 linear layers here."""
    try:
        import bitsandbytes as bnb  # noqa: F401
        from bitsandbytes.nn import Linear4bit

        layer = Linear4bit(64, 64, bias=False, quant_type="nf4", compute_dtype=torch.float32)
        layer.load_state_dict({"weight": torch.randn(64, 64)}, strict=False)
        layer = layer.to("cuda" if torch.cuda.is_available() else "cpu")
        layer(torch.randn(2, 64, device=layer.weight.device))
    except Exception as err:  # noqa: BLE001 - any failure means "not on this platform"
        raise UnsupportedModelError(f"qlora needs bitsandbytes NF4 on this platform ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); use --method lora") from err


def standalone_student(bank: Any, name: str) -> Any:
    """A deep copy of the model running profile ``name``: nothing shared with the bank."""
    with bank.using(name):
        student = copy.deepcopy(bank.model)
    for p in student.parameters():
        p.requires_grad_(False)
    return student


def quantize_nf4(model: Any) -> int:
    """Replace every decoder Linear by a bitsandbytes NF4 Linear4bit (QLoRA base); returns count."""
    from bitsandbytes.nn import Linear4bit, Params4bit

    count = 0
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if not isinstance(child, torch.nn.Linear):
                    continue
                q = Linear4bit(child.in_features, child.out_features, bias=child.bias is not None, quant_type="nf4",
                               compute_dtype=torch.float32, device="meta")
                q.weight = Params4bit(child.weight.data.to(torch.float32).cpu(), requires_grad=False, quant_type="nf4")
                device = child.weight.device
                q = q.to(device)
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.data.clone(), requires_grad=False)
                setattr(parent, name, q)
                count += 1
    return count


def targets_for_plan(plan: Any) -> list[str]:
    """Projections that get a LoRA for a plan's kind.

    Why: an FFN cut changes only what the MLPs compute, so adapting the MLP projections
    alone repairs it with fewer parameters to overfit; a skipped layer or a removed head
    changes the residual stream that every later attention and MLP reads, so both adapt.
    """
    if plan.ffn and not plan.heads and not plan.skip_layers:
        return list(MLP)
    return ATTENTION + MLP


def _lr_at(step: int, cfg: HealConfig) -> float:
    warm = max(1, cfg.steps // 20)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, cfg.steps - warm)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, ids: torch.Tensor, lm_weight: float) -> torch.Tensor:
    """Mean per-token KL(teacher || student), plus ``lm_weight`` x next-token cross-entropy."""
    s = F.log_softmax(student_logits.float(), dim=-1)
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    loss = F.kl_div(s.flatten(0, 1), t.flatten(0, 1), log_target=True, reduction="batchmean")
    if lm_weight:
        loss = loss + lm_weight * F.cross_entropy(student_logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    return loss


def topk_distill_loss(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, teacher_indices: torch.Tensor) -> torch.Tensor:
    """Mean per-token KL between teacher and student on the teacher's top-k tokens plus one
    "every other token" bucket (exact KL of the distributions coarsened to k + 1 outcomes;
    a lower bound of the full KL that equals it as the tail vanishes)."""
    s_all = F.log_softmax(student_logits.float(), dim=-1)
    s = s_all.gather(-1, teacher_indices.long())
    t = teacher_logprobs.float()
    t_tail = torch.log1p(-t.exp().sum(-1).clamp(max=1 - 1e-6))
    s_tail = torch.log1p(-s.exp().sum(-1).clamp(max=1 - 1e-6))
    kl = (t.exp() * (t - s)).sum(-1) + t_tail.exp() * (t_tail - s_tail)
    return kl.mean()


def heal_profile(
    bank: Any,
    name: str,
    blocks: torch.Tensor,
    output: Path,
    cfg: HealConfig,
    progress: Callable[[int, int, float], None] | None = None,
    student: Any = None,
    teacher_targets: Any = None,
) -> HealResult:
    """Train a LoRA for profile ``name`` of ``bank`` on ``blocks`` (N x seq_len token ids).

    ``student`` may be given (e.g. a variant tuned for a task); by default it is a
    standalone copy of the profile. Saves the PEFT adapter to ``output/adapter`` and
    returns what happened. ``progress(step, steps, loss)`` is called after each step.
    ``teacher_targets`` (:class:`casrap.heal.data.TeacherTargets` for ``blocks``) replaces the
    teacher's forward pass by its cached top-k log-probabilities.
    """
    from peft import LoraConfig, get_peft_model

    cfg.check()
    if cfg.method == "qlora":
        check_qlora()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    adapter_dir = output / "adapter"
    torch.manual_seed(cfg.seed)
    student = student if student is not None else standalone_student(bank, name)
    if cfg.method == "qlora":
        quantize_nf4(student)
    targets = list(cfg.targets) or targets_for_plan(bank.profile(name).plan)
    lora = LoraConfig(r=cfg.rank, lora_alpha=2 * cfg.rank, lora_dropout=0.0, bias="none", target_modules=targets)
    peft_model = get_peft_model(student, lora)
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(cfg.seed)
    order = torch.cat([torch.randperm(len(blocks), generator=generator) for _ in range(math.ceil(cfg.steps * cfg.batch / max(1, len(blocks))) + 1)])
    ckpt = output / CHECKPOINT
    settings = {k: v for k, v in asdict(cfg).items() if k not in {"steps", "save_every"}}
    start_step, losses = _resume(ckpt, settings, blocks, peft_model, optimiser)
    teacher = bank.model
    device = next(teacher.parameters()).device
    began = time.perf_counter()
    bank.activate(FULL)
    step = start_step
    for step in range(start_step, cfg.steps):
        picked = order[step * cfg.batch:(step + 1) * cfg.batch]
        for group in optimiser.param_groups:
            group["lr"] = _lr_at(step, cfg)
        loss = _batch_loss(peft_model, teacher, blocks, picked, teacher_targets, cfg.lm_weight, device)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        losses.append(float(loss.detach()))
        if progress:
            progress(step + 1, cfg.steps, losses[-1])
        if (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            _save_checkpoint(ckpt, peft_model, optimiser, step + 1, losses, settings, blocks)
    train_s = time.perf_counter() - began
    peft_model.eval()
    save_in_plan_order(peft_model, bank, name, adapter_dir)
    ckpt.unlink(missing_ok=True)
    return HealResult(adapter_dir, cfg.steps, train_s, losses, sum(p.numel() for p in params),
                      (cfg.steps - start_step) * cfg.batch * blocks.shape[1], start_step)


def _resume(ckpt: Path, settings: dict[str, Any], blocks: torch.Tensor, peft_model: Any, optimiser: Any) -> tuple[int, list[float]]:
    """Load a resume checkpoint written with the same settings and blocks: (first step, losses so far)."""
    state = _read_checkpoint(ckpt) if ckpt.is_file() else None
    if state is None:
        return 0, []
    if state.get("settings") != settings or state.get("blocks") != list(blocks.shape):
        log.warning("ignoring %s: it was written with other settings", ckpt)
        return 0, []
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(peft_model, state["lora"])
    optimiser.load_state_dict(state["optimiser"])
    log.info("resuming healing at step %d", int(state["step"]))
    return int(state["step"]), list(state["losses"])


def _batch_loss(student: Any, teacher: Any, blocks: torch.Tensor, picked: torch.Tensor, teacher_targets: Any, lm_weight: float,
                device: Any) -> torch.Tensor:
    """Distillation loss of one batch: against the teacher's cached top-k, or its live forward pass."""
    ids = blocks[picked].to(device)
    if teacher_targets is None:
        with torch.no_grad():
            teacher_logits = teacher(ids, use_cache=False).logits
        return distill_loss(student(input_ids=ids, use_cache=False).logits, teacher_logits, ids, lm_weight)
    logits = student(input_ids=ids, use_cache=False).logits
    loss = topk_distill_loss(logits, teacher_targets.logprobs[picked].to(device), teacher_targets.indices[picked].to(device))
    if lm_weight:
        loss = loss + lm_weight * F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    return loss


def _read_checkpoint(path: Path) -> dict[str, Any] | None:
    """A resume checkpoint read with ``weights_only=True`` (tensors, numbers, strings and
    containers only: a checkpoint file cannot run code); None, with a warning, when it
    holds anything else or cannot be read, and healing starts over."""
    import pickle

    try:
        state = torch.load(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as err:
        log.warning("ignoring %s: not a plain healing checkpoint (%s)", path, str(err).splitlines()[0] if str(err) else type(err).__name__)
        return None
    return state if isinstance(state, dict) else None


def _save_checkpoint(path: Path, peft_model: Any, optimiser: Any, step: int, losses: list[float], settings: dict, blocks: torch.Tensor) -> None:
    from peft import get_peft_model_state_dict

    tmp = path.with_suffix(".tmp")
    torch.save({"lora": get_peft_model_state_dict(peft_model), "optimiser": optimiser.state_dict(), "step": step,
                "losses": losses, "settings": settings, "blocks": list(blocks.shape)}, tmp)
    tmp.replace(path)


def _save_adapter(peft_model: Any, directory: Path) -> None:
    """PEFT's own format; the LoRA factors are saved as float32 (small: rank 8)."""
    peft_model.save_pretrained(str(directory), save_embedding_layers=False)
    if not (directory / ADAPTER_CONFIG).is_file() or not (directory / ADAPTER_WEIGHTS).is_file():
        raise RuntimeError(f"PEFT did not write {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} in {directory}")


def save_in_plan_order(peft_model: Any, bank: Any, name: str, directory: Path) -> None:
    """Save the adapter with channel/head dimensions in the plan's index order (the
    contract :func:`casrap.profiles.adapter.merge_adapter_into` reads), whatever order the
    student's modules held them in (a reordered base lays them out by importance)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    from casrap.profiles.adapter import factors_to_plan_order

    profile = bank.profile(name)
    state = get_peft_model_state_dict(peft_model)
    set_peft_model_state_dict(peft_model, factors_to_plan_order(state, profile.layers, profile.plan))
    _save_adapter(peft_model, directory)
