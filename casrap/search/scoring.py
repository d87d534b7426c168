"""Fitness of a pruning plan on one model: KL to the full model, perplexity, or an lm-eval task.

A :class:`PlanScorer` owns (or shares) a :class:`ProfileBank` and scores *plans*, not
genomes: plans are plain picklable data, so the same scorer runs in-process or inside a
Ray worker that rebuilt the model from its spec (:mod:`casrap.search.distributed`).

Why KL is the default fitness: on a few hundred tokens, the perplexity of a pruned model
is dominated by a handful of badly predicted tokens, so it ranks plans noisily; the KL
divergence from the full model's next-token distribution uses every token's whole
distribution (a much denser signal) and measures exactly what pruning should preserve.
The full model's log-probabilities are computed once per scorer
(:class:`casrap.measure.quality.FullModelReference`, the measure every quality figure uses).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from casrap.errors import CasrapError, InputError
from casrap.measure.quality import FullModelReference, active_quality
from casrap.profiles.bank import ProfileBank
from casrap.profiles.catalogue import FULL
from casrap.profiles.plan import PruningPlan

FITNESS_KINDS = ("kl", "ppl", "lm-eval")


@dataclass
class FitnessSpec:
    """What a genome's plan is scored on (picklable: it travels to Ray workers).

    Attributes:
        kind: ``kl`` (minus mean KL(full || pruned) per token), ``ppl`` (minus
            perplexity), or ``lm-eval`` (accuracy on ``task``; layer sets).
        token_ids: the search-split token block (never validation or test text).
        task: lm-eval task name (``casrap_local`` ships with the package).
        task_limit: questions of the task used (None = all).
        include_paths: folders of extra lm-eval task YAMLs.
    """

    kind: str = "kl"
    token_ids: list[int] = field(default_factory=list)
    task: str = "casrap_local"
    task_limit: int | None = None
    include_paths: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind not in FITNESS_KINDS:
            raise InputError(f"unknown fitness {self.kind!r}; choose from {', '.join(FITNESS_KINDS)}")


class PlanScorer:
    """Scores plans on one model: ``scorer(plan) -> (fitness, terms)``, higher is better."""

    def __init__(self, bank: ProfileBank, tokenizer: Any, spec: FitnessSpec) -> None:
        self.bank = bank
        self.tokenizer = tokenizer
        self.spec = spec
        self.ids = torch.tensor(spec.token_ids, dtype=torch.long)
        self.reference: FullModelReference | None = None
        self._task_dir: tempfile.TemporaryDirectory[str] | None = None
        if spec.kind in {"kl", "ppl"} and self.ids.numel() < 2:
            raise InputError("search fitness needs at least 2 tokens of search text")
        if spec.kind == "kl":
            self.reference = FullModelReference.on_block(bank, self.ids, FULL)

    # ------------------------------------------------------------------ metrics
    def _active_terms(self) -> dict[str, float]:
        if self.spec.kind == "lm-eval":
            return {"acc": self._task_accuracy()}
        if self.reference is not None:
            quality = self.reference.score()
            return {"ppl": quality.ppl, "kl": quality.kl}
        return {"ppl": active_quality(self.bank.model, self.ids[:1], self.ids[1:]).ppl}

    def _task_accuracy(self) -> float:
        try:
            from lm_eval import simple_evaluate
            from lm_eval.models.huggingface import HFLM
            from lm_eval.tasks import TaskManager
        except ImportError as err:
            raise CasrapError("--fitness lm-eval needs lm-evaluation-harness: pip install 'casrap[eval]'") from err
        from casrap.evaluation.lm_eval_tasks import write_local_task

        if self._task_dir is None:
            self._task_dir = tempfile.TemporaryDirectory()
            write_local_task(Path(self._task_dir.name))
        manager = TaskManager(include_path=[self._task_dir.name, *self.spec.include_paths])
        lm = HFLM(pretrained=self.bank.model, tokenizer=self.tokenizer, batch_size=1)
        out = simple_evaluate(model=lm, tasks=[self.spec.task], task_manager=manager, limit=self.spec.task_limit, log_samples=False)
        metrics = out["results"][self.spec.task]
        return float(next((v for k, v in metrics.items() if k.startswith("acc,")), float("nan")))

    def fitness(self, terms: dict[str, float]) -> float:
        """The number the GA maximises, from the measured terms."""
        if self.spec.kind == "kl":
            return -terms["kl"]
        if self.spec.kind == "ppl":
            return -terms["ppl"]
        return terms["acc"]

    def __call__(self, plan: PruningPlan) -> tuple[float, dict[str, float]]:
        with self.bank.scratch(replace(plan, fingerprint="")):
            terms = self._active_terms()
        return self.fitness(terms), terms


@dataclass
class SplitScorer:
    """Perplexity (with a 95% CI) and KL to the full model on one held-out token block."""

    bank: ProfileBank
    ids: torch.Tensor  # 1-D
    reference: FullModelReference | None = None

    def __post_init__(self) -> None:
        self.reference = FullModelReference.on_block(self.bank, self.ids, FULL)

    @property
    def n_tokens(self) -> int:
        return int(self.ids.numel() - 1)

    def measure(self, plan: PruningPlan | None) -> dict[str, Any]:
        """ppl, its 95% CI, KL to the full model, n tokens: for ``plan`` (None = full model)."""
        assert self.reference is not None
        if plan is None:
            quality = self.reference.full
        else:
            with self.bank.scratch(replace(plan, fingerprint="")):
                quality = self.reference.score()
        return {"ppl": quality.ppl, "ppl_ci95": list(quality.ppl_ci95()), "kl": quality.kl, "n": self.n_tokens}
