"""Recorded measurements and ``casrap/PruningReplay-v0``, which serves them.

Format (JSONL): the first line is a header
``{"format": "casrap-replay/2", "observation": {"version", "features"}, "model", "profiles",
"max_new_tokens", "machine", ...}``
(``casrap record`` adds versions, load levels, how each figure was obtained and the
latency models' errors); every other line is one profile on one prompt under one
load level: ``prompt_id``, ``load`` (background workers), ``profile``, ``latency_s``
(TTFT + median decode step per further token, router overhead included),
``latency_source`` (``measured`` | ``modelled``), ``predicted_full_s`` (the
*unloaded* full model's predicted latency for this prompt length: targets are drawn
as multiples of it), ``ppl``/``kl`` (teacher-forced on the full model's answer,
load-independent), the telemetry read just before the decision, and ``split``. A
*context* is one (prompt, load) pair; the replay env needs every profile in each
context it serves.

A record stores the context's raw features (telemetry, prompt length and perplexity,
slowdown, thread share), not an observation vector: each episode's observation is built
from them by :meth:`casrap.decide.router.Router.observe` with that episode's latency
target, exactly as the runtime builds it. The header names the observation spec it was
recorded for (:data:`casrap.decide.observation.OBSERVATION_VERSION`); a file recorded
for another spec is refused in one line (its records lack, or mean something else by,
the features this spec needs). Files written before the header carried the spec are read
as the current spec.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from casrap.decide.observation import OBSERVATION_VERSION
from casrap.decide.router import Router
from casrap.envs.config import OBSERVATION_FEATURES
from casrap.envs.rewards import RewardConfig, RewardInput, compute_reward, reward_config
from casrap.errors import InputError

REPLAY_FORMAT = "casrap-replay/2"
REPLAY_FORMATS = ("casrap-replay/1", REPLAY_FORMAT)
RECORD_KEYS = ("prompt_id", "load", "profile", "latency_s", "ppl", "kl", "baseline_latency_s", "baseline_ppl",
               "prompt_tokens", "prompt_ppl", "telemetry")
TELEMETRY_KEYS = ("other_cpu_util", "mem_available_gb", "gpu_util", "vram_free_gb", "battery")
BUNDLED_REPLAY = "bundled"


@dataclass
class ReplayTable:
    """Measurements as arrays: contexts x actions."""

    header: dict[str, Any]
    profiles: list[str]
    context_ids: list[str]
    splits: np.ndarray  # [C] str
    prompt_keys: np.ndarray  # [C] str: text keys of the prompts (``Prompt.key``), to check train/test overlap
    categories: np.ndarray  # [C] str
    contexts: list[dict[str, Any]]  # [C] raw features of each context (Router.observe's arguments but the target)
    latency: np.ndarray  # [C, A] seconds, including router overhead
    baseline_latency: np.ndarray  # [C]
    ppl: np.ndarray  # [C, A] teacher-forced ppl of the full model's answer
    baseline_ppl: np.ndarray  # [C]
    kl: np.ndarray  # [C, A]
    predicted_full: np.ndarray | None = None  # [C] unloaded full-model latency predicted for the prompt (targets scale it)
    measured: np.ndarray | None = None  # [C, A] bool: latency measured (True) or modelled

    def observation(self, context: int, budget_ratio: float = float("inf")) -> np.ndarray:
        """Context ``context``'s observation with latency target ``budget_ratio`` (Router.observe)."""
        c = self.contexts[context]
        return Router.observe(c["telemetry"], c["prompt_tokens"], c["prompt_ppl"], budget_ratio, c["slowdown"], c["thread_share"])

    @property
    def base_obs(self) -> np.ndarray:
        """[C, F] every context's observation without a latency target."""
        return np.array([self.observation(c) for c in range(len(self.contexts))], dtype=np.float32).reshape(-1, len(OBSERVATION_FEATURES))

    @property
    def loads(self) -> np.ndarray:
        return np.array([c.rsplit("@", 1)[-1] for c in self.context_ids])

    def target_base(self) -> np.ndarray:
        """What a target ratio multiplies: the predicted unloaded full latency (v2), else the measured baseline (v1)."""
        return self.predicted_full if self.predicted_full is not None else self.baseline_latency

    def subset(self, split: str) -> ReplayTable:
        if split == "all":
            return self
        keep = self.splits == split
        if not keep.any():
            raise InputError(f"replay file has no {split!r} contexts")
        return ReplayTable(
            self.header, self.profiles, [c for c, k in zip(self.context_ids, keep) if k], self.splits[keep], self.prompt_keys[keep],
            self.categories[keep], [c for c, k in zip(self.contexts, keep) if k], self.latency[keep], self.baseline_latency[keep],
            self.ppl[keep], self.baseline_ppl[keep], self.kl[keep],
            None if self.predicted_full is None else self.predicted_full[keep],
            None if self.measured is None else self.measured[keep],
        )


def write_replay(path: Path, header: dict[str, Any], records: Iterable[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        spec = {"version": OBSERVATION_VERSION, "features": list(OBSERVATION_FEATURES)}
        handle.write(json.dumps({"format": REPLAY_FORMAT, **header, "observation": spec}) + "\n")
        for record in records:
            handle.write(json.dumps(record, default=float) + "\n")
    return path


def _read_lines(source: str | Path) -> list[str]:
    if str(source) == BUNDLED_REPLAY:
        return resources.files("casrap.data").joinpath("replay_smollm2.jsonl").read_text(encoding="utf-8").splitlines()
    try:
        return Path(source).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read replay file {source}: {err}") from err


def load_replay(source: str | Path = BUNDLED_REPLAY) -> ReplayTable:
    lines = [line for line in _read_lines(source) if line.strip()]
    if not lines:
        raise InputError(f"replay file {source} is empty")
    try:
        header = json.loads(lines[0])
    except ValueError as err:
        raise InputError(f"{source}:1: invalid JSON header") from err
    if header.get("format") not in REPLAY_FORMATS:
        raise InputError(f"{source}:1: not a casrap replay file (expected format {REPLAY_FORMAT})")
    missing = [key for key in ("profiles",) if key not in header]
    if missing or not isinstance(header.get("profiles"), list) or not header["profiles"]:
        raise InputError(f"{source}:1: replay header lacks {missing or ['profiles']} (write it with `casrap record`)")
    spec = header.get("observation") or {"version": OBSERVATION_VERSION, "features": list(OBSERVATION_FEATURES)}
    if spec.get("version") != OBSERVATION_VERSION or list(spec.get("features", [])) != list(OBSERVATION_FEATURES):
        raise InputError(f"{source}:1: recorded for observation spec v{spec.get('version')}, this casrap builds "
                         f"v{OBSERVATION_VERSION}: re-record it with `casrap record`")
    profiles = list(header["profiles"])
    contexts: dict[str, dict[str, Any]] = {}
    for number, line in enumerate(lines[1:], start=2):
        try:
            r = json.loads(line)
            lacking = [k for k in RECORD_KEYS if k not in r] + [f"telemetry.{k}" for k in TELEMETRY_KEYS if k not in r.get("telemetry", {})]
            if lacking:
                raise KeyError(", ".join(lacking))
            key = f"{r['prompt_id']}@{r['load']}"
            ctx = contexts.setdefault(key, {"first": r, "by_profile": {}})
            ctx["by_profile"][r["profile"]] = r
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise InputError(f"{source}:{number}: malformed record (missing or bad: {err})") from err
    complete = {k: c for k, c in contexts.items() if all(p in c["by_profile"] for p in profiles)}
    if not complete:
        raise InputError(f"replay file {source} has no context with every profile measured")
    keys = list(complete)
    base_obs, lat, ppl, kl, blat, bppl, splits, cats, pkeys, pfull, measured = [], [], [], [], [], [], [], [], [], [], []
    for key in keys:
        first = complete[key]["first"]
        tokens = first.get("input_tokens", first["prompt_tokens"])  # the templated prompt, as the Router counts it
        base_obs.append({"telemetry": first["telemetry"], "prompt_tokens": tokens, "prompt_ppl": first["prompt_ppl"],
                         "slowdown": float(first.get("slowdown", 1.0)), "thread_share": float(first.get("thread_share", 1.0))})
        rows = [complete[key]["by_profile"][p] for p in profiles]
        pfull.append(first.get("predicted_full_s"))
        measured.append([r.get("latency_source", "measured") == "measured" for r in rows])
        lat.append([r["latency_s"] for r in rows])
        ppl.append([r["ppl"] for r in rows])
        kl.append([r["kl"] for r in rows])
        blat.append(float(np.median([r["baseline_latency_s"] for r in rows])))
        bppl.append(first["baseline_ppl"])
        splits.append(first.get("split", "train"))
        pkeys.append(str(first.get("prompt_key") or f"replay-id:{first['prompt_id']}"))
        cats.append(first.get("category", ""))
    has_prediction = all(v is not None for v in pfull)
    return ReplayTable(
        header, profiles, keys, np.array(splits), np.array(pkeys), np.array(cats), base_obs,
        np.array(lat), np.array(blat), np.array(ppl), np.array(bppl), np.array(kl),
        np.array(pfull, dtype=float) if has_prediction else None, np.array(measured, dtype=bool),
    )


class PruningReplayEnv(gym.Env):
    """``casrap/PruningReplay-v0``: Pruning-v0's interface over recorded measurements.

    No model is loaded: each episode draws a recorded context (prompt x load level)
    and, for the ``slo`` reward, an absolute latency target (a multiple, drawn from
    ``RewardConfig.budget_range``, of the *unloaded* full model's predicted latency for
    the prompt: the observation shows that multiple, and how loaded the machine is
    reaches the policy through telemetry only); a step looks up the chosen
    profile's recorded latency and quality and computes the reward with the same
    functions as the live env. Observation and action spaces match Pruning-v0.

    Arguments (flat keywords, as ``gym.make("casrap/PruningReplay-v0", reward="slo")``):
    ``replay`` (path or ``"bundled"``), ``split`` (train | test | all), ``reward`` (a
    kind name or a :class:`RewardConfig`), ``slo_lambda``, ``table`` (an already loaded
    :class:`ReplayTable`).
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        replay: str | Path = BUNDLED_REPLAY,
        split: str = "train",
        reward: RewardConfig | str | None = None,
        table: ReplayTable | None = None,
        slo_lambda: float | None = None,
    ) -> None:
        super().__init__()
        self.table = (table or load_replay(replay)).subset(split)
        self.reward_config = reward_config(reward, slo_lambda)
        self.action_names = list(self.table.profiles)
        self.action_space = spaces.Discrete(len(self.action_names))
        self.observation_space = spaces.Box(0.0, 1.0, shape=(len(OBSERVATION_FEATURES),), dtype=np.float32)
        self._context = 0
        self._budget_ratio = float("inf")
        self._obs = np.zeros(len(OBSERVATION_FEATURES), dtype=np.float32)

    def prompt_keys(self) -> set[str]:
        """Text keys of the prompts this env serves (checkpoints record them)."""
        return set(self.table.prompt_keys.tolist())

    @property
    def n_contexts(self) -> int:
        return len(self.table.context_ids)

    def _draw(self, context: int | None = None, budget_ratio: float | None = None) -> None:
        self._context = int(self.np_random.integers(self.n_contexts)) if context is None else int(context)
        if self.reward_config.kind == "slo":
            lo, hi = self.reward_config.budget_range
            self._budget_ratio = float(self.np_random.uniform(lo, hi)) if budget_ratio is None else float(budget_ratio)
        else:
            self._budget_ratio = float("inf")
        self._obs = self.table.observation(self._context, self._budget_ratio)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        options = options or {}
        self._draw(options.get("context"), options.get("budget_ratio"))
        return self._obs.copy(), {"context": self.table.context_ids[self._context], "budget_ratio": self._budget_ratio}

    def outcome(self, action: int) -> tuple[float, bool, RewardInput]:
        """Reward of ``action`` in the current context (also used by the oracle)."""
        c = self._context
        base_lat = float(self.table.baseline_latency[c])
        x = RewardInput(
            float(self.table.latency[c, action]), base_lat, float(self.table.ppl[c, action]),
            float(self.table.baseline_ppl[c]), float(self.table.target_base()[c]) * self._budget_ratio,
        )
        reward, stop = compute_reward(x, self.reward_config)
        return reward, stop, x

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        a = int(action)
        reward, _, x = self.outcome(a)
        c = self._context
        info = {
            "context": self.table.context_ids[c], "category": str(self.table.categories[c]), "action": a,
            "profile": self.action_names[a], "latency_s": x.latency_s, "baseline_latency_s": x.baseline_latency_s,
            "ppl": x.ppl, "baseline_ppl": x.baseline_ppl, "kl": float(self.table.kl[c, a]), "speedup": x.speedup,
            "degradation": x.degradation, "budget_s": x.budget_s if np.isfinite(x.budget_s) else None, "reward": reward,
        }
        return self._obs.copy(), float(reward), True, False, info
