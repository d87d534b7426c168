"""``casrap heal PROFILE``: a LoRA / QLoRA adapter that recovers what pruning costs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from casrap.profiles.catalogue import FULL
from casrap.cli.common import DeviceOpt, JsonOpt, ModelOpt, build_profiles, console, emit_json, load, out, progress_bar
from casrap.errors import InputError


def heal(
    profile: str = typer.Argument(..., help="pruned profile to heal: a spec (layers-25, ffn-25, heads-25) or a plan .json"),
    model: str = ModelOpt,
    device: str = DeviceOpt,
    method: str = typer.Option("lora", "--method", help="lora | qlora (base in 4-bit NF4 via bitsandbytes)"),
    steps: Optional[int] = typer.Option(None, "--steps", help="optimiser steps (default: 75 for text healing, 60 for --task)"),
    rank: int = typer.Option(8, "--rank", help="LoRA rank"),
    lr: float = typer.Option(5e-3, "--lr", help="AdamW learning rate"),
    batch: int = typer.Option(4, "--batch", help="sequences per step"),
    targets: str = typer.Option("", help="comma-separated projections that get a LoRA (default: by profile kind, MLP for ffn-P, attention + MLP otherwise)"),
    lm_weight: float = typer.Option(0.0, "--lm-weight", help="add this x the LM loss to the KL (text healing)"),
    samples: int = typer.Option(256, "--samples", help="answers the full model writes to train prompts as healing text (cached)"),
    continuations: int = typer.Option(128, "--continuations", help="also heal on N prose continuations the full model writes from calibration sentence openings (cached)"),
    topk: int = typer.Option(64, "--topk", help="teacher log-probabilities kept per token, computed once and cached (0: run the teacher every step)"),
    select: Optional[str] = typer.Option(None, "--select", help="sweep and keep the best on the validation prose, e.g. 'lr=2e-3,5e-3;steps=75,150'"),
    task: Optional[str] = typer.Option(None, "--task", help="safety: tune on the safety task's train split and report test AUROC instead"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="directory for the plan JSON and adapter (default checkpoints/heal/PROFILE+heal)"),
    ship: bool = typer.Option(False, "--ship", help="maintainers: also copy the healed plan and adapter into casrap/data/plans/<model>/ (only if better on validation prose than the one shipped)"),
    as_json: bool = JsonOpt,
) -> None:
    """Heal a pruned profile by distillation from the full model (resumable; writes a plan that references the adapter)."""
    import time

    from casrap.heal.runner import HEAL_SUFFIX

    began = time.perf_counter()
    cfg, grid = _config(task, method, steps, rank, lr, batch, targets, lm_weight, samples, continuations, topk, select)
    lm = load(model, device)
    bank = build_profiles(lm, [FULL, profile], model)
    name = bank.names[-1]
    if name == FULL:
        raise InputError("the full model has nothing to heal; give a pruned profile")
    output = output or Path("checkpoints") / "heal" / (name + (f"+{task}" if task else HEAL_SUFFIX))
    data = _run(lm, bank, name, cfg, output, task, grid)
    if not task:
        data["wall_s"] = time.perf_counter() - began
    if ship and data.get("better_than_shipped") is False:
        data["shipped"] = None  # the adapter already shipped is better on validation prose: keep it
    elif ship:
        from casrap.heal.runner import ship as ship_plan

        data["shipped"] = str(ship_plan(Path(data["plan"]), Path(model).name))
    if as_json:
        emit_json(data)
    elif task:
        _print_task(data)
    else:
        _print_healing(data, name, ship)


def _config(task: str | None, method: str, steps: int | None, rank: int, lr: float, batch: int, targets: str, lm_weight: float,
            samples: int, continuations: int, topk: int, select: str | None) -> tuple[Any, dict[str, list[float]]]:
    """The checked healing config and the ``--select`` grid (one-line errors for bad combinations)."""
    from casrap.heal.evaluate import parse_select
    from casrap.heal.train import HealConfig

    if task not in (None, "safety"):
        raise InputError(f"unknown task {task!r}; the one tuning task is safety")
    cfg = HealConfig(method=method, steps=steps or (60 if task else 75), rank=rank, lr=lr, batch=batch,
                     targets=[t.strip() for t in targets.split(",") if t.strip()], lm_weight=lm_weight, samples=samples,
                     continuations=continuations, topk=topk)
    cfg.check()
    grid = parse_select(select)
    if task and grid:
        raise InputError("--select applies to text healing, not --task")
    if method == "qlora":
        from casrap.heal.train import check_qlora

        check_qlora()
    return cfg, grid


def _run(lm: Any, bank: Any, name: str, cfg: Any, output: Path, task: str | None, grid: dict[str, list[float]]) -> dict[str, Any]:
    """Heal (or tune for the task) with a progress bar per stage; the result's record."""
    with progress_bar() as bar:
        tasks: dict[str, Any] = {}

        def on_progress(stage: str, done: int, total: int, loss: float) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            label = f"{stage} {name}" + (f" loss {loss:.3f}" if stage.startswith("healing") else "")
            bar.update(tasks[stage], completed=done, description=label)

        if task:
            from casrap.heal.task import tune_for_task

            return tune_for_task(lm, bank, name, cfg, output, progress=on_progress).to_dict()
        from casrap.heal.evaluate import heal_selected
        from casrap.heal.runner import healed_plan

        return heal_selected(lm, bank, name, cfg, output, healed_plan, select=grid, progress=on_progress)


def _print_task(data: dict[str, Any]) -> None:
    out.print(f"safety task ({data['task_source']}), AUROC on its test split (n={data['test_n']}):")
    for key, value in data["auroc"].items():
        out.print(f"  {key}: {value:.3f}")
    out.print(f"wrote {data['plan']} (adapter {data['adapter']})")


def _print_healing(data: dict[str, Any], name: str, ship: bool) -> None:
    from casrap.heal.runner import HEAL_SUFFIX

    if len(data["candidates"]) > 1:
        for c in data["candidates"]:
            out.print(f"  candidate lr {c['lr']:g}, {c['steps']} steps: validation ppl {c['validation_ppl']:.2f} "
                      f"(gap recovered {100 * c['validation_gap_recovered']:.0f}%, {c['train_s']:.0f} s)")
    out.print(f"healed {name} with lr {data['lr']:g}, {data['steps']} steps on {', '.join(data['targets'])} in {data['train_s']:.0f} s "
              f"({data['tokens_seen']} tokens); loss {data['loss_first']:.3f} -> {data['loss_last']:.3f}")
    for split, rows in data["quality"].items():
        for key, q in rows.items():
            out.print(f"  {split:<10} {key}: ppl {q['ppl']:.2f}, KL {q['kl']:.3f} on {q['corpus']} ({q['tokens']} tokens)")
    gaps = data["gap_recovered"]
    out.print(f"log-perplexity gap recovered: validation {100 * gaps['validation']:.1f}%, test {100 * gaps['test']:.1f}%; "
              f"memory of the healed profile beyond the base: {data['memory_overhead_mb']:.1f} MB")
    if data.get("shipped_validation_ppl") is not None:
        verdict = "better" if data["better_than_shipped"] else "not better"
        out.print(f"the shipped {name}{HEAL_SUFFIX}: validation ppl {data['shipped_validation_ppl']:.2f}; this adapter is {verdict}"
                  + ("" if not ship else ("; shipped" if data.get("shipped") else "; not shipped")))
    out.print(f"wall time {data['wall_s']:.0f} s; wrote {data['plan']}: use it with -p {data['plan']}")


def register(app: typer.Typer) -> None:
    """Attach ``heal`` to the top-level app."""
    app.command()(heal)
