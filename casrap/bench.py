"""``casrap bench``: speed and quality of every profile against the full model.

Per profile: parameters removed, ideal speedup (weight bytes read per decoded token,
full / pruned), measured decode speedup (interleaved A B pairs, median of per-pair
ratios), time to first token, perplexity on the evaluation corpus, KL to the full
model on the same text, switch time, memory (bytes the profile holds beyond the base
model, counted by unique storage, and the peak memory while it decodes), and with
``compile`` the same decode comparison under ``torch.compile`` with a static cache. The
baseline is re-measured inside every pair, so drift in machine load hits both sides.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from casrap.measure import (
    compare_interleaved,
    mean_kl,
    next_token_logits,
    perplexity,
)
from casrap.measure.corpus import Corpus
from casrap.measure.timing import GenerationTiming, check_prompt_fits
from casrap.measure.memory import PeakMemory
from casrap.profiles.bank import ProfileBank
from casrap.profiles.catalogue import FULL

BENCH_PROMPT = "Explain, step by step, how a small garden can feed a family through the summer."


@dataclass
class BenchConfig:
    """Knobs of ``casrap bench``."""

    new_tokens: int = 32  # tokens generated per timed run (EOS ignored)
    pairs: int = 5  # interleaved baseline/candidate pairs per profile
    warmup: int = 1
    ppl_window: int = 512
    ppl_max_tokens: int | None = None  # cap corpus tokens (None = whole corpus)
    kl_tokens: int = 512  # tokens of the corpus used for KL
    switch_trials: int = 200
    prompt: str = BENCH_PROMPT
    compile: bool = False  # also time decode under torch.compile (static cache), eager vs compiled


@dataclass
class ProfileResult:
    name: str
    description: str
    params_removed: float
    ideal_speedup: float
    speedup: float
    speedup_pairs: list[float]
    decode_ms_per_token: float
    baseline_decode_ms_per_token: float
    ttft_ms: float
    ppl: float
    kl: float
    switch_ms: float
    memory_overhead_mb: float
    functional: bool = False
    weights_mb: float = 0.0  # unique storages the profile runs (its layers + embeddings, norm, head)
    peak_memory_mb: float | None = None  # peak RSS (CPU) / allocated (CUDA) during its timed decode runs
    compiled: dict[str, Any] | None = None  # decode under torch.compile, when asked
    packed_mb: float = 0.0  # packed int4 weights the profile holds (part of memory_overhead_mb)


def _compile_options() -> dict[str, Any]:
    """generate() kwargs that decode through torch.compile with a static cache (any device).

    transformers compiles the decoding forward itself when the cache is static; by default
    only on accelerators, so the config opts CPUs in. Each profile is a new graph (its
    layers differ): the dynamo cache limit is raised so that no profile silently falls
    back to eager.
    """
    import torch._dynamo
    from transformers import CompileConfig

    torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
    config = CompileConfig(fullgraph=False, dynamic=False)
    config._compile_all_devices = True
    return {"cache_implementation": "static", "compile_config": config}


def compile_blocker() -> str | None:
    """Why torch.compile cannot run here (one line), or None."""
    import shutil

    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        return "torch.compile needs a C++ compiler on CPU (none of c++, g++, clang++ found)"
    return None


@dataclass
class BenchReport:
    model: str
    device: str
    threads: int
    corpus: str
    corpus_tokens: int
    config: dict[str, Any]
    profiles: list[ProfileResult] = field(default_factory=list)
    quant_kernel: dict[str, Any] | None = None  # the int4 kernel check the bank ran (int4 profiles only)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["profiles"] = [asdict(p) for p in self.profiles]
        return data


def bench_router(bank: ProfileBank, tokenizer: Any, clock: Callable[[], float] = time.perf_counter) -> Any:
    """The Router bench times through: the policy's per-token clock, at this process's thread count (fixed)."""
    from casrap.decide.router import Router
    from casrap.telemetry.threads import ThreadPolicy

    return Router(bank, tokenizer, policy=None, threads=ThreadPolicy(mode="fixed", fixed=torch.get_num_threads()), probe=False,
                  clock=clock)


def router_timing(bank: ProfileBank, tokenizer: Any, input_ids: torch.Tensor, new_tokens: int = 32, repetitions: int = 3,
                  warmup: int = 1, profile: str = FULL, clock: Callable[[], float] = time.perf_counter) -> GenerationTiming:
    """Median TTFT, generation time and decode step of ``profile`` over ``repetitions`` generations
    (EOS ignored) through the Router: the clock the policy's latencies are read from."""
    if new_tokens < 2:
        from casrap.errors import InputError

        raise InputError("timing needs at least 2 new tokens to separate prefill from decode")
    check_prompt_fits(bank.model, int(input_ids.shape[-1]), new_tokens)
    router = bench_router(bank, tokenizer, clock)
    outputs = []
    for i in range(warmup + repetitions):
        out = router.run(router.fixed_decision(profile, input_ids, new_tokens), input_ids, new_tokens, ignore_eos=True).output
        if i >= warmup:
            outputs.append(out)
    total = statistics.median(o.generation_s for o in outputs)
    return GenerationTiming(
        ttft_s=statistics.median(o.ttft_s for o in outputs), total_s=total,
        decode_ms_per_token=1000.0 * statistics.median(o.decode_median_s for o in outputs),
        tokens_per_s=new_tokens / total if total > 0 else float("inf"), new_tokens=new_tokens, repetitions=repetitions,
    )


def _decode_runner(router: Any, name: str, ids: torch.Tensor, tokens: int,
                   options: dict[str, Any] | None = None) -> Callable[[], float]:
    """One measurement = one generation through the Router (EOS ignored); returns its median decode step in seconds.

    The clock is the one every policy latency is read from (each new token timed as it
    appears, :class:`~casrap.decide.generation.GenerationOutput`), so README's speedups and
    the recorded latencies are the same measurement; TTFT comes from the same run.
    """
    extra = {"generate_options": options} if options else {}

    def run() -> float:
        out = router.run(router.fixed_decision(name, ids, tokens), ids, tokens, ignore_eos=True, **extra).output
        run.ttfts.append(out.ttft_s)  # type: ignore[attr-defined]
        return max(out.decode_median_s, 1e-9)
    run.ttfts = []  # type: ignore[attr-defined]
    return run


def switch_time_ms(bank: ProfileBank, name: str, trials: int) -> float:
    times = []
    for _ in range(trials):
        bank.activate(FULL)
        times.append(bank.activate(name))
    bank.activate(FULL)
    return 1000.0 * statistics.median(times)


def run_bench(
    bank: ProfileBank,
    tokenizer: Any,
    corpus: Corpus,
    names: list[str],
    config: BenchConfig | None = None,
    progress: Callable[[str], None] | None = None,
) -> BenchReport:
    cfg = config or BenchConfig()
    report_step = progress or (lambda _name: None)
    model = bank.model
    device = next(model.parameters()).device
    prompt_ids = tokenizer(cfg.prompt, return_tensors="pt").input_ids.to(device)
    corpus_ids = tokenizer(corpus.text, return_tensors="pt").input_ids[0]
    if cfg.ppl_max_tokens:
        corpus_ids = corpus_ids[: cfg.ppl_max_tokens]
    kl_ids = corpus_ids[: cfg.kl_tokens].unsqueeze(0)
    router = bench_router(bank, tokenizer)
    report = BenchReport(
        model=bank.base_model,
        device=str(device),
        threads=torch.get_num_threads(),
        corpus=corpus.name,
        corpus_tokens=int(corpus_ids.numel()),
        config=asdict(cfg),
        quant_kernel=bank.quant_check.to_dict() if bank.quant_check else None,
    )
    bank.activate(FULL)
    full_logits = next_token_logits(model, kl_ids)
    full_ppl = perplexity(model, corpus_ids, window=cfg.ppl_window, stride=cfg.ppl_window // 2).ppl
    for name in names:
        report_step(name)
        plan = bank.profile(name).plan
        if name == FULL:
            ppl, kl = full_ppl, 0.0
        else:
            with bank.using(name):
                ppl = perplexity(model, corpus_ids, window=cfg.ppl_window, stride=cfg.ppl_window // 2).ppl
                kl = mean_kl(full_logits, next_token_logits(model, kl_ids))
        base_run = _decode_runner(router, FULL, prompt_ids, cfg.new_tokens)
        cand_run = _decode_runner(router, name, prompt_ids, cfg.new_tokens)
        comparison = compare_interleaved(base_run, cand_run, pairs=cfg.pairs, warmup=cfg.warmup)
        with PeakMemory(device) as peak:
            cand_run()
        bank.activate(FULL)
        compiled = _compiled_comparison(router, name, prompt_ids, cfg, comparison) if cfg.compile else None
        report.profiles.append(
            ProfileResult(
                name=name,
                description=plan.description,
                params_removed=bank.params_removed(name),
                ideal_speedup=bank.ideal_speedup(name) if not plan.functional else 1.0,
                speedup=comparison.speedup,
                speedup_pairs=comparison.ratios,
                decode_ms_per_token=1000 * statistics.median(comparison.candidate_s),
                baseline_decode_ms_per_token=1000 * statistics.median(comparison.baseline_s),
                ttft_ms=1000 * statistics.median(cand_run.ttfts[cfg.warmup:]),  # type: ignore[attr-defined]
                ppl=ppl,
                kl=kl,
                switch_ms=switch_time_ms(bank, name, cfg.switch_trials),
                memory_overhead_mb=bank.memory_overhead_bytes(name) / 2**20 if name != FULL else 0.0,
                functional=plan.functional,
                weights_mb=bank.profile_weight_bytes(name) / 2**20,
                peak_memory_mb=peak.mb,
                compiled=compiled,
                packed_mb=bank.packed_bytes(name) / 2**20,
            )
        )
    return report


def _compiled_comparison(router: Any, name: str, ids: torch.Tensor, cfg: BenchConfig, eager: Any) -> dict[str, Any]:
    """Decode ms/token of the full model and ``name`` under torch.compile (interleaved pairs).

    The first call per profile compiles (timed apart as ``compile_s``); both sides then
    run warm. Reports the compiled speedup next to the eager one of the same profile.
    """
    options = _compile_options()
    bank = router.bank
    base_run = _decode_runner(router, FULL, ids, cfg.new_tokens, options)
    cand_run = _decode_runner(router, name, ids, cfg.new_tokens, options)
    start = time.perf_counter()
    cand_run()
    compile_s = time.perf_counter() - start
    comparison = compare_interleaved(base_run, cand_run, pairs=cfg.pairs, warmup=cfg.warmup)
    bank.activate(FULL)
    cand_ms = 1000 * statistics.median(comparison.candidate_s)
    base_ms = 1000 * statistics.median(comparison.baseline_s)
    return {
        "decode_ms_per_token": cand_ms,
        "baseline_decode_ms_per_token": base_ms,
        "speedup": comparison.speedup,
        "speedup_pairs": comparison.ratios,
        "eager_over_compiled": 1000 * statistics.median(eager.candidate_s) / cand_ms,
        "compile_s": compile_s,
    }



# ----------------------------------------------------- dense vs factorised matmul
@dataclass
class MatmulTiming:
    """One shape: a dense ``d_out x d_in`` map vs its rank-``rank`` factor pair."""

    d_in: int
    d_out: int
    rank: int
    tokens: int
    dense_us: float
    factorised_us: float
    ideal_speedup: float  # parameters (weight bytes) dense / factorised
    speedup: float  # median of per-repetition ratios dense / factorised

    @property
    def share_of_ideal(self) -> float:
        return self.speedup / self.ideal_speedup


@torch.inference_mode()
def factorised_matmul_timing(
    shapes: list[tuple[int, int]],
    removed: float = 0.25,
    tokens: int = 1,
    repeats: int = 200,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> list[MatmulTiming]:
    """Why low-rank profiles may not reach their ideal speedup: time ``F.linear`` on the
    dense weight against the two factors removing ``removed`` of its parameters, at
    decode batch size (``tokens`` rows), interleaved per repetition, medians.

    At small shapes a second kernel launch costs as much as the bytes it saves; the
    table shows at which size factorisation becomes fast on this machine.
    """
    import torch.nn.functional as F

    from casrap.pruners.lowrank import rank_for_rate

    def clock(fn: Callable[[], torch.Tensor]) -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    rows = []
    for d_in, d_out in shapes:
        rank = rank_for_rate(removed, d_in, d_out) or 1
        w = torch.randn(d_out, d_in, dtype=dtype, device=device)
        a = torch.randn(rank, d_in, dtype=dtype, device=device)
        b = torch.randn(d_out, rank, dtype=dtype, device=device)
        x = torch.randn(tokens, d_in, dtype=dtype, device=device)
        dense = lambda: F.linear(x, w)
        factor = lambda: F.linear(F.linear(x, a), b)
        for _ in range(10):
            dense(), factor()
        d_times, f_times, ratios = [], [], []
        for _ in range(repeats):
            td, tf = clock(dense), clock(factor)
            d_times.append(td)
            f_times.append(tf)
            ratios.append(td / tf)
        rows.append(MatmulTiming(d_in, d_out, rank, tokens, 1e6 * statistics.median(d_times), 1e6 * statistics.median(f_times),
                                 d_in * d_out / (rank * (d_in + d_out)), statistics.median(ratios)))
    return rows
