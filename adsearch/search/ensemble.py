"""Ensembles of a study's completed trials from their out-of-fold predictions, scored honestly.

Each completed trial kept its out-of-fold scores (`objective.oof_predictions`). Two ways to combine them:

* **caruana** (Caruana et al. 2004): members on a common scale (each trial's scores divided by their spread
  over the train recordings, no label used, so a probability classifier and an SVM margin weigh alike; MMSE
  predictions as they are), averaged with weights; selection adds, with replacement, the trial that most
  improves the study metric, for `rounds` rounds, and keeps the best prefix.
* **stack**: a regularised second-level model on the members' scaled scores: logistic regression (C = 1) for
  AD vs control, ridge regression (alpha = 1) for MMSE. With several feature sources among the candidates
  this is late fusion of, say, acoustic and linguistic models.

Either way the ensemble is `intercept + weights @ (scores / scales)`, thresholded at 0 (classification) or
clipped to 0-30 (MMSE), which is all that export and predict need.

A CV score of an ensemble chosen on the same out-of-fold predictions it is scored on is optimistic. The
nested estimate therefore, for each fold of the study's first fold assignment, ranks the trials and builds
the ensemble on the other folds' recordings only, then scores it on the held-out fold; the best single trial
is scored the same way (chosen on the other folds), so the two numbers compare like with like.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from adsearch.search.objective import oof_predictions, score_predictions
from adsearch.search.protocol import MMSE_RANGE, REGRESSION_METRICS, direction

METHODS = ("caruana", "stack")


@dataclass
class Combination:
    """How members' scores become one: `intercept + weights @ (scores / scales)`."""

    weights: np.ndarray
    intercept: float = 0.0

    def apply(self, scaled: np.ndarray, regression: bool) -> np.ndarray:
        combined = self.intercept + self.weights @ scaled
        return np.clip(combined, *MMSE_RANGE) if regression else combined


def describe_left_out(left_out: list[int]) -> str | None:
    """One line for the trials an ensemble could not consider, or None."""
    if not left_out:
        return None
    shown = ", ".join(str(n) for n in left_out[:10]) + (", ..." if len(left_out) > 10 else "")
    return (f"{len(left_out)} complete trial(s) left out of the candidates (no out-of-fold scores: run before "
            f"adsearch kept them): {shown}")


@dataclass
class EnsembleCV:
    """Nested CV of the ensemble and of the best single trial, per fold; the ensemble built on all folds."""

    method: str
    ensemble_folds: list[float]
    single_folds: list[float]
    trials: list[int]  # the members' trial numbers
    weights: list[float]  # caruana: how often each was chosen, normalised to sum 1; stack: coefficients
    scales: list[float]  # each member's score spread (1 for MMSE predictions)
    intercept: float
    best_single: int  # the trial ranked first on all folds: what the ensemble is compared with
    left_out: list[int] = field(default_factory=list)  # complete trials without out-of-fold scores: no candidates

    @property
    def ensemble(self) -> float:
        return float(np.mean(self.ensemble_folds))

    @property
    def single(self) -> float:
        return float(np.mean(self.single_folds))


def candidate_scores(trials, regression: bool = False) -> tuple[list[int], np.ndarray, np.ndarray]:
    """(trial numbers, scaled scores (trials, train recordings), scales): the first repeat's out-of-fold
    scores of the trials that kept them, each divided by its spread over the recordings (MMSE: scale 1)."""
    numbers, rows, scales = [], [], []
    for trial in trials:
        oof = oof_predictions(trial)
        if oof is None or np.isnan(oof[0]).any():
            continue
        spread = 1.0 if regression else float(np.std(oof[0])) or 1.0
        numbers.append(trial.number)
        rows.append(oof[0] / spread)
        scales.append(spread)
    if not rows:
        return numbers, np.zeros((0, 0)), np.asarray(scales)
    return numbers, np.asarray(rows, np.float64), np.asarray(scales)


def _metric(y: np.ndarray, scores: np.ndarray, metric: str) -> float:
    return score_predictions(y, scores, 0.0, metric in REGRESSION_METRICS)[metric]


def _score(y: np.ndarray, scores: np.ndarray, metric: str) -> float:
    """The metric, signed so that higher is better (RMSE and MAE negated): what selection maximises."""
    value = _metric(y, scores, metric)
    return -value if direction(metric) == "minimize" else value


def caruana(scores: np.ndarray, y: np.ndarray, metric: str, rounds: int = 20) -> np.ndarray:
    """How many times each candidate (a row of `scores`) is chosen: greedy forward selection with replacement
    of the candidate whose addition scores best (ties: the lower index), keeping the best-scoring prefix."""
    counts = np.zeros(len(scores), np.int64)
    total = np.zeros(scores.shape[1])
    best_counts, best = counts.copy(), -np.inf
    for size in range(1, rounds + 1):
        gains = [_score(y, (total + scores[i]) / size, metric) for i in range(len(scores))]
        chosen = int(np.argmax(gains))
        counts[chosen] += 1
        total += scores[chosen]
        if gains[chosen] > best:
            best, best_counts = gains[chosen], counts.copy()
    return best_counts


def stack(scores: np.ndarray, y: np.ndarray, regression: bool, seed: int = 0) -> Combination:
    """A regularised linear model of the target on the candidates' scores (one column per candidate)."""
    from sklearn.linear_model import LogisticRegression, Ridge

    if regression:
        model = Ridge(alpha=1.0).fit(scores.T, y)
        return Combination(np.asarray(model.coef_, np.float64), float(model.intercept_))
    model = LogisticRegression(C=1.0, max_iter=2000, random_state=seed).fit(scores.T, y)
    return Combination(model.coef_[0].astype(np.float64), float(model.intercept_[0]))


def build(method: str, scores: np.ndarray, y: np.ndarray, metric: str, rounds: int = 20, seed: int = 0
          ) -> Combination:
    """The ensemble of the candidate rows of `scores`, fitted to `y` with `method`."""
    if method == "caruana":
        counts = caruana(scores, y, metric, rounds)
        return Combination(counts / counts.sum())
    if method == "stack":
        return stack(scores, y, metric in REGRESSION_METRICS, seed)
    raise ValueError(f"unknown ensemble method {method!r}; choose one of {', '.join(METHODS)}")


def _ranking(scores: np.ndarray, y: np.ndarray, metric: str, top: int) -> np.ndarray:
    return np.argsort([-_score(y, row, metric) for row in scores], kind="stable")[:top]


def nested_cv(scores: np.ndarray, y: np.ndarray, assignment: np.ndarray, metric: str, top: int,
              rounds: int = 20, method: str = "caruana") -> tuple[list[float], list[float]]:
    """Per fold of `assignment`: the ensemble of the `top` trials best on the other folds, built there, and
    the best single trial there, both scored on the held-out fold."""
    regression = metric in REGRESSION_METRICS
    ensemble_folds, single_folds = [], []
    for fold in range(int(assignment.max()) + 1):
        inner, outer = assignment != fold, assignment == fold
        ranking = _ranking(scores[:, inner], y[inner], metric, top)
        combination = build(method, scores[ranking][:, inner], y[inner], metric, rounds)
        ensemble_folds.append(_metric(y[outer], combination.apply(scores[ranking][:, outer], regression), metric))
        single_folds.append(_metric(y[outer], scores[ranking[0]][outer], metric))
    return ensemble_folds, single_folds


def ensemble_cv(study, labels: np.ndarray, folds: np.ndarray, metric: str, top: int = 20,
                rounds: int = 20, method: str = "caruana") -> EnsembleCV:
    """The nested estimate on the study's first fold assignment, and the ensemble of its `top` trials built
    on all train recordings (what an export fits)."""
    from optuna.trial import TrialState

    if method not in METHODS:
        raise ValueError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    sign = 1 if direction(metric) == "minimize" else -1
    complete = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: sign * t.value)
    regression = metric in REGRESSION_METRICS
    numbers, scores, scales = candidate_scores(complete, regression)
    left_out = [t.number for t in complete if t.number not in set(numbers)]
    if len(numbers) < 2:
        raise ValueError(f"study {study.study_name!r}: an ensemble needs at least two completed trials with "
                         f"out-of-fold scores; {len(numbers)} of {len(complete)} have them ({len(left_out)} left out: "
                         "trials run before adsearch kept out-of-fold scores, or with a repeat that did not run)")
    ensemble_folds, single_folds = nested_cv(scores, labels, folds[0], metric, top, rounds, method)
    ranking = _ranking(scores, labels, metric, top)
    combination = build(method, scores[ranking], labels, metric, rounds)
    if not (np.isfinite(combination.weights).all() and np.isfinite(combination.intercept)):
        raise ValueError(f"study {study.study_name!r}: the {method} ensemble's weights are not finite (its members' "
                         "out-of-fold scores hold extreme values); try --method caruana or fewer members")
    kept = [k for k, weight in enumerate(combination.weights) if weight != 0]
    return EnsembleCV(method, ensemble_folds, single_folds, [numbers[ranking[k]] for k in kept],
                      [float(combination.weights[k]) for k in kept], [float(scales[ranking[k]]) for k in kept],
                      combination.intercept, numbers[ranking[0]], left_out)
