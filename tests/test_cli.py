"""End-to-end through the ``casrap`` entry point on the tiny model and the replay env."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def run(args, cwd, check=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "casrap.cli", *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"casrap {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_train_test_report_smoke_on_tiny_model(tmp_path):
    common = ["--model", "tiny-random-llama", "--max-new-tokens", "3", "--checkpoint", "ck/p.zip"]
    profiles = ["--profiles", "layers-25", "--profiles", "ffn-25"]
    out = run(["train", "--episodes", "3", *common, *profiles, "--json"], tmp_path)
    summary = json.loads(out.stdout)
    assert summary["episodes_done"] == 3
    run_dir = tmp_path / "reports" / "train-1"
    for name in ("metrics.jsonl", "training_metrics.json", "training_report.txt", "report.md", "reward.png", "action_usage.png", "token_speed.png"):
        assert (run_dir / name).is_file(), name
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("prompt_tokens", "prompt_ppl", "complexity", "baseline_latency_s", "profile", "latency_s", "ppl", "reward"):
        assert key in record
    out = run(["test", *common, "--test-samples", "2", "--wikitext-samples", "2", "--json"], tmp_path)
    result = json.loads(out.stdout)
    names = [s["name"] for s in result["scores"]]
    assert names[0] == "policy" and "static:none" in names and "random" in names and "oracle (hindsight)" in names
    assert "none" in result["perplexity"]
    (run_dir / "report.md").unlink()
    run(["report", str(run_dir)], tmp_path)
    assert (run_dir / "report.md").is_file()


def test_replay_training_and_resume_through_cli(tmp_path):
    base = ["--replay", "bundled", "--reward", "slo", "--checkpoint", "ck/p.zip", "--quiet"]
    run(["train", "--episodes", "20", *base], tmp_path)
    run(["train", "--episodes", "30", "--resume", *base], tmp_path)
    lines = (tmp_path / "reports" / "train-1" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 30
    out = run(["test", "--replay", "bundled", "--checkpoint", "ck/p.zip", "--json"], tmp_path)
    assert json.loads(out.stdout)["best_static"].startswith("static:")


@pytest.mark.parametrize(
    "args, message",
    [
        (["info", "--model", "no-such-model"], "unknown model spec"),
        (["bench", "--model", "tiny-random-llama", "--profiles", "prune-all"], "unknown profile"),
        (["test", "--replay", "bundled", "--checkpoint", "missing.zip"], "no checkpoint"),
        (["train", "--replay", "nope.jsonl"], "cannot read replay"),
        (["report", "."], "no metrics.jsonl"),
    ],
)
def test_user_errors_are_one_line_without_traceback(tmp_path, args, message):
    proc = run(args, tmp_path, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_info_and_bench_json_on_tiny(tmp_path):
    info = json.loads(run(["info", "--model", "tiny-random-llama", "--json"], tmp_path).stdout)
    assert info["kv_heads"] == 2 and info["group_size"] == 4
    bench = json.loads(run(["bench", "--model", "tiny-random-llama", "-p", "layers-25", "-p", "heads-25", "-p", "ffnmask-25",
                            "--tokens", "4", "--pairs", "2", "--corpus", "offline", "--ppl-max-tokens", "200", "--json"], tmp_path).stdout)
    names = [p["name"] for p in bench["profiles"]]
    assert names == ["none", "layers-25", "heads-25", "ffnmask-25"]
    for p in bench["profiles"]:
        for key in ("name", "params_removed", "ideal_speedup", "speedup", "ppl", "kl", "switch_ms"):
            assert key in p
    assert bench["corpus"] == "casrap-prose/test"  # held-out third, never calibration text
    masked = bench["profiles"][3]
    assert masked["functional"] and masked["ideal_speedup"] == 1.0


def test_record_then_train_and_test_on_the_recording(tmp_path):
    """`casrap record` writes a replay whose every latency is measured; replay training and testing read it."""
    args = ["record", "--model", "tiny-random-llama", "--output", "rec.jsonl", "--train-prompts", "3", "--test-prompts", "2",
            "--loads", "0,1", "--max-new-tokens", "3", "--timing-tokens", "2", "--settle", "0", "--block", "2",
            "-p", "layers-25", "-p", "ffn-25", "--json"]
    summary = json.loads(run(args, tmp_path).stdout)
    assert summary["contexts"] == 5 * 2 and summary["profiles"] == ["none", "layers-25", "ffn-25"]
    records = [json.loads(line) for line in (tmp_path / "rec.jsonl").read_text().splitlines()]
    assert records[0]["thread_policy"].startswith("free-cores") and set(records[0]["profile_speed"]) == set(summary["profiles"])
    assert {r["latency_source"] for r in records[1:]} == {"measured"}
    run(["train", "--replay", "rec.jsonl", "--reward", "slo", "--episodes", "30", "--checkpoint", "ck/p.zip", "--json"], tmp_path)
    result = json.loads(run(["test", "--replay", "rec.jsonl", "--checkpoint", "ck/p.zip", "--json"], tmp_path).stdout)
    assert "policy" in json.dumps(result)
