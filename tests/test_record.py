"""Telemetry of the rest of the machine, the unloaded latency model, and the recording at scale."""

from __future__ import annotations

import json
import time

import numpy as np
import psutil
import pytest

from casrap.decide.observation import OBSERVATION_FEATURES
from casrap.envs.record import (
    RecordConfig, build_records, quality_pass, recording_header, seed_quality, select_prompts, timing_order, timing_pass,
)
from casrap.envs.replay import PruningReplayEnv, load_replay, write_replay
from casrap.decide.latency_model import (
    LatencyFit, LatencySample, UnloadedLatencyModel, fit_latency, grouped_holdout_error, load_or_fit_latency_model,
)
from casrap.telemetry import FakeTelemetry, LiveTelemetry
from casrap.telemetry.load import BackgroundLoad

PROFILES = ["none", "layers-25", "ffn-25"]


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    x = 0.0
    while time.perf_counter() < end:
        x += 1.0


@pytest.mark.parametrize("cores", [2, 16])
def test_other_cpu_is_the_machines_busy_time_less_our_own_per_core(cores):
    """On scripted CPU counters: k other busy cores read 100 k / cores percent whatever we did."""
    telemetry = LiveTelemetry()
    telemetry._cores = cores
    clock = {"wall": 0.0, "busy": 0.0, "own": 0.0}
    telemetry._cpu_counters = lambda: (clock["wall"], clock["busy"], clock["own"])
    telemetry._last = telemetry._cpu_counters()
    for others in (0, 1, 2):
        # one second in which casrap itself keeps one core busy and `others` cores run other processes
        clock["wall"] += 1.0
        clock["own"] += 1.0
        clock["busy"] += 1.0 + others
        assert telemetry._other_cpu() == pytest.approx(100.0 * others / cores)
    clock["wall"] += 0.001  # a window too short to mean anything keeps the previous reading
    clock["busy"] += 0.001 * cores
    assert telemetry._other_cpu() == pytest.approx(100.0 * 2 / cores)


def test_other_cpu_separates_background_load_levels_even_right_after_our_own_work():
    """0, 1 and 2 busy workers read apart although casrap itself was busy just before each reading.

    What k workers can get depends on the cores: with our own busy loop on one core they have
    the rest, or a fair share k / (k + 1) of all cores when there are fewer cores than busy
    processes. Each reading must show at least half of its expected step. On a machine that other
    processes already keep busy the steps cannot be seen, and the test says so instead of guessing
    (the arithmetic is tested on scripted counters above).
    """
    cores = psutil.cpu_count() or 1
    telemetry = LiveTelemetry()
    readings = {}
    for workers in (0, 1, 2):
        load = BackgroundLoad(workers=workers).start() if workers else None
        try:
            if load:
                load.set_intensity(1.0)
            time.sleep(0.5)
            telemetry.read()
            _busy(1.0)  # "a generation" of our own, right before the decision
            readings[workers] = telemetry.read()
        finally:
            if load:
                load.stop()
    other = {w: r.other_cpu_util for w, r in readings.items()}
    if other[0] > 0.5 * 100.0 / cores:
        pytest.skip(f"other processes already use {other[0]:.0f}% of the {cores} cores")

    def expected(k: int) -> float:
        return 100.0 * min(k, cores * k / (k + 1)) / cores

    # casrap's own busy second (one core of the machine's) is in the total but not in "other"
    assert readings[0].cpu_util - other[0] > 0.5 * 100.0 / cores, readings[0]
    assert other[1] - other[0] > 0.5 * (expected(1) - expected(0)), other
    assert other[2] - other[1] > 0.5 * (expected(2) - expected(1)), other


def test_latency_fit_recovers_a_known_line_and_reports_held_out_error():
    truth = LatencyFit(0.05, 0.001, 0.03, 0.00002)
    samples = [LatencySample(p, truth.ttft(p), truth.decode(p), 16) for p in (8, 32, 64, 128, 256) for _ in range(2)]
    fit = fit_latency(samples)
    assert fit.predict(100, 32) == pytest.approx(truth.predict(100, 32), rel=1e-6)
    err = grouped_holdout_error(samples, [str(s.prompt_tokens) for s in samples], 16)
    assert err["median_rel_error"] < 1e-6 and err["n"] == len(samples)
    noisy = [LatencySample(s.prompt_tokens, s.ttft_s * (1.3 if i % 3 == 0 else 1.0), s.decode_s, 16) for i, s in enumerate(samples)]
    assert grouped_holdout_error(noisy, [str(s.prompt_tokens) for s in noisy], 16)["p90_rel_error"] > 0.01


def test_unloaded_latency_model_is_measured_once_and_cached(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("CASRAP_HOME", str(tmp_path))
    first = load_or_fit_latency_model(tiny.model, tiny.tokenizer, lengths=(4, 8, 16), new_tokens=4, repeats=2)
    assert first.predict(64, 8) >= first.predict(8, 8) > 0  # slopes are clamped at 0: never shorter for longer prompts (tiny-model timings are too small to promise more)
    assert set(first.holdout) >= {"median_rel_error", "n"}
    cached = list((tmp_path / "latency").glob("*.json"))
    assert len(cached) == 1
    again = load_or_fit_latency_model(tiny.model, tiny.tokenizer)
    assert again.to_dict() == UnloadedLatencyModel.load(cached[0]).to_dict() == first.to_dict()


class _Levels:
    """Stands in for the background workers: remembers which level was asked for, when."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def set(self, level: str, seed: int = 0) -> None:
        self.calls.append(level)


def test_recording_measures_every_latency_through_the_router_and_resumes(tiny, tmp_path):
    from casrap.decide.router import Router
    from casrap.profiles.factory import build_bank

    bank = build_bank(tiny.model, PROFILES, base_model="tiny", tokenizer=tiny.tokenizer)
    config = RecordConfig(train_prompts=6, test_prompts=3, loads=("0", "1", "bursty"), max_new_tokens=6, timing_tokens=4,
                          settle_s=0.0, block=2)
    prompts = select_prompts(config)
    assert len(prompts) == 9 and sum(p.split == "test" for p in prompts) == 3
    quality = quality_pass(bank, tiny.tokenizer, prompts, PROFILES, config, tmp_path / "q.jsonl")
    assert all(q["kl"]["none"] == 0.0 and q["ppl"]["layers-25"] != q["ppl"]["none"] for q in quality.values())
    # resumable: a second pass re-scores nothing
    rows_before = len((tmp_path / "q.jsonl").read_text().splitlines())
    again = quality_pass(bank, tiny.tokenizer, prompts, PROFILES, config, tmp_path / "q.jsonl")
    assert again == quality and len((tmp_path / "q.jsonl").read_text().splitlines()) == rows_before
    ordered = timing_order(prompts)
    assert sorted(p.key for p in ordered) == sorted(p.key for p in prompts)
    assert {p.split for p in ordered[:3]} == {"train", "test"}  # a recording cut short holds both splits
    router = Router(bank, tiny.tokenizer, policy=None, telemetry=FakeTelemetry(0),
                    unloaded=UnloadedLatencyModel(LatencyFit(0.01, 0.0, 0.001, 0.0)))
    levels = _Levels()
    part = timing_pass(router, ordered[:4], PROFILES, config, tmp_path / "t.jsonl", levels, deadline=None)
    assert len(part) == 4 * len(config.loads) * len(PROFILES)
    assert levels.calls[:3] == ["0", "1", "bursty"] and levels.calls[3:6] == ["1", "bursty", "0"]  # levels rotate per block
    # resume with more prompts: the first four are not measured again
    timing = timing_pass(router, ordered, PROFILES, config, tmp_path / "t.jsonl", _Levels())
    assert len(timing) == len(ordered) * len(config.loads) * len(PROFILES)
    assert len({(r["prompt_key"], r["load"], r["profile"]) for r in timing}) == len(timing)
    assert bank.active == "none" and all(r["threads"] >= 1 and r["slowdown"] > 0 for r in timing)
    header = recording_header("tiny", bank, PROFILES, config, quality, timing, {"quality_s": 1.0}, router.threads.key())
    path = write_replay(tmp_path / "r.jsonl", header, build_records(quality, timing, PROFILES, config))
    records = [json.loads(line) for line in path.read_text().splitlines()[1:]]
    assert {r["latency_source"] for r in records} == {"measured"}
    assert {r["load"] for r in records} == {"0", "1", "bursty"}
    assert header["thread_policy"].startswith("free-cores") and header["profile_speed"]["none"] == pytest.approx(1.0)
    table = load_replay(path)
    assert table.measured.all() and table.base_obs.shape[1] == len(OBSERVATION_FEATURES)
    # a deadline already passed measures nothing more
    assert len(timing_pass(router, ordered, PROFILES, config, tmp_path / "t2.jsonl", _Levels(), deadline=0.0)) == 0


def test_quality_is_taken_from_an_earlier_recording_where_it_has_every_profile(tmp_path):
    from casrap.data.prompts import Prompt

    prompts = [Prompt(id="a", text="alpha", category="c", group="g", split="train"),
               Prompt(id="b", text="beta", category="c", group="h", split="test")]
    header = {"model": "x", "profiles": PROFILES, "max_new_tokens": 4}
    rows = []
    for p in prompts:
        for name in PROFILES if p.id == "a" else PROFILES[:2]:  # b lacks a profile: measured again
            rows.append({"prompt_id": p.id, "prompt_key": p.key, "load": 0, "profile": name, "ppl": 2.0, "kl": 0.1,
                         "prompt_tokens": 3, "input_tokens": 5, "prompt_ppl": 4.0})
    write_replay(tmp_path / "old.jsonl", header, rows)
    assert seed_quality(tmp_path / "old.jsonl", prompts, PROFILES, tmp_path / "q.jsonl") == 1
    assert seed_quality(tmp_path / "old.jsonl", prompts, PROFILES, tmp_path / "q.jsonl") == 0  # already there
    row = json.loads((tmp_path / "q.jsonl").read_text().splitlines()[0])
    assert row["prompt_key"] == prompts[0].key and set(row["ppl"]) == set(PROFILES)


def test_replay_targets_are_absolute_multiples_of_the_unloaded_prediction(tmp_path):
    """The budget scales the predicted unloaded latency, not the full model's latency under the current load."""
    header = {"model": "x", "profiles": ["none", "fast"], "max_new_tokens": 8}
    records = []
    for load, slow in ((0, 1.0), (2, 2.5)):
        for name, factor in (("none", 1.0), ("fast", 0.6)):
            records.append({"prompt_id": "p", "load": load, "profile": name, "latency_s": slow * factor, "ppl": 10.0 if name == "none" else 12.0,
                            "kl": 0.0, "baseline_latency_s": slow, "baseline_ppl": 10.0, "prompt_tokens": 5, "prompt_ppl": 3.0,
                            "predicted_full_s": 1.0, "latency_source": "modelled", "split": "train",
                            "telemetry": {"other_cpu_util": 90.0 * load / 2, "mem_available_gb": 8, "gpu_util": 0, "vram_free_gb": 0, "battery": 100}})
    write_replay(tmp_path / "r.jsonl", header, records)
    env = PruningReplayEnv(tmp_path / "r.jsonl", reward="slo")
    rewards = {}
    for context in range(2):
        obs, info = env.reset(options={"context": context, "budget_ratio": 1.5})
        load = info["context"].rsplit("@", 1)[1]
        rewards[load] = [env.outcome(a)[0] for a in range(2)]
        assert obs[OBSERVATION_FEATURES.index("latency_target")] == pytest.approx(1.5 / 4)
    # idle: the full model meets a 1.5 s target; under load it misses it and the fast profile wins
    assert np.argmax(rewards["0"]) == 0 and np.argmax(rewards["2"]) == 1


def test_choice_by_load_test_detects_dependence_and_not_its_absence(tmp_path):
    from casrap.reports import build_report
    from casrap.reports.load_shift import choice_by_load
    from casrap.reports.runs import append_jsonl

    shifted = [{"background_load": lv, "profile": "none" if lv == 0 else "layers-25", "reward": 0.0} for lv in (0, 1.0) for _ in range(20)]
    mixed = [{"background_load": lv, "profile": p, "reward": 0.0} for lv in (0, 1.0) for p in ("none", "layers-25") for _ in range(10)]
    assert choice_by_load(shifted)["p_value"] < 0.01
    assert choice_by_load(mixed)["p_value"] > 0.5
    assert choice_by_load([{"profile": "none"}]) is None
    run = tmp_path / "run"
    run.mkdir()
    for i, r in enumerate(shifted):
        append_jsonl(run / "metrics.jsonl", {**r, "episode": i + 1})
    build_report(run)
    assert (run / "choice_by_load.png").is_file() and "chosen profile by background load" in (run / "training_report.txt").read_text()


def test_calibrate_command_measures_and_caches_the_latency_model(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from casrap.cli import app

    monkeypatch.setenv("CASRAP_HOME", str(tmp_path / "home"))
    result = CliRunner().invoke(app, ["calibrate", "--model", "tiny-random-llama", "--output", str(tmp_path / "cal.safetensors")])
    assert result.exit_code == 0, result.output
    assert "unloaded latency model" in result.stdout
    saved = list((tmp_path / "home" / "latency").glob("*.json"))
    assert len(saved) == 1 and UnloadedLatencyModel.load(saved[0]).fit.decode_c > 0
