"""``casrap train | test | report``: the RL side of the command line (``casrap record`` records replays)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

import typer

from casrap.cli.common import (
    DeviceOpt, JsonOpt, ModelOpt, WeightNormOpt, build_profiles, console, emit_json, load, measure_latency_model, out,
    progress_bar,
)
from casrap.envs.rewards import REWARDS, RewardConfig, reward_config
from casrap.errors import InputError
from casrap.profiles.catalogue import CASRAP_V22, FULL, default_catalogue

ProfilesOpt = typer.Option(None, "--profiles", "-p", help="action catalogue: specs, shipped plan names (ga-rates-40) or plan .json files (default: CASRAP v2.2 set + the plans shipped for the model)")
RewardOpt = typer.Option("casrap", "--reward", help=f"reward: {' | '.join(REWARDS)}")


def _reward(kind: str, slo_lambda: float = 10.0) -> RewardConfig:
    return reward_config(kind, slo_lambda)


SloLambdaOpt = typer.Option(10.0, "--slo-lambda", help="slo reward: weight of the relative latency-budget overrun")


def _live_env(model: str, device: str, profiles: list[str], max_new_tokens: int, reward: RewardConfig,
              prompts: list[Any], structural: bool | None = None, weight_norm: bool = False) -> Any:
    from casrap.envs.config import EnvConfig
    from casrap.envs.pruning_env import PruningEnv

    lm = load(model, device)
    names = [FULL, *[p for p in profiles if p != FULL]]
    bank = build_profiles(lm, names, model, structural, weight_norm)
    config = EnvConfig(model=model, device=device, profiles=names, max_new_tokens=max_new_tokens, reward=reward, structural=structural)
    env = PruningEnv(config, bank=bank, tokenizer=lm.tokenizer, prompts=prompts)
    ensure_latency_model(env.router)
    return env


def ensure_latency_model(router: Any) -> None:
    """Measure the unloaded latency model on first use, visibly (seconds; cached per model and machine)."""
    from casrap.decide.latency_model import latency_cache_path

    if not latency_cache_path(router.bank.fingerprint).is_file():
        console.print("no latency model for this model on this machine yet: timing the full model once (seconds; cached)")
        router.unloaded = measure_latency_model(router.bank, router.tokenizer, router.telemetry)
    _ = router.unloaded


def interrupt_on_sigterm() -> None:
    """Treat SIGTERM (a scheduler, `kill`, a closing container) like Ctrl-C: checkpoint, then stop.

    Background jobs also start with SIGINT ignored, so SIGTERM is how they are stopped.
    """
    import signal

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def _episode_line(r: dict[str, Any]) -> str:
    if "prompt_tokens" not in r:
        return (f"ep {r['episode']:>4} | {r['profile']:<11} | {r['latency_s']:.3f}s vs {r['baseline_latency_s']:.3f}s "
                f"| ppl {r['ppl']:.2f} vs {r['baseline_ppl']:.2f} | reward {r['reward']:+.3f}")
    return (f"ep {r['episode']:>4} | prompt {r['prompt_tokens']:>3} tok ppl {r['prompt_ppl']:6.1f} cx {r['complexity']:.2f} "
            f"| base {r['baseline_latency_s']:.2f}s {r['baseline_tokens_per_s']:.1f} tok/s ppl {r['baseline_ppl']:.2f} "
            f"| {r['profile']:<10} {r['latency_s']:.2f}s {r['tokens_per_s']:.1f} tok/s ppl {r['ppl']:.2f} KL {r['kl']:.3f} "
            f"| reward {r['reward']:+.3f}")


# ------------------------------------------------------------------------ train
def train(
    episodes: int = typer.Option(200, help="episodes (one prompt each by default)"),
    model: str = ModelOpt,
    checkpoint: Path = typer.Option(Path("checkpoints/rl_policy.zip"), help="policy zip (SB3 format)"),
    train_dataset: Optional[str] = typer.Option(None, help="CSV/JSONL/hub id with a prompt column; its fixed train split is used (default: the bundled prompts)"),
    train_samples: Optional[int] = typer.Option(None, help="use at most this many training prompts"),
    max_new_tokens: int = typer.Option(50, help="tokens generated per step"),
    device: str = DeviceOpt,
    reward: str = RewardOpt,
    slo_lambda: float = SloLambdaOpt,
    replay: Optional[str] = typer.Option(None, help="train on recorded measurements (a file from `casrap record`, or 'bundled')"),
    background_load: bool = typer.Option(False, "--background-load", help="run a real CPU load that varies across episodes"),
    profiles: Optional[list[str]] = ProfilesOpt,
    weight_norm: bool = WeightNormOpt,
    seed: int = typer.Option(0),
    resume: bool = typer.Option(False, "--resume", help="continue from --checkpoint and its run folder"),
    save_every: int = typer.Option(25, help="episodes between checkpoints"),
    reports: Path = typer.Option(Path("reports"), help="parent folder of numbered run folders"),
    quiet: bool = typer.Option(False, "--quiet", help="no per-episode lines"),
    tensorboard: Optional[Path] = typer.Option(None, "--tensorboard", help="also log to TensorBoard in this folder (reward, latency, KL, profile shares per episode; `tensorboard --logdir DIR`)"),
    as_json: bool = JsonOpt,
) -> None:
    """Train the Double-DQN controller (live on the model, or on a replay file)."""
    from casrap.agents.training import TrainConfig, read_state
    from casrap.agents.training import train as run_training
    from casrap.reports import build_report
    from casrap.telemetry.load import BackgroundLoad

    if tensorboard is not None:
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise InputError("--tensorboard needs the tensorboard package: pip install 'casrap[tb]'")
    reward_cfg = _reward(reward, slo_lambda)
    if resume:
        saved = read_state(checkpoint)
        profiles = profiles or saved.get("profiles")
        replay = replay or saved.get("replay")
    env, tokens, trained_on = _training_env(replay, reward_cfg, model, device, list(profiles or default_catalogue(model)),
                                            max_new_tokens, train_dataset, train_samples, weight_norm)
    names = env.action_names
    # two workers at intensities 0, 0.5, 1 (the schedule's levels) burn about 0, 1 and 2 cores
    background = BackgroundLoad(workers=2).start() if background_load and not replay else None
    config = TrainConfig(episodes=episodes, checkpoint=checkpoint, reports_root=reports, seed=seed, resume=resume, save_every=save_every,
                         tensorboard=tensorboard)
    started = time.perf_counter()
    interrupt_on_sigterm()
    with progress_bar() as bar:
        task = bar.add_task("training", total=episodes)

        def on_episode(record: dict[str, Any]) -> None:
            if background:
                record["background_load"] = background.on_episode(record["episode"])
            bar.update(task, completed=record["episode"])
            if not quiet:
                bar.console.print(_episode_line(record), soft_wrap=True, highlight=False)

        try:
            result = run_training(env, config, on_episode, max_new_tokens=tokens,
                                  run_meta={"model": model, "profiles": names, "reward": reward, "slo_lambda": slo_lambda,
                                            "replay": replay, "prompts": trained_on})
        finally:
            if background:
                background.stop()
    elapsed = time.perf_counter() - started
    report = build_report(result.run_dir, f"casrap train ({'replay ' + replay if replay else model}, reward {reward})",
                          {"wall time": f"{elapsed:.0f} s", "checkpoint": str(checkpoint)})
    bundle_dir = None if replay or result.interrupted else _write_bundle(env, checkpoint, model, reward, slo_lambda)
    summary = {"run_dir": str(result.run_dir), "checkpoint": str(checkpoint), "episodes_done": result.episodes_done,
               "interrupted": result.interrupted, "wall_s": elapsed, "report": str(report),
               "bundle": str(bundle_dir) if bundle_dir else None}
    if as_json:
        emit_json(summary)
    else:
        _print_trained(result, elapsed, checkpoint, report, bundle_dir, replay)
    if result.interrupted:
        raise typer.Exit(130)


def _training_env(replay: str | None, reward_cfg: Any, model: str, device: str, names: list[str], max_new_tokens: int,
                  train_dataset: str | None, train_samples: int | None, weight_norm: bool) -> tuple[Any, int | None, dict[str, Any]]:
    """The env a run trains on (a replay, or live on the model), the answer length it describes, and its prompts' record."""
    if replay:
        from casrap.envs.replay import PruningReplayEnv

        env: Any = PruningReplayEnv(replay, split="train", reward=reward_cfg)
        tokens = int(env.table.header.get("max_new_tokens", 0)) or None
        return env, tokens, {"source": f"replay:{replay}", "train_keys": sorted(env.prompt_keys())}
    from casrap.data.prompts import load_prompts

    prompts = load_prompts(train_dataset, split="train")
    prompts = prompts[:train_samples] if train_samples else prompts
    env = _live_env(model, device, names, max_new_tokens, reward_cfg, prompts, weight_norm=weight_norm)
    return env, max_new_tokens, {"source": train_dataset or "bundled", "train_keys": sorted({p.key for p in env.prompts})}


def _print_trained(result: Any, elapsed: float, checkpoint: Path, report: Path, bundle_dir: Path | None, replay: str | None) -> None:
    out.print(f"{'interrupted; ' if result.interrupted else ''}{result.episodes_done} episodes in {elapsed:.0f} s; "
              f"policy {checkpoint}; report {report}" + ("; continue with --resume" if result.interrupted else ""))
    if bundle_dir:
        out.print(f"bundle {bundle_dir} (casrap generate/serve --bundle {bundle_dir})")
    elif replay:
        out.print(f"to run it: casrap bundle --checkpoint {checkpoint} --out DIR --model MODEL (builds the actions' plans for a model)")


def _write_bundle(env: Any, checkpoint: Path, model: str, reward: str, slo_lambda: float) -> Path:
    """The policy bundle of a live run: the policy with the exact plans it was trained on."""
    from casrap.agents.training import read_state
    from casrap.pruners.importance import default_calibration_path
    from casrap.runtime.bundle import bundle_dir_for, write_bundle

    return write_bundle(bundle_dir_for(checkpoint), checkpoint, env.bank, model_spec=model,
                        reward={"reward": reward, "slo_lambda": slo_lambda}, training=read_state(checkpoint),
                        calibration=default_calibration_path(env.model))


# ------------------------------------------------------------------------- test
def test(
    checkpoint: Path = typer.Option(Path("checkpoints/rl_policy.zip"), help="trained policy zip"),
    model: str = ModelOpt,
    device: str = DeviceOpt,
    test_dataset: Optional[str] = typer.Option(None, help="CSV/JSONL/hub id; its fixed test split is used (default: the bundled prompts)"),
    test_samples: int = typer.Option(20, help="test prompts measured under every profile (live mode)"),
    max_new_tokens: int = typer.Option(50),
    replay: Optional[str] = typer.Option(None, help="evaluate on recorded measurements (test split)"),
    reward: Optional[str] = typer.Option(None, "--reward", help="reward (default: the one trained with)"),
    slo_lambda: Optional[float] = typer.Option(None, "--slo-lambda", help="default: the one trained with"),
    budgets_per_context: int = typer.Option(20, help="latency budgets drawn per context (slo reward)"),
    bandit_steps: int = typer.Option(3000, help="replay: decisions LinUCB learns from on the train split, as a contextual-bandit baseline (0: none)"),
    ope_epsilon: float = typer.Option(0.2, "--ope-epsilon", help="replay: exploration rate of the simulated epsilon-greedy behaviour log the policy is scored from off-policy (SNIPS, DR); 0: skip"),
    wikitext_samples: int = typer.Option(200, help="paragraphs of WikiText-2 (or the bundled prose) for perplexity"),
    lm_eval: Optional[str] = typer.Option(None, "--lm-eval", help="comma-separated lm-eval tasks ('casrap_local' works offline)"),
    lm_eval_include: Optional[list[Path]] = typer.Option(None, "--lm-eval-include", help="folder of your own lm-eval task YAMLs (repeatable)"),
    seed: int = typer.Option(0),
    reports: Path = typer.Option(Path("reports")),
    as_json: bool = JsonOpt,
) -> None:
    """Compare the policy with no pruning, every static action, random and the oracle."""
    from casrap.agents.evaluate import compare_policies
    from casrap.agents.training import load_policy, read_state
    from casrap.data.prompts import load_prompts
    from casrap.envs.replay import PruningReplayEnv, load_replay
    from casrap.reports import build_report, new_run_dir

    saved = read_state(checkpoint)
    reward_cfg = _reward(reward or saved.get("reward", "casrap"), slo_lambda if slo_lambda is not None else saved.get("slo_lambda", 10.0))
    run_dir = new_run_dir(reports, "test")
    lm = None
    if replay:
        env = PruningReplayEnv(replay, split="test", reward=reward_cfg)
        refuse_overlap(saved, env.prompt_keys(), f"replay {replay} (test split)")
    else:
        prompts = load_prompts(test_dataset, split="test")[:test_samples]
        refuse_overlap(saved, {p.key for p in prompts}, test_dataset or "the bundled test prompts")
        live = _live_env(model, device, saved.get("profiles") or list(CASRAP_V22), max_new_tokens, RewardConfig(), prompts)
        lm = live
        path = _measure_live(live, model, max_new_tokens, run_dir)
        env = PruningReplayEnv(table=load_replay(path), split="test", reward=reward_cfg)
    policy = load_policy(checkpoint, env)
    baselines = {}
    if replay and bandit_steps:
        from casrap.agents.bandit import train_linucb

        baselines["linucb"] = train_linucb(PruningReplayEnv(replay, split="train", reward=reward_cfg), bandit_steps, seed=seed)
    comparison = compare_policies(env, policy, budgets_per_context=budgets_per_context, seed=seed, baselines=baselines)
    _record_decisions(env, policy, reward_cfg, seed, run_dir)
    result: dict[str, Any] = {"run_dir": str(run_dir), "checkpoint": str(checkpoint), **comparison.to_dict()}
    if replay and ope_epsilon > 0:
        from casrap.agents.evaluate import off_policy_check

        result["ope"] = off_policy_check(env, policy, comparison, budgets_per_context, seed, ope_epsilon)
    if lm is not None and wikitext_samples:
        result["perplexity"] = _profile_perplexity(lm, comparison, wikitext_samples)
    if lm_eval:
        if lm is None:
            raise InputError("--lm-eval needs the live model: drop --replay")
        from casrap.evaluation.lm_eval_tasks import run_lm_eval

        result["lm_eval"] = run_lm_eval(lm.bank, lm.tokenizer, lm_eval.split(","), _top_profiles(comparison),
                                        include_paths=list(lm_eval_include or []))
    (run_dir / "comparison.json").write_text(json.dumps(result, indent=1, default=float))
    build_report(run_dir, f"casrap test ({checkpoint})", comparison_md=comparison.markdown())
    if as_json:
        emit_json(result)
        return
    _print_tested(result, comparison, run_dir)


def _record_decisions(env: Any, policy: Any, reward_cfg: Any, seed: int, run_dir: Path) -> None:
    """The policy's decision in every context, one metrics line each (for the plots)."""
    from casrap.envs.replay import PruningReplayEnv
    from casrap.reports import append_jsonl

    rng_env = PruningReplayEnv(table=env.table, reward=reward_cfg, split="all")
    rng_env.reset(seed=seed)
    for episode, context in enumerate(range(rng_env.n_contexts), start=1):
        obs, _ = rng_env.reset(options={"context": context})
        action = int(policy.predict(obs, deterministic=True)[0])
        _, _, _, _, info = rng_env.step(action)
        append_jsonl(run_dir / "metrics.jsonl", {**info, "episode": episode, "max_new_tokens": env.table.header.get("max_new_tokens")})


def _print_tested(result: dict[str, Any], comparison: Any, run_dir: Path) -> None:
    out.print(comparison.markdown(), soft_wrap=True, markup=False)
    if "ope" in result:
        o = result["ope"]
        out.print(f"off-policy estimates from a simulated epsilon-greedy log ({o['behaviour']['greedy']}, eps {o['behaviour']['epsilon']}, "
                  f"{o['n']} decisions): " + ", ".join(f"{k.upper()} {o[k]['value']:+.4f} [{o[k]['ci95'][0]:+.4f}, {o[k]['ci95'][1]:+.4f}]"
                                                       for k in ("snips", "dr")) + f"; replay value {o['replay_value']:+.4f}", soft_wrap=True, markup=False)
    if "perplexity" in result:
        out.print("perplexity on " + ", ".join(f"{k}: {v:.2f}" for k, v in result["perplexity"].items() if k != "corpus") + f" ({result['perplexity']['corpus']})")
    out.print(f"report: {run_dir / 'report.md'}")


def _measure_live(live: Any, model: str, max_new_tokens: int, run_dir: Path) -> Path:
    """The test prompts measured under every profile through the recorder's path (``casrap record``'s
    quality and timing passes, at the machine's current load): the replay file the comparison runs on."""
    from casrap.envs.record import RecordConfig, record_replay

    config = RecordConfig(loads=("0",), max_new_tokens=max_new_tokens, timing_tokens=max_new_tokens,
                          analysis_tokens=live.config.analysis_tokens, settle_s=0.0)
    prompts = list(live.prompts)
    with progress_bar() as bar:
        task = bar.add_task("measuring test prompts", total=len(prompts) * (1 + len(live.action_names)))
        return record_replay(live.router, prompts, list(live.action_names), config, run_dir / "measurements.work",
                             run_dir / "measurements.jsonl", model, progress=lambda i, n: bar.update(task, completed=i, total=n))


def refuse_overlap(saved_state: dict[str, Any], test_keys: set[str], where: str) -> None:
    """One-line refusal when test prompts were trained on (checkpoints store prompt text keys)."""
    trained = set((saved_state.get("prompts") or {}).get("train_keys", []))
    overlap = trained & set(test_keys)
    if overlap:
        raise InputError(f"{len(overlap)} of {len(test_keys)} test prompts in {where} were used to train this checkpoint; "
                         "test on held-out prompts (the fixed test split) or another dataset")


def _top_profiles(comparison: Any, k: int = 2) -> list[str]:
    actions = comparison.scores[0].actions
    return [name for name, _ in sorted(actions.items(), key=lambda kv: -kv[1]) if name != FULL][:k]


def _profile_perplexity(env: Any, comparison: Any, samples: int) -> dict[str, Any]:
    from casrap.measure import load_corpus, perplexity

    corpus = load_corpus("auto")
    text = "\n\n".join(corpus.paragraphs()[:samples])
    ids = env.tokenizer(text, return_tensors="pt").input_ids[0]
    result: dict[str, Any] = {"corpus": corpus.name}
    for name in [FULL, *_top_profiles(comparison)]:
        with env.bank.using(name):
            result[name] = perplexity(env.model, ids).ppl
    return result


# ----------------------------------------------------------------------- report
def report(run_dir: Path = typer.Argument(..., help="a reports/train-N or reports/test-N folder")) -> None:
    """Rebuild a run's summary, plots and report.md from its metrics."""
    from casrap.reports import build_report

    path = build_report(run_dir)
    out.print(f"rebuilt {path}")


def register(app: typer.Typer) -> None:
    """Attach this group's commands to the top-level app."""
    for command in (train, test, report):
        app.command()(command)
