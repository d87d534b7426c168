"""Quality of profiles before and after healing, on held-out test prose only.

Perplexity and KL to the full model on :func:`casrap.measure.corpus.prose_split("test")`
(never calibration or healing text), and the share of the log-perplexity gap healing
recovers: (ln ppl_pruned - ln ppl_healed) / (ln ppl_pruned - ln ppl_full).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from casrap.errors import InputError

import torch

from casrap.measure.perplexity import mean_kl, next_token_logits, perplexity
from casrap.profiles.catalogue import FULL


@dataclass
class ProfileQuality:
    name: str
    ppl: float
    kl: float
    tokens: int
    corpus: str


def test_ids(tokenizer: Any, max_tokens: int | None = None) -> tuple[torch.Tensor, str]:
    """Token ids of the test third of the bundled prose, and its name."""
    return split_ids(tokenizer, "test", max_tokens)


@torch.inference_mode()
def profile_quality(bank: Any, names: list[str], ids: torch.Tensor, corpus: str, window: int = 512) -> list[ProfileQuality]:
    """Sliding-window perplexity and mean KL(full || profile) over non-overlapping windows."""
    chunks = [ids[i:i + window] for i in range(0, len(ids), window) if len(ids[i:i + window]) > 1]
    with bank.using(FULL):
        reference = [next_token_logits(bank.model, c.unsqueeze(0)) for c in chunks]
    results = []
    for name in names:
        with bank.using(name):
            ppl = perplexity(bank.model, ids, window=window, stride=window // 2, corpus=corpus)
            kls = [mean_kl(ref, next_token_logits(bank.model, chunk.unsqueeze(0))) * len(chunk) for chunk, ref in zip(chunks, reference)]
        results.append(ProfileQuality(name, ppl.ppl, sum(kls) / sum(len(c) for c in chunks), ppl.tokens, corpus))
    return results


def gap_recovered(ppl_full: float, ppl_pruned: float, ppl_healed: float) -> float:
    """Share of the log-perplexity gap closed by healing (1 = back to the full model)."""
    gap = math.log(ppl_pruned) - math.log(ppl_full)
    return (math.log(ppl_pruned) - math.log(ppl_healed)) / gap if gap > 0 else float("nan")


def split_ids(tokenizer: Any, split: str, max_tokens: int | None = None) -> tuple[torch.Tensor, str]:
    """Token ids of one third of the bundled prose (``validation`` picks, ``test`` reports)."""
    from casrap.measure.corpus import prose_split

    corpus = prose_split(split)
    ids = tokenizer(corpus.text, return_tensors="pt").input_ids[0]
    return (ids[:max_tokens] if max_tokens else ids), corpus.name


@dataclass
class Candidate:
    """One healing run of a sweep: its settings, where it wrote, and its validation quality."""

    lr: float
    steps: int
    name: str
    plan: Any
    result: Any
    validation_ppl: float = float("nan")
    validation_gap: float = float("nan")


def parse_select(text: str | None) -> dict[str, list[float]]:
    """``lr=1e-3,3e-3;steps=75,150`` -> {"lr": [...], "steps": [...]} (empty: no sweep)."""
    from casrap.errors import InputError

    grid: dict[str, list[float]] = {}
    for part in (text or "").replace(" ", "").split(";"):
        if not part:
            continue
        key, _, values = part.partition("=")
        if key not in ("lr", "steps") or not values:
            raise InputError(f"--select {part!r}: use lr=A,B,... and/or steps=N,M,... separated by ';'")
        try:
            grid[key] = [float(v) for v in values.split(",") if v]
        except ValueError as err:
            raise InputError(f"--select {part!r}: values must be numbers") from err
        if not grid[key] or any(v <= 0 for v in grid[key]):
            raise InputError(f"--select {part!r}: values must be positive")
    return grid


def _shipped_healed(bank: Any, healed_name: str) -> str | None:
    """Add the shipped plan ``healed_name`` for this model to the bank (as ``shipped:NAME``);
    None when none ships (or it cannot be built here)."""
    from casrap.errors import CasrapError
    from casrap.profiles.shipped import is_shipped, load_shipped

    if not is_shipped(healed_name):
        return None
    try:
        plan = load_shipped(healed_name, bank.fingerprint)
    except CasrapError:
        return None
    plan.name = f"shipped:{healed_name}"
    if plan.name in bank.names:
        bank.remove(plan.name)
    bank.add(plan)
    return plan.name


def heal_selected(
    lm: Any, bank: Any, name: str, cfg: Any, output: Any, healed_plan: Any, select: dict[str, list[float]] | None = None,
    progress: Any = None,
) -> dict[str, Any]:
    """Heal ``name`` once per (lr, steps) of ``select``, keep the best on the *validation*
    prose, report full / pruned / healed on validation and test prose and the wall time.

    Why: the learning rate and step count that minimise the healing loss overfit the
    healing text; validation prose (never trained on, never reported) picks them, and the
    test prose is read once, for the winner only. The teacher's top-k targets are
    computed once (cached on disk) and shared by every candidate. ``healed_plan(plan,
    adapter_dir, cfg, result)`` makes the ``NAME+heal`` plan
    (:func:`casrap.heal.runner.healed_plan`; passed in because the runner imports this module).
    """
    import time
    from dataclasses import replace
    from pathlib import Path

    from casrap.heal.data import healing_blocks, teacher_targets
    from casrap.heal.train import targets_for_plan

    began = time.perf_counter()
    plan = healable_plan(bank, name)
    cfg = replace(cfg, targets=list(cfg.targets) or targets_for_plan(plan))
    blocks = healing_blocks(lm, bank.fingerprint, cfg, progress)
    teacher = None
    if cfg.topk:
        with bank.using(FULL):
            teacher = teacher_targets(bank.model, blocks, bank.fingerprint, k=cfg.topk,
                                      progress=(lambda i, n: progress("teacher", i, n, 0.0)) if progress else None)
    output = Path(output)
    candidates, healed_name = _train_candidates(bank, name, plan, blocks, teacher, cfg, select or {}, output, healed_plan, progress)
    val, val_corpus, shipped_val = _validate(bank, lm, name, candidates, healed_name)
    best = min(candidates, key=lambda c: c.validation_ppl)
    final = _keep_best(bank, plan, cfg, candidates, best, output, healed_plan)
    final.meta["heal"]["data"] = (f"calibration text + {cfg.samples} full-model answers to train-split prompts + "
                                  f"{cfg.continuations} full-model continuations of calibration sentences")
    final.meta["heal"]["selected_on"] = val_corpus
    final.meta["heal"]["candidates"] = [{"lr": c.lr, "steps": c.steps, "validation_ppl": round(c.validation_ppl, 3)} for c in candidates]
    plan_path = final.save(output / f"{final.name}.json")
    test_ids_, test_corpus = split_ids(lm.tokenizer, "test")
    test = profile_quality(bank, [FULL, name, final.name], test_ids_, test_corpus)
    best_val = next(q for q in val if q.name == best.name)
    return {
        "plan": str(plan_path), "adapter": str(Path(final.meta["adapter"])), "profile": name, "targets": cfg.targets,
        "lr": best.lr, "steps": best.steps, "train_s": best.result.train_s, "tokens_seen": best.result.tokens_seen,
        "resumed_from": best.result.resumed_from, "trainable_parameters": best.result.trainable_parameters,
        "loss_first": best.result.losses[0] if best.result.losses else None,
        "loss_last": best.result.losses[-1] if best.result.losses else None,
        "healing_blocks": len(blocks), "teacher_topk": cfg.topk, "teacher_cache": str(teacher.path) if teacher and teacher.path else None,
        "candidates": [{"lr": c.lr, "steps": c.steps, "validation_ppl": c.validation_ppl, "validation_gap_recovered": c.validation_gap,
                        "train_s": c.result.train_s} for c in candidates],
        "quality": {
            "validation": {q.name if q.name != best.name else final.name: _quality_row(q) for q in (val[0], val[1], best_val)},
            "test": {q.name: _quality_row(q) for q in test},
        },
        "gap_recovered": {"validation": best.validation_gap, "test": gap_recovered(test[0].ppl, test[1].ppl, test[2].ppl)},
        "shipped_validation_ppl": shipped_val.ppl if shipped_val else None,
        "better_than_shipped": (best.validation_ppl < shipped_val.ppl) if shipped_val else None,
        "memory_overhead_mb": bank.memory_overhead_bytes(final.name) / 2**20,
        "wall_s": time.perf_counter() - began,
    }


def _quality_row(q: ProfileQuality) -> dict[str, Any]:
    return {"ppl": q.ppl, "kl": q.kl, "tokens": q.tokens, "corpus": q.corpus}


def _train_candidates(bank: Any, name: str, plan: Any, blocks: torch.Tensor, teacher: Any, cfg: Any, grid: dict[str, list[float]],
                      output: Any, healed_plan: Any, progress: Any) -> tuple[list[Candidate], str]:
    """One healing run per (lr, steps) of ``grid``, each added to the bank; the candidates and the healed name."""
    from dataclasses import replace

    from casrap.heal.train import heal_profile

    lrs = grid.get("lr") or [cfg.lr]
    steps_list = [int(s) for s in grid.get("steps") or [cfg.steps]]
    sweep = len(lrs) * len(steps_list) > 1
    candidates: list[Candidate] = []
    healed_name = ""
    for lr in lrs:
        for steps in steps_list:
            c_cfg = replace(cfg, lr=lr, steps=steps)
            c_out = output / f"lr{lr:g}-steps{steps}" if sweep else output
            label = f"lr {lr:g} steps {steps}"
            result = heal_profile(bank, name, blocks, c_out, c_cfg, teacher_targets=teacher,
                                  progress=(lambda s, n, loss, label=label: progress(f"healing {label}", s, n, loss)) if progress else None)
            healed = healed_plan(plan, str(result.adapter_dir.resolve()), c_cfg, result)
            healed_name = healed.name
            if sweep:
                healed.name = f"{healed_name}@lr{lr:g}-s{steps}"
            candidates.append(Candidate(lr, steps, healed.name, healed, result))
    for c in candidates:
        if c.name in bank.names:
            bank.remove(c.name)
        bank.add(c.plan)
    return candidates, healed_name


def _validate(bank: Any, lm: Any, name: str, candidates: list[Candidate], healed_name: str) -> tuple[list[ProfileQuality], str, ProfileQuality | None]:
    """Full, pruned and every candidate (and the shipped adapter, if one ships) on the validation prose."""
    shipped = _shipped_healed(bank, healed_name)  # the adapter a new one must beat to replace it
    val_ids, val_corpus = split_ids(lm.tokenizer, "validation")
    val = profile_quality(bank, [FULL, name, *[c.name for c in candidates], *([shipped] if shipped else [])], val_ids, val_corpus)
    shipped_val = val.pop() if shipped else None
    if shipped:
        bank.remove(shipped)
    for c, q in zip(candidates, val[2:]):
        c.validation_ppl, c.validation_gap = q.ppl, gap_recovered(val[0].ppl, val[1].ppl, q.ppl)
    return val, val_corpus, shipped_val


def _keep_best(bank: Any, plan: Any, cfg: Any, candidates: list[Candidate], best: Candidate, output: Any, healed_plan: Any) -> Any:
    """The winner's plan; after a sweep its adapter is copied to ``output/adapter`` and only it stays in the bank."""
    import shutil
    from dataclasses import replace

    if len(candidates) == 1:
        return best.plan
    adapter_dir = output / "adapter"
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    shutil.copytree(best.result.adapter_dir, adapter_dir)
    final = healed_plan(plan, str(adapter_dir.resolve()), replace(cfg, lr=best.lr, steps=best.steps), best.result)
    for c in candidates:
        bank.remove(c.name)
    if final.name in bank.names:
        bank.remove(final.name)
    bank.add(final)
    return final


def healable_plan(bank: Any, name: str) -> Any:
    """The plan of profile ``name`` if healing applies to it; one-line error otherwise."""
    from casrap.pruners.sparse24 import sparse24_layers

    if name == FULL:
        raise InputError("the full model has nothing to heal; give a pruned profile (layers-25, ffn-25, a plan .json)")
    plan = bank.profile(name).plan
    if plan.functional or plan.ranks or sparse24_layers(plan):
        raise InputError(f"profile {name!r}: healing applies to structural head/FFN/layer plans (not masked, low-rank or 2:4 ones)")
    if plan.meta.get("adapter"):
        raise InputError(f"profile {name!r} is already healed")
    return plan
