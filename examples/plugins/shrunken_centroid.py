"""An adsearch classifier plugin: a nearest shrunken centroid classifier (diagonal, standardised distances).

Use it without editing adsearch: put this folder on PYTHONPATH (on every machine that runs workers), then
`adsearch search ... --plugins shrunken_centroid` or `plugins: [shrunken_centroid]` in the space YAML, and
name the classifier under `space.classifiers` like a built-in one (`shrunken_centroid: {}`). A package can
declare the module as an entry point instead, and then needs no option:

    [project.entry-points."adsearch.classifiers"]
    shrunken_centroid = "shrunken_centroid"

The estimator follows scikit-learn's contract (parameters in __init__, fit returns self, state in
attributes ending in _), so `check_estimator` passes on it and adsearch can clone, fit, export and load it.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from adsearch.search.classifiers import FloatRange, register


class ShrunkenCentroid(ClassifierMixin, BaseEstimator):
    """Each class's mean, shrunk towards the overall mean by `shrink` (0: none, 1: all classes equal), and
    distances in units of the pooled within-class standard deviation; probabilities are a softmax over the
    negative squared distances scaled by `temperature`."""

    def __init__(self, shrink: float = 0.0, temperature: float = 1.0):
        self.shrink = shrink
        self.temperature = temperature

    def fit(self, X, y):
        X, y = validate_data(self, X, y)
        check_classification_targets(y)
        self.classes_, codes = np.unique(y, return_inverse=True)
        overall = X.mean(axis=0)
        means = np.stack([X[codes == k].mean(axis=0) for k in range(len(self.classes_))])
        residuals = X - means[codes]
        self.scale_ = np.sqrt((residuals ** 2).mean(axis=0)) + 1e-6
        self.centroids_ = (1 - self.shrink) * means + self.shrink * overall
        return self

    def _log_odds(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, reset=False)
        distances = (((X[:, None, :] - self.centroids_[None]) / self.scale_) ** 2).sum(axis=2)
        return -distances / (self.temperature * X.shape[1])

    def decision_function(self, X):
        scores = self._log_odds(X)  # checks it is fitted first
        return scores[:, 1] - scores[:, 0] if len(self.classes_) == 2 else scores

    def predict_proba(self, X):
        scores = self._log_odds(X)
        scores = np.exp(scores - scores.max(axis=1, keepdims=True))
        return scores / scores.sum(axis=1, keepdims=True)

    def predict(self, X):
        scores = self._log_odds(X)
        return self.classes_[np.argmax(scores, axis=1)]


@register("shrunken_centroid", "nearest shrunken centroid (plugin example)",
          {"shrink": FloatRange(0.0, 0.9, min=0, max=1), "temperature": FloatRange(0.1, 10.0, log=True, above=0)})
def _shrunken_centroid(params, seed):
    return ShrunkenCentroid(shrink=params["shrink"], temperature=params["temperature"])
