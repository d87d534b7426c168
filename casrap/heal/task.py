"""Task tuning, the guided head-pruning system's last phase: LoRA on the safety task.

The safety task (:func:`casrap.search.data.load_safety_task`) is split three ways,
fixed by seed; tuning reads the *search* and *validation* thirds (together, the task's
train split) and AUROC is reported on the *test* third only. The model reads the same
classification prompt the search scores (:data:`casrap.search.fitness.CLASSIFY`) and is
trained with cross-entropy over the two answers " safe" / " unsafe" at the answer
position; the score is ``logit(unsafe) - logit(safe)`` as in the search.

Four figures: full model, full model tuned, pruned, pruned and tuned — so the reader sees
whether tuning, not pruning, is what moves the score.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from casrap.profiles.catalogue import FULL
from casrap.heal.train import HealConfig, _lr_at, save_in_plan_order, standalone_student


@dataclass
class TaskReport:
    plan_path: Path
    adapter_dir: Path
    source: str
    train_n: int
    test_n: int
    auroc: dict[str, float]
    train_s: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {"plan": str(self.plan_path), "adapter": str(self.adapter_dir), "task": "safety", "task_source": self.source,
                "train_n": self.train_n, "test_n": self.test_n, "auroc": self.auroc, "train_s": self.train_s}


class _Batch:
    """Classification prompts right-padded, with the answer position and label per row."""

    def __init__(self, tokenizer: Any, prompts: list[Any]) -> None:
        from casrap.search.fitness import CLASSIFY

        enc = tokenizer([CLASSIFY.format(prompt=p.prompt) for p in prompts], return_tensors="pt", padding=True, padding_side="right")
        self.ids, self.mask = enc.input_ids, enc.attention_mask
        self.last = self.mask.sum(1) - 1
        self.labels = torch.tensor([int(p.unsafe) for p in prompts])
        self.answer_ids = [tokenizer(" safe", add_special_tokens=False).input_ids[0], tokenizer(" unsafe", add_special_tokens=False).input_ids[0]]

    def two_way_logits(self, model: Any, rows: torch.Tensor | None = None) -> torch.Tensor:
        rows = torch.arange(len(self.ids)) if rows is None else rows
        device = next(model.parameters()).device
        logits = model(input_ids=self.ids[rows].to(device), attention_mask=self.mask[rows].to(device), use_cache=False).logits
        final = logits[torch.arange(len(rows), device=device), self.last[rows].to(device)]
        return final[:, self.answer_ids].float()


def _auroc(model: Any, batch: _Batch) -> float:
    from casrap.search.fitness import auroc

    with torch.inference_mode():
        two = batch.two_way_logits(model)
    scores = (two[:, 1] - two[:, 0]).cpu().numpy()
    return auroc(scores, batch.labels.numpy().astype(bool))


def _tune(student: Any, train: _Batch, cfg: HealConfig, progress: Callable[[int, int, float], None] | None) -> tuple[Any, float]:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(cfg.seed)
    peft_model = get_peft_model(student, LoraConfig(r=cfg.rank, lora_alpha=2 * cfg.rank, lora_dropout=0.0, bias="none",
                                                    target_modules=list(cfg.targets)))
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(cfg.seed)
    began = time.perf_counter()
    batch = min(cfg.batch * 2, len(train.ids))
    for step in range(cfg.steps):
        rows = torch.randperm(len(train.ids), generator=generator)[:batch]
        for group in optimiser.param_groups:
            group["lr"] = _lr_at(step, cfg)
        loss = F.cross_entropy(train.two_way_logits(peft_model, rows), train.labels[rows].to(next(peft_model.parameters()).device))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        if progress:
            progress(step + 1, cfg.steps, float(loss.detach()))
    peft_model.eval()
    return peft_model, time.perf_counter() - began


def tune_for_task(
    lm: Any, bank: Any, name: str, cfg: HealConfig, output: Path, source: str = "auto",
    progress: Callable[[str, int, int, float], None] | None = None,
) -> TaskReport:
    """Tune the full model and profile ``name`` on the safety task's train split; AUROC on test.

    Writes ``output/NAME+safety.json`` (the tuned pruned variant, an action like any
    other) with its adapter in ``output/adapter``; the tuned full model's adapter goes to
    ``output/full-adapter`` for comparison.
    """
    from casrap.heal.runner import healed_plan
    from casrap.heal.train import HealResult
    from casrap.search.data import load_safety_task

    task = load_safety_task(source, seed=cfg.seed)
    train_prompts = task.search + task.validation
    train, test = _Batch(lm.tokenizer, train_prompts), _Batch(lm.tokenizer, task.test)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    scores: dict[str, float] = {}
    seconds: dict[str, float] = {}
    with bank.using(FULL):
        scores["full"] = _auroc(bank.model, test)
    with bank.using(name):
        scores["pruned"] = _auroc(bank.model, test)
    adapter_dir = output / "adapter"
    for label, profile, folder in (("full_tuned", FULL, output / "full-adapter"), ("pruned_tuned", name, adapter_dir)):
        tuned, seconds[label] = _tune(standalone_student(bank, profile), train, cfg,
                                      (lambda s, n, loss, lab=label: progress(f"tuning {lab}", s, n, loss)) if progress else None)
        scores[label] = _auroc(tuned, test)
        save_in_plan_order(tuned, bank, profile, folder)
        del tuned
    plan = bank.profile(name).plan
    result = HealResult(adapter_dir, cfg.steps, seconds["pruned_tuned"], [], 0, 0)
    tuned_plan = healed_plan(plan, str(adapter_dir.resolve()), cfg, result)
    tuned_plan.name = f"{plan.name}+safety"
    tuned_plan.description = f"{plan.description}; LoRA-tuned on the safety task's train split"
    tuned_plan.meta["heal"]["data"] = f"safety task train split ({task.source}, n={len(train_prompts)})"
    tuned_plan.meta["heal"]["auroc_test"] = {k: round(v, 4) for k, v in scores.items()}
    path = tuned_plan.save(output / f"{tuned_plan.name}.json")
    return TaskReport(path, adapter_dir, task.source, len(train_prompts), len(task.test), scores, seconds)


__all__ = ["TaskReport", "tune_for_task"]
