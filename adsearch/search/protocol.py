"""The evaluation protocol's shared pieces: speaker-grouped folds, labels permuted across speakers (the
noise floor) and the chance level of each metric. The search, its null studies, export and the report all
use them, so they live below all of those.
"""

from __future__ import annotations

import numpy as np

from adsearch.search.errors import StudyError

# What a metric scores when the features say nothing about the label.
CHANCE = {"balanced_accuracy": 0.5, "roc_auc": 0.5}


class ProtocolError(ValueError):
    """Train data the CV protocol cannot work with (too few speakers per class, missing labels)."""


def assign_folds(labels: np.ndarray, groups: np.ndarray, folds: int, repeats: int, seed: int) -> np.ndarray:
    """(repeats, n) fold index per item; a speaker's recordings always share a fold."""
    from sklearn.model_selection import StratifiedGroupKFold

    for label in (0, 1):
        speakers = len(set(groups[labels == label]))
        if speakers < folds:
            raise ProtocolError(f"only {speakers} speaker(s) with label {label} in the train split: "
                                f"lower cv.folds to at most {speakers}")
    assignment = np.empty((repeats, len(labels)), np.int64)
    for repeat in range(repeats):
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed + repeat)
        for fold, (_, valid) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
            assignment[repeat, valid] = fold
    return assignment


def permute_labels(labels: np.ndarray, groups: np.ndarray, seed: int) -> np.ndarray:
    """Labels permuted across speakers: each speaker's recordings share the label of another speaker."""
    speakers, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    per_speaker = labels[first]
    for speaker, label in zip(inverse, labels, strict=True):
        if per_speaker[speaker] != label:
            raise StudyError(f"speaker {str(speakers[speaker])!r} has recordings with different labels; a label "
                             "permutation across speakers needs one label per speaker")
    shuffled = np.random.default_rng(seed).permutation(per_speaker)
    return shuffled[inverse]
