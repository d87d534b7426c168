"""First-come-first-served access to the profile bank, with withdrawal.

``threading.Lock`` wakes an arbitrary waiter, so under load a request could wait
behind requests that arrived after it. :class:`FifoGate` hands the bank over in
arrival order, and a waiter whose :class:`~casrap.decide.generation.Cancellation` is
set (client gone, deadline passed) leaves the line at once instead of taking the
bank when its turn comes. The gate also keeps a short log of hand-overs, which is
how the time from one request giving the bank up to the next one getting it is
measured.

:class:`BatchScheduler` is the batching engine behind the same gate: while it holds the
bank, requests that run the same profile share decode steps
(:mod:`casrap.decide.batching`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

POLL_S = 0.05  # for cancel flags without callbacks; a Cancellation wakes its waiter itself


@dataclass(frozen=True)
class BankEvent:
    """``acquire`` or ``release`` of the bank at ``at`` (``time.perf_counter``), by request ``tag``."""

    kind: str
    at: float
    tag: Any


class FifoGate:
    """A lock granted in arrival order; ``acquire(cancel)`` returns False if the waiter was cancelled."""

    def __init__(self, log_size: int = 2048) -> None:
        self._cond = threading.Condition()
        self._line: deque[object] = deque()
        self._busy = False
        self.log: deque[BankEvent] = deque(maxlen=log_size)

    @property
    def waiting(self) -> int:
        """Requests in line for the bank now (not counting the one holding it)."""
        return len(self._line)

    @property
    def busy(self) -> bool:
        return self._busy

    def wake(self) -> None:
        """Make every waiter re-check its cancel flag now."""
        with self._cond:
            self._cond.notify_all()

    @staticmethod
    def _timeout(cancel: Any) -> float | None:
        """How long a waiter may sleep: until woken (cancel callbacks wake it), or until its deadline.

        Waiters do not poll without need: thirty parked threads waking every few
        milliseconds would take the GIL from the generating one.
        """
        if cancel is None:
            return None
        if not hasattr(cancel, "on_cancel"):
            return POLL_S
        deadline = getattr(cancel, "deadline", None)
        return None if deadline is None else max(deadline - time.monotonic(), 0.0) + 0.001

    def acquire(self, cancel: Any = None, tag: Any = None) -> bool:
        ticket = object()
        if cancel is not None and hasattr(cancel, "on_cancel"):
            cancel.on_cancel(self.wake)
        with self._cond:
            self._line.append(ticket)
            try:
                while True:
                    if cancel is not None and cancel.is_set():
                        return False
                    if not self._busy and self._line[0] is ticket:
                        self._busy = True
                        self.log.append(BankEvent("acquire", time.perf_counter(), tag))
                        return True
                    self._cond.wait(self._timeout(cancel))
            finally:
                self._line.remove(ticket)
                self._cond.notify_all()

    def release(self, tag: Any = None) -> None:
        with self._cond:
            self._busy = False
            self.log.append(BankEvent("release", time.perf_counter(), tag))
            self._cond.notify_all()

    def __enter__(self) -> FifoGate:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


# --------------------------------------------------------------------------- batching
@dataclass(eq=False)  # compared by identity: it holds tensors and an event
class BatchJob:
    """One request in the batching engine: what to generate, and how it went.

    ``decided_at`` is when its (last) decision began: its latency counts from there and
    ``waited`` up to there, as a serial request's latency counts from getting the bank.
    """

    text: str
    ids: Any  # [1, prompt tokens]
    max_new_tokens: int
    target: float | None
    profile: str | None  # forced profile (baselines), else the policy decides
    ignore_eos: bool
    sampling: dict[str, Any]
    cancel: Any
    on_step: Callable[[Any], None] | None
    on_decision: Callable[[Any], None] | None
    arrived: float
    decision: Any = None
    decided_at: float = 0.0
    waited: float = 0.0
    behind: int = 0
    expired: bool = False
    switch_s: float = 0.0
    output: Any = None  # GenerationOutput once done
    ended: float = 0.0
    peak_batch: int = 1
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


@dataclass
class BatchHooks:
    """What the engine asks its owner (an :class:`~casrap.runtime.adaptive.AdaptiveLM`) to do.

    ``decide(job, profile)``: a Decision for ``job`` (``profile`` forces one, for
    ``batch_mode="batch"`` joiners); ``batchable(job)``: whether the engine can
    batch the decided job (only plain ``model.generate`` decoding batches: not
    compressed-KV or prompt-lookup profiles, nor ``generate_options``); ``run_solo(job)``: run it alone, as the
    serial path does, returning the Router's ``Routed``; ``cancelled(reason)``: the
    exception a withdrawn request raises; ``finished(job)``: after a job is done (the
    owner may learn the latency from it).
    """

    decide: Callable[[BatchJob, str | None], Any]
    batchable: Callable[[BatchJob], bool]
    run_solo: Callable[[BatchJob], Any]
    cancelled: Callable[[str], BaseException]
    finished: Callable[[BatchJob], None] = lambda job: None


class BatchScheduler:
    """Continuous batching on a bank with one active profile: requests join and leave at step boundaries.

    One engine thread does all model work (decisions, prefills, decode steps) while it
    holds the bank's :class:`FifoGate`, and exits when nothing is waiting or running
    (so an idle runtime holds no thread and no gate). Grouping (``batch_mode="group"``):
    the running batch has one profile; a waiting request is decided at the first step
    boundary after it arrives (its queue length and wait enter its budget as in the serial
    path); when its profile is the batch's it joins, otherwise it waits until the batch
    drains, and then the oldest waiting request is decided afresh and its profile runs.
    ``batch_mode="batch"``: the request that starts a batch is decided; everyone who
    joins while it runs takes its profile. Between any two decode steps ``on_step(step_s)``
    runs (a callable or an object with ``.step``), e.g. a thread governor.
    """

    def __init__(self, bank: Any, tokenizer: Any, gate: FifoGate, hooks: BatchHooks, config: Any,
                 clock: Callable[[], float] = time.perf_counter, on_step: Any = None) -> None:
        from casrap.decide.batching import DecodeBatch

        self.bank, self.tokenizer, self.gate, self.hooks, self.config, self.clock = bank, tokenizer, gate, hooks, config, clock
        self.on_step = getattr(on_step, "step", on_step)
        self._batch = DecodeBatch(bank.model, tokenizer, clock)
        self._profile: str | None = None
        self._cond = threading.Condition()
        self._waiting: list[BatchJob] = []
        self._thread: threading.Thread | None = None
        self._holding = False
        self._gate_wait = False
        self.steps = 0  # decode steps run (all batches)
        self.peak = 0  # most rows ever decoded in one step

    # ------------------------------------------------------------ request side
    @property
    def waiting(self) -> int:
        """Requests submitted and not yet running."""
        return len(self._waiting)

    @property
    def waiting_on_gate(self) -> bool:
        """Whether the engine thread itself stands in the gate's line (not a request)."""
        return self._gate_wait

    @property
    def profile(self) -> str | None:
        """The running batch's profile (None between batches)."""
        return self._profile

    @property
    def running(self) -> int:
        return self._batch.size

    def run(self, job: BatchJob) -> BatchJob:
        """Submit ``job`` and block until it is done; raises its error (``hooks.cancelled`` when withdrawn)."""
        cancel = job.cancel
        if cancel is not None and hasattr(cancel, "on_cancel"):
            cancel.on_cancel(lambda: self._withdraw(job))
        with self._cond:
            self._waiting.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="casrap-batch", daemon=True)
                self._thread.start()
        while not job.done.wait(FifoGate._timeout(cancel)):
            if cancel is not None and cancel.is_set():
                self._withdraw(job)
        if job.error is not None:
            raise job.error
        return job

    def _withdraw(self, job: BatchJob) -> bool:
        """Take a cancelled job out of the line (False once it runs: then it stops within a step)."""
        with self._cond:
            if job not in self._waiting:
                return False
            self._waiting.remove(job)
        job.error = self.hooks.cancelled(getattr(job.cancel, "reason", None) or "cancelled")
        job.done.set()
        return True

    def _claim(self, job: BatchJob) -> bool:
        with self._cond:
            if job not in self._waiting:
                return False
            self._waiting.remove(job)
            return True

    # ------------------------------------------------------------- engine side
    def _loop(self) -> None:
        while True:
            with self._cond:
                if not self._waiting and not self._batch.size:
                    self._thread = None
                    if self._holding:
                        self._holding = False
                        self.gate.release("batch")
                    return
            if not self._holding:
                self._gate_wait = True
                self.gate.acquire(None, "batch")
                self._gate_wait, self._holding = False, True
            try:
                self._boundary()
            except BaseException as err:  # noqa: BLE001 - a failed step fails the batch, not the engine
                self._fail_batch(err)

    def _fail_batch(self, err: BaseException) -> None:
        log.exception("batched decoding failed; failing the %d running requests", self._batch.size)
        for row in self._batch.drop_all():
            self._fail(row.tag, err)
        self._profile = None
        self._restore()

    def _fail(self, job: BatchJob, err: BaseException) -> None:
        job.error = err
        job.done.set()

    def _restore(self) -> None:
        from casrap.profiles.catalogue import FULL

        if FULL in getattr(self.bank, "names", [FULL]):
            self.bank.activate(FULL)

    def _decide(self, job: BatchJob, profile: str | None = None) -> bool:
        """Decide ``job`` now (False when deciding failed: the job is failed and withdrawn)."""
        now = self.clock()
        with self._cond:
            behind = len(self._waiting) - self._waiting.index(job) - 1 if job in self._waiting else 0
        job.decided_at, job.waited, job.behind = now, now - job.arrived, behind
        try:
            job.decision = self.hooks.decide(job, profile)
        except BaseException as err:  # noqa: BLE001 - handed to the request
            if self._claim(job):
                self._fail(job, err)
            return False
        return True

    def _start(self) -> bool:
        """Start a batch with the oldest waiting request (decided afresh); False when none could start."""
        with self._cond:
            job = self._waiting[0] if self._waiting else None
        if job is None or not self._decide(job):
            return False
        profile = job.decision.profile
        if not self.hooks.batchable(job):
            if self._claim(job):
                self._solo(job)
            return False
        t0 = self.clock()
        self.bank.activate(profile)
        job.switch_s = self.clock() - t0
        self._profile = profile
        self._admit(job)
        return True

    def _solo(self, job: BatchJob) -> None:
        if job.on_decision is not None:
            job.on_decision(job.decision)
        try:
            routed = self.hooks.run_solo(job)
        except BaseException as err:  # noqa: BLE001 - handed to the request
            self._fail(job, err)
            return
        job.decision, job.output, job.switch_s, job.ended = routed.decision, routed.output, routed.switch_s, self.clock()
        job.done.set()  # the Router learnt its latency already

    def _admit(self, job: BatchJob) -> None:
        from casrap.decide.batching import SequenceRequest

        if not self._claim(job):
            return
        if job.on_decision is not None:
            job.on_decision(job.decision)
        try:
            options = {**job.sampling, "cancel": job.cancel, "on_step": job.on_step}
            request = SequenceRequest(job.ids, job.max_new_tokens, job.ignore_eos, options)
            row = self._batch.admit(request, tag=job)
        except BaseException as err:  # noqa: BLE001 - a bad request fails alone
            self._fail(job, err)
            return
        self.peak = max(self.peak, self._batch.size)
        if row.done:
            self._complete(row)

    def _complete(self, row: Any) -> None:
        job = row.tag
        try:
            job.output = row.output()
        except BaseException as err:  # noqa: BLE001
            self._fail(job, err)
            return
        job.ended, job.peak_batch = row.end, row.peak_batch
        self.hooks.finished(job)
        job.done.set()

    def _boundary(self) -> None:
        """One step boundary: start a batch if none runs, decide and admit newcomers, one decode step."""
        with self._cond:
            waiting = list(self._waiting)
        # is_set() may fire a deadline's callbacks (which withdraw): read it outside the lock
        for job in [j for j in waiting if j.cancel is not None and j.cancel.is_set()]:
            self._withdraw(job)
        if not self._batch.size and not self._start():
            return
        with self._cond:
            fresh = [j for j in self._waiting if j.decision is None]
        for job in fresh:
            self._decide(job, self._profile if self.config.batch_mode == "batch" else None)
        if self.bank.active != self._profile:  # a decision ran the full model (prompt analysis)
            self.bank.activate(self._profile)
        with self._cond:
            joining = [j for j in self._waiting if j.decision is not None and j.decision.profile == self._profile]
        for job in joining[: max(int(self.config.max_batch) - self._batch.size, 0)]:
            self._admit(job)
        if self._batch.size:
            t0 = self.clock()
            finished = self._batch.step()
            step_s = self.clock() - t0
            self.steps += 1
            for row in finished:
                self._complete(row)
            if self.on_step is not None:
                self.on_step(step_s)
        if not self._batch.size:
            self._profile = None
            self._restore()


__all__ = ["BankEvent", "BatchHooks", "BatchJob", "BatchScheduler", "FifoGate"]
