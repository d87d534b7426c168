"""First-come-first-served access to the profile bank, with withdrawal.

``threading.Lock`` wakes an arbitrary waiter, so under load a request could wait
behind requests that arrived after it. :class:`FifoGate` hands the bank over in
arrival order, and a waiter whose :class:`~casrap.decide.generation.Cancellation` is
set (client gone, deadline passed) leaves the line at once instead of taking the
bank when its turn comes. The gate also keeps a short log of hand-overs, which is
how the time from one request giving the bank up to the next one getting it is
measured.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

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


__all__ = ["BankEvent", "FifoGate"]
