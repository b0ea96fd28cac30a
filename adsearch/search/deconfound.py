"""Deconfounded cross-validation: fold scores of what a configuration's predictions say beyond the nuisances.

A configuration can score well by riding a nuisance that follows the label in the training split only
(recording length, the recording device, the room): on ADReSSo's train split AD recordings are longer, and a
layer that encodes length then looks like a layer that encodes dementia. Label permutation cannot reveal it
(it breaks the nuisance's link to the label too), and a warning beside the best score does not stop the
search from choosing it.

Here each validation fold is scored a second time, on its out-of-fold predictions *adjusted for the
nuisances*. The nuisances (`baseline.nuisance_features`) are first summarised by the nuisance-only model of
the baseline, fitted on the fold's training part: its score on a validation recording is what the nuisances
say about that recording's label (a propensity score, Rosenbaum & Rubin 1983, Biometrika 70:41-55; one
number, so that a fold of eight recordings can carry the adjustment). A linear model of the predictions on
that score and the target, fitted on the fold's own recordings, gives the predictions' within-class (MMSE:
at a given score) dependence on the nuisances, and that part is subtracted. What a prediction says about the
label through the nuisances goes; what it says beyond them stays. A configuration that only rides length
then scores near chance (its predictions are a function of length, all of it removed), one that models the
speech keeps most of its plain score. This is the post-hoc adjustment of predictions for confounds that Dinga,
Schmaal, Penninx, Veltman & Marquand (2020, "Controlling for effects of confounding variables on machine
learning predictions", bioRxiv 2020.08.17.255034) recommend over adjusting the input features; Snoek, Miletic &
Scholte (2019, NeuroImage 184:741-760) show why feature-side confound regression misleads.

Inverse-propensity weighting of the validation recordings, tried first, did not do it on the planted shortcut:
where the nuisance all but separates the classes (little overlap) the weights cannot balance it, and the length-
riding configuration kept 0.6-0.9 ROC AUC under them (BENCHMARKS.md, "hard kinds").
"""

from __future__ import annotations

import numpy as np

MODES = ("auto", "on", "off")
SIGNIFICANT = 0.05  # auto: deconfound where the nuisance-only baseline beats chance at this permutation p


def adjusted(predictions: np.ndarray, target: np.ndarray, nuisances: np.ndarray) -> np.ndarray:
    """`predictions` ((n,) or (n, columns)) minus their linear dependence on `nuisances` ((n,) nuisance scores,
    or (n, features)) at a fixed `target` (labels or MMSE scores), fitted on these n recordings; the nuisances
    are centred, so the predictions keep their mean and a threshold keeps its meaning. Rows with a non-finite
    prediction are left as they are."""
    P = np.asarray(predictions, np.float64)
    single = P.ndim == 1
    P = P[:, None] if single else P
    Z = np.asarray(nuisances, np.float64).reshape(len(P), -1)
    Z = Z - Z.mean(axis=0)
    design = np.column_stack([np.ones(len(P)), Z, np.asarray(target, np.float64)])
    finite = np.isfinite(P).all(axis=1)
    out = P.copy()
    if finite.sum() > 2:
        coefficients = np.linalg.lstsq(design[finite], P[finite], rcond=None)[0]
        out[finite] = P[finite] - Z[finite] @ coefficients[1:-1]
    return out[:, 0] if single else out


def adjusted_scores(score: np.ndarray, threshold: float, target: np.ndarray, nuisances: np.ndarray,
                    probability: bool) -> tuple[np.ndarray, float]:
    """A fold's scores and threshold, adjusted (`adjusted`): probabilities on the log-odds scale, where a model's
    dependence on a nuisance is linear (a probability saturates, and a linear adjustment would leave the
    saturated part), so the threshold 0.5 becomes 0."""
    if not probability:
        return adjusted(score, target, nuisances), threshold
    p = np.clip(np.asarray(score, np.float64), 1e-6, 1 - 1e-6)
    return adjusted(np.log(p / (1 - p)), target, nuisances), 0.0


def nuisance_model(regression: bool, seed: int = 0):
    """The nuisance-only model, unfitted: a standardised logistic regression (MMSE: ridge). The baseline scores
    it, the deconfounding adjusts for its scores: one model for both."""
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), Ridge(alpha=1.0) if regression else LogisticRegression(random_state=seed))


def nuisance_scores(Z: np.ndarray, targets: np.ndarray, folds: np.ndarray, regression: bool, seed: int = 0
                    ) -> np.ndarray:
    """(repeats, recordings): each recording's score under the nuisance-only model (`nuisance_model`) fitted on
    the training part of the fold that validates it."""
    scores = np.zeros(folds.shape, np.float64)
    for repeat, assignment in enumerate(folds):
        for fold in range(int(assignment.max()) + 1):
            valid = assignment == fold
            if not regression and len(np.unique(targets[~valid])) < 2:
                continue
            model = nuisance_model(regression, seed).fit(Z[~valid], targets[~valid])
            scores[repeat, valid] = model.predict(Z[valid]) if regression else model.decision_function(Z[valid])
    return scores


def plan(mode: str, baseline: dict | None, Z: np.ndarray, names: list[str], chance: float | None,
         targets: np.ndarray, folds: np.ndarray, regression: bool, seed: int = 0) -> dict:
    """Whether a study scores its trials deconfounded, why, and on which nuisances (`mode`: the space's
    `deconfound:` key). `auto` deconfounds where the nuisance-only baseline beats chance (permutation p below
    SIGNIFICANT): the nuisances then carry label information a configuration could ride."""
    from adsearch.search.protocol import improvement

    if mode not in MODES:
        raise ValueError(f"deconfound: {mode!r} is not one of {', '.join(MODES)}")
    usable = Z.shape[1] > 0
    informative = bool(baseline and usable and baseline.get("p_value", 1.0) < SIGNIFICANT and (
        chance is None or improvement(baseline["cv"], chance, baseline["metric"]) > 0))
    if mode == "off" or not usable or (mode == "auto" and not informative):
        why = ("deconfound: off" if mode == "off" else "no nuisance feature varies" if not usable
               else f"the nuisance-only baseline does not beat chance (permutation p = "
                    f"{baseline['p_value']:.2f})" if baseline else "no nuisance-only baseline")
        return {"scheme": "none", "why": why, "features": names}
    why = ("deconfound: on" if mode == "on" and not informative
           else f"the nuisance-only baseline beats chance (CV {baseline['cv']:.3f}, permutation p = "
                f"{baseline['p_value']:.2f}): its nuisances carry label information")
    scores = nuisance_scores(Z, targets, folds, regression, seed)
    return {"scheme": "adjusted", "why": why, "features": names, "scores": np.round(scores, 6).tolist()}


def describe(deconfounding: dict) -> str:
    """One line for the summary, the study note and the report."""
    if deconfounding.get("scheme") != "adjusted":
        return f"plain CV ({deconfounding.get('why', 'not deconfounded')})"
    return (f"deconfounded CV: each fold's predictions adjusted for what {', '.join(deconfounding['features'])} "
            f"say about the label (the nuisance-only model's score, fitted on the fold's training part; its linear "
            f"part at a fixed label removed), because {deconfounding['why']}")
