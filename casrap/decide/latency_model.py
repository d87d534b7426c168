"""How long a profile takes on this machine, as a function of prompt length and new tokens.

Two uses, one model:

- **Absolute latency targets.** A request carries a target in seconds. The policy
  sees it as a multiple of the *predicted unloaded* full-model latency for this
  prompt length and token count, so no observation feature needs the full model to
  run on the request being decided. The full model's unloaded fit is measured once
  per model and machine (the "latency calibration", seconds on 2 cores) and cached
  under ``$CASRAP_HOME/latency/``, with its error on held-out measurements. The cache
  is keyed by what the fit measured: the model's weights (reorder-stable fingerprint),
  the device it ran on (CPU, or which GPU), its dtype, the thread policy and the machine
  (CPU model, core count, torch version). A cached fit that does not match all of
  them, or that was measured while other processes used more than
  :data:`LOAD_LIMIT_PCT` % of the CPU, is never used: it is measured again.
- **Recordings at scale.** ``casrap record`` fits one model per (profile, load level)
  on a measured subset of prompts and fills in the rest, saying which figures are
  measured and which modelled, and the fit's error on measured contexts it was not
  fitted on.

The form is the one decode at batch 1 follows: time to first token grows linearly
with the prompt (prefill), and every further token costs a median decode step that
grows slowly with the context length::

    latency(p, n) = (a + b p) + (n - 1) (c + d p)

Medians of per-token steps, not totals, so a scheduler hiccup does not move a fit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from casrap.profiles.catalogue import FULL
from casrap.errors import CheckpointError

log = logging.getLogger(__name__)
LATENCY_FORMAT = "casrap-latency/1"
LOAD_LIMIT_PCT = 25.0  # other processes' CPU share (% of the machine) above which a fit is not "unloaded"


@dataclass(frozen=True)
class LatencySample:
    """One timed generation: prompt tokens, time to first token, median decode step (seconds)."""

    prompt_tokens: int
    ttft_s: float
    decode_s: float
    new_tokens: int = 0

    def total(self, new_tokens: int | None = None) -> float:
        n = self.new_tokens if new_tokens is None else new_tokens
        return self.ttft_s + max(n - 1, 0) * self.decode_s


@dataclass
class LatencyFit:
    """``latency(p, n) = ttft_a + ttft_b p + (n - 1) (decode_c + decode_d p)`` (seconds)."""

    ttft_a: float
    ttft_b: float
    decode_c: float
    decode_d: float
    samples: int = 0

    def ttft(self, prompt_tokens: float) -> float:
        return max(self.ttft_a + self.ttft_b * prompt_tokens, 1e-6)

    def decode(self, prompt_tokens: float) -> float:
        return max(self.decode_c + self.decode_d * prompt_tokens, 1e-6)

    def predict(self, prompt_tokens: float, new_tokens: int) -> float:
        return self.ttft(prompt_tokens) + max(new_tokens - 1, 0) * self.decode(prompt_tokens)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def fit_line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares intercept and slope; a flat line when x does not vary."""
    if len(x) == 0:
        raise ValueError("no samples to fit")
    if np.ptp(x) == 0 or len(x) < 3:
        return float(np.median(y)), 0.0
    slope, intercept = np.polyfit(x, y, 1)
    return float(intercept), float(slope)


def fit_latency(samples: Sequence[LatencySample]) -> LatencyFit:
    """Fit TTFT and the median decode step as lines in the prompt length."""
    p = np.array([s.prompt_tokens for s in samples], dtype=float)
    ttft_a, ttft_b = fit_line(p, np.array([s.ttft_s for s in samples]))
    steps = [(s.prompt_tokens, s.decode_s) for s in samples if s.decode_s > 0]
    if steps:
        decode_c, decode_d = fit_line(np.array([x for x, _ in steps], float), np.array([y for _, y in steps]))
        decode_d = max(decode_d, 0.0)
    else:
        decode_c, decode_d = 0.0, 0.0
    return LatencyFit(ttft_a, max(ttft_b, 0.0), decode_c, decode_d, len(samples))


def relative_errors(fit: LatencyFit, samples: Sequence[LatencySample], new_tokens: int | None = None) -> list[float]:
    """|predicted - measured| / measured of each sample's total latency."""
    out = []
    for s in samples:
        measured = s.total(new_tokens)
        if measured > 0:
            out.append(abs(fit.predict(s.prompt_tokens, new_tokens or s.new_tokens) - measured) / measured)
    return out


def grouped_holdout_error(samples: Sequence[LatencySample], groups: Sequence[str], new_tokens: int | None = None) -> dict[str, float]:
    """Leave-one-group-out error: fit without a prompt's samples, predict that prompt's.

    Groups are prompts, so the error is that of predicting a prompt the fit never saw.
    """
    errors: list[float] = []
    keys = sorted(set(groups))
    if len(keys) < 2:
        return {"median_rel_error": float("nan"), "p90_rel_error": float("nan"), "n": 0}
    for key in keys:
        train = [s for s, g in zip(samples, groups) if g != key]
        test = [s for s, g in zip(samples, groups) if g == key]
        errors += relative_errors(fit_latency(train), test, new_tokens)
    return {"median_rel_error": float(np.median(errors)), "p90_rel_error": float(np.percentile(errors, 90)), "n": len(errors)}


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what ``platform`` knows)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    return cpu


def machine_key() -> str:
    """What makes a latency fit this machine's: CPU model, core count, torch version.

    The device, dtype and threads a fit ran with are keyed separately (:func:`run_context`).
    """
    import torch

    raw = f"{cpu_name()}|{os.cpu_count()}|{torch.__version__}"
    return hashlib.sha256(raw.encode()).hexdigest()[:12]


def thread_key() -> str:
    """How generation is threaded here: the execution policy's key where it exists, else
    torch's intra-op thread count and ``OMP_WAIT_POLICY``."""
    try:
        from casrap.telemetry.threads import thread_policy_key
    except ImportError:  # pragma: no cover - older trees
        import torch

        return f"threads{torch.get_num_threads()}/wait-{os.environ.get('OMP_WAIT_POLICY', '').lower() or 'default'}"
    return thread_policy_key()


def device_label(device: Any) -> str:
    """``cpu``, or ``cuda:N <GPU name>``: two GPUs of different kinds never share a fit."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} {torch.cuda.get_device_name(index)}"
    return device.type


def run_context(model: Any) -> dict[str, str]:
    """What a latency fit of ``model`` depends on besides its weights: device, dtype,
    thread policy and machine (the cache key; also stored in the fit and checked on load)."""
    parameter = next(model.parameters())
    return {"device": device_label(parameter.device), "dtype": str(parameter.dtype).replace("torch.", ""),
            "threads": thread_key(), "machine": machine_key()}


def default_context() -> dict[str, str]:
    """The context of a float32 model on the CPU (for callers that only know the fingerprint)."""
    return {"device": "cpu", "dtype": "float32", "threads": thread_key(), "machine": machine_key()}


def context_key(context: dict[str, str]) -> str:
    raw = "|".join(f"{k}={context[k]}" for k in sorted(context))
    return hashlib.sha256(raw.encode()).hexdigest()[:12]


@dataclass
class UnloadedLatencyModel:
    """The full model's latency on this machine with nothing else running.

    Attributes:
        fit: the fitted line pair.
        model_key: fingerprint of the model it was measured on.
        machine: :func:`machine_key` of the machine.
        device: where the model ran.
        holdout: leave-one-prompt-out relative error of total latency.
        other_cpu_util: mean CPU share other processes used while measuring (a fit
            above :data:`LOAD_LIMIT_PCT` is not cached and never reused).
        measured_at: Unix time.
        dtype: the model's dtype while measured.
        threads: the thread policy's key while measured (:func:`thread_key`).
    """

    fit: LatencyFit
    model_key: str = ""
    machine: str = ""
    device: str = "cpu"
    holdout: dict[str, float] = field(default_factory=dict)
    other_cpu_util: float = 0.0
    measured_at: float = 0.0
    dtype: str = ""
    threads: str = ""

    @property
    def context(self) -> dict[str, str]:
        return {"device": self.device, "dtype": self.dtype, "threads": self.threads, "machine": self.machine}

    def mismatch(self, model_key: str, context: dict[str, str]) -> str | None:
        """Why this fit does not describe ``model_key`` under ``context`` (None: it does)."""
        if self.model_key != model_key:
            return f"it was measured on model {self.model_key or '?'}, not {model_key}"
        for key, value in context.items():
            if self.context.get(key) != value:
                return f"it was measured with {key} {self.context.get(key) or '?'}, this run has {value}"
        if self.other_cpu_util > LOAD_LIMIT_PCT:
            return f"it was measured while other processes used {self.other_cpu_util:.0f}% CPU (limit {LOAD_LIMIT_PCT:.0f}%)"
        return None

    def predict(self, prompt_tokens: int, new_tokens: int) -> float:
        """Seconds the full model needs for this request on an idle machine."""
        return self.fit.predict(prompt_tokens, new_tokens)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["format"] = LATENCY_FORMAT
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UnloadedLatencyModel:
        if data.get("format") != LATENCY_FORMAT:
            raise CheckpointError(f"not a casrap latency model (format {data.get('format')!r})")
        try:
            fit = LatencyFit(**{k: data["fit"][k] for k in ("ttft_a", "ttft_b", "decode_c", "decode_d")},
                             samples=int(data["fit"].get("samples", 0)))
            return cls(fit, str(data.get("model_key", "")), str(data.get("machine", "")), str(data.get("device", "cpu")),
                       dict(data.get("holdout", {})), float(data.get("other_cpu_util", 0.0)), float(data.get("measured_at", 0.0)),
                       str(data.get("dtype", "")), str(data.get("threads", "")))
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"malformed latency model: {err}") from err

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path) -> UnloadedLatencyModel:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as err:
            raise CheckpointError(f"cannot read latency model {path}: {err}") from err


def probe_prompts(tokenizer: Any, lengths: Sequence[int]) -> list[Any]:
    """Token-id prompts of the given lengths, cut from the calibration text (never evaluation text)."""
    import torch

    from casrap.data.calibration import calibration_texts

    ids = tokenizer("\n\n".join(calibration_texts()), return_tensors="pt").input_ids[0]
    out = []
    for i, n in enumerate(lengths):
        start = (i * 97) % max(len(ids) - n, 1)
        out.append(ids[start : start + n].unsqueeze(0).to(torch.long))
    return out


def measure_latency(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Any],
    new_tokens: int,
    repeats: int = 1,
    clock: Callable[[], float] = time.perf_counter,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[LatencySample], list[str]]:
    """Time the *active* profile on each prompt ``repeats`` times (after one warm-up run)."""
    from casrap.decide.generation import generate_timed

    generate_timed(model, tokenizer, prompts[0], 2, clock=clock, ignore_eos=True)
    samples, groups = [], []
    total, done = len(prompts) * repeats, 0
    for _ in range(repeats):
        for i, ids in enumerate(prompts):
            out = generate_timed(model, tokenizer, ids, new_tokens, clock=clock, ignore_eos=True)
            samples.append(LatencySample(int(ids.shape[-1]), out.ttft_s, out.decode_median_s, len(out.token_ids)))
            groups.append(str(i))
            done += 1
            if progress:
                progress(done, total)
    return samples, groups


def latency_cache_path(model_key: str, home: Path | None = None, context: dict[str, str] | None = None) -> Path:
    """Where the fit of ``model_key`` under ``context`` (default: float32 on the CPU) is cached."""
    from casrap.paths import casrap_home

    return (home or casrap_home()) / "latency" / f"{model_key}-{context_key(context or default_context())}.json"


def _usable(path: Path, key: str, context: dict[str, str]) -> bool:
    try:
        return path.is_file() and UnloadedLatencyModel.load(path).mismatch(key, context) is None
    except CheckpointError:
        return False


def load_or_fit_latency_model(
    bank_or_model: Any,
    tokenizer: Any,
    telemetry: Any = None,
    lengths: Sequence[int] = (8, 48, 128, 256),
    new_tokens: int = 12,
    repeats: int = 2,
    cache: bool = True,
    progress: Callable[[int, int], None] | None = None,
    refit: bool = False,
) -> UnloadedLatencyModel:
    """The cached unloaded latency model of this model on this machine, measured on first use.

    Measures the *full* model (a bank is switched to ``none`` and left there) on
    calibration-text prompts of several lengths; the error reported is
    leave-one-length-out. A cached fit is used only when it matches the weights, device,
    dtype, thread policy and machine of this run and was measured on a quiet machine;
    ``refit`` measures again regardless (``casrap calibrate --latency``). A fit measured
    under load above :data:`LOAD_LIMIT_PCT` is returned and cached as such (never over a
    usable quiet fit), and is measured again on next use.
    """
    from casrap.profiles.bank import bank_fingerprint

    bank = bank_or_model if hasattr(bank_or_model, "activate") else None
    model = bank.model if bank is not None else bank_or_model
    key = bank.fingerprint if bank is not None else bank_fingerprint(model)
    context = run_context(model)
    path = latency_cache_path(key, context=context)
    if cache and not refit and path.is_file():
        try:
            cached = UnloadedLatencyModel.load(path)
            why = cached.mismatch(key, context)
            if why is None:
                return cached
            log.warning("re-measuring the latency model: the cached one does not fit (%s)", why)
        except CheckpointError as err:
            log.warning("re-measuring the latency model: %s", err)
    if bank is not None:
        bank.activate(FULL)
    if telemetry is not None:
        telemetry.read()
    device = next(model.parameters()).device
    prompts = [p.to(device) for p in probe_prompts(tokenizer, lengths)]
    started = time.time()
    samples, groups = measure_latency(model, tokenizer, prompts, new_tokens, repeats, progress=progress)
    other = float(telemetry.read().other_cpu_util) if telemetry is not None else 0.0
    result = UnloadedLatencyModel(
        fit_latency(samples), key, context["machine"], context["device"], grouped_holdout_error(samples, groups), other, started,
        context["dtype"], context["threads"],
    )
    if other > LOAD_LIMIT_PCT:
        log.warning("latency model measured while other processes used %.0f%% CPU (limit %.0f%%): not an unloaded fit; "
                    "it is measured again on next use", other, LOAD_LIMIT_PCT)
    if cache and not (other > LOAD_LIMIT_PCT and _usable(path, key, context)):  # never replace a quiet fit by a busy one
        result.save(path)
    log.info("latency model: TTFT %.1f ms + %.3f ms/prompt token, decode %.1f ms/token; held-out median error %.1f%%",
             1e3 * result.fit.ttft_a, 1e3 * result.fit.ttft_b, 1e3 * result.fit.decode_c,
             100 * result.holdout.get("median_rel_error", float("nan")))
    return result
