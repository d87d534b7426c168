"""``casrap loadtest`` as a serving benchmark: levels, interleaving, per-level statistics, prompts files, JSON.

Requests run on the tiny model or on a fake runner; background loads are fakes that
record when they run. Nothing here asserts a timing.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from runtime_helpers import TINY_PROFILES, BudgetPolicy, make_tiny_bundle, tiny_bank

from casrap.errors import InputError
from casrap.runtime.loadtest import (
    POLICY, LoadTestConfig, background_for, best_static, choose_prompts, dominating, level_names, paired_difference,
    plot_result, run_loadtest, runner_rows, summarise, sweep_order, target_ratio,
)
from casrap.telemetry.load import parse_load_levels


def _adaptive(lm):
    from casrap.decide.defaults import RuntimeDefaults
    from casrap.decide.router import Router
    from casrap.runtime.adaptive import AdaptiveLM
    from casrap.telemetry import FakeTelemetry

    bank = tiny_bank(lm)
    router = Router(bank, lm.tokenizer, BudgetPolicy(len(bank.names)), RuntimeDefaults(max_new_tokens=4), telemetry=FakeTelemetry(0))
    return AdaptiveLM(router, lm.tokenizer, "tiny-random-llama")


# ----------------------------------------------------------------------- levels
def test_load_levels_are_parsed_and_a_legacy_load_is_named():
    assert parse_load_levels(" 0, 1,bursty,1") == ["0", "1", "bursty"]
    with pytest.raises(InputError, match="load levels"):
        parse_load_levels("0,3")
    assert level_names(LoadTestConfig(load_levels=["2", "0"])) == ["2", "0"]
    assert level_names(LoadTestConfig(background_load=0.0)) == ["0"]
    assert level_names(LoadTestConfig(background_load=1.0, load_workers=2)) == ["2"]
    assert level_names(LoadTestConfig(background_load=0.5, load_workers=1)) == ["1x0.5"]
    bursty = background_for(LoadTestConfig(load_levels=["bursty"]), "bursty", seed=7)
    assert bursty.workers == 2 and bursty.bursts.seed == 7
    custom = background_for(LoadTestConfig(background_load=0.5), "1x0.5", seed=0)
    assert custom.workers == 1 and custom.intensity == 0.5


def test_sweep_interleaves_levels_per_prompt_and_rotates_runners():
    levels, runners = ["0", "1", "2", "bursty"], [POLICY, "none", "a", "b", "c"]
    steps = sweep_order(5, levels, runners)
    assert len(steps) == 20
    for i in range(5):
        mine = steps[4 * i: 4 * i + 4]
        assert {s[0] for s in mine} == {i}  # one prompt's levels run back to back
        assert [s[1] for s in mine] == levels[i % 4:] + levels[: i % 4]  # each prompt starts one level later
    for _, _, order in steps:
        assert sorted(order) == sorted(runners) and order == runners[runners.index(order[0]):] + runners[: runners.index(order[0])]
    firsts = [order[0] for _, _, order in steps]
    assert all(firsts.count(r) == 4 for r in runners)  # 20 steps: each runner goes first 4 times
    for level in levels:  # no level always sees the same runner first
        assert len({order[0] for _, lv, order in steps if lv == level}) > 1


def test_targets_are_seeded_per_prompt():
    config = LoadTestConfig(seed=3)
    ratios = [target_ratio(config, f"{k:016x}") for k in range(200)]
    assert all(0.5 <= r <= 3.0 for r in ratios) and len(set(ratios)) == 200
    assert target_ratio(config, "00000000000000ff") == target_ratio(LoadTestConfig(seed=3, prompts=99), "00000000000000ff")
    assert target_ratio(config, "00000000000000ff") != target_ratio(LoadTestConfig(seed=4), "00000000000000ff")


# ---------------------------------------------------------------- the sweep
class FakeLoad:
    def __init__(self, level: str, log: list) -> None:
        self.level, self.log = level, log
        self.workers = 0 if level == "0" else 2

    def start(self) -> FakeLoad:
        self.log.append(("start", self.level))
        return self

    def stop(self) -> None:
        self.log.append(("stop", self.level))


def _fake_runner(log: list, active: list):
    """Known latencies per profile and level; the 'policy' always picks layers-25."""
    base = {"none": 1.0, "layers-25": 0.6, "ffn-25": 0.8}

    def run(prompt: str, n: int, target: float | None, profile: str | None) -> dict:
        name = profile or "layers-25"
        level = active[-1] if active else "idle"
        log.append(("run", POLICY if profile is None else profile, level))
        latency = base[name] * (1 + (0.0 if level in ("0", "idle") else 1.0))
        return {"profile": name, "latency_s": latency, "total_s": latency, "ttft_s": 0.1 * latency, "queue_wait_s": 0.0,
                "decision_s": 0.01 if profile is None else 0.0, "switch_s": 0.001, "telemetry_s": 0.0, "analysis_s": 0.0,
                "policy_s": 0.0, "completion_tokens": n}

    return run


def test_run_loadtest_follows_the_sweep_with_each_level_loaded_and_gives_json(tiny, tmp_path):
    adaptive = _adaptive(tiny)
    log: list = []
    active: list = []
    sleeps: list = []

    def make_load(level: str, seed: int) -> FakeLoad:
        load = FakeLoad(level, log)
        start, stop = load.start, load.stop
        load.start = lambda: (active.append(level), start())[1]  # type: ignore[method-assign]
        load.stop = lambda: (active.pop(), stop())  # type: ignore[method-assign]
        return load

    config = LoadTestConfig(prompts=2, max_new_tokens=4, load_levels=["0", "2"], resamples=200)
    streamed: list = []
    result = run_loadtest(adaptive, config, on_request=streamed.append, runner=_fake_runner(log, active), background=make_load,
                          sleep=sleeps.append)
    runners = [POLICY, *TINY_PROFILES]
    expected = [("run", "none", "idle")]  # warm-up
    for _, level, order in sweep_order(2, ["0", "2"], runners):
        expected += [("start", level), *[("run", r, level) for r in order], ("stop", level)]
    assert log == expected
    assert sleeps == [config.settle_s] * 2  # only loaded levels wait for the load to settle
    assert streamed == result.requests and len(result.requests) == 2 * 2 * len(runners)
    assert list(result.levels) == ["0", "2"]
    for level in result.levels.values():
        assert level.n == 2 and all(row.n == 2 for row in level.rows)
        assert level.row("none").mean_kl == 0.0 and level.row(POLICY).profiles == {"layers-25": 2}
        assert {"best_static_here", "best_static_overall"} <= set(level.versus)
    policy = [r for r in result.requests if r["runner"] == POLICY]
    assert all(r["kl"] == next(s["kl"] for s in result.requests if s["runner"] == "layers-25" and s["prompt_id"] == r["prompt_id"])
               for r in policy)  # the policy picked layers-25: same KL as the static layers-25 on that prompt
    assert all(r["tpot_s"] == pytest.approx((r["latency_s"] - r["ttft_s"]) / 3) for r in result.requests)
    data = json.loads(json.dumps(result.to_dict()))
    assert set(data) >= {"n", "levels", "rows", "by_level", "overall", "best_static_overall", "targets", "notes", "config", "requests"}
    row = data["by_level"]["2"]["rows"][0]
    assert set(row) >= {"name", "n", "targets_met", "slo_attainment", "mean_kl", "p50_s", "p90_s", "p99_s", "ttft_p50_s", "tpot_p50_s"}
    assert set(data["by_level"]["2"]["versus"]["best_static_here"]) >= {"against", "targets_met_diff", "targets_met_diff_ci95",
                                                                          "kl_diff", "kl_diff_ci95", "n_prompts"}
    assert data["config"]["levels"] == ["0", "2"]
    png = plot_result(result, tmp_path / "plot.png")
    assert png.is_file() and png.stat().st_size > 0


def test_in_process_sweep_on_the_tiny_model_without_background(tiny):
    adaptive = _adaptive(tiny)
    result = run_loadtest(adaptive, LoadTestConfig(prompts=2, max_new_tokens=3, load_levels=["0"], resamples=100))
    assert [r.name for r in result.rows] == [POLICY, *TINY_PROFILES]
    assert all(r["level"] == "0" and r["ttft_s"] <= r["total_s"] for r in result.requests)
    assert result.levels["0"].row("none").mean_kl == 0.0


# ------------------------------------------------------------ canned statistics
def _req(runner, prompt, level, total, met, kl, profile=None, tokens=5):
    return {"runner": runner, "prompt_id": prompt, "level": level, "profile": profile or runner, "total_s": total,
            "latency_s": total, "ttft_s": total / 5, "tpot_s": (total - total / 5) / (tokens - 1), "met": met, "kl": kl,
            "overhead_s": 0.01 * total}


def _canned():
    """Two levels, four prompts. At load 0 the policy ties the full model's targets with more KL (dominated);
    at load 1 it meets more targets than any static with less KL than the fast one."""
    reqs = []
    for p in range(4):
        reqs += [_req(POLICY, p, "0", 1.0, True, 0.2, "fast"), _req("none", p, "0", 1.0, True, 0.0),
                 _req("fast", p, "0", 0.5, True, 0.5)]
        reqs += [_req(POLICY, p, "1", 1.0, True, 0.2, "fast"), _req("none", p, "1", 3.0, False, 0.0),
                 _req("fast", p, "1", 1.5, p < 2, 0.5)]
    return reqs


def test_per_level_rows_from_canned_records():
    reqs = _canned()
    rows = {r.name: r for r in runner_rows([r for r in reqs if r["level"] == "1"], [POLICY, "none", "fast"])}
    assert rows[POLICY].targets_met == 4 and rows["fast"].targets_met == 2 and rows["none"].slo_attainment == 0.0
    assert rows["fast"].mean_kl == pytest.approx(0.5)
    assert rows["none"].p50_s == 3.0 and rows["none"].p99_s == 3.0 and rows["none"].ttft_p50_s == pytest.approx(0.6)
    assert rows["fast"].tpot_p50_s == pytest.approx((1.5 - 0.3) / 4)
    assert rows[POLICY].overhead_share == pytest.approx(0.01) and rows[POLICY].profiles == {"fast": 4}
    assert best_static(list(rows.values())) == "fast"
    idle = runner_rows([r for r in reqs if r["level"] == "0"], [POLICY, "none", "fast"])
    assert best_static(idle) == "none"  # equal targets: the lower KL wins
    assert [r.name for r in dominating(idle)] == ["none"] and dominating(list(rows.values())) == []


def test_summary_names_where_the_policy_is_dominated_with_paired_cis():
    result = summarise(_canned(), [POLICY, "none", "fast"], ["0", "1"], 4, {}, resamples=500)
    idle, busy = result.levels["0"], result.levels["1"]
    assert idle.dominated_by == ["none"] and busy.dominated_by == []
    assert any("load 0: the policy is DOMINATED by none" in line for line in result.notes)
    assert any(line.startswith("load 1: no static profile dominates") for line in result.notes)
    here = busy.versus["best_static_here"]
    assert here["against"] == "fast" and here["targets_met_diff"] == pytest.approx(0.5) and here["kl_diff"] == pytest.approx(-0.3)
    lo, hi = here["targets_met_diff_ci95"]
    assert 0.0 <= lo <= 0.5 <= hi <= 1.0
    assert here["kl_diff_ci95"] == pytest.approx([-0.3, -0.3])  # the same difference on every prompt: no spread
    # overall: 'fast' meets 6/8, 'none' 4/8 -> fast is the best static overall, compared at each level
    assert result.best_static_overall == "fast" and idle.versus["best_static_overall"]["against"] == "fast"


def test_paired_bootstrap_resamples_prompts():
    rng = np.random.default_rng(0)
    reqs = []
    for p in range(10):
        shift = float(rng.normal(0, 1))
        for level in ("0", "1", "2", "bursty"):  # four near-identical pairs per prompt
            noise = float(rng.normal(0, 0.01))
            reqs += [_req(POLICY, p, level, 1.0, True, 1.0 + shift + noise), _req("s", p, level, 1.0, True, 1.0)]
    d = paired_difference(reqs, "s", resamples=2000)
    diffs = np.array([a["kl"] - b["kl"] for a, b in zip(reqs[::2], reqs[1::2])])
    lo, hi = d["kl_diff_ci95"]
    assert d["n_pairs"] == 40 and d["n_prompts"] == 10 and lo < diffs.mean() < hi
    assert (hi - lo) / 2 > 1.5 * 1.96 * diffs.std(ddof=1) / np.sqrt(40)  # ten prompts, not forty independent pairs


# --------------------------------------------------------------- prompts files
def test_prompts_file_uses_the_same_reader_and_split_rules(tmp_path):
    from casrap.data.prompts import load_prompts

    csv_path = tmp_path / "mine.csv"
    rows = ["id,prompt,split"] + [f"t{i},Test question {i}?,test" for i in range(3)] + [f"r{i},Train question {i}?,train" for i in range(4)]
    csv_path.write_text("\n".join(rows) + "\n")
    chosen = choose_prompts(LoadTestConfig(source=str(csv_path), prompts=10))
    assert sorted(p.id for p in chosen) == ["t0", "t1", "t2"]
    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text("\n".join(json.dumps({"prompt": f"Say something about topic {i}."}) for i in range(60)) + "\n")
    test_split = {p.text for p in load_prompts(jsonl, split="test")}
    picked = choose_prompts(LoadTestConfig(source=str(jsonl), prompts=5))
    assert len(picked) == min(5, len(test_split)) and {p.text for p in picked} <= test_split  # hashed split, no seed
    bad = tmp_path / "bad.csv"
    bad.write_text("question\nWhat?\n")
    with pytest.raises(InputError, match="no prompt column"):
        choose_prompts(LoadTestConfig(source=str(bad)))


# ---------------------------------------------------------------------- CLI
def test_cli_refuses_bad_levels_before_loading_anything(tmp_path):
    from typer.testing import CliRunner

    from casrap.cli import app

    result = CliRunner().invoke(app, ["loadtest", "--bundle", str(tmp_path / "missing"), "--load-levels", "0,busy"])
    assert isinstance(result.exception, InputError) and "load levels" in str(result.exception)


def test_cli_loadtest_prompts_file_levels_json_and_plot(tiny, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from casrap.cli import app

    bundle, _ = make_tiny_bundle(tiny, tmp_path / "bundle")
    prompts = tmp_path / "p.csv"
    prompts.write_text("prompt,split\nName a colour.,test\nName a fruit.,test\nName a city.,train\n")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["loadtest", "--bundle", str(bundle), "--model", "tiny-random-llama", "--prompts-file", str(prompts),
                                      "--load-levels", "0", "--prompts", "2", "-n", "3", "--plot", "lt.png", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout[result.stdout.index("{"):])
    assert data["levels"] == ["0"] and data["n"] == 2 and data["config"]["source"] == str(prompts)
    assert {r["prompt_id"] for r in data["requests"]} <= {"0", "1"}  # the test split of the file only
    assert (tmp_path / "lt.png").is_file() and (tmp_path / "reports" / "loadtest-1" / "requests.jsonl").is_file()
