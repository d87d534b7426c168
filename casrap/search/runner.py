"""``casrap search``: run the encodings on a model, compare with simple rules, save plans.

Data hygiene: perplexity fitness uses the *search* third of the bundled prose (or
WikiText-2), the winner is checked on *validation*, and the comparison table uses only
the *test* third; the safety task splits the same way (see :mod:`casrap.search.data`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from casrap.measure.corpus import EVALUATION_SPLITS, OFFLINE_CORPUS, load_corpus, prose_split
from casrap.models.architecture import decoder_layers, describe, head_dim_of
from casrap.profiles.bank import ProfileBank
from casrap.profiles.plan import PruningPlan
from casrap.pruners.heads import plan_kv_groups
from casrap.pruners.importance import Importance, load_or_calibrate
from casrap.pruners.layers import plan_skip_layers, skip_last_layers
from casrap.search import ga
from casrap.search.data import LabelledPrompt, load_safety_task
from casrap.search.fitness import PerplexityScorer, SafetyScorer, plan_sparsity

ENCODINGS = ("rates", "layers", "heads", "nsga2", "ranks")
DEFAULT_ENCODINGS = ("rates", "layers", "heads", "nsga2")  # ranks: opt in (`-e ranks`), it fits a PCA basis
EVAL_PROFILE = "__eval__"
T = TypeVar("T")


@dataclass
class SearchRun:
    """What ``casrap search`` was asked for."""

    encodings: tuple[str, ...] = DEFAULT_ENCODINGS
    sparsities: tuple[float, ...] = (0.2, 0.4)
    head_sparsity: float = 0.2
    tokens: int = 512
    task_data: str = "auto"
    alpha: float = 1.0  # heads: weight of the sparsity shortfall penalty
    beta: float = 0.5  # heads: weight of the pruned-importance penalty
    ppl_tolerance: float = 0.1  # ranks: binary search keeps search ppl <= (1 + tolerance) x full
    config: ga.SearchConfig = field(default_factory=ga.SearchConfig)


def token_thirds(tokenizer: Any, tokens: int) -> tuple[str, list[torch.Tensor]]:
    """Search / validation / test blocks: interleaved thirds of WikiText-2's test split where
    reachable, else the fixed thirds of the bundled prose (:func:`prose_split`); never
    calibration text."""
    corpus = load_corpus("auto")
    if corpus.name.startswith(OFFLINE_CORPUS):
        name, texts = OFFLINE_CORPUS, [prose_split(split).text for split in EVALUATION_SPLITS]
    else:
        paragraphs = corpus.paragraphs()
        name, texts = corpus.name, ["\n\n".join(paragraphs[part::3]) for part in range(3)]
    return name, [tokenizer(text, return_tensors="pt").input_ids[0][:tokens] for text in texts]


@torch.inference_mode()
def task_head_importance(model: Any, tokenizer: Any, prompts: list[LabelledPrompt], group_size: int) -> torch.Tensor:
    """[layers, kv groups]: how differently each group's heads act on unsafe vs safe prompts.

    Per prompt, the mean norm of each head's output contribution; per head, the gap
    between the class means over the pooled standard deviation; summed per group and
    normalised to sum to 1.
    """
    layers = decoder_layers(model)
    d = head_dim_of(model)
    rows: list[list[torch.Tensor]] = []
    current: list[torch.Tensor] = []

    def hook(module: Any, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].float()
        w = module.weight.float().view(module.weight.shape[0], -1, d)
        contrib = torch.einsum("bthd,Dhd->bthD", x.view(*x.shape[:2], -1, d), w)
        current.append(contrib.norm(dim=-1).mean(dim=(0, 1)).cpu())

    handles = [layer.self_attn.o_proj.register_forward_pre_hook(hook) for layer in layers]
    try:
        for p in prompts:
            current.clear()
            model(tokenizer(p.prompt, return_tensors="pt").input_ids.to(next(model.parameters()).device), use_cache=False)
            rows.append(list(current))
    finally:
        for h in handles:
            h.remove()
    acts = torch.stack([torch.stack(r) for r in rows])  # [N, L, H]
    labels = torch.tensor([p.unsafe for p in prompts])
    a, b = acts[labels], acts[~labels]
    gap = (a.mean(0) - b.mean(0)).abs() / (torch.sqrt((a.var(0) + b.var(0)) / 2) + 1e-6)
    groups = gap.view(gap.shape[0], -1, group_size).sum(-1)
    return groups / groups.sum()


def _evaluate(bank: ProfileBank, plan: PruningPlan, score: Callable[[], T]) -> T:
    """Score a plan once as the temporary profile ``EVAL_PROFILE`` (removed afterwards)."""
    plan.name = EVAL_PROFILE
    bank.add(plan)
    try:
        with bank.using(plan.name):
            return score()
    finally:
        bank.remove(plan.name)


def _ppl_eval(bank: ProfileBank, plan: PruningPlan, scorer: PerplexityScorer) -> tuple[float, tuple[float, float]]:
    return _evaluate(bank, plan, scorer.ppl_with_ci)


def _task_eval(bank: ProfileBank, plan: PruningPlan, scorer: SafetyScorer) -> tuple[float, tuple[float, float]]:
    return _evaluate(bank, plan, scorer.auroc_with_ci)


def _row(method: str, sparsity: float, split_scores: dict[str, tuple[float, tuple[float, float]]], n: dict[str, int]) -> dict[str, Any]:
    row: dict[str, Any] = {"method": method, "sparsity": sparsity}
    for split, (value, ci) in split_scores.items():
        row[split] = value
        row[f"{split}_ci95"] = list(ci)
        row[f"{split}_n"] = n[split]
    return row


def run_search(
    model: Any,
    tokenizer: Any,
    run: SearchRun,
    out_dir: Path,
    plans_dir: Path,
    importance: Importance | None = None,
    base_model: str = "",
    log: Callable[[str, ga.GenerationLog], None] | None = None,
) -> dict[str, Any]:
    info = describe(model)
    imp = importance or load_or_calibrate(model, tokenizer)[0]
    bank = ProfileBank(model, base_model)
    corpus_name, (search_ids, val_ids, test_ids) = token_thirds(tokenizer, run.tokens)
    ppl = {s: PerplexityScorer(model, ids) for s, ids in zip(("search", "validation", "test"), (search_ids, val_ids, test_ids))}
    n_tok = {s: int(ids.numel() - 1) for s, ids in zip(("search", "validation", "test"), (search_ids, val_ids, test_ids))}
    report: dict[str, Any] = {"model": base_model, "corpus": corpus_name, "importance": imp.source, "config": asdict(run.config), "results": {}}
    plans_dir.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    full = {s: sc.ppl_with_ci() for s, sc in ppl.items()}
    report["full_model_ppl"] = {s: v[0] for s, v in full.items()}
    cfg = run.config

    def note(encoding: str) -> Callable[[ga.GenerationLog], None]:
        def inner(entry: ga.GenerationLog) -> None:
            with (out_dir / "generations.jsonl").open("a") as handle:
                handle.write(json.dumps({"encoding": encoding, **asdict(entry)}) + "\n")
            if log:
                log(encoding, entry)
        return inner

    if "rates" in run.encodings:
        rows = []
        for target in run.sparsities:
            evaluator = ga.MemoEvaluator(bank, lambda g: ga.rates_plan(g, imp.ffn), lambda p: (-ppl["search"].ppl(), {}))
            result = ga.run_rates_ga(info.layers, target, evaluator, cfg, note(f"rates-{int(100 * target)}"))
            best = ga.rates_plan(result.best_genome, imp.ffn)
            uniform = ga.rates_plan([target] * info.layers, imp.ffn)
            for method, plan in (("GA per-layer rates", best), ("uniform", uniform)):
                scores = {s: _ppl_eval(bank, PruningPlan(**{**asdict(plan), "name": "x"}), ppl[s]) for s in ("validation", "test")}
                rows.append(_row(method, plan_sparsity(plan, info), scores, n_tok) | {"ffn_sparsity": target})
            name = f"rates-ga-{int(100 * target)}"
            saved = ga.rates_plan(result.best_genome, imp.ffn, functional=False)
            saved.name, saved.base_model = name, base_model
            saved.description = f"GA per-layer FFN rates, {100 * target:.0f}% of FFN channels"
            saved.meta = {"search": "rates", "rates": result.best_genome, "evaluations": result.evaluations}
            saved.save(plans_dir / f"{name}.json")
            report["results"][name] = {"history": [asdict(h) for h in result.history], "rates": result.best_genome}
        report["rates_table"] = rows

    if "layers" in run.encodings:
        rows = []
        for target in run.sparsities:
            k = max(1, int(round(target * info.layers)))
            evaluator = ga.MemoEvaluator(bank, ga.layers_plan, lambda p: (-ppl["search"].ppl(), {}))
            result = ga.run_binary_ga(f"layers-{k}", info.layers, k / info.layers, lambda g, r: ga.repair_layer_set(g, k, r), evaluator, cfg, note(f"layers-k{k}"))
            candidates = {
                "GA layer set": ga.layers_plan(result.best_genome),
                "last k": PruningPlan(name="x", skip_layers=skip_last_layers(info.layers, k)),
                "block influence": PruningPlan(name="x", skip_layers=plan_skip_layers(imp.layers, k / info.layers + 1e-9)),
            }
            for method, plan in candidates.items():
                scores = {s: _ppl_eval(bank, plan, ppl[s]) for s in ("validation", "test")}
                rows.append(_row(method, plan_sparsity(plan, info), scores, n_tok) | {"k": k, "layers": plan.skip_layers})
            saved = ga.layers_plan(result.best_genome)
            saved.name, saved.base_model = f"layers-ga-k{k}", base_model
            saved.description = f"GA layer set, {k} layers skipped: {saved.skip_layers}"
            saved.save(plans_dir / f"{saved.name}.json")
            report["results"][saved.name] = {"history": [asdict(h) for h in result.history], "skip": saved.skip_layers}
        report["layers_table"] = rows

    if "heads" in run.encodings:
        task = load_safety_task(run.task_data, seed=cfg.seed)
        scorers = {"search": SafetyScorer(model, tokenizer, task.search), "validation": SafetyScorer(model, tokenizer, task.validation), "test": SafetyScorer(model, tokenizer, task.test)}
        n_task = {"search": len(task.search), "validation": len(task.validation), "test": len(task.test)}
        group_imp = task_head_importance(model, tokenizer, task.search, info.group_size)
        target = run.head_sparsity
        attention_share = info.parameters.attention / (info.parameters.attention + info.parameters.mlp)

        def head_score(plan: PruningPlan) -> tuple[float, dict[str, float]]:
            groups_removed = sum(info.kv_heads - len(v["kv"]) for v in plan.heads.values())
            sparsity = groups_removed / (info.layers * info.kv_heads)
            pruned_importance = float(sum(group_imp[l, g] for l in range(info.layers) for g in range(info.kv_heads)
                                          if l in plan.heads and g not in plan.heads[l]["kv"]))
            task_score = scorers["search"].auroc()
            terms = {"task": task_score, "sparsity_penalty": run.alpha * max(0.0, target - sparsity) / target,
                     "importance_penalty": run.beta * pruned_importance, "sparsity": sparsity}
            return task_score - terms["sparsity_penalty"] - terms["importance_penalty"], terms

        evaluator = ga.MemoEvaluator(bank, lambda g: ga.heads_plan(g, info), head_score)
        length = info.layers * info.kv_heads
        result = ga.run_binary_ga("heads", length, 1.0 - target, lambda g, r: ga.repair_heads(g, info.layers, info.kv_heads, r), evaluator, cfg, note("heads"))
        best = ga.heads_plan(result.best_genome, info)
        removed = sum(info.kv_heads - len(v["kv"]) for v in best.heads.values())
        ranked_heads, _ = plan_kv_groups(imp.kv_groups(info.group_size), info.group_size, removed / length + 1e-9)
        ranked = PruningPlan(name="x", heads=ranked_heads, functional=True)
        rows = []
        full_plan = PruningPlan(name="x")
        for method, plan in (("GA head mask", best), ("importance-ranked groups", ranked), ("full model", full_plan)):
            scores = {s: _task_eval(bank, PruningPlan(**{**asdict(plan), "name": "x"}), scorers[s]) for s in ("validation", "test")}
            rows.append(_row(method, plan_sparsity(plan, info), scores, n_task) | {"groups_removed": sum(info.kv_heads - len(v["kv"]) for v in plan.heads.values())})
        report["heads_table"] = rows
        report["heads_task"] = {"source": task.source, "attention_share": attention_share, "best_terms": evaluator(result.best_genome)[1]}
        saved = ga.heads_plan(result.best_genome, info, functional=False)
        saved.name, saved.base_model = "heads-ga", base_model
        saved.description = f"GA head mask: {removed}/{length} kv groups removed (safety task)"
        saved.save(plans_dir / "heads-ga.json")
        report["results"]["heads-ga"] = {"history": [asdict(h) for h in result.history], "mask": result.best_genome}

    if "nsga2" in run.encodings:
        def objectives(genome: list[int]) -> tuple[float, float]:
            return _evaluate(bank, ga.layers_plan(genome), lambda: (ppl["search"].ppl(), bank.ideal_speedup(EVAL_PROFILE)))

        result = ga.run_nsga2(info.layers, objectives, cfg, note("nsga2"))
        baselines = {}
        for k in range(1, info.layers // 2 + 1, max(1, info.layers // 10)):
            for method, skip in (("last k", skip_last_layers(info.layers, k)), ("block influence", plan_skip_layers(imp.layers, k / info.layers + 1e-9))):
                baselines.setdefault(method, []).append(objectives([int(i in skip) for i in range(info.layers)]))
        report["pareto"] = {"front": [{"skip": [i for i, b in enumerate(g) if b], "ppl": f[0], "ideal_speedup": f[1]} for g, f in result.front],
                            "baselines": {m: [{"ppl": p, "ideal_speedup": s} for p, s in v] for m, v in baselines.items()}}
    if "ranks" in run.encodings:
        from casrap.search.ranks import run_ranks

        if bank.lowrank_basis is None:
            from casrap.pruners.lowrank import load_or_fit_basis

            bank.lowrank_basis = load_or_fit_basis(model, tokenizer, key=bank.fingerprint)
        found = run_ranks(bank, lambda plan, split: _ppl_eval(bank, plan, ppl[split]), ppl["search"].ppl, n_tok, run.sparsities,
                          cfg, run.ppl_tolerance, full["search"][0], note)
        for name, plan in found.pop("ranks_plans").items():
            plan.base_model, plan.fingerprint = base_model, bank.fingerprint
            plan.save(plans_dir / f"{name}.json")
        report["results"].update(found.pop("ranks_results"))
        report.update(found)
        report["lowrank_basis"] = bank.lowrank_basis.source
    (out_dir / "search.json").write_text(json.dumps(report, indent=1, default=float))
    return report
