"""Heal one profile end to end: healing text, training, plan JSON, before/after quality.

The healed plan is the pruned plan with ``name`` ``PROFILE+heal``, ``meta["adapter"]``
naming the adapter folder relative to the plan file (``adapter``; shipped plans use
``casrap-data:plans/...``) and ``meta["adapter_sha256"]`` pinning its bytes, so the plan
and its folder can be moved together and it is an action like any other: ``-p PLAN.json``
in every command, and the bank applies the adapter to the profile's modules
(:func:`casrap.profiles.adapter.apply_adapter`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from casrap.profiles.catalogue import FULL
from casrap.errors import InputError
from casrap.heal.train import HealConfig, HealResult, heal_profile
from casrap.profiles.plan import PruningPlan

log = logging.getLogger(__name__)
HEAL_SUFFIX = "+heal"


@dataclass
class HealReport:
    plan_path: Path
    adapter_dir: Path
    result: HealResult
    quality: dict[str, dict[str, float]] = field(default_factory=dict)
    gap_recovered: float | None = None
    memory_overhead_mb: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "plan": str(self.plan_path), "adapter": str(self.adapter_dir), "steps": self.result.steps,
            "train_s": self.result.train_s, "tokens_seen": self.result.tokens_seen, "resumed_from": self.result.resumed_from,
            "trainable_parameters": self.result.trainable_parameters,
            "loss_first": self.result.losses[0] if self.result.losses else None,
            "loss_last": self.result.losses[-1] if self.result.losses else None,
            "quality": self.quality, "gap_recovered": self.gap_recovered, "memory_overhead_mb": self.memory_overhead_mb,
        }


def healed_plan(plan: PruningPlan, adapter_reference: str, cfg: HealConfig, result: HealResult) -> PruningPlan:
    """The pruned plan renamed ``NAME+heal``, pointing at its adapter and pinning its SHA-256.

    :meth:`PruningPlan.save` writes an adapter path inside the plan's folder relative to
    the plan, so ``output/`` (plan + ``adapter/``) can be moved as a whole.
    """
    from casrap.profiles.adapter import ADAPTER_WEIGHTS, DIGEST_KEY, adapter_digest

    data = plan.to_dict()
    healed = PruningPlan.from_dict(data)
    healed.name = plan.name + HEAL_SUFFIX
    healed.description = f"{plan.description}; healed ({cfg.method} r={cfg.rank}, {cfg.steps} steps KL distillation)"
    healed.meta = {**plan.meta, "adapter": adapter_reference, "healed_from": plan.name,
                   "heal": {**{k: v for k, v in asdict(cfg).items() if k != "save_every"}, "train_s": round(result.train_s, 1),
                            "tokens_seen": result.tokens_seen, "loss_first": result.losses[0] if result.losses else None,
                            "loss_last": result.losses[-1] if result.losses else None,
                            "data": "calibration text + full-model samples on train-split prompts"}}
    folder = Path(adapter_reference)
    if folder.is_absolute() and (folder / ADAPTER_WEIGHTS).is_file():
        healed.meta[DIGEST_KEY] = adapter_digest(folder)
    return healed


def heal(
    lm: Any,
    bank: Any,
    name: str,
    cfg: HealConfig,
    output: Path,
    progress: Callable[[str, int, int, float], None] | None = None,
    evaluate: bool = True,
) -> HealReport:
    """Heal profile ``name`` (already in ``bank``); write ``output/NAME+heal.json`` + ``output/adapter``.

    ``progress(stage, done, total, loss)`` reports sampling ("sampling") and training
    ("healing") steps. With ``evaluate`` the healed plan is added to the bank and
    perplexity / KL of full, pruned and healed on test prose are returned.
    """
    from casrap.heal.data import healing_blocks
    from casrap.heal.evaluate import healable_plan

    plan = healable_plan(bank, name)
    blocks = healing_blocks(lm, bank.fingerprint, cfg, progress)
    output = Path(output)
    result = heal_profile(bank, name, blocks, output, cfg,
                          progress=(lambda s, n, loss: progress("healing", s, n, loss)) if progress else None)
    healed = healed_plan(plan, str(result.adapter_dir.resolve()), cfg, result)
    plan_path = healed.save(output / f"{healed.name}.json")  # saved relative to the plan: the folder can move
    report = HealReport(plan_path, result.adapter_dir, result)
    if evaluate:
        from casrap.heal.evaluate import gap_recovered, profile_quality, test_ids

        if healed.name in bank.names:
            bank.remove(healed.name)
        bank.add(healed)
        ids, corpus = test_ids(lm.tokenizer)
        quality = profile_quality(bank, [FULL, name, healed.name], ids, corpus)
        report.quality = {q.name: {"ppl": q.ppl, "kl": q.kl, "tokens": q.tokens, "corpus": q.corpus} for q in quality}
        report.gap_recovered = gap_recovered(quality[0].ppl, quality[1].ppl, quality[2].ppl)
        report.memory_overhead_mb = bank.memory_overhead_bytes(healed.name) / 2**20
    return report


def ship(plan_path: Path, model_dir: str) -> Path:
    """Maintainers: copy a healed plan and its adapter into ``casrap/data/plans/<model_dir>/``.

    The adapter goes beside the plan as ``NAME.adapter/`` and the shipped plan names it
    ``casrap-data:plans/<model_dir>/NAME.adapter``, so it resolves inside any install.
    Only the two adapter files are copied, the weights as float16 (about 4 MB at rank 8 on all
    seven projections of SmolLM2-135M).
    """
    import shutil

    from casrap.profiles.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, DIGEST_KEY, PACKAGE_PREFIX, adapter_digest, plan_adapter_path
    from casrap.profiles.shipped import PLANS_DIR, package_plans_dir

    plan = PruningPlan.load(plan_path)
    source = plan_adapter_path(plan)
    if source is None:
        raise InputError(f"{plan_path} is not a healed plan (no meta.adapter)")
    target_dir = package_plans_dir(model_dir)
    adapter_dir = target_dir / f"{plan.name}.adapter"
    adapter_dir.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import load_file, save_file

    shutil.copyfile(source / ADAPTER_CONFIG, adapter_dir / ADAPTER_CONFIG)
    tensors = {k: v.half().contiguous() for k, v in load_file(str(source / ADAPTER_WEIGHTS)).items()}  # halves the package size
    save_file(tensors, str(adapter_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    plan.meta["adapter"] = f"{PACKAGE_PREFIX}{PLANS_DIR}/{model_dir}/{adapter_dir.name}"
    plan.meta[DIGEST_KEY] = adapter_digest(adapter_dir)
    return plan.save(target_dir / f"{plan.name}.json")
