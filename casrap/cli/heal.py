"""``casrap heal PROFILE``: a LoRA / QLoRA adapter that recovers what pruning costs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

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
    targets: str = typer.Option("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", help="comma-separated projections that get a LoRA"),
    lm_weight: float = typer.Option(0.0, "--lm-weight", help="add this x the LM loss to the KL (text healing)"),
    samples: int = typer.Option(256, "--samples", help="answers the full model writes to train prompts as healing text (cached)"),
    continuations: int = typer.Option(0, "--continuations", help="also heal on N prose continuations the full model writes from calibration paragraph openings (cached; did not help ffn-25)"),
    task: Optional[str] = typer.Option(None, "--task", help="safety: tune on the safety task's train split and report test AUROC instead"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="directory for the plan JSON and adapter (default checkpoints/heal/PROFILE+heal)"),
    ship: bool = typer.Option(False, "--ship", help="maintainers: also copy the healed plan and adapter into casrap/data/plans/<model>/"),
    as_json: bool = JsonOpt,
) -> None:
    """Heal a pruned profile by distillation from the full model (resumable; writes a plan that references the adapter)."""
    from casrap.heal.runner import HEAL_SUFFIX
    from casrap.heal.train import HealConfig

    if task not in (None, "safety"):
        raise InputError(f"unknown task {task!r}; the one tuning task is safety")
    cfg = HealConfig(method=method, steps=steps or (60 if task else 75), rank=rank, lr=lr, batch=batch,
                     targets=[t.strip() for t in targets.split(",") if t.strip()], lm_weight=lm_weight, samples=samples,
                     continuations=continuations)
    cfg.check()
    if method == "qlora":
        from casrap.heal.train import check_qlora

        check_qlora()
    lm = load(model, device)
    bank = build_profiles(lm, ["none", profile], model)
    name = bank.names[-1]
    if name == "none":
        raise InputError("the full model has nothing to heal; give a pruned profile")
    output = output or Path("checkpoints") / "heal" / (name + (f"+{task}" if task else HEAL_SUFFIX))
    with progress_bar() as bar:
        tasks: dict[str, Any] = {}

        def on_progress(stage: str, done: int, total: int, loss: float) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            label = f"{stage} {name}" + (f" loss {loss:.3f}" if stage != "sampling" else "")
            bar.update(tasks[stage], completed=done, description=label)

        if task:
            from casrap.heal.task import tune_for_task

            report = tune_for_task(lm, bank, name, cfg, output, progress=on_progress)
        else:
            from casrap.heal.runner import heal as run_heal

            report = run_heal(lm, bank, name, cfg, output, progress=on_progress)
    data = report.to_dict()
    if ship:
        from casrap.heal.runner import ship as ship_plan

        data["shipped"] = str(ship_plan(Path(data["plan"]), Path(model).name))
    if as_json:
        emit_json(data)
        return
    if task:
        out.print(f"safety task ({data['task_source']}), AUROC on its test split (n={data['test_n']}):")
        for key, value in data["auroc"].items():
            out.print(f"  {key}: {value:.3f}")
        out.print(f"wrote {data['plan']} (adapter {data['adapter']})")
        return
    out.print(f"healed {name} in {data['train_s']:.0f} s ({data['steps']} steps, {data['tokens_seen']} tokens); loss {data['loss_first']:.3f} -> {data['loss_last']:.3f}")
    for key, q in data["quality"].items():
        out.print(f"  {key}: ppl {q['ppl']:.2f}, KL {q['kl']:.3f} on {q['corpus']} ({q['tokens']} tokens)")
    if data["gap_recovered"] is not None:
        out.print(f"log-perplexity gap recovered: {100 * data['gap_recovered']:.0f}%; memory of the healed profile beyond the base: {data['memory_overhead_mb']:.1f} MB")
    out.print(f"wrote {data['plan']}: use it with -p {data['plan']}")


def register(app: typer.Typer) -> None:
    """Attach ``heal`` to the top-level app."""
    app.command()(heal)
