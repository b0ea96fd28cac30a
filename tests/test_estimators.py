import numpy as np
import pytest
from sklearn.covariance import ShrunkCovariance
from sklearn.decomposition import PCA
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from adsearch.results.model_files import load_model, save_model
from adsearch.search.estimators import (
    BlockwiseStandardScaler,
    CenteredKernelRidge,
    CovariancePCA,
    PLSRegressor,
    ShrinkageLDA,
    TfidfWeighting,
    UnivariateSelection,
)


def data(n, dim, classes, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, dim)) * rng.uniform(0.1, 3.0, dim)
    y = rng.integers(0, classes, n)
    X[:, :3] += y[:, None]
    return X, y


@pytest.mark.parametrize("n, dim, classes, shrinkage", [(300, 40, 2, 0.0), (300, 40, 3, 0.3), (100, 200, 2, 0.7)])
def test_shrinkage_lda_equals_scikit_learn_lda_with_shrunk_covariance(n, dim, classes, shrinkage):
    X, y = data(n, dim, classes)
    reference = LinearDiscriminantAnalysis(solver="lsqr", covariance_estimator=ShrunkCovariance(shrinkage=shrinkage))
    reference.fit(X, y)
    ours = ShrinkageLDA(shrinkage=shrinkage, block_rows=64).fit(X, y)  # several blocks
    np.testing.assert_allclose(ours.coef_, reference.coef_, atol=1e-10)
    np.testing.assert_allclose(ours.intercept_, reference.intercept_, atol=1e-10)
    np.testing.assert_allclose(ours.predict_proba(X), reference.predict_proba(X), atol=1e-10)
    np.testing.assert_array_equal(ours.predict(X), reference.predict(X))


def test_shrinkage_lda_keeps_float32_and_reports_a_singular_covariance():
    X, y = data(40, 100, 2)
    model = ShrinkageLDA(shrinkage=0.2).fit(X.astype(np.float32), y)
    assert model.coef_.dtype == np.float32 and model.predict_proba(X.astype(np.float32)).shape == (40, 2)
    with pytest.raises(ValueError, match="singular at shrinkage=0.0"):
        ShrinkageLDA(shrinkage=0.0).fit(X, y)  # more features than samples
    with pytest.raises(ValueError, match="at least two classes"):
        ShrinkageLDA().fit(X, np.zeros(40))


def test_blockwise_scaler_equals_standard_scaler_and_refits_from_scratch():
    X, _ = data(1000, 30, 2)
    X32 = X.astype(np.float32)
    ours = BlockwiseStandardScaler(block_rows=77).fit(X32[:500]).fit(X32)  # the second fit forgets the first
    reference = StandardScaler().fit(X32)
    np.testing.assert_allclose(ours.mean_, reference.mean_, rtol=1e-12)
    np.testing.assert_allclose(ours.scale_, reference.scale_, rtol=1e-12)
    assert ours.n_samples_seen_ == 1000
    in_place = X32.copy()
    BlockwiseStandardScaler(copy=False).fit_transform(in_place)
    np.testing.assert_allclose(in_place, reference.transform(X32), atol=1e-6)


@pytest.mark.parametrize("n_components", [5, 0.8])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_covariance_pca_equals_scikit_learn_pca(n_components, dtype):
    X, _ = data(2000, 40, 2)
    X = (X @ np.random.default_rng(1).normal(size=(40, 40))).astype(dtype)  # correlated features
    reference = PCA(n_components, svd_solver="full").fit(X)
    ours = CovariancePCA(n_components, block_rows=300).fit(X)
    assert ours.n_components_ == reference.n_components_
    np.testing.assert_allclose(ours.explained_variance_ratio_, reference.explained_variance_ratio_, rtol=1e-4)
    np.testing.assert_allclose(ours.explained_variance_, reference.explained_variance_, rtol=1e-4)
    scale = np.abs(reference.transform(X)).max()
    np.testing.assert_allclose(ours.transform(X), reference.transform(X), atol=1e-4 * scale)
    assert ours.transform(X).dtype == dtype
    with pytest.raises(ValueError, match="n_components must be"):
        CovariancePCA(41).fit(X)


def test_estimators_round_trip_through_skops(tmp_path):
    from sklearn.pipeline import make_pipeline

    X, y = data(200, 20, 2)
    model = make_pipeline(BlockwiseStandardScaler(), CovariancePCA(5), ShrinkageLDA(0.1)).fit(X, y)
    save_model(model, tmp_path / "m.skops")
    np.testing.assert_array_equal(load_model(tmp_path / "m.skops").predict_proba(X), model.predict_proba(X))


@parametrize_with_checks([TfidfWeighting()])
def test_tfidf_weighting_follows_scikit_learn_conventions(estimator, check):
    """scikit-learn's own estimator checks (its contract for transformers) against adsearch's TF-IDF step."""
    check(estimator)


@parametrize_with_checks([UnivariateSelection(k=2), UnivariateSelection(k=2, regression=True)])
def test_univariate_selection_follows_scikit_learn_conventions(estimator, check):
    check(estimator)


def test_univariate_selection_keeps_scikit_learns_best_columns():
    """The same columns as SelectKBest with the ANOVA F test (classes) or f_regression (a score)."""
    from sklearn.feature_selection import SelectKBest, f_classif, f_regression

    X, y = data(120, 30, 3)
    for regression, target, score in ((False, y, f_classif), (True, X[:, 5] * 2 + y, f_regression)):
        ours = UnivariateSelection(k=4, regression=regression).fit(X, target)
        theirs = SelectKBest(score, k=4).fit(X, target)
        np.testing.assert_array_equal(ours.columns_, np.flatnonzero(theirs.get_support()))
        np.testing.assert_array_equal(ours.transform(X), theirs.transform(X))


def test_tfidf_weighting_matches_scikit_learn_and_refuses_negative_values():
    from sklearn.feature_extraction.text import TfidfTransformer

    counts = np.random.default_rng(0).poisson(0.7, size=(30, 12)).astype(float)
    ours = TfidfWeighting().fit(counts[:20]).transform(counts[20:])
    theirs = TfidfTransformer(sublinear_tf=True).fit(counts[:20]).transform(counts[20:]).toarray()
    np.testing.assert_allclose(ours, theirs, atol=1e-12)
    with pytest.raises(ValueError, match="n-gram source"):
        TfidfWeighting().fit(counts - 1)


def test_calibration_metrics_match_scikit_learns():
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import brier_score_loss

    from adsearch.results.calibration import calibration_report

    rng = np.random.default_rng(4)
    probability = np.concatenate([rng.uniform(size=200), [0.0, 1.0, 0.1, 0.2, 0.5, 0.9999]])
    y = (rng.uniform(size=len(probability)) < probability ** 1.5).astype(int)  # overconfident on purpose
    report = calibration_report(y, probability)
    assert report["brier"] == pytest.approx(brier_score_loss(y, probability))
    observed, predicted = calibration_curve(y, probability, n_bins=10, strategy="uniform")
    np.testing.assert_allclose([b["observed"] for b in report["bins"]], observed)
    np.testing.assert_allclose([b["mean_predicted"] for b in report["bins"]], predicted)
    assert sum(b["n"] for b in report["bins"]) == len(y)
    by_hand = sum(b["n"] * abs(b["observed"] - b["mean_predicted"]) for b in report["bins"]) / len(y)
    assert report["ece"] == pytest.approx(by_hand) and report["ece"] > 0.05
    assert calibration_report(y, y.astype(float))["ece"] == 0.0  # certain and right: perfectly calibrated


@parametrize_with_checks([CenteredKernelRidge(alpha=0.1, gamma=0.1), PLSRegressor(n_components=2)])
def test_mmse_regressors_follow_scikit_learn_conventions(estimator, check):
    """scikit-learn's own estimator checks (its contract for regressors) against adsearch's two regressors."""
    check(estimator)


def test_centered_kernel_ridge_is_kernel_ridge_on_centred_targets():
    """The intercept is the training mean; the rest is scikit-learn's KernelRidge on the centred targets."""
    from sklearn.kernel_ridge import KernelRidge

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(50, 6)), rng.normal(24, 4, 50)
    ours = CenteredKernelRidge(alpha=0.5, gamma=0.2).fit(X, y)
    theirs = KernelRidge(alpha=0.5, kernel="rbf", gamma=0.2).fit(X, y - y.mean())
    np.testing.assert_allclose(ours.predict(X[:7]), theirs.predict(X[:7]) + y.mean(), rtol=1e-10)
    # far from every training point the RBF kernel vanishes: the prediction is the mean, not 0
    assert abs(ours.predict(X[:1] + 100)[0] - y.mean()) < 1e-6


def test_pls_regressor_caps_its_components_at_what_the_data_allows():
    from sklearn.cross_decomposition import PLSRegression

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(30, 3)), rng.normal(size=30)
    fitted = PLSRegressor(n_components=16).fit(X, y)
    assert fitted.model_.n_components == 3
    np.testing.assert_allclose(fitted.predict(X), PLSRegression(3).fit(X, y).predict(X).ravel())
