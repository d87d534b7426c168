"""Fitness evaluation on a Ray pool, plugged into DEAP's ``toolbox.map``.

Each worker is a Ray actor holding its own copy of the model, built from a picklable
:class:`WorkerSpec` (the loader's model spec, device, and the fitness spec with the
search tokens), and checks that the weights it loaded have the driver's fingerprint
before scoring anything. The driver sends *plans* (plain data, a few KB) and gets back
``(fitness, terms)``.

Why rebuild from the spec rather than ``ray.put`` the weights: the loader spec is a few
bytes and every node loads from its local cache (or the hub) at disk speed, while a
``ray.put`` of the state dict is pickled torch tensors that each worker copies out of
the object store, and on a multi-node cluster pushes gigabytes over the network per
node (a 1B model is 2.5-5 GB) - for every search. The fingerprint check catches the one
risk of rebuilding (a node with other weights under the same spec). A model that
exists only in the driver's memory has no spec, so it cannot be searched on Ray; use
``--workers 0``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from casrap.errors import CasrapError, CheckpointError
from casrap.profiles.plan import PruningPlan
from casrap.search.scoring import FitnessSpec, PlanScorer

log = logging.getLogger(__name__)


@dataclass
class WorkerSpec:
    """Everything a worker needs to rebuild the scorer (picklable)."""

    model: str  # loader spec: smollm2-135m, a checkpoint dir, a hub id, tiny-random-llama
    fingerprint: str  # model_key the rebuilt weights must have
    fitness: FitnessSpec
    device: str = "cpu"
    threads: int = 1


class ScorerWorker:
    """Body of the Ray actor: loads the model once, then scores plans."""

    def __init__(self, spec: WorkerSpec) -> None:
        import torch

        from casrap.models import load_model
        from casrap.profiles.bank import ProfileBank

        torch.set_num_threads(max(1, spec.threads))
        lm = load_model(spec.model, device=spec.device)
        bank = ProfileBank(lm.model, base_model=spec.model)
        self.fingerprint = bank.fingerprint
        # a worker with other weights never scores: the driver reads ready() and refuses
        self.scorer = PlanScorer(bank, lm.tokenizer, spec.fitness) if not spec.fingerprint or spec.fingerprint == bank.fingerprint else None

    def score(self, plan: PruningPlan) -> tuple[float, dict[str, float]]:
        if self.scorer is None:
            raise CheckpointError(f"this worker's model has fingerprint {self.fingerprint}, not the driver's")
        return self.scorer(plan)

    def ready(self) -> str:
        """The fingerprint of the weights this worker loaded."""
        return self.fingerprint


class RayPool:
    """``workers`` actors on a local Ray (or the cluster at ``address``); ``map`` is DEAP's map.

    ``map(fn, plans)`` ignores ``fn`` beyond checking it is the toolbox's evaluate: the
    evaluation function of a Ray pool is the actors' own scorer (it holds the model).
    """

    def __init__(self, spec: WorkerSpec, workers: int, address: str | None = None, num_cpus: int | None = None) -> None:
        try:
            import ray
            from ray.util import ActorPool
        except ImportError as err:
            raise CasrapError("--workers/--ray-address need Ray: pip install 'casrap[search]'") from err
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"address": address, "log_to_driver": False, "include_dashboard": False}
            if address is None:
                kwargs["num_cpus"] = num_cpus or workers
            try:
                ray.init(**kwargs)
            except Exception as err:  # noqa: BLE001 - connection errors vary by version
                raise CasrapError(f"cannot start or reach Ray at {address or 'local'}: {type(err).__name__}: {err}") from err
            self._started = True
        actor = ray.remote(num_cpus=spec.threads)(ScorerWorker)
        self.actors = [actor.remote(spec) for _ in range(max(1, workers))]
        try:
            fingerprints = ray.get([a.ready.remote() for a in self.actors])
        except Exception as err:  # noqa: BLE001 - a worker failed to build
            self.close()
            cause = getattr(err, "cause", None) or err
            raise CasrapError(f"a Ray worker failed to start: {type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}") from err
        wrong = sorted({f for f in fingerprints if spec.fingerprint and f != spec.fingerprint})
        if wrong:
            self.close()
            raise CheckpointError(f"Ray workers loaded {spec.model!r} with fingerprint {', '.join(wrong)}, the driver's model is "
                                  f"{spec.fingerprint}: every worker must see the same weights")
        self.pool = ActorPool(self.actors)
        log.info("Ray pool: %d workers for %s", len(self.actors), spec.model)

    def map(self, fn: Callable[[PruningPlan], Any], plans: Iterable[PruningPlan]) -> Iterator[Any]:
        """Score plans on the actors, results in input order."""
        return self.pool.map(lambda actor, plan: actor.score.remote(plan), list(plans))

    def close(self) -> None:
        for a in getattr(self, "actors", []):
            try:
                self._ray.kill(a)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.actors = []
        if self._started:
            self._ray.shutdown()
            self._started = False

    def __enter__(self) -> RayPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
