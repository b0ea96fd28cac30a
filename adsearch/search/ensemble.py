"""Greedy ensemble selection (Caruana et al. 2004) over a study's completed trials, scored honestly.

Each completed trial kept its out-of-fold scores (`objective.oof_predictions`). Members are combined on a
common scale: each trial's scores divided by their spread over the train recordings (no label is used), so a
probability classifier and an SVM margin weigh alike; the ensemble's score is the mean of its members' with
threshold 0. Selection adds, with replacement, the trial that most improves the study metric, for `rounds`
rounds, and keeps the best prefix.

A CV score of an ensemble selected on the same out-of-fold predictions it is scored on is optimistic. The
nested estimate therefore, for each fold of the study's first fold assignment, ranks the trials and selects
the ensemble on the other folds' recordings only, then scores it on the held-out fold; the best single trial
is scored the same way (chosen on the other folds), so the two numbers compare like with like.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from adsearch.search.objective import metrics, oof_predictions


@dataclass
class EnsembleCV:
    """Nested CV of the ensemble and of the best single trial, per fold; the ensemble selected on all folds."""

    ensemble_folds: list[float]
    single_folds: list[float]
    trials: list[int]  # the trial numbers of the members (the candidates' order)
    weights: list[int]  # how often each member was chosen (selection with replacement), on all folds

    @property
    def ensemble(self) -> float:
        return float(np.mean(self.ensemble_folds))

    @property
    def single(self) -> float:
        return float(np.mean(self.single_folds))


def candidate_scores(trials) -> tuple[list[int], np.ndarray]:
    """(trial numbers, scores (trials, train recordings)): the first repeat's out-of-fold scores of the trials
    that kept them, each divided by its spread over the recordings."""
    numbers, rows = [], []
    for trial in trials:
        oof = oof_predictions(trial)
        if oof is None or np.isnan(oof[0]).any():
            continue
        spread = float(np.std(oof[0]))
        numbers.append(trial.number)
        rows.append(oof[0] / spread if spread > 0 else oof[0])
    return numbers, np.asarray(rows, np.float64).reshape(len(rows), -1)


def _score(y: np.ndarray, scores: np.ndarray, metric: str) -> float:
    return metrics(y, scores, 0.0)[metric]


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


def ensemble_score(scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return weights @ scores / weights.sum()


def nested_cv(scores: np.ndarray, y: np.ndarray, assignment: np.ndarray, metric: str, top: int,
              rounds: int = 20) -> tuple[list[float], list[float]]:
    """Per fold of `assignment`: the ensemble of the `top` trials best on the other folds, selected there, and
    the best single trial there, both scored on the held-out fold."""
    ensemble_folds, single_folds = [], []
    for fold in range(int(assignment.max()) + 1):
        inner, outer = assignment != fold, assignment == fold
        ranking = np.argsort([-_score(y[inner], row[inner], metric) for row in scores], kind="stable")[:top]
        weights = caruana(scores[ranking][:, inner], y[inner], metric, rounds)
        ensemble_folds.append(_score(y[outer], ensemble_score(scores[ranking][:, outer], weights), metric))
        single_folds.append(_score(y[outer], scores[ranking[0]][outer], metric))
    return ensemble_folds, single_folds


def ensemble_cv(study, labels: np.ndarray, folds: np.ndarray, metric: str, top: int = 20,
                rounds: int = 20) -> EnsembleCV:
    """The nested estimate on the study's first fold assignment, and the ensemble of its `top` trials
    selected on all train recordings (what an export would fit)."""
    from optuna.trial import TrialState

    complete = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: -t.value)
    numbers, scores = candidate_scores(complete)
    if len(numbers) < 2:
        raise ValueError(f"study {study.study_name!r}: an ensemble needs at least two completed trials with "
                         "out-of-fold scores (trials run before adsearch kept them have none)")
    ensemble_folds, single_folds = nested_cv(scores, labels, folds[0], metric, top, rounds)
    ranking = np.argsort([-_score(labels, row, metric) for row in scores], kind="stable")[:top]
    weights = caruana(scores[ranking], labels, metric, rounds)
    members = [(numbers[i], int(w)) for i, w in zip(ranking, weights, strict=True) if w]
    return EnsembleCV(ensemble_folds, single_folds, [m for m, _ in members], [w for _, w in members])
