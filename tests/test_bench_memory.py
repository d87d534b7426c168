"""Bench's memory columns, the compiled-decode wiring and ``casrap bench-kv`` on the tiny model."""

from __future__ import annotations

import json

import torch

from casrap import bench as bench_module
from casrap.bench import BenchConfig, run_bench
from casrap.measure.corpus import prose_split
from casrap.measure.memory import PeakMemory
from casrap.models import describe
from casrap.profiles import ProfileBank, build_plan
from casrap.pruners.importance import calibrate


def test_peak_memory_sees_an_allocation():
    with PeakMemory("cpu") as idle:
        pass
    with PeakMemory("cpu") as busy:
        block = torch.ones(64 * 2**20 // 4)  # 64 MB, touched
        block.add_(1)
        import time
        time.sleep(0.05)
    del block
    assert busy.mb is not None and idle.mb is not None and busy.mb > idle.mb


def test_bench_reports_memory_and_a_compiled_comparison(tiny, monkeypatch):
    imp = calibrate(tiny.model, tiny.tokenizer, ["The river runs through the old town."] * 2)
    bank = ProfileBank(tiny.model, "tiny")
    bank.reorder(imp)
    for spec in ("ffn-25", "heads-25"):
        bank.add(build_plan(spec, imp, describe(tiny.model)))
    # the compiled path with eager options: checks the wiring, not torch.compile (minutes)
    monkeypatch.setattr(bench_module, "_compile_options", dict)
    cfg = BenchConfig(new_tokens=3, pairs=1, ppl_max_tokens=64, kl_tokens=32, switch_trials=3, compile=True)
    report = run_bench(bank, tiny.tokenizer, prose_split("test"), bank.names, cfg)
    for p in report.profiles:
        assert p.peak_memory_mb and p.peak_memory_mb > 0 and p.weights_mb > 0
        assert p.memory_overhead_mb == 0.0
        assert set(p.compiled) >= {"decode_ms_per_token", "speedup", "eager_over_compiled", "compile_s"}
    full = report.profiles[0]
    assert full.weights_mb * 2**20 == bank.profile_weight_bytes("none")
    assert bank.base_weight_bytes() >= bank.profile_weight_bytes("ffn-25")


def test_bench_cli_counts_the_whole_default_bank(tmp_path):
    from tests.test_cli import run

    data = json.loads(run(["bench", "--model", "tiny-random-llama", "-p", "ffn-25", "--memory-with", "default", "--tokens", "3",
                           "--pairs", "1", "--corpus", "offline", "--ppl-max-tokens", "64", "--json"], tmp_path).stdout)
    assert [p["name"] for p in data["profiles"]] == ["none", "ffn-25"]
    assert {"heads-50", "kvheads-33", "ffn-50", "layers-50"} <= set(data["profiles_in_bank"])
    assert data["reorder"]["importance"].startswith("calibrated")
    assert data["total_memory_overhead_mb"] == 0.0 and data["base_weight_mb"] > 0
    assert data["profiles"][1]["peak_memory_mb"] > 0


def test_bench_kv_cli_on_tiny(tmp_path):
    from tests.test_cli import run

    data = json.loads(run(["bench-kv", "--model", "tiny-random-llama", "--prompt-tokens", "64", "--kv-keep-ratio", "0.5",
                           "--tokens", "4", "--pairs", "1", "--json"], tmp_path).stdout)
    (row,) = data["rows"]
    assert row["prompt_tokens"] == 64 and row["kept_tokens"] == 36  # sinks 4 + recent 32 > half of 64
    assert row["kl"] >= 0 and 0 <= row["top1_agreement"] <= 1 and row["answer_tokens"] == 3
