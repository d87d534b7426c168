"""``casrap train --tensorboard DIR``: SB3's event files, with casrap's per-episode scalars in them."""

from __future__ import annotations

import json

import pytest

from tests.test_cli import run


def _scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_replay_training_writes_tensorboard_scalars_per_episode(tmp_path):
    pytest.importorskip("tensorboard")
    out = run(["train", "--replay", "bundled", "--reward", "slo", "--episodes", "40", "--checkpoint", "ck/p.zip",
               "--tensorboard", "tb", "--quiet", "--json"], tmp_path)
    assert json.loads(out.stdout)["episodes_done"] == 40
    (run_dir,) = sorted((tmp_path / "tb").iterdir())  # SB3's DIR/casrap_1
    assert run_dir.name == "casrap_1" and list(run_dir.glob("events.out.tfevents.*"))
    scalars = _scalars(run_dir)
    for tag in ("episode/reward", "episode/latency_s", "episode/kl"):
        assert len(scalars[tag]) == 40, tag
    shares = {tag: values for tag, values in scalars.items() if tag.startswith("choice/")}
    from casrap.envs.replay import load_replay

    assert len(shares) == len(load_replay("bundled").profiles)  # every action of the bundled recording, from the first episode on
    for i in range(40):  # the shares of one episode's window add up to 1
        assert sum(values[i] for values in shares.values()) == pytest.approx(1.0)
    metrics = [json.loads(line) for line in (tmp_path / "reports" / "train-1" / "metrics.jsonl").read_text().splitlines()]
    assert scalars["episode/reward"] == pytest.approx([m["reward"] for m in metrics], rel=1e-5)


def test_tensorboard_option_without_the_package_is_one_line(tmp_path, monkeypatch):
    import importlib.util

    from casrap.cli import rl
    from casrap.errors import InputError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(InputError, match=r"casrap\[tb\]"):
        rl.train(episodes=1, replay="bundled", tensorboard=tmp_path / "tb")
