"""What a fresh machine and a new user run into: structure, data hygiene, bad input."""

from __future__ import annotations

import ast
import base64
import json
import pathlib
import zipfile

import gymnasium as gym
import pytest
import torch

import casrap
from casrap.decide.observation import OBSERVATION_FEATURES
from casrap.errors import CasrapError, CheckpointError, InputError, UnsupportedModelError

PACKAGE = pathlib.Path(casrap.__file__).parent


# ------------------------------------------------------------------ structure
def _import_graph() -> dict[str, set[str]]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_among_casrap_modules():
    assert _cycles(_import_graph()) == []
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]  # the checker itself finds one


# Floors, top to bottom: a package may import its own floor or any floor below it, never above.
FLOORS: list[set[str]] = [
    {"cli", "__main__"},
    {"runtime"},                                   # serving: AdaptiveLM, server, loadtest, bundles
    {"agents", "search", "heal", "bench", "bench_kv"},
    {"envs"},
    {"decide"},                                    # the one decision path (Router, observation, timed generation)
    {"profiles"},
    {"pruners"},
    {"models"},
    {"measure", "telemetry", "data", "reports", "evaluation", "errors", "paths", "version", "hub"},
]


def _floor_of(package: str) -> int:
    for level, names in enumerate(FLOORS):
        if package in names:
            return level
    raise AssertionError(f"casrap.{package} is on no floor: add it to FLOORS")


def _upward_imports(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for source, targets in graph.items():
        parts = source.split(".")
        if len(parts) < 2:  # the package root re-exports lazily
            continue
        for target in targets:
            a, b = parts[1], target.split(".")[1] if "." in target else target
            if a != b and _floor_of(b) < _floor_of(a):
                found.append(f"{source} -> {target}")
    return sorted(found)


def test_imports_only_run_downward():
    assert _upward_imports(_import_graph()) == []
    # the checker itself sees a lower floor reaching up
    assert _upward_imports({"casrap.envs.x": {"casrap.runtime.router"}}) == ["casrap.envs.x -> casrap.runtime.router"]


def test_cli_package_registers_every_command():
    from casrap.cli import app

    names = {c.name or c.callback.__name__ for c in app.registered_commands}
    assert {"info", "calibrate", "bench", "export", "record", "train", "test", "report", "search"} <= names
    assert "eval" in {g.name for g in app.registered_groups}


# --------------------------------------------------------------- data hygiene
def test_prompt_splits_are_fixed_grouped_and_never_share_a_passage():
    from casrap.data.prompts import load_prompts
    from casrap.measure.corpus import offline_corpus

    train, test = load_prompts(None, split="train"), load_prompts(None, split="test")
    assert len(test) >= 100 and len(train) >= 400
    assert not {p.group for p in train} & {p.group for p in test}
    assert not {p.key for p in train} & {p.key for p in test}
    assert any(p.text == "What is the capital of France?" for p in train)
    capitals = [p for p in train + test if p.text.startswith("What is the capital of")]
    assert len({p.split for p in capitals}) == 1  # one template, one side
    paragraphs = offline_corpus().paragraphs()
    used = {side: {i for p in ps for i, para in enumerate(paragraphs) if para in p.text} for side, ps in (("train", train), ("test", test))}
    assert used["train"] and used["test"] and not used["train"] & used["test"]


def test_user_file_split_ignores_seeds_and_keeps_groups(tmp_path):
    from casrap.data.prompts import load_prompts

    rows = [f"{i},fam{i % 40},Question {i} about family {i % 40}?" for i in range(80)]
    path = tmp_path / "p.csv"
    path.write_text("id,group,prompt\n" + "\n".join(rows) + "\n")
    train, test = load_prompts(path, "train"), load_prompts(path, "test")
    assert train and test and len(train) + len(test) == 80
    assert not {p.group for p in train} & {p.group for p in test}
    assert load_prompts(path, "test") == test  # nothing random


def test_calibration_text_never_overlaps_evaluation_text():
    from casrap.data.calibration import calibration_texts
    from casrap.data.prompts import load_prompts
    from casrap.measure.corpus import EVALUATION_SPLITS, load_corpus, offline_corpus, prose_split

    texts = calibration_texts()
    assert len(texts) == 64
    evaluation = offline_corpus().text
    sentences = {s.strip() for t in texts for s in t.split(".") if len(s.split()) >= 6}
    assert sentences and not any(s in evaluation for s in sentences)
    test_keys = {p.key for p in load_prompts(None, split="test")}
    from casrap.data.prompts import text_key

    assert not {text_key(t) for t in texts} & test_keys
    from casrap.data.calibration import evaluation_questions

    assert evaluation_questions() and not evaluation_questions() & set(texts)
    splits = [set(prose_split(s).paragraphs()) for s in EVALUATION_SPLITS]
    assert all(splits) and not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2])
    assert load_corpus("offline").name == "casrap-prose/test"


def test_casrap_test_refuses_a_checkpoint_trained_on_its_test_prompts():
    from casrap.cli.rl import refuse_overlap
    from casrap.envs.replay import PruningReplayEnv

    test_keys = PruningReplayEnv("bundled", split="test").prompt_keys()
    refuse_overlap({"prompts": {"train_keys": sorted(PruningReplayEnv("bundled", split="train").prompt_keys())}}, test_keys, "x")
    with pytest.raises(InputError, match="were used to train"):
        refuse_overlap({"prompts": {"train_keys": [next(iter(test_keys))]}}, test_keys, "x")


# --------------------------------------------------------------- gymnasium API
def test_gym_make_takes_flat_keywords(tiny):
    from casrap.data.prompts import load_prompts
    from casrap.profiles.factory import build_bank
    from casrap.telemetry import FakeTelemetry

    bank = build_bank(tiny.model, ["none", "layers-25"], tokenizer=tiny.tokenizer)
    env = gym.make("casrap/Pruning-v0", bank=bank, tokenizer=tiny.tokenizer, telemetry=FakeTelemetry(0),
                   prompts=load_prompts(None, split="train")[:3], max_new_tokens=8, profiles=["none", "layers-25"],
                   reward="slo", slo_lambda=3.0)
    config = env.unwrapped.config
    assert config.max_new_tokens == 8 and config.reward.kind == "slo" and config.reward.slo_lambda == 3.0
    obs, _ = env.reset(seed=0)
    _, _, terminated, _, info = env.step(1)
    assert terminated and info["profile"] == "layers-25" and len(obs) == len(OBSERVATION_FEATURES)
    with pytest.raises(TypeError, match="max_new_token"):
        gym.make("casrap/Pruning-v0", bank=bank, tokenizer=tiny.tokenizer, max_new_token=8)
    replay = gym.make("casrap/PruningReplay-v0", reward="slo", slo_lambda=2.5, split="test")
    assert replay.unwrapped.reward_config.kind == "slo" and replay.unwrapped.reward_config.slo_lambda == 2.5
    with pytest.raises(InputError, match="unknown reward"):
        gym.make("casrap/PruningReplay-v0", reward="fast")


# ------------------------------------------------------------------ bad input
def test_plans_that_break_the_model_are_refused(tiny):
    from casrap.models import describe
    from casrap.profiles import ProfileBank, PruningPlan, build_plan
    from casrap.pruners.importance import weight_norm_importance

    bank = ProfileBank(tiny.model, "tiny")
    bad = {
        "grouped layout": PruningPlan("a", heads={0: {"kv": [0, 1], "q": [0, 1, 2, 3]}}),  # group size 4: q 2-3 are kv 0's
        "out of range": PruningPlan("b", heads={0: {"kv": [0, 5], "q": [0, 1, 20, 21]}}),
        "layer": PruningPlan("c", skip_layers=[9]),
        "channels": PruningPlan("d", ffn={1: [0, 1, 500]}),
        "all layers": PruningPlan("e", skip_layers=[0, 1, 2, 3]),
    }
    for why, plan in bad.items():
        with pytest.raises(CheckpointError):
            bank.add(plan)
    good = PruningPlan("ok", heads={0: {"kv": [0, 1], "q": [0, 1, 4, 5]}})  # two query heads of each kv head
    bank.add(good)
    foreign = build_plan("layers-25", weight_norm_importance(tiny.model), describe(tiny.model))
    foreign.fingerprint = "llama-4L-000000000000"
    with pytest.raises(CheckpointError, match="another model"):
        bank.add(foreign)


def test_bank_refuses_a_model_with_accelerate_hooks(tiny):
    from accelerate.hooks import ModelHook, add_hook_to_module

    from casrap.profiles import ProfileBank

    add_hook_to_module(tiny.model.model.layers[1], ModelHook())
    with pytest.raises(UnsupportedModelError, match="accelerate hooks"):
        ProfileBank(tiny.model)


def test_replay_file_missing_keys_is_a_one_line_error(tmp_path):
    from casrap.envs.replay import load_replay

    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"format": "casrap-replay/2"}) + "\n")
    with pytest.raises(InputError, match="header lacks"):
        load_replay(path)
    record = json.loads(load_replay_line())
    del record["telemetry"]["other_cpu_util"]
    path.write_text(json.dumps({"format": "casrap-replay/2", "profiles": ["none"]}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(InputError, match=r"r.jsonl:2: .*telemetry.other_cpu_util"):
        load_replay(path)


def load_replay_line() -> str:
    from importlib import resources

    return resources.files("casrap.data").joinpath("replay_smollm2.jsonl").read_text().splitlines()[1]


def test_corrupt_state_file_is_a_one_line_error(tmp_path):
    from casrap.agents.training import read_state

    checkpoint = tmp_path / "p.zip"
    (tmp_path / "p.state.json").write_text("{truncated")
    with pytest.raises(CheckpointError, match="corrupt"):
        read_state(checkpoint)
    assert read_state(tmp_path / "other.zip") == {}


def test_policy_zip_loads_without_unpickling(tmp_path):
    """A zip whose pickled entries would run code: load_policy never unpickles them."""
    import cloudpickle

    from casrap.agents import DoubleDQN
    from casrap.agents.training import load_policy
    from casrap.envs.replay import PruningReplayEnv

    env = PruningReplayEnv("bundled", reward="slo")
    DoubleDQN("MlpPolicy", env, seed=0, learning_starts=5, buffer_size=100).save(tmp_path / "p.zip")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with zipfile.ZipFile(tmp_path / "p.zip") as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    data = json.loads(members["data"])
    data["observation_space"][":serialized:"] = base64.b64encode(cloudpickle.dumps(Payload())).decode()
    members["data"] = json.dumps(data).encode()
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as archive:
        for name, blob in members.items():
            archive.writestr(name, blob)
    policy = load_policy(tmp_path / "evil.zip", env)
    assert not marker.exists()
    assert policy.observation_space.shape == (len(OBSERVATION_FEATURES),) and policy.action_space.n == env.action_space.n
    with pytest.raises(CasrapError):
        (tmp_path / "junk.zip").write_bytes(b"not a zip")
        load_policy(tmp_path / "junk.zip", env)


def test_cli_resume_with_corrupt_state_prints_one_line(tmp_path):
    from test_cli import run

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "p.state.json").write_text("{")
    proc = run(["train", "--replay", "bundled", "--episodes", "2", "--checkpoint", "checkpoints/p.zip", "--resume"], tmp_path, check=False)
    assert proc.returncode == 2
    assert "corrupt" in proc.stderr and "Traceback" not in proc.stderr


# -------------------------------------------------------------------- agents
def test_double_dqn_regresses_on_online_argmax_evaluated_by_target(monkeypatch):
    """The TD targets the loss sees are Double DQN's; swapping the networks' roles would fail."""
    import torch.nn.functional as F

    from casrap.agents import DoubleDQN
    from casrap.envs.replay import PruningReplayEnv

    from stable_baselines3.common.type_aliases import ReplayBufferSamples

    env = PruningReplayEnv("bundled", reward="slo")
    model = DoubleDQN("MlpPolicy", env, seed=0, learning_starts=5, buffer_size=200, batch_size=16, gamma=0.9)
    model.learn(40)
    torch.manual_seed(0)
    with torch.no_grad():  # make the two networks disagree
        for p in model.q_net_target.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    # non-terminal transitions (the env's own are one-step episodes, where every target is the reward)
    n, actions = 16, env.action_space.n
    obs_n = len(OBSERVATION_FEATURES)
    batch = ReplayBufferSamples(torch.rand(n, obs_n), torch.randint(0, actions, (n, 1)), torch.rand(n, obs_n),
                                torch.zeros(n, 1), torch.randn(n, 1), None)
    monkeypatch.setattr(model.replay_buffer, "sample", lambda *a, **k: batch)
    with torch.no_grad():
        online, target = model.q_net(batch.next_observations), model.q_net_target(batch.next_observations)
    discount = batch.discounts if batch.discounts is not None else 0.9
    expected = batch.rewards + (1 - batch.dones) * discount * target.gather(1, online.argmax(1, keepdim=True))
    swapped = batch.rewards + (1 - batch.dones) * discount * online.gather(1, target.argmax(1, keepdim=True))
    vanilla = batch.rewards + (1 - batch.dones) * discount * target.max(1, keepdim=True).values
    seen = []
    real_loss = F.smooth_l1_loss
    monkeypatch.setattr(F, "smooth_l1_loss", lambda current, tgt: seen.append(tgt.clone()) or real_loss(current, tgt))
    model.train(gradient_steps=1, batch_size=16)
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], expected)
    assert not torch.allclose(seen[0], swapped) and not torch.allclose(seen[0], vanilla)


def test_sigterm_during_training_keeps_checkpoint_and_metrics(tmp_path):
    """A training run stopped from outside saves its policy and state, and can resume."""
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, "-m", "casrap.cli", "train", "--replay", "bundled", "--reward", "slo", "--episodes", "1000000",
            "--checkpoint", "ck/p.zip", "--quiet"]
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "reports" / "train-1" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.is_file() or len(metrics.read_text().splitlines()) < 50):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    state = json.loads((tmp_path / "ck" / "p.state.json").read_text())
    assert (tmp_path / "ck" / "p.zip").is_file() and state["episodes_done"] >= 50
    assert state["prompts"]["train_keys"] and state["reward"] == "slo"
