"""Off-policy evaluation: a policy's mean reward, estimated from decisions another policy logged.

A new policy should be scored before it serves anyone. Every live decision casrap logs
carries the observation, the action taken, its reward and the *propensity*: the
probability with which the behaviour policy (the one that was running, exploring) took
that action. With those, two standard estimators score any target policy ``pi`` from
the log alone. For logged ``(x_i, a_i, r_i, p_i)`` and weights
``w_i = pi(a_i | x_i) / p_i``:

- **SNIPS** (self-normalised importance sampling; Swaminathan & Joachims, 2015):
  ``sum_i w_i r_i / sum_i w_i``. Consistent, stays within the range of the rewards, and
  has far less variance than plain importance sampling when weights are large.
- **DR** (doubly robust; Dudik, Langford & Li, 2011):
  ``mean_i [ sum_a pi(a | x_i) q(x_i, a) + w_i (r_i - q(x_i, a_i)) ]`` with a reward
  model ``q``. Unbiased if *either* the propensities or the reward model are right.
  ``q`` here is a ridge regression per action on ``[1, x, x^2]``, *cross-fitted* over
  prompt folds: a decision's own reward never helps predict it.

Both come with a 95% percentile-bootstrap interval that resamples whole prompts (the
decisions of one prompt are not independent, as in :mod:`casrap.agents.evaluate`); the
reward model is not refitted per resample, so the DR interval leaves out its fitting
noise. Diagnostics: the effective sample size ``(sum w)^2 / sum w^2`` and the largest
weight - an estimate resting on a handful of decisions says so there.

Wrong propensities bias both estimators (DR only when its reward model is wrong too):
log them exactly, with :func:`epsilon_greedy_propensity` or :func:`softmax_propensity`.
Written with numpy alone; nothing here needs a model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from casrap.errors import InputError

RESAMPLES = 2000


# ------------------------------------------------------------------ propensities
def epsilon_greedy_probabilities(greedy: Any, epsilon: float | Any, n_actions: int) -> np.ndarray:
    """``[n, K]`` action probabilities of epsilon-greedy: ``1 - eps + eps/K`` on the greedy action, ``eps/K`` elsewhere.

    SB3's DQN explores this way: with probability ``eps`` it samples uniformly over all
    ``K`` actions, the greedy one included.
    """
    greedy = np.atleast_1d(np.asarray(greedy, dtype=int))
    eps = np.broadcast_to(np.asarray(epsilon, dtype=float), greedy.shape)
    if np.any((eps < 0) | (eps > 1)):
        raise InputError(f"exploration rate must lie in [0, 1] (got {eps.min():g}..{eps.max():g})")
    probs = np.repeat((eps / n_actions)[:, None], n_actions, axis=1)
    probs[np.arange(len(greedy)), greedy] += 1.0 - eps
    return probs


def epsilon_greedy_propensity(taken: Any, greedy: Any, epsilon: float | Any, n_actions: int) -> Any:
    """Probability that epsilon-greedy took ``taken`` when its greedy choice was ``greedy`` (scalar in, scalar out)."""
    scalar = np.ndim(taken) == 0
    taken = np.atleast_1d(np.asarray(taken, dtype=int))
    probs = epsilon_greedy_probabilities(greedy, epsilon, n_actions)[np.arange(len(taken)), taken]
    return float(probs[0]) if scalar else probs


def softmax_probabilities(q_values: Any, temperature: float = 1.0) -> np.ndarray:
    """``[n, K]`` Boltzmann probabilities ``exp(q / T) / sum exp(q / T)``, computed stably."""
    if temperature <= 0:
        raise InputError(f"softmax temperature must be > 0 (got {temperature})")
    q = np.atleast_2d(np.asarray(q_values, dtype=float)) / temperature
    q = q - q.max(axis=1, keepdims=True)
    e = np.exp(q)
    return e / e.sum(axis=1, keepdims=True)


def softmax_propensity(q_values: Any, taken: Any, temperature: float = 1.0) -> Any:
    """Probability that softmax exploration over ``q_values`` took ``taken`` (scalar for one decision)."""
    scalar = np.ndim(taken) == 0
    taken = np.atleast_1d(np.asarray(taken, dtype=int))
    probs = softmax_probabilities(q_values, temperature)[np.arange(len(taken)), taken]
    return float(probs[0]) if scalar else probs


def deterministic_probabilities(actions: Any, n_actions: int) -> np.ndarray:
    """``[n, K]`` one-hot probabilities of a deterministic (greedy) target policy."""
    actions = np.asarray(actions, dtype=int).ravel()
    probs = np.zeros((len(actions), n_actions))
    probs[np.arange(len(actions)), actions] = 1.0
    return probs


# ------------------------------------------------------------------------- logs
@dataclass
class LoggedDecisions:
    """Logged bandit feedback: one row per decision.

    Attributes:
        observations: ``[n, d]`` what the behaviour policy saw.
        actions: ``[n]`` action indices it took.
        rewards: ``[n]`` rewards received.
        propensities: ``[n]`` behaviour probability of each taken action, in (0, 1].
        groups: ``[n]`` prompt of each decision (bootstrap unit and cross-fitting fold).
        n_actions: size of the action set.
    """

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    propensities: np.ndarray
    groups: np.ndarray
    n_actions: int

    def __post_init__(self) -> None:
        self.observations = np.atleast_2d(np.asarray(self.observations, dtype=float))
        self.actions = np.asarray(self.actions, dtype=int).ravel()
        self.rewards = np.asarray(self.rewards, dtype=float).ravel()
        self.propensities = np.asarray(self.propensities, dtype=float).ravel()
        self.groups = np.asarray(self.groups).ravel().astype(str)
        n = len(self.actions)
        if n == 0:
            raise InputError("no logged decisions to evaluate")
        sizes = {len(self.observations), len(self.rewards), len(self.propensities), len(self.groups)}
        if sizes != {n}:
            raise InputError(f"logged decisions disagree in length (actions {n}, others {sorted(sizes)})")
        if np.any((self.actions < 0) | (self.actions >= self.n_actions)):
            raise InputError(f"logged actions must lie in 0..{self.n_actions - 1}")
        bad = ~np.isfinite(self.propensities) | (self.propensities <= 0) | (self.propensities > 1)
        if bad.any():
            raise InputError(f"{int(bad.sum())} logged propensities are not in (0, 1] (first: {self.propensities[bad][0]!r})")
        if not np.all(np.isfinite(self.rewards)):
            raise InputError("logged rewards must be finite")

    def __len__(self) -> int:
        return len(self.actions)

    @classmethod
    def from_records(cls, records: Iterable[Mapping[str, Any]], n_actions: int) -> LoggedDecisions:
        """From training metrics (``metrics.jsonl`` lines): records with ``observation``, ``action``, ``reward``, ``propensity``.

        The group is the record's ``prompt_key``, else ``prompt_id``, else the prompt
        part of its ``context``; records without a propensity (older runs) are refused.
        """
        rows = [r for r in records if "reward" in r and "action" in r]
        missing = [i for i, r in enumerate(rows) if r.get("propensity") is None or r.get("observation") is None]
        if missing:
            raise InputError(f"{len(missing)} of {len(rows)} records lack a logged propensity or observation "
                             "(recorded before propensities were logged); re-run training to log them")

        def group(r: Mapping[str, Any]) -> str:
            return str(r.get("prompt_key") or r.get("prompt_id") or str(r.get("context", "")).rsplit("@", 1)[0])

        return cls(np.array([r["observation"] for r in rows], dtype=float), [int(r["action"]) for r in rows],
                   [float(r["reward"]) for r in rows], [float(r["propensity"]) for r in rows], [group(r) for r in rows], n_actions)


@dataclass
class Estimate:
    """One estimate of a target policy's mean reward."""

    estimator: str
    value: float
    ci95: list[float]  # [lo, hi], bootstrap over prompts
    n: int
    n_prompts: int
    effective_sample_size: float  # (sum w)^2 / sum w^2
    max_weight: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _target_matrix(logs: LoggedDecisions, target: Any) -> np.ndarray:
    probs = np.asarray(target, dtype=float)
    if probs.ndim == 1:  # actions of a deterministic policy
        probs = deterministic_probabilities(probs, logs.n_actions)
    if probs.shape != (len(logs), logs.n_actions):
        raise InputError(f"target probabilities must be [{len(logs)}, {logs.n_actions}] (got {list(probs.shape)})")
    if np.any(probs < 0) or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-6):
        raise InputError("target probabilities must be non-negative and sum to 1 per decision")
    return probs


def importance_weights(logs: LoggedDecisions, target: Any) -> np.ndarray:
    """``w_i = pi(a_i | x_i) / p_i``; ``target`` is ``[n, K]`` probabilities or ``[n]`` actions."""
    probs = _target_matrix(logs, target)
    return probs[np.arange(len(logs)), logs.actions] / logs.propensities


def group_bootstrap(numerators: np.ndarray, denominators: np.ndarray, groups: np.ndarray,
                    resamples: int = RESAMPLES, seed: int = 0) -> list[float]:
    """95% percentile interval of ``sum(num) / sum(den)`` when whole groups are resampled with replacement."""
    labels, inverse = np.unique(groups, return_inverse=True)
    num = np.bincount(inverse, weights=numerators, minlength=len(labels))
    den = np.bincount(inverse, weights=denominators, minlength=len(labels))
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(labels), size=(resamples, len(labels)))
    totals = den[picks].sum(axis=1)
    ratios = np.divide(num[picks].sum(axis=1), totals, out=np.full(resamples, np.nan), where=totals > 0)
    ratios = ratios[np.isfinite(ratios)]
    if not len(ratios):
        return [float("nan"), float("nan")]
    return [float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))]


def _diagnostics(w: np.ndarray) -> tuple[float, float]:
    square = float((w**2).sum())
    return (float(w.sum() ** 2 / square) if square > 0 else 0.0), float(w.max())


def snips(logs: LoggedDecisions, target: Any, resamples: int = RESAMPLES, seed: int = 0) -> Estimate:
    """Self-normalised importance-sampling estimate of the target's mean reward (module docstring)."""
    w = importance_weights(logs, target)
    ess, top = _diagnostics(w)
    value = float((w * logs.rewards).sum() / w.sum()) if w.sum() > 0 else float("nan")
    return Estimate("snips", value, group_bootstrap(w * logs.rewards, w, logs.groups, resamples, seed), len(logs),
                    int(len(np.unique(logs.groups))), ess, top)


# ------------------------------------------------------------------ reward model
def _features(observations: np.ndarray) -> np.ndarray:
    return np.hstack([np.ones((len(observations), 1)), observations, observations**2])


def fit_reward_model(observations: np.ndarray, actions: np.ndarray, rewards: np.ndarray, n_actions: int,
                     ridge: float = 1.0) -> np.ndarray:
    """Per-action ridge coefficients ``[K, f]`` on ``[1, x, x^2]``, shrunk towards the mean reward.

    An action never taken in the fitting data predicts the mean reward of all actions.
    """
    x = _features(np.atleast_2d(observations))
    mean = float(rewards.mean()) if len(rewards) else 0.0
    coef = np.zeros((n_actions, x.shape[1]))
    for a in range(n_actions):
        mine = actions == a
        xa, ra = x[mine], rewards[mine] - mean
        coef[a] = np.linalg.solve(xa.T @ xa + ridge * np.eye(x.shape[1]), xa.T @ ra)
        coef[a, 0] += mean
    return coef


def predict_rewards(coef: np.ndarray, observations: np.ndarray) -> np.ndarray:
    """``[n, K]`` predicted reward of every action."""
    return _features(np.atleast_2d(observations)) @ coef.T


def cross_fitted_rewards(logs: LoggedDecisions, folds: int = 2, ridge: float = 1.0, seed: int = 0) -> np.ndarray:
    """``[n, K]`` reward-model predictions, each fitted on the *other* prompts' folds.

    With fewer prompts than folds the model is fitted on all decisions (in-sample).
    """
    labels, inverse = np.unique(logs.groups, return_inverse=True)
    if len(labels) < max(folds, 2):
        coef = fit_reward_model(logs.observations, logs.actions, logs.rewards, logs.n_actions, ridge)
        return predict_rewards(coef, logs.observations)
    fold_of_label = np.random.default_rng(seed).permutation(len(labels)) % folds
    fold = fold_of_label[inverse]
    out = np.empty((len(logs), logs.n_actions))
    for k in range(folds):
        train, test = fold != k, fold == k
        coef = fit_reward_model(logs.observations[train], logs.actions[train], logs.rewards[train], logs.n_actions, ridge)
        out[test] = predict_rewards(coef, logs.observations[test])
    return out


def doubly_robust(logs: LoggedDecisions, target: Any, reward_model: np.ndarray | None = None, folds: int = 2,
                  ridge: float = 1.0, resamples: int = RESAMPLES, seed: int = 0) -> Estimate:
    """Doubly robust estimate; ``reward_model`` is ``[n, K]`` predictions (default: cross-fitted ridge)."""
    probs = _target_matrix(logs, target)
    q = cross_fitted_rewards(logs, folds, ridge, seed) if reward_model is None else np.asarray(reward_model, dtype=float)
    if q.shape != probs.shape:
        raise InputError(f"reward model predictions must be [{len(logs)}, {logs.n_actions}] (got {list(q.shape)})")
    idx = np.arange(len(logs))
    w = probs[idx, logs.actions] / logs.propensities
    terms = (probs * q).sum(axis=1) + w * (logs.rewards - q[idx, logs.actions])
    ess, top = _diagnostics(w)
    return Estimate("dr", float(terms.mean()), group_bootstrap(terms, np.ones(len(logs)), logs.groups, resamples, seed),
                    len(logs), int(len(np.unique(logs.groups))), ess, top)


def evaluate_offline(logs: LoggedDecisions, target: Any, seed: int = 0, resamples: int = RESAMPLES) -> dict[str, Any]:
    """Both estimators for one target policy, as plain data (``{"snips": {...}, "dr": {...}}``)."""
    return {"snips": snips(logs, target, resamples, seed).to_dict(),
            "dr": doubly_robust(logs, target, resamples=resamples, seed=seed).to_dict()}
