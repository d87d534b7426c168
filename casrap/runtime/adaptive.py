"""``AdaptiveLM``: a language model that picks its pruning profile per request.

    from casrap import AdaptiveLM
    lm = AdaptiveLM.load()                       # shipped bundle, embedded SmolLM2-135M
    answer = lm.generate("What is the capital of France?")
    answer.text, answer.record.profile, answer.record.latency_s

A bank has one active profile, and a KV cache built under one profile is invalid under
another. Concurrent requests that run the same profile decode together: a batching
engine (:class:`casrap.runtime.queueing.BatchScheduler`, ``BatchConfig.max_batch``
rows, default 8) lets them join and leave the running batch between decode steps;
a request whose profile differs waits until the batch drains (``batch_mode="group"``).
``max_batch=1`` runs one request at a time through a first-come-first-served gate
(:class:`casrap.runtime.queueing.FifoGate`), as do compressed-KV (``kv-R``) profiles.
Either way the number waiting and the time a request waited enter its decision (see
:mod:`casrap.decide.router`).
Without a latency target the bundle's default budget applies
(``RuntimeDefaults.budget_ratio``); a request whose target already passed while it
queued is answered by the fastest profile, and its record says so
(``target_expired``). A request may carry a
:class:`~casrap.decide.generation.Cancellation`: set while queued, the request leaves
the line; set while running, generation stops after the current token.

Prompt features (perplexity) are read from the request's own text: a plain prompt, or
the last user message of a chat (a long fixed system prompt would otherwise make every
request look alike).
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch

from casrap.profiles.catalogue import FULL
from casrap.decide.batching import BatchConfig
from casrap.decide.generation import Cancellation, GenerationOutput, StreamPiece, TokenLogprob
from casrap.decide.router import Decision, Router
from casrap.errors import InputError
from casrap.measure.timing import check_prompt_fits
from casrap.runtime.bundle import PolicyBundle, RuntimeDefaults, load_bundle
from casrap.runtime.queueing import BatchHooks, BatchJob, BatchScheduler, FifoGate

Messages = list[dict[str, str]]


class RequestCancelled(Exception):
    """The request was cancelled (client gone) or timed out before it got the bank."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"request {reason} while waiting for the model")
        self.reason = reason


@dataclass
class GenerationRecord:
    """What one request cost and what was chosen (seconds unless named otherwise).

    ``latency_s`` runs from the moment the request got the bank (decision, switch and
    generation); ``total_s`` adds the queue wait; ``target_met`` compares ``total_s``
    with the target (None without one). ``ttft_s`` counts from the same moment as
    ``latency_s``. ``target_expired``: the target had passed before the request got the
    bank, so the fastest profile answered without asking the policy.
    """

    profile: str
    decision_s: float
    telemetry_s: float
    analysis_s: float
    policy_s: float
    switch_s: float
    queue_wait_s: float
    queue_length: int
    ttft_s: float
    generation_s: float
    latency_s: float
    total_s: float
    prompt_tokens: int
    completion_tokens: int
    tokens_per_s: float
    target_s: float | None
    target_met: bool | None
    finish_reason: str
    budget_ratio: float
    estimated_full_s: float
    target_expired: bool = False
    cancel_to_stop_s: float | None = None

    @property
    def overhead_share(self) -> float:
        """Decision + switch time as a share of the whole request (excluding queue wait)."""
        return (self.decision_s + self.switch_s) / self.latency_s if self.latency_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe data (a forced profile has no budget: NaN becomes None)."""
        data = asdict(self)
        data["overhead_share"] = self.overhead_share
        return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in data.items()}


@dataclass
class Generation:
    text: str
    record: GenerationRecord
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    stop: str | None = None


class GenerationStream:
    """Iterate for text pieces as they are generated; ``.result`` once exhausted.

    Generation runs in a worker thread (which waits for the bank first). Two ways to
    consume it: iterate (blocking, text pieces), or call :meth:`drain` whenever
    ``notify`` fires (non-blocking; the server's event loop does this, so no thread is
    parked per waiting client). :meth:`cancel` stops the request: it leaves the queue, or
    generation stops after the current token.
    """

    _END = object()

    def __init__(self, run: Callable[[Callable[[StreamPiece], None], Callable[[Decision], None]], Generation],
                 cancel: Cancellation | None = None, notify: Callable[[], None] | None = None) -> None:
        self._queue: queue.Queue[Any] = queue.Queue()
        self.result: Generation | None = None
        self.decision: Decision | None = None
        self.decided = threading.Event()  # set once the profile is chosen (or the request failed)
        self.finished = False
        self.error: BaseException | None = None
        self.cancellation = cancel if cancel is not None else Cancellation()
        self._notify = notify or (lambda: None)
        self._thread = threading.Thread(target=self._work, args=(run,), daemon=True)
        self._thread.start()

    def _on_decision(self, decision: Decision) -> None:
        self.decision = decision
        self.decided.set()
        self._notify()

    def _on_piece(self, piece: StreamPiece) -> None:
        self._queue.put(piece)
        if piece.text or piece.logprobs:
            self._notify()

    def _work(self, run: Callable[[Callable[[StreamPiece], None], Callable[[Decision], None]], Generation]) -> None:
        try:
            self.result = run(self._on_piece, self._on_decision)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            self.error = err
        finally:
            self.decided.set()
            self._queue.put(self._END)
            self._notify()

    @property
    def _error(self) -> BaseException | None:
        return self.error

    def cancel(self, reason: str = "cancelled") -> None:
        self.cancellation.cancel(reason)

    def wait_decision(self, timeout: float | None = None) -> Decision | None:
        """Block until the profile is chosen; re-raises an error that came first."""
        self.decided.wait(timeout)
        if self.decision is None and self.error is not None:
            raise self.error
        return self.decision

    def drain(self) -> list[StreamPiece]:
        """Pieces generated since the last call, without blocking; sets ``finished`` at the end."""
        pieces: list[StreamPiece] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return pieces
            if item is self._END:
                self.finished = True
                return pieces
            pieces.append(item)

    def __iter__(self) -> Iterator[str]:
        while True:
            item = self._queue.get()
            if item is self._END:
                break
            if item.text:
                yield item.text
        self.finished = True
        self._thread.join()
        if self.error is not None:
            raise self.error

    @property
    def record(self) -> GenerationRecord | None:
        return self.result.record if self.result else None


class AdaptiveLM:
    """A model plus a policy bundle: per-request profile choice, timed; same-profile requests batched.

    ``batching``: :class:`~casrap.decide.batching.BatchConfig` (``max_batch=1``: one
    request at a time). ``on_step``: called with each batched decode step's seconds
    between two steps (a callable or an object with ``.step``, e.g. a thread governor).
    """

    def __init__(self, router: Router, tokenizer: Any, model_name: str = "", bundle: PolicyBundle | None = None,
                 clock: Callable[[], float] = time.perf_counter, batching: BatchConfig | None = None,
                 on_step: Any = None) -> None:
        self.router = router
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.bundle = bundle
        self.clock = clock
        self.batching = batching or BatchConfig()
        self._gate = FifoGate()
        self._engine: BatchScheduler | None = None
        if self.batching.max_batch > 1:
            hooks = BatchHooks(decide=self._decide_job, batchable=self._batchable,
                               run_solo=self._run_solo, cancelled=RequestCancelled, finished=self._learn_speed)
            self._engine = BatchScheduler(router.bank, tokenizer, self._gate, hooks, self.batching, clock=clock,
                                          on_step=on_step if on_step is not None else self._govern_batch_step)

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, bundle: str | Any = None, model: str | Any = None, device: str = "auto",
             telemetry: Any = None, clock: Callable[[], float] = time.perf_counter, warmup_tokens: int = 8,
             batching: BatchConfig | None = None) -> AdaptiveLM:
        """Load a bundle (default: the shipped one) and its model (default: the bundle's).

        ``model`` is a spec for :func:`casrap.models.load_model` or an already
        loaded :class:`LoadedModel`. Raises :class:`CheckpointError` (one line) when the
        model's weights are not those the bundle's plans were made for. ``warmup_tokens``
        > 0 runs :meth:`warmup` (``batching``: see the class; the first forward pass after loading is several times
        slower than the rest and would mislead both the first decision and the latency model).
        """
        from casrap.models import load_model
        from casrap.models.loaded import LoadedModel

        checked = bundle if isinstance(bundle, PolicyBundle) else load_bundle(bundle)
        lm = model if isinstance(model, LoadedModel) else load_model(model or checked.model_spec, device=device)
        bank = checked.build_bank(lm.model)
        policy = checked.load_policy()
        router = Router(bank, lm.tokenizer, policy, checked.defaults, telemetry=telemetry, clock=clock)
        adaptive = cls(router, lm.tokenizer, model_name=lm.spec, bundle=checked, clock=clock, batching=batching)
        if warmup_tokens > 0:
            adaptive.warmup(warmup_tokens)
        return adaptive

    def warmup(self, tokens: int = 8) -> None:
        """One untimed pass, the unloaded latency model the targets are normalised by (cached per
        model and machine; measured here on first use, a few seconds), and a first slowdown probe."""
        from casrap.decide.generation import generate_timed

        ids = self.encode("Hello.", tokens)
        model = self.router.bank.model
        with self._gate:
            self.router.bank.activate(FULL)
            generate_timed(model, self.tokenizer, ids, 2, clock=self.clock, ignore_eos=True)
            _ = self.router.unloaded
            self.router.prepare(force_probe=True)

    @property
    def defaults(self) -> RuntimeDefaults:
        return self.router.defaults

    @property
    def profiles(self) -> list[str]:
        return list(self.router.actions)

    @property
    def fastest_profile(self) -> str:
        """The profile with the largest ideal speed-up (answers requests whose target already passed)."""
        bank = self.router.bank
        return max(self.router.actions, key=lambda n: (float(bank.ideal_speedup(n)), -self.router.actions.index(n)))

    @property
    def queue_length(self) -> int:
        """Requests waiting for the bank now (not running; the batching engine's own place in line not counted)."""
        if self._engine is None:
            return self._gate.waiting
        return self._gate.waiting - int(self._engine.waiting_on_gate) + self._engine.waiting

    @property
    def busy(self) -> bool:
        """Whether a request (or the batching engine) holds the bank now."""
        return self._gate.busy

    @property
    def bank_log(self) -> list[Any]:
        """Recent hand-overs of the bank (:class:`casrap.runtime.queueing.BankEvent`), oldest first."""
        return list(self._gate.log)

    @property
    def context_length(self) -> int:
        return int(getattr(self.router.bank.model.config, "max_position_embeddings", 0) or 0)

    # ---------------------------------------------------------------- requests
    @staticmethod
    def prompt_text(prompt: str | Messages) -> str:
        """The text the analyzer scores: the prompt, or the last user message of a chat.

        Falls back to the last message with content when no message has the user role.
        """
        if isinstance(prompt, str):
            return prompt
        for message in reversed(prompt):
            if message.get("role") == "user" and str(message.get("content") or "").strip():
                return str(message["content"])
        for message in reversed(prompt):
            if str(message.get("content") or "").strip():
                return str(message["content"])
        return ""

    @staticmethod
    def joined_text(prompt: str | Messages) -> str:
        """Every message's content joined (the prompt of a tokenizer without a chat template)."""
        if isinstance(prompt, str):
            return prompt
        return "\n".join(str(m.get("content") or "") for m in prompt)

    def encode(self, prompt: str | Messages, max_new_tokens: int) -> torch.Tensor:
        """Token ids (chat template when the tokenizer has one); one-line errors for bad input."""
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if not messages or not self.joined_text(messages).strip():
            raise InputError("empty prompt: give some text or at least one message with content")
        if getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
            ids = ids if torch.is_tensor(ids) else ids["input_ids"]
        else:
            ids = self.tokenizer(self.joined_text(messages), return_tensors="pt").input_ids
        check_prompt_fits(self.router.bank.model, int(ids.shape[-1]), max_new_tokens)
        return ids

    def encode_raw(self, text: str, max_new_tokens: int) -> torch.Tensor:
        """Token ids of plain text, no chat template (``/v1/completions``)."""
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if not text.strip():
            raise InputError("empty prompt")
        ids = self.tokenizer(text, return_tensors="pt").input_ids
        check_prompt_fits(self.router.bank.model, int(ids.shape[-1]), max_new_tokens)
        return ids

    def _enter(self, cancel: Cancellation | None = None, tag: Any = None) -> tuple[float, int]:
        """Wait for the bank in arrival order; returns (seconds waited, requests still waiting behind)."""
        arrived = self.clock()
        if not self._gate.acquire(cancel, tag):
            reason = getattr(cancel, "reason", None) or "cancelled"
            raise RequestCancelled(reason)
        return self.clock() - arrived, self._gate.waiting

    def choose(self, prompt: str | Messages, max_new_tokens: int | None = None, latency_target_s: float | None = None) -> Decision:
        """The decision alone (no generation)."""
        n = self.defaults.max_new_tokens if max_new_tokens is None else max_new_tokens
        ids = self.encode(prompt, n)
        waited, behind = self._enter()
        try:
            return self.router.decide(self.prompt_text(prompt), int(ids.shape[-1]), n, latency_target_s, behind, waited)
        finally:
            self._gate.release()

    def _generate_ids(self, text: str, ids: torch.Tensor, n: int, target: float | None,
                      on_step: Callable[[StreamPiece], None] | None, ignore_eos: bool, profile: str | None,
                      on_decision: Callable[[Decision], None] | None = None, cancel: Cancellation | None = None,
                      **sampling: Any) -> Generation:
        if self._engine is None:
            return self._generate_serial(text, ids, n, target, on_step, ignore_eos, profile, on_decision, cancel, **sampling)
        job = BatchJob(text, ids, n, target, profile, ignore_eos, dict(sampling), cancel, on_step, on_decision, self.clock())
        self._engine.run(job)
        latency = job.ended - job.decided_at
        return self._generation(job.decision, job.output, job.switch_s, job.waited, job.behind, latency, job.expired, target,
                                ids)

    def _generate_serial(self, text: str, ids: torch.Tensor, n: int, target: float | None,
                         on_step: Callable[[StreamPiece], None] | None, ignore_eos: bool, profile: str | None,
                         on_decision: Callable[[Decision], None] | None = None, cancel: Cancellation | None = None,
                         **sampling: Any) -> Generation:
        tag = id(cancel) if cancel is not None else None
        waited, behind = self._enter(cancel, tag)
        try:
            start = self.clock()
            expired = profile is None and target is not None and waited >= target
            if expired:
                profile = self.fastest_profile
            if profile is None:  # the request's options mask the actions whose generator cannot honour them
                decision = self.router.decide(text, int(ids.shape[-1]), n, target, behind, waited, options=sampling)
            else:
                decision = self.router.fixed_decision(profile, ids, n, behind, waited)
            if on_decision is not None:
                on_decision(decision)
            routed = self._route(decision, ids, n, on_step, ignore_eos, cancel, sampling)
            latency = self.clock() - start
        finally:
            self._gate.release(tag)
        return self._generation(routed.decision, routed.output, routed.switch_s, waited, behind, latency, expired, target, ids)

    def _route(self, decision: Decision, ids: torch.Tensor, n: int, on_step: Callable[[StreamPiece], None] | None,
               ignore_eos: bool, cancel: Cancellation | None, sampling: dict[str, Any]) -> Any:
        """Run one decided request alone on the bank (the Router's timed generation)."""
        sampling = dict(sampling)  # every profile kind's generator takes cancel and on_step (casrap.decide.generators)
        if cancel is not None:
            sampling["cancel"] = cancel
        if on_step is not None:
            sampling["on_step"] = on_step
        return self.router.run(decision, ids, n, ignore_eos=ignore_eos, **sampling)

    def _generation(self, d: Decision, o: GenerationOutput, switch_s: float, waited: float, behind: int, latency: float,
                    expired: bool, target: float | None, ids: torch.Tensor) -> Generation:
        """The answer and its record (latency from getting the bank; total adds the wait)."""
        total = latency + waited
        record = GenerationRecord(
            profile=d.profile, decision_s=d.decision_s, telemetry_s=d.telemetry_s, analysis_s=d.analysis_s,
            policy_s=d.policy_s, switch_s=switch_s, queue_wait_s=waited, queue_length=behind,
            ttft_s=latency - o.generation_s + o.ttft_s, generation_s=o.generation_s, latency_s=latency, total_s=total,
            prompt_tokens=int(ids.shape[-1]), completion_tokens=len(o.token_ids),
            tokens_per_s=len(o.token_ids) / o.generation_s if o.generation_s > 0 else 0.0,
            target_s=target, target_met=None if target is None else total <= target, finish_reason=o.finish_reason,
            budget_ratio=d.budget_ratio, estimated_full_s=d.estimated_full_s, target_expired=expired,
            cancel_to_stop_s=getattr(o, "cancel_to_stop_s", None),
        )
        return Generation(o.text, record, o.token_ids, getattr(o, "logprobs", None), getattr(o, "stop", None))

    # ------------------------------------------------------- batching hooks
    def _govern_batch_step(self, step_s: float) -> None:
        """The Router's thread governor between batched decode steps (medians kept per profile and batch size)."""
        engine, governor = self._engine, self.router.governor
        if engine is not None:
            governor.for_work(f"{engine.profile}/batch{engine.running}")
        governor.step(step_s)

    def _decide_job(self, job: BatchJob, profile: str | None = None) -> Decision:
        """A batched request's decision, made by the engine at a step boundary (the serial path's rules)."""
        from dataclasses import replace

        n, tokens = job.max_new_tokens, int(job.ids.shape[-1])
        if profile is not None and job.profile is None:  # batch_mode="batch": the running batch's profile
            return replace(self.router.fixed_decision(profile, job.ids, n, job.behind, job.waited), rule="batch")
        job.expired = job.profile is None and job.target is not None and job.waited >= job.target
        chosen = self.fastest_profile if job.expired else job.profile
        if chosen is not None:
            return self.router.fixed_decision(chosen, job.ids, n, job.behind, job.waited)
        return self.router.decide(job.text, tokens, n, job.target, job.behind, job.waited, options=job.sampling)

    def _batchable(self, job: BatchJob) -> bool:
        """Whether the engine can batch a decided job: a dense profile and no ``model.generate`` options."""
        from casrap.decide.generators import DENSE, requested

        return self.router.generator(job.decision.profile).kind == DENSE and "generate_options" not in requested(job.sampling)

    def _run_solo(self, job: BatchJob) -> Any:
        """A request the engine cannot batch (compressed KV, prompt lookup): alone, exactly as the serial path runs it."""
        return self._route(job.decision, job.ids, job.max_new_tokens, job.on_step, job.ignore_eos, job.cancel, job.sampling)

    def _learn_speed(self, job: BatchJob) -> None:
        """Feed casrap's slowdown tracker from requests that decoded alone (a shared step is slower by design)."""
        o = job.output
        if job.peak_batch > 1 or o is None or len(o.decode_steps_s) < 3 or self.router._unloaded is None:
            return
        tracker = self.router.slowdown
        tracker.unloaded_step_s = self.router.unloaded.fit.decode(int(job.ids.shape[-1]))
        tracker.observe(job.decision.profile, o.decode_median_s, self.clock())

    def _compressed_kv(self, profile: str) -> bool:
        """Whether ``profile`` generates through the compressed-KV path (``kv-R`` actions)."""
        from casrap.decide.kv_generation import kv_keep_of

        try:
            return kv_keep_of(self.router.bank.profile(profile).plan) is not None
        except (AttributeError, KeyError, InputError):
            return False

    def _check_profile(self, profile: str | None) -> None:
        if profile is not None and profile not in self.router.actions:
            raise InputError(f"no profile named {profile!r}; have {', '.join(self.router.actions)}")

    def generate(
        self,
        prompt: str | Messages,
        max_new_tokens: int | None = None,
        latency_target_s: float | None = None,
        stream: bool = False,
        ignore_eos: bool = False,
        profile: str | None = None,
        raw: bool = False,
        cancel: Cancellation | None = None,
        **sampling: Any,
    ) -> Generation | GenerationStream:
        """Answer a prompt (or chat messages) on the profile the policy picks.

        ``stream=True`` returns a :class:`GenerationStream` of text pieces. ``profile``
        forces a profile (baselines); ``raw`` skips the chat template; ``ignore_eos``
        generates exactly ``max_new_tokens`` (timing); ``cancel`` stops the request
        from another thread. ``sampling``: see
        :func:`casrap.decide.generation.generate_timed` (``do_sample``, ``temperature``,
        ``top_p``, ``top_k``, ``seed``, ``stop``, penalties, ``logprobs``; greedy by default).
        """
        n = self.defaults.max_new_tokens if max_new_tokens is None else max_new_tokens
        self._check_profile(profile)
        ids = self.encode_raw(prompt, n) if raw and isinstance(prompt, str) else self.encode(prompt, n)
        text = self.prompt_text(prompt)
        if stream:
            token = cancel if cancel is not None else Cancellation()
            return GenerationStream(lambda on_step, on_decision: self._generate_ids(
                text, ids, n, latency_target_s, on_step, ignore_eos, profile, on_decision, token, **sampling), token)
        return self._generate_ids(text, ids, n, latency_target_s, None, ignore_eos, profile, cancel=cancel, **sampling)

    def submit(
        self,
        prompt: str | Messages,
        max_new_tokens: int | None = None,
        latency_target_s: float | None = None,
        ignore_eos: bool = False,
        profile: str | None = None,
        raw: bool = False,
        cancel: Cancellation | None = None,
        notify: Callable[[], None] | None = None,
        pieces: bool = True,
        **sampling: Any,
    ) -> GenerationStream:
        """Like ``generate(stream=True)``, but tokenising and templating happen in the worker
        thread too (a server's event loop never does that work); bad input surfaces from
        :meth:`GenerationStream.wait_decision` or the stream's ``error``. ``notify`` is
        called from the worker whenever the stream has news. ``pieces=False`` skips the
        per-token text (a plain answer needs only the result)."""
        n = self.defaults.max_new_tokens if max_new_tokens is None else max_new_tokens

        def run(on_step: Callable[[StreamPiece], None], on_decision: Callable[[Decision], None]) -> Generation:
            self._check_profile(profile)
            ids = self.encode_raw(prompt, n) if raw and isinstance(prompt, str) else self.encode(prompt, n)
            return self._generate_ids(self.prompt_text(prompt), ids, n, latency_target_s, on_step if pieces else None,
                                      ignore_eos, profile, on_decision, token, **sampling)

        token = cancel if cancel is not None else Cancellation()
        return GenerationStream(run, token, notify)
