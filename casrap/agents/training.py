"""Training loop around SB3's ``learn``: per-episode metrics, checkpoints, resume.

Nothing is lost on interruption: every episode's metrics are appended (and flushed)
to ``metrics.jsonl`` as it ends; the policy is saved every ``save_every`` episodes,
on Ctrl-C or failure, and at the end, beside a ``.state.json`` that ``resume`` reads
to continue in the same run folder.

With ``TrainConfig.tensorboard`` set, SB3 gets it as ``tensorboard_log`` (its own
scalars: exploration rate, TD loss) and the episode recorder writes casrap's per-episode
scalars into the same event file: ``episode/reward``, ``episode/latency_s``,
``episode/kl``, ``episode/speedup`` and ``choice/<profile>`` (each profile's share of the
last ``CHOICE_WINDOW`` episodes), so ``tensorboard --logdir DIR`` shows the run live.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.utils import LinearSchedule

from casrap.agents.double_dqn import AgentConfig, DoubleDQN
from casrap.agents.ope import epsilon_greedy_propensity
from casrap.errors import CheckpointError
from casrap.reports.runs import append_jsonl, new_run_dir, read_metrics

log = logging.getLogger(__name__)

CHOICE_WINDOW = 50  # episodes over which TensorBoard's choice/<profile> shares are taken
TB_RUN_NAME = "casrap"  # SB3 writes DIR/casrap_N/ (N counts the runs in DIR)


@dataclass
class TrainConfig:
    """Settings of ``casrap train`` that are not the environment's.

    Attributes:
        episodes: episodes to run in total (a resumed run counts those already done).
        checkpoint: where the SB3 policy zip goes; ``<stem>.state.json`` beside it.
        reports_root: parent of the numbered run folders.
        seed: seeds the agent and the environment.
        resume: continue from ``checkpoint`` and its state file.
        save_every: episodes between periodic checkpoints.
        agent: Double-DQN hyper-parameters.
        tensorboard: folder for TensorBoard event files (SB3's ``tensorboard_log``); None: none.
    """

    episodes: int = 200
    checkpoint: Path = Path("checkpoints/rl_policy.zip")
    reports_root: Path = Path("reports")
    seed: int = 0
    resume: bool = False
    save_every: int = 25
    agent: AgentConfig = field(default_factory=AgentConfig)
    prompts_per_episode: int = 1
    tensorboard: Path | None = None


def state_path(checkpoint: Path) -> Path:
    return checkpoint.with_suffix(".state.json")


def read_state(checkpoint: Path) -> dict[str, Any]:
    """The ``.state.json`` beside a checkpoint ({} if absent); a corrupt one is a one-line error."""
    path = state_path(Path(checkpoint))
    if not path.is_file():
        return {}
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{path} is corrupt ({type(err).__name__}); delete it to start afresh, or restore it") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is corrupt (expected a JSON object)")
    return state


def write_state(checkpoint: Path, state: dict[str, Any]) -> None:
    """Write the state file atomically, so an interruption never leaves half a file."""
    path = state_path(Path(checkpoint))
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state, default=str))
    tmp.replace(path)


def _safe_custom_objects(checkpoint: Path) -> dict[str, Any]:
    """Replacements for every pickled entry of an SB3 zip, built from its readable JSON.

    SB3 stores spaces, schedules and classes as cloudpickle blobs, and unpickling runs
    whatever code the file holds. Every such entry is replaced here by an object built
    from plain JSON fields (shape, n, schedule endpoints), so only JSON and
    ``torch.load(weights_only=True)`` tensors come from the file.
    """
    import zipfile

    import numpy as np
    from gymnasium import spaces
    from stable_baselines3.common.buffers import ReplayBuffer
    from stable_baselines3.common.type_aliases import TrainFreq, TrainFrequencyUnit
    from stable_baselines3.dqn.policies import DQNPolicy

    try:
        with zipfile.ZipFile(checkpoint) as archive:
            data = json.loads(archive.read("data"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{checkpoint} is not a readable casrap policy ({type(err).__name__})") from err
    pickled = {k: v for k, v in data.items() if isinstance(v, dict) and ":serialized:" in v}
    custom: dict[str, Any] = {key: None for key in pickled}
    try:
        obs = pickled.get("observation_space", {})
        shape = obs.get("_shape", [8])
        shape = json.loads(shape) if isinstance(shape, str) else shape
        custom["observation_space"] = spaces.Box(0.0, 1.0, shape=tuple(int(n) for n in shape), dtype=np.float32)
        custom["action_space"] = spaces.Discrete(int(pickled.get("action_space", {}).get("n", 0)))
        schedule = pickled.get("exploration_schedule", {})
        custom["exploration_schedule"] = LinearSchedule(float(schedule.get("start", 0.05)), float(schedule.get("end", 0.05)),
                                                        float(schedule.get("end_fraction", 1.0)))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{checkpoint}: unreadable spaces or schedules ({err})") from err
    rate = float(data.get("learning_rate", 0.0)) if isinstance(data.get("learning_rate"), (int, float)) else 0.0
    custom.update({
        "policy_class": DQNPolicy, "replay_buffer_class": ReplayBuffer, "lr_schedule": lambda _: rate,
        "train_freq": TrainFreq(1, TrainFrequencyUnit.STEP), "learning_rate": rate,
    })
    return custom


def load_policy(checkpoint: Path, env: gym.Env | None = None) -> DoubleDQN:
    """Load a policy zip without unpickling anything; spaces must match the env."""
    if not Path(checkpoint).is_file():
        raise CheckpointError(f"no checkpoint at {checkpoint}")
    custom = _safe_custom_objects(Path(checkpoint))
    try:
        model = DoubleDQN.load(str(checkpoint), env=None, custom_objects=custom, device="cpu")
    except Exception as err:  # noqa: BLE001 - zip errors, missing keys, torch errors
        raise CheckpointError(f"{checkpoint} is not a readable casrap policy: {type(err).__name__}: {err}") from err
    if env is not None:
        if model.action_space.n != env.action_space.n:  # type: ignore[attr-defined]
            raise CheckpointError(
                f"{checkpoint} was trained on {model.action_space.n} actions; this environment has "  # type: ignore[attr-defined]
                f"{env.action_space.n}; use the same --profiles (or replay file) as in training"  # type: ignore[attr-defined]
            )
        if model.observation_space.shape != env.observation_space.shape:
            raise CheckpointError(f"{checkpoint} expects observations of shape {model.observation_space.shape}")
    return model


class EpisodeRecorder(BaseCallback):
    """Appends one metrics record per finished step/episode and checkpoints.

    When SB3 logs to TensorBoard, each finished episode also becomes scalars there (see
    the module docstring), written through SB3's own writer so that one event file holds
    the whole run.
    """

    def __init__(self, run_dir: Path, first_episode: int, save: Callable[[int], None], save_every: int,
                 on_episode: Callable[[dict[str, Any]], None] | None, max_new_tokens: int | None,
                 action_names: list[str] | None = None) -> None:
        super().__init__()
        self.run_dir = run_dir
        self.episode = first_episode
        self.save = save
        self.save_every = save_every
        self.on_episode = on_episode
        self.max_new_tokens = max_new_tokens
        self.action_names = list(action_names or [])
        self.recent: deque[str] = deque(maxlen=CHOICE_WINDOW)
        self.writer: Any = None

    def _on_training_start(self) -> None:
        from stable_baselines3.common.logger import TensorBoardOutputFormat

        for fmt in self.logger.output_formats:
            if isinstance(fmt, TensorBoardOutputFormat):
                self.writer = fmt.writer

    def _on_training_end(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def _to_tensorboard(self, record: dict[str, Any]) -> None:
        step = record["episode"]
        for key in ("reward", "latency_s", "kl", "speedup"):
            value = record.get(key)
            if isinstance(value, (int, float)):
                self.writer.add_scalar(f"episode/{key}", float(value), step)
        profile = record.get("profile")
        if profile is None:
            return
        self.recent.append(str(profile))
        if profile not in self.action_names:
            self.action_names.append(str(profile))
        for name in self.action_names:
            self.writer.add_scalar(f"choice/{name}", self.recent.count(name) / len(self.recent), step)

    def _behaviour(self, env_index: int) -> dict[str, Any]:
        """The observation the action was chosen on and its epsilon-greedy propensity, for off-policy evaluation.

        Called before SB3 stores the transition and updates the exploration rate, so
        ``_last_obs`` and ``exploration_rate`` are the ones the action was taken under;
        before ``learning_starts`` SB3 samples uniformly (epsilon 1).
        """
        model: Any = self.model
        obs = np.asarray(model._last_obs)[env_index]
        greedy = int(model.policy.predict(obs, deterministic=True)[0])
        warmup = self.num_timesteps - len(self.locals["infos"]) < model.learning_starts
        eps = 1.0 if warmup else float(model.exploration_rate)
        n_actions = int(model.action_space.n)
        taken = int(np.asarray(self.locals["actions"]).ravel()[env_index])
        return {"observation": [float(v) for v in obs], "greedy_action": greedy, "behaviour_epsilon": eps,
                "propensity": epsilon_greedy_propensity(taken, greedy, eps, n_actions)}

    def _on_step(self) -> bool:
        for env_index, (info, done) in enumerate(zip(self.locals["infos"], self.locals["dones"])):
            if "reward" not in info:
                continue
            if done:
                self.episode += 1
            record = {k: v for k, v in info.items() if k not in ("episode", "terminal_observation", "TimeLimit.truncated")}
            record["episode"] = self.episode
            record["timestep"] = int(self.num_timesteps)
            record["exploration_rate"] = float(self.model.exploration_rate)  # type: ignore[attr-defined]
            record.update(self._behaviour(env_index))
            if self.max_new_tokens:
                record.setdefault("max_new_tokens", self.max_new_tokens)
            append_jsonl(self.run_dir / "metrics.jsonl", record)
            if self.writer is not None and done:
                self._to_tensorboard(record)
            if self.on_episode:
                self.on_episode(record)
            if done and self.save_every and self.episode % self.save_every == 0:
                self.save(self.episode)
        return True


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path
    episodes_done: int
    interrupted: bool


def train(
    env: gym.Env,
    config: TrainConfig,
    on_episode: Callable[[dict[str, Any]], None] | None = None,
    max_new_tokens: int | None = None,
    run_meta: dict[str, Any] | None = None,
) -> TrainResult:
    checkpoint = Path(config.checkpoint)
    state_file = state_path(checkpoint)
    if config.resume:
        if not state_file.is_file():
            raise CheckpointError(f"nothing to resume: {state_file} not found")
        state = read_state(checkpoint)
        if "run_dir" not in state:
            raise CheckpointError(f"{state_file} names no run folder; start a new run without --resume")
        run_dir = Path(state["run_dir"])
        recorded = [int(r["episode"]) for r in read_metrics(run_dir) if r.get("episode")]
        done = max([int(state["episodes_done"]), *recorded])
        model = load_policy(checkpoint, env)
        model.set_env(env)
        model.learning_rate = config.agent.learning_rate
        model._setup_lr_schedule()
        model.exploration_schedule = LinearSchedule(
            model.exploration_initial_eps, model.exploration_final_eps, model.exploration_fraction
        )
        model.tensorboard_log = str(config.tensorboard) if config.tensorboard else None
    else:
        run_dir = new_run_dir(Path(config.reports_root), "train")
        done = 0
        total = config.episodes * config.prompts_per_episode
        model = DoubleDQN("MlpPolicy", env, seed=config.seed, verbose=0, device="cpu",
                          tensorboard_log=str(config.tensorboard) if config.tensorboard else None,
                          **config.agent.sb3_kwargs(total, config.prompts_per_episode))
    base_state = read_state(checkpoint) if config.resume else {}
    meta = {"episodes": config.episodes, "seed": config.seed, "checkpoint": str(checkpoint), "agent": config.agent.to_dict(), **(run_meta or {})}
    (run_dir / "run.json").write_text(json.dumps(meta, indent=1, default=str))

    def save(episodes_done: int) -> None:
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        model.save(str(checkpoint))
        write_state(checkpoint, {**base_state, "run_dir": str(run_dir), "episodes_done": episodes_done,
                                 "episodes_total": config.episodes, **(run_meta or {})})

    recorder = EpisodeRecorder(run_dir, done, save, config.save_every, on_episode, max_new_tokens,
                               action_names=getattr(env, "action_names", None))
    remaining = max(0, (config.episodes - done) * config.prompts_per_episode)
    interrupted = False
    try:
        if remaining:
            model.learn(total_timesteps=remaining, callback=recorder, reset_num_timesteps=not config.resume,
                        tb_log_name=TB_RUN_NAME)
    except KeyboardInterrupt:
        interrupted = True
        log.warning("interrupted after %d episodes; saving", recorder.episode)
    except Exception:
        save(recorder.episode)
        raise
    save(recorder.episode)
    return TrainResult(run_dir, checkpoint, recorder.episode, interrupted)
