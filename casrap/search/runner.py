"""``casrap search``: run the encodings on a model, compare with simple rules, save plans.

Data hygiene: fitness uses only the *search* split of the bundled prose
(``prose_split("search")``), the winner is picked on *validation*
(``prose_split("validation")``), and the comparison tables report *test*
(``prose_split("test")``) with n tokens; calibration text is never any of them. The
safety task splits the same way (see :mod:`casrap.search.data`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from casrap.measure.corpus import EVALUATION_SPLITS, OFFLINE_CORPUS, prose_split
from casrap.models.architecture import decoder_layers, describe, head_dim_of
from casrap.profiles.bank import ProfileBank
from casrap.profiles.plan import PruningPlan
from casrap.pruners.heads import plan_kv_groups
from casrap.pruners.importance import Importance, load_or_calibrate
from casrap.pruners.layers import plan_skip_layers, skip_last_layers
from casrap.search import ga
from casrap.search.data import LabelledPrompt, load_safety_task
from casrap.search.evolve import EvolveContext
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
    fitness: str = "kl"  # rates / layers: kl | ppl | lm-eval (see casrap.search.scoring)
    time_budget: float | None = None  # seconds per rates / layers search (each target)
    eval_tokens: int = 0  # validation / test tokens (0 = the whole split)
    finalists: int = 5  # top genomes by search fitness compared on validation
    level_step: float = 0.05  # rates: one level of the level-switch mutation
    model_spec: str = ""  # loader spec Ray workers rebuild the model from
    workers: int = 0  # Ray workers (0 = evaluate in this process)
    ray_address: str | None = None  # an existing Ray cluster (None = a local Ray when workers > 0)
    lm_eval_task: str = "casrap_local"
    lm_eval_limit: int | None = None
    ship_dir: Path | None = None  # also write ga-* plans here (casrap/data/plans/<model>/)


def token_thirds(tokenizer: Any, tokens: int, eval_tokens: int = 0) -> tuple[str, list[torch.Tensor]]:
    """Search / validation / test blocks from the fixed prose splits (:func:`prose_split`);
    never calibration text. Search keeps its first ``tokens``; validation and test keep
    ``eval_tokens`` (0 = the whole split)."""
    blocks = [tokenizer(prose_split(split).text, return_tensors="pt").input_ids[0] for split in EVALUATION_SPLITS]
    cut = [tokens, eval_tokens or None, eval_tokens or None]
    return OFFLINE_CORPUS, [ids[:n] for ids, n in zip(blocks, cut)]


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
    with bank.scratch(plan, EVAL_PROFILE):
        return score()


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


@dataclass
class _Context:
    """What every encoding's search shares within one ``run_search``."""

    model: Any
    tokenizer: Any
    run: SearchRun
    bank: ProfileBank
    imp: Importance
    info: Any
    blocks: dict[str, torch.Tensor]  # search / validation / test token blocks
    ppl: dict[str, PerplexityScorer]
    n_tok: dict[str, int]
    full: dict[str, tuple[float, tuple[float, float]]]
    plans_dir: Path
    base_model: str
    note: Callable[[str], Callable[[ga.GenerationLog], None]]


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
    """Every encoding ``run`` asks for, in order; the report (also written to ``out_dir/search.json``)."""
    imp = importance or load_or_calibrate(model, tokenizer)[0]
    bank = ProfileBank(model, base_model)
    corpus_name, thirds = token_thirds(tokenizer, run.tokens, run.eval_tokens)
    blocks = dict(zip(("search", "validation", "test"), thirds))
    ppl = {s: PerplexityScorer(model, ids) for s, ids in blocks.items()}
    report: dict[str, Any] = {"model": base_model, "corpus": corpus_name, "importance": imp.source, "config": asdict(run.config), "results": {}}
    plans_dir.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    full = {s: sc.ppl_with_ci() for s, sc in ppl.items()}
    report["full_model_ppl"] = {s: v[0] for s, v in full.items()}

    def note(encoding: str) -> Callable[[ga.GenerationLog], None]:
        def inner(entry: ga.GenerationLog) -> None:
            with (out_dir / "generations.jsonl").open("a") as handle:
                handle.write(json.dumps({"encoding": encoding, **asdict(entry)}) + "\n")
            if log:
                log(encoding, entry)
        return inner

    ctx = _Context(model, tokenizer, run, bank, imp, describe(model), blocks, ppl,
                   {s: int(ids.numel() - 1) for s, ids in blocks.items()}, full, plans_dir, base_model, note)
    if "rates" in run.encodings or "layers" in run.encodings:
        _search_evolved(ctx, report)
    if "heads" in run.encodings:
        _search_heads(ctx, report)
    if "nsga2" in run.encodings:
        _search_nsga2(ctx, report)
    if "ranks" in run.encodings:
        _search_ranks(ctx, report)
    (out_dir / "search.json").write_text(json.dumps(report, indent=1, default=float))
    return report


def _search_evolved(ctx: _Context, report: dict[str, Any]) -> None:
    """The rates and layer-set searches (:mod:`casrap.search.evolve`), each target in turn."""
    from casrap.search.evolve import search_layers, search_rates

    run, blocks = ctx.run, ctx.blocks
    context = EvolveContext(ctx.bank, ctx.tokenizer, ctx.imp, ctx.info, run, blocks["search"], blocks["validation"], blocks["test"],
                            ctx.plans_dir, ctx.base_model, ctx.note)
    with context:
        for encoding, search in (("rates", search_rates), ("layers", search_layers)):
            if encoding not in run.encodings:
                continue
            report[f"{encoding}_table"] = []
            for target in run.sparsities:
                rows, name, result = search(context, target)
                report[f"{encoding}_table"] += rows
                report["results"][name] = result
    report["fitness"] = {"kind": run.fitness, "search_tokens": int(blocks["search"].numel()), "time_budget_s": run.time_budget,
                         "workers": run.workers, "ray_address": run.ray_address}


def _search_heads(ctx: _Context, report: dict[str, Any]) -> None:
    """The head-mask GA on the safety task, against importance-ranked groups and the full model."""
    run, info, bank, model, tokenizer = ctx.run, ctx.info, ctx.bank, ctx.model, ctx.tokenizer
    cfg = run.config
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
    result = ga.run_binary_ga("heads", length, 1.0 - target, lambda g, r: ga.repair_heads(g, info.layers, info.kv_heads, r), evaluator, cfg, ctx.note("heads"))
    finalists = list(dict.fromkeys(tuple(g) for g, _ in result.final))[: max(1, run.finalists)]
    result.best_genome = list(max(finalists, key=lambda g: _task_eval(bank, ga.heads_plan(list(g), info), scorers["validation"])[0]))
    best = ga.heads_plan(result.best_genome, info)
    removed = sum(info.kv_heads - len(v["kv"]) for v in best.heads.values())
    ranked_heads, _ = plan_kv_groups(ctx.imp.kv_groups(info.group_size), info.group_size, removed / length + 1e-9)
    ranked = PruningPlan(name="x", heads=ranked_heads, functional=True)
    rows = []
    full_plan = PruningPlan(name="x")
    for method, plan in (("GA head mask", best), ("importance-ranked groups", ranked), ("full model", full_plan)):
        scores = {s: _task_eval(bank, PruningPlan(**{**asdict(plan), "name": "x"}), scorers[s]) for s in ("validation", "test")}
        rows.append(_row(method, plan_sparsity(plan, info), scores, n_task) | {"groups_removed": sum(info.kv_heads - len(v["kv"]) for v in plan.heads.values())})
    report["heads_table"] = rows
    report["heads_task"] = {"source": task.source, "attention_share": attention_share, "best_terms": evaluator(result.best_genome)[1]}
    saved = ga.heads_plan(result.best_genome, info, functional=False)
    saved.name, saved.base_model = "heads-ga", ctx.base_model
    saved.description = f"GA head mask: {removed}/{length} kv groups removed (safety task)"
    saved.save(ctx.plans_dir / "heads-ga.json")
    report["results"]["heads-ga"] = {"history": [asdict(h) for h in result.history], "mask": result.best_genome}


def _search_nsga2(ctx: _Context, report: dict[str, Any]) -> None:
    """The layer-set Pareto front (search perplexity against ideal speedup), with the rules beside it."""
    bank, info, imp = ctx.bank, ctx.info, ctx.imp

    def objectives(genome: list[int]) -> tuple[float, float]:
        return _evaluate(bank, ga.layers_plan(genome), lambda: (ctx.ppl["search"].ppl(), bank.ideal_speedup(EVAL_PROFILE)))

    result = ga.run_nsga2(info.layers, objectives, ctx.run.config, ctx.note("nsga2"))
    baselines: dict[str, list[tuple[float, float]]] = {}
    for k in range(1, info.layers // 2 + 1, max(1, info.layers // 10)):
        for method, skip in (("last k", skip_last_layers(info.layers, k)), ("block influence", plan_skip_layers(imp.layers, k / info.layers + 1e-9))):
            baselines.setdefault(method, []).append(objectives([int(i in skip) for i in range(info.layers)]))
    report["pareto"] = {"front": [{"skip": [i for i, b in enumerate(g) if b], "ppl": f[0], "ideal_speedup": f[1]} for g, f in result.front],
                        "baselines": {m: [{"ppl": p, "ideal_speedup": s} for p, s in v] for m, v in baselines.items()}}


def _search_ranks(ctx: _Context, report: dict[str, Any]) -> None:
    """The low-rank ranks GA and binary searches (:mod:`casrap.search.ranks`); saves its plans."""
    from casrap.search.ranks import run_ranks

    bank, ppl = ctx.bank, ctx.ppl
    if bank.lowrank_basis is None:
        from casrap.pruners.lowrank import load_or_fit_basis

        bank.lowrank_basis = load_or_fit_basis(ctx.model, ctx.tokenizer, key=bank.fingerprint)
    found = run_ranks(bank, lambda plan, split: _ppl_eval(bank, plan, ppl[split]), ppl["search"].ppl, ctx.n_tok, ctx.run.sparsities,
                      ctx.run.config, ctx.run.ppl_tolerance, ctx.full["search"][0], ctx.note)
    for name, plan in found.pop("ranks_plans").items():
        plan.base_model, plan.fingerprint = ctx.base_model, bank.fingerprint
        plan.save(ctx.plans_dir / f"{name}.json")
    report["results"].update(found.pop("ranks_results"))
    report.update(found)
    report["lowrank_basis"] = bank.lowrank_basis.source
