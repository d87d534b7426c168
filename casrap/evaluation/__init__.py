"""Benchmark-task evaluation of profiles through lm-evaluation-harness ([eval] extra)."""
