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
    """``--compile`` decodes through transformers' compiled path: torch.compile is asked for.

    Compiling for real takes minutes per profile on a CPU (about 3 min for the first tiny-model
    profile on a loaded 2-core machine), so a spy stands in for the compiler: it records the call
    and returns the function uncompiled. The options are bench's own (static cache, CPU opted in),
    so the test fails if they ever stop reaching torch.compile.
    """
    imp = calibrate(tiny.model, tiny.tokenizer, ["The river runs through the old town."] * 2)
    bank = ProfileBank(tiny.model, "tiny")
    bank.reorder(imp)
    for spec in ("ffn-25", "heads-25"):
        bank.add(build_plan(spec, imp, describe(tiny.model)))
    compiled: list[dict] = []

    def spy(fn=None, **options):
        compiled.append(options)
        return fn

    monkeypatch.setattr(torch, "compile", spy)
    if hasattr(tiny.model, "_compiled_call"):  # transformers caches the compiled call on the model
        monkeypatch.delattr(tiny.model, "_compiled_call")
    cfg = BenchConfig(new_tokens=3, pairs=1, ppl_max_tokens=64, kl_tokens=32, switch_trials=3, compile=True)
    report = run_bench(bank, tiny.tokenizer, prose_split("test"), bank.names, cfg)
    assert compiled and compiled[0].get("dynamic") is False, compiled
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


def test_compiled_decode_options_request_a_static_cache_on_any_device():
    options = bench_module._compile_options()
    assert options["cache_implementation"] == "static"
    assert options["compile_config"]._compile_all_devices is True  # CPUs are opted in, not only accelerators
    assert torch._dynamo.config.cache_size_limit >= 64  # one graph per profile without silent eager fallback


def test_bench_compile_without_a_cpp_compiler_is_refused_in_one_line(tmp_path, monkeypatch):
    import shutil

    from casrap.errors import InputError

    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert "C++ compiler" in bench_module.compile_blocker()
    from casrap.cli import model_commands

    try:
        model_commands.bench(model="tiny-random-llama", compile_decode=True)
    except InputError as err:
        assert "C++ compiler" in str(err) and "\n" not in str(err)
    else:
        raise AssertionError("bench --compile ran without a C++ compiler")
