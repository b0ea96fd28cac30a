"""Regressors of the MMSE score (ADReSSo task 2), in the same registry as the classifiers.

The same habits as `classifiers.py`: single-threaded, seeded, trees and boosters bounded. The ranges suit
pooled speech-model features of ~166 recordings; targets are 0-30, predictions are clipped to that range by
the objective (not here), so every model is scored on what a user would be shown.
"""

from __future__ import annotations

from adsearch.search.classifiers import CATBOOST, FOREST, XGBOOST, Choice, FloatRange, IntRange, register

_MMSE = "mmse"


@register("ridge", "ridge regression (L2-penalised least squares)",
          {"alpha": FloatRange(1e-2, 1e4, log=True, above=0)}, task=_MMSE)
def _ridge(p, seed):
    from sklearn.linear_model import Ridge

    return Ridge(alpha=p["alpha"])


@register("elastic_net", "elastic-net regression (l1_ratio 1: lasso), for a score carried by a few dimensions",
          {"alpha": FloatRange(1e-3, 1e1, log=True, above=0), "l1_ratio": FloatRange(0.2, 1.0, min=0, max=1)},
          task=_MMSE)
def _elastic_net(p, seed):
    from sklearn.linear_model import ElasticNet

    return ElasticNet(alpha=p["alpha"], l1_ratio=p["l1_ratio"], max_iter=5000, random_state=seed)


@register("kernel_ridge", "kernel ridge regression with an RBF kernel",
          {"alpha": FloatRange(1e-3, 1e2, log=True, above=0), "gamma": FloatRange(1e-5, 1e-1, log=True, above=0)},
          task=_MMSE)
def _kernel_ridge(p, seed):
    from adsearch.search.estimators import CenteredKernelRidge

    return CenteredKernelRidge(alpha=p["alpha"], gamma=p["gamma"])


@register("svr", "support vector regression with an RBF kernel",
          {"C": FloatRange(1e-1, 1e3, log=True, above=0), "gamma": FloatRange(1e-5, 1e-1, log=True, above=0),
           "epsilon": FloatRange(0.1, 3.0, log=True, min=0)}, task=_MMSE)
def _svr(p, seed):
    from sklearn.svm import SVR

    return SVR(C=p["C"], gamma=p["gamma"], epsilon=p["epsilon"], kernel="rbf")


@register("knn_regressor", "k nearest neighbours, mean score of the neighbours",
          {"n_neighbors": IntRange(1, 31), "weights": Choice(("uniform", "distance")),
           "metric": Choice(("euclidean", "cosine"))},
          fit_to_data=lambda p, n: {**p, "n_neighbors": min(p["n_neighbors"], n)}, task=_MMSE)
def _knn_regressor(p, seed):
    from sklearn.neighbors import KNeighborsRegressor

    return KNeighborsRegressor(n_neighbors=p["n_neighbors"], weights=p["weights"], metric=p["metric"])


@register("pls", "partial least squares regression (a few latent components)",
          {"n_components": IntRange(1, 16)},
          fit_to_data=lambda p, n: {**p, "n_components": min(p["n_components"], max(n - 1, 1))}, task=_MMSE)
def _pls(p, seed):
    from adsearch.search.estimators import PLSRegressor

    return PLSRegressor(n_components=p["n_components"])


@register("random_forest_regressor", "random forest of regression trees", FOREST, task=_MMSE)
def _random_forest_regressor(p, seed):
    from sklearn.ensemble import RandomForestRegressor

    return RandomForestRegressor(**p, n_jobs=1, random_state=seed)


@register("extra_trees_regressor", "extremely randomised regression trees", FOREST, task=_MMSE)
def _extra_trees_regressor(p, seed):
    from sklearn.ensemble import ExtraTreesRegressor

    return ExtraTreesRegressor(**p, n_jobs=1, random_state=seed)


@register("xgboost_regressor", "gradient-boosted regression trees (XGBoost, histogram method, capped rounds)",
          XGBOOST, task=_MMSE)
def _xgboost_regressor(p, seed):
    from xgboost import XGBRegressor

    return XGBRegressor(**p, tree_method="hist", max_bin=64, n_jobs=1, random_state=seed, verbosity=0)


@register("catboost_regressor", "gradient-boosted oblivious regression trees (CatBoost, capped iterations)",
          CATBOOST, task=_MMSE)
def _catboost_regressor(p, seed):
    from catboost import CatBoostRegressor

    return CatBoostRegressor(**p, border_count=32, thread_count=1, random_seed=seed, verbose=False,
                             allow_writing_files=False)
