"""One timed generation on whatever profile is active, with optional text streaming.

The time to first token is read when the first new token exists, so streaming and
plain requests are timed by the same code. Everything a request can ask for beyond
greedy decoding is done by small per-request objects handed to ``model.generate``:

- sampling (temperature, top-k, top-p) with transformers' warpers, then a sampler of
  our own that draws from a per-request ``torch.Generator`` (``seed``), so one
  request's seed never touches the process-wide random state;
- OpenAI's additive ``presence_penalty`` / ``frequency_penalty`` and ``logit_bias``
  (logits processors);
- ``logprobs``: log-probabilities of the *raw* model distribution (before penalties,
  temperature and truncation), the chosen token's and the top ``n``;
- ``stop`` strings: generation ends when one appears in the decoded text, which is cut
  before it; streamed text holds back any tail that could still become a stop string;
- ``cancel``: a :class:`Cancellation` checked after every token, so a request whose
  client left, or whose deadline passed, gives the model up within one decode step;
- the end ids of the model's ``generation_config`` (all of them, e.g. Llama-3's
  ``<|eot_id|>``) together with the tokenizer's EOS;
- ``on_decode_step``: called with each decode step's seconds between two forward passes,
  where the thread governor (:class:`casrap.telemetry.threads.ThreadGovernor`) may change
  torch's thread count for the next pass.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

CANCELLED = "cancelled"
TIMEOUT = "timeout"


class Cancellation:
    """A request's stop flag: set when its client leaves (``cancel()``) or once its deadline passes.

    Thread-safe; ``is_set()`` is what generation and the bank's queue poll. Callbacks
    registered with :meth:`on_cancel` run once, in the cancelling thread (the bank's
    queue uses one to wake a waiter at once instead of at its next poll).
    """

    def __init__(self, timeout_s: float | None = None) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []
        self.reason: str | None = None
        self.set_at: float | None = None  # time.perf_counter() when set
        self.deadline = time.monotonic() + timeout_s if timeout_s else None

    def cancel(self, reason: str = CANCELLED) -> None:
        with self._lock:
            if self._event.is_set():
                return
            self.reason, self.set_at = reason, time.perf_counter()
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def is_set(self) -> bool:
        if self._event.is_set():
            return True
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self.cancel(TIMEOUT)
            return True
        return False

    def on_cancel(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(callback)
                return
        callback()


@dataclass
class TokenLogprob:
    """One generated token's log-probability and the ``top`` most likely alternatives."""

    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)


@dataclass
class StreamPiece:
    """What one decode step made visible: new text (may be empty), tokens so far, their logprobs."""

    text: str
    tokens: int
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class GenerationOutput:
    token_ids: list[int]
    text: str
    ttft_s: float
    generation_s: float
    finish_reason: str  # "stop" (end id or stop string), "length", "cancelled" or "timeout"
    decode_steps_s: list[float] = field(default_factory=list)  # seconds between consecutive new tokens
    logprobs: list[TokenLogprob] | None = None  # when asked for
    stop: str | None = None  # the stop string that ended generation
    cancel_to_stop_s: float | None = None  # cancel flag set -> generation stopped (perf_counter seconds)

    @property
    def decode_median_s(self) -> float:
        """Median seconds per decode step (0 with fewer than two new tokens)."""
        return float(statistics.median(self.decode_steps_s)) if self.decode_steps_s else 0.0

    @property
    def robust_latency_s(self) -> float:
        """TTFT plus the median decode step for every further token: what the reward trusts."""
        return self.ttft_s + self.decode_median_s * max(len(self.decode_steps_s), 0)


def end_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends a turn: the model's ``generation_config.eos_token_id`` (int or list) and the tokenizer's."""
    ids: list[int] = []
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in ([config_eos] if isinstance(config_eos, int) else list(config_eos or [])) + [tokenizer.eos_token_id]:
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    return ids


def model_sampling_defaults(model: Any) -> dict[str, Any]:
    """Sampling the model's ``generation_config`` asks for (``do_sample`` and its warpers), or {} for greedy."""
    config = getattr(model, "generation_config", None)
    if config is None or not getattr(config, "do_sample", False):
        return {}
    out: dict[str, Any] = {"do_sample": True}
    for key in ("temperature", "top_p", "top_k"):
        value = getattr(config, key, None)
        if value is not None:
            out[key] = value
    return out


class _Penalties(LogitsProcessor):
    """OpenAI's additive penalties over the tokens generated so far, and ``logit_bias``."""

    def __init__(self, prompt_len: int, presence: float, frequency: float, bias: dict[int, float]) -> None:
        self.prompt_len, self.presence, self.frequency, self.bias = prompt_len, presence, frequency, bias
        # logit_bias as one index/value pair of tensors, added in one op per step (not a Python loop over entries)
        self.bias_ids = torch.tensor(list(bias), dtype=torch.long)
        self.bias_values = torch.tensor(list(bias.values()), dtype=torch.float32)
        self._bias_for: tuple[Any, ...] | None = None  # (device, dtype, vocab) the tensors were prepared for

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        generated = input_ids[:, self.prompt_len:]
        if generated.numel() and (self.presence or self.frequency):
            counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
            scores -= self.frequency * counts + self.presence * (counts > 0).to(scores.dtype)
        if self.bias_ids.numel():
            if self._bias_for != (scores.device, scores.dtype, scores.shape[-1]):
                self._bias_for = (scores.device, scores.dtype, scores.shape[-1])
                keep = (self.bias_ids >= 0) & (self.bias_ids < scores.shape[-1])
                self.bias_ids = self.bias_ids[keep].to(scores.device)
                self.bias_values = self.bias_values[keep].to(scores.device, scores.dtype)
            scores.index_add_(1, self.bias_ids, self.bias_values.expand(scores.shape[0], -1))
        return scores


class _Sampler(LogitsProcessor):
    """Draws the next token from the (warped) scores with a per-request generator; greedy then takes it."""

    def __init__(self, seed: int | None) -> None:
        self.seed = seed
        self.generator: torch.Generator | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.seed is not None and self.generator is None:
            self.generator = torch.Generator(device=scores.device).manual_seed(int(self.seed))
        probs = torch.softmax(scores.float(), dim=-1)
        chosen = torch.multinomial(probs, 1, generator=self.generator)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, chosen, 0.0)


class _LogprobRecorder(LogitsProcessor):
    """Keeps the raw distribution of the step in flight; the step watcher commits the chosen token."""

    def __init__(self, top: int) -> None:
        self.top = top
        self.pending: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.pending = torch.log_softmax(scores[0].float(), dim=-1)
        return scores


def _token_text(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters could still start a stop string (or finish a split character)."""
    stable = text.rstrip("\ufffd")  # a split multi-byte character decodes as U+FFFD until it is complete
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(stable)), longest, -1):
            if stable.endswith(stop[:k]):
                longest = k
                break
    return len(text) - len(stable) + longest


def _find_stop(text: str, stops: Sequence[str], new_from: int = 0) -> tuple[int, str] | None:
    """The earliest stop string in ``text`` as (position, stop), searching only where a match could end at or
    after ``new_from`` (the text before it was searched at an earlier step): O(new text + stop length) per step."""
    found = [(i, s) for s in stops if s and (i := text.find(s, max(0, new_from - len(s) + 1))) >= 0]
    return min(found) if found else None


class _StepWatch(StoppingCriteria):
    """Runs after every new token: notes the clock, commits its logprob, checks stop strings and
    the cancel flag, and streams the text that can no longer change.

    Per-token times let the reward use the *median* decode step, so one scheduler hiccup
    during a generation does not decide what a profile costs.
    """

    def __init__(self, clock: Callable[[], float], tokenizer: Any, prompt_len: int, stops: Sequence[str],
                 cancel: Any, recorder: _LogprobRecorder | None, ends: set[int],
                 on_step: Callable[[StreamPiece], None] | None,
                 on_decode_step: Callable[[float], None] | None = None) -> None:
        self.clock, self.tokenizer, self.prompt_len = clock, tokenizer, prompt_len
        self.on_decode_step = on_decode_step
        self.stops, self.cancel, self.recorder, self.ends, self.on_step = list(stops), cancel, recorder, ends, on_step
        self.times: list[float] = []
        self.logprobs: list[TokenLogprob] = []
        self.emitted = 0  # characters of text already streamed
        self.sent_logprobs = 0
        self.stop: str | None = None
        self.cancelled: str | None = None
        self.cancel_to_stop_s: float | None = None
        self.searched = ""  # text already searched for stop strings (no match in it)

    def _new_from(self, text: str) -> int:
        """Where ``text`` may differ from what was searched: its end, unless decoding changed earlier text."""
        return len(self.searched) if text.startswith(self.searched) else 0

    @property
    def first(self) -> float | None:
        return self.times[0] if self.times else None

    def _commit_logprob(self, token: int) -> None:
        if self.recorder is None or self.recorder.pending is None or token in self.ends:
            return
        row = self.recorder.pending
        top: list[tuple[int, str, float]] = []
        if self.recorder.top > 0:
            values, ids = row.topk(min(self.recorder.top, row.shape[-1]))
            top = [(int(i), _token_text(self.tokenizer, int(i)), float(v)) for v, i in zip(values, ids)]
        self.logprobs.append(TokenLogprob(token, _token_text(self.tokenizer, token), float(row[token]), top))
        self.recorder.pending = None

    def text_of(self, new: list[int]) -> str:
        return self.tokenizer.decode(new, skip_special_tokens=True)

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        self.times.append(self.clock())
        if self.on_decode_step is not None and len(self.times) >= 2:
            self.on_decode_step(self.times[-1] - self.times[-2])
        done = False
        new = input_ids[0, self.prompt_len:].tolist()
        if new:
            self._commit_logprob(new[-1])
        if self.stops or self.on_step is not None:
            text = self.text_of([t for t in new if t not in self.ends])
            hit = _find_stop(text, self.stops, self._new_from(text)) if self.stops else None
            self.searched = text.rstrip("\ufffd")  # a split character may still change: search it again
            if hit is not None:
                self.stop, done = hit[1], True
                safe = hit[0]
            else:
                safe = len(text) - _held_back(text, self.stops)
            if self.on_step is not None:
                piece = text[self.emitted:safe] if safe > self.emitted else ""
                self.emitted = max(self.emitted, safe)
                fresh, self.sent_logprobs = self.logprobs[self.sent_logprobs:], len(self.logprobs)
                self.on_step(StreamPiece(piece, len(new), fresh))
        if self.cancel is not None and self.cancel.is_set():
            self.cancelled = getattr(self.cancel, "reason", None) or CANCELLED
            set_at = getattr(self.cancel, "set_at", None)
            self.cancel_to_stop_s = time.perf_counter() - set_at if set_at is not None else None
            done = True
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class _TextCallback:
    """Adapts the old ``on_text(str)`` callback to stream pieces."""

    def __init__(self, on_text: Callable[[str], None], on_step: Callable[[StreamPiece], None] | None) -> None:
        self.on_text, self.on_step = on_text, on_step

    def __call__(self, piece: StreamPiece) -> None:
        if piece.text:
            self.on_text(piece.text)
        if self.on_step is not None:
            self.on_step(piece)


@dataclass
class DecodeRequest:
    """Everything one request hands a decode loop, built once by :func:`prepare_request`.

    Every generator (``model.generate``, prompt lookup, the compressed-KV loop) applies
    the same ``processors`` to the same token sequence and calls the same ``watch`` after
    each forward pass, so cancel, streaming, stop strings, seeds, logprobs, penalties and
    the per-step hook behave identically whatever produced the tokens.
    """

    ids: torch.Tensor
    prompt_len: int
    ends: list[int]
    pad: int
    processors: LogitsProcessorList
    recorder: _LogprobRecorder | None
    stream: Callable[[StreamPiece], None] | None
    watch: _StepWatch
    device: torch.device

    def next_token(self, seq: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """[1, 1] token after ``seq`` from its [1, vocab] logits, exactly as ``model.generate`` picks it."""
        scores = self.processors(seq, logits.float()) if self.processors else logits
        return scores.argmax(-1, keepdim=True)


def prepare_request(
    model: Any,
    tokenizer: Any,
    input_ids: torch.Tensor,
    clock: Callable[[], float] = time.perf_counter,
    on_text: Callable[[str], None] | None = None,
    ignore_eos: bool = False,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stop: Sequence[str] | None = None,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    logit_bias: dict[int, float] | None = None,
    logprobs: int | None = None,
    cancel: Any = None,
    on_step: Callable[[StreamPiece], None] | None = None,
    on_decode_step: Callable[[float], None] | None = None,
) -> DecodeRequest:
    """The processors, end ids and step watcher of one request (shared by every generator)."""
    device = next(model.parameters()).device
    ids = input_ids.to(device)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    prompt_len = int(ids.shape[1])
    ends = [] if ignore_eos else end_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    processors = LogitsProcessorList()
    recorder = _LogprobRecorder(int(logprobs)) if logprobs is not None else None
    if recorder is not None:
        processors.append(recorder)  # first: the raw distribution
    if presence_penalty or frequency_penalty or logit_bias:
        processors.append(_Penalties(prompt_len, presence_penalty, frequency_penalty, dict(logit_bias or {})))
    if do_sample:
        if temperature != 1.0:
            processors.append(TemperatureLogitsWarper(temperature))
        if top_k and top_k > 0:
            processors.append(TopKLogitsWarper(top_k=int(top_k)))
        if top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=top_p))
        processors.append(_Sampler(seed))
    stream = _TextCallback(on_text, on_step) if on_text is not None else on_step
    watch = _StepWatch(clock, tokenizer, prompt_len, [s for s in (stop or []) if s], cancel, recorder, set(ends), stream,
                       on_decode_step)
    return DecodeRequest(ids, prompt_len, ends, int(pad), processors, recorder, stream, watch, device)


def finish_request(request: DecodeRequest, tokenizer: Any, new: list[int], start: float, end: float) -> GenerationOutput:
    """The output of a finished decode loop: cut at the first end id and at a stop string, flush the stream."""
    watch, ends = request.watch, set(request.ends)
    finish = "length"
    cut = next((i for i, t in enumerate(new) if t in ends), None)  # several tokens per pass may run past an end id
    if cut is not None:
        finish, new = "stop", new[:cut]
    text = tokenizer.decode(new, skip_special_tokens=True)
    if watch.stop is not None:
        hit = _find_stop(text, [watch.stop])
        text, finish = (text[: hit[0]] if hit else text), "stop"
    elif watch.cancelled is not None and finish == "length":
        finish = watch.cancelled
    if request.stream is not None:
        rest = text[watch.emitted:] if len(text) > watch.emitted else ""
        fresh = watch.logprobs[watch.sent_logprobs:]
        if rest or fresh:
            request.stream(StreamPiece(rest, len(new), fresh))
    steps = [b - a for a, b in zip(watch.times, watch.times[1:])]
    return GenerationOutput(new, text, (watch.first if watch.first is not None else end) - start, end - start, finish, steps,
                            logprobs=watch.logprobs if request.recorder is not None else None, stop=watch.stop,
                            cancel_to_stop_s=watch.cancel_to_stop_s)


@torch.inference_mode()
def generate_timed(
    model: Any,
    tokenizer: Any,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    clock: Callable[[], float] = time.perf_counter,
    on_text: Callable[[str], None] | None = None,
    ignore_eos: bool = False,
    prompt_lookup: int | None = None,
    generate_options: dict[str, Any] | None = None,
    **options: Any,
) -> GenerationOutput:
    """Generate on the active profile; ``ignore_eos`` fixes the length (for timing).

    ``options`` are :func:`prepare_request`'s: ``logprobs`` (None for none, else how many
    alternatives per token, 0: the chosen token's only), ``cancel`` (anything with
    ``is_set()``, e.g. a :class:`Cancellation`), ``on_step`` (a :class:`StreamPiece` after
    every forward pass; ``on_text`` receives only the non-empty text pieces), sampling,
    penalties, ``stop``, ``seed``, ``on_decode_step``.

    ``prompt_lookup=K`` decodes with transformers' prompt-lookup decoding (drafts of up
    to K tokens copied from the prompt, verified in one forward pass; the greedy answer is
    the dense one). A pass may then add several tokens: the watcher, the per-step hook and
    ``decode_steps_s`` see one entry per forward pass, and logprobs are refused (only the
    pass's last distribution would be kept). ``generate_options`` go to ``model.generate``
    unchanged (a static cache and ``compile_config`` for compiled decoding).
    """
    if prompt_lookup is not None and options.get("logprobs") is not None:
        from casrap.errors import InputError

        raise InputError("prompt-lookup decoding cannot return logprobs")
    request = prepare_request(model, tokenizer, input_ids, clock=clock, on_text=on_text, ignore_eos=ignore_eos, **options)
    ids, device = request.ids, request.device
    kwargs: dict[str, Any] = {"do_sample": False}
    if request.processors:
        kwargs["logits_processor"] = request.processors
    if ignore_eos:
        kwargs["min_new_tokens"] = max_new_tokens
    if prompt_lookup is not None:
        kwargs["prompt_lookup_num_tokens"] = int(prompt_lookup)
    kwargs.update(generate_options or {})
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = clock()
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, eos_token_id=request.ends or None,
        pad_token_id=request.pad, stopping_criteria=StoppingCriteriaList([request.watch]), **kwargs,
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    end = clock()
    return finish_request(request, tokenizer, out[0, request.prompt_len:].tolist(), start, end)
