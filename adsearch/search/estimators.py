"""scikit-learn estimators rebuilt to work in row blocks, for wide pooled features on large corpora, and TF-IDF
weighting of n-gram counts (`TfidfWeighting`), and two MMSE regressors scikit-learn lacks in the needed form
(`CenteredKernelRidge`, `PLSRegressor`).

On 3,072-dim features (mean+std+max of a 1024-dim layer) and thousands of windows, scikit-learn's
`StandardScaler.fit` makes a float64 copy of its whole input (twice the float32 features),
`LinearDiscriminantAnalysis(solver="lsqr", shrinkage=s)` holds about ten d x d matrices and solves by SVD
(370 MB and about 10 s a fit on one core), and `PCA` copies its input and decomposes it (or its covariance)
with several more (about 420 MB). The estimators below read their input a block of rows at a time and keep
at most one d x d float64 matrix, so a search worker stays within a few hundred megabytes.
They follow scikit-learn's conventions (parameters in `__init__`, `fit` / `predict`, fitted attributes with
a trailing underscore) and are saved with skops like the rest of the pipeline.
"""

from __future__ import annotations

import numpy as np
from scipy import linalg
from scipy.linalg.blas import dsyrk
from scipy.special import expit, softmax
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin, TransformerMixin
from sklearn.preprocessing import StandardScaler
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

BLOCK_ROWS = 256


class BlockwiseStandardScaler(StandardScaler):
    """`StandardScaler` whose `fit` merges per-block statistics (`partial_fit`, `block_rows` rows at a time)
    instead of upcasting the whole input to float64 at once. Same mean and variance up to rounding."""

    def __init__(self, *, copy: bool = True, with_mean: bool = True, with_std: bool = True,
                 block_rows: int = BLOCK_ROWS):
        super().__init__(copy=copy, with_mean=with_mean, with_std=with_std)
        self.block_rows = block_rows

    def fit(self, X, y=None, sample_weight=None):
        for fitted in ("n_samples_seen_", "mean_", "var_", "scale_"):  # a refit starts from nothing
            self.__dict__.pop(fitted, None)
        for start in range(0, X.shape[0], self.block_rows):
            rows = slice(start, start + self.block_rows)
            self.partial_fit(X[rows], None, None if sample_weight is None else sample_weight[rows])
        return self


class UnivariateSelection(TransformerMixin, BaseEstimator):
    """Keep the `k` columns that separate the targets best one at a time, fitted on the training part of a fold:
    the ANOVA F statistic for classes, the squared correlation for a score (`regression=True`). A signal that
    sits in a few of a layer's 1,024 dimensions is diluted by the rest in a dense model; this finds them
    (scikit-learn's SelectKBest stores its score function, a type a model file could not be trusted with)."""

    def __init__(self, *, k: int = 16, regression: bool = False):
        self.k = k
        self.regression = regression

    def fit(self, X, y):
        X, y = validate_data(self, X, y, dtype=np.float64)
        if self.k < 1:
            raise ValueError(f"k={self.k}: keep at least one column")
        if self.regression:
            centred, target = X - X.mean(axis=0), np.asarray(y, np.float64) - np.mean(y)
            with np.errstate(invalid="ignore", divide="ignore"):
                scores = (centred.T @ target) ** 2 / (np.sum(centred**2, axis=0) * np.sum(target**2))
        else:
            check_classification_targets(y)
            classes = np.unique(y)
            mean = X.mean(axis=0)
            between = sum(np.sum(y == c) * (X[y == c].mean(axis=0) - mean) ** 2 for c in classes)
            within = sum(np.sum((X[y == c] - X[y == c].mean(axis=0)) ** 2, axis=0) for c in classes)
            with np.errstate(invalid="ignore", divide="ignore"):
                scores = between / within
        scores = np.where(np.isfinite(scores), scores, 0.0)
        self.scores_ = scores
        self.columns_ = np.sort(np.argsort(-scores, kind="stable")[:min(self.k, X.shape[1])])
        return self

    def transform(self, X):
        check_is_fitted(self, "columns_")
        X = validate_data(self, X, reset=False)
        return X[:, self.columns_]


class TfidfWeighting(TransformerMixin, BaseEstimator):
    """TF-IDF weighting of term counts (an n-gram source), fitted like every pipeline step on the training
    part of a fold only, so no held-out recording shapes the weights: sublinear term frequency (1 + log tf),
    smoothed inverse document frequency, rows scaled to unit length. Dense in, dense out (unlike
    scikit-learn's TfidfTransformer, whose sparse output the next steps would have to special-case)."""

    def __init__(self, *, sublinear_tf: bool = True):
        self.sublinear_tf = sublinear_tf

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.positive_only = True
        return tags

    def fit(self, X, y=None):
        X = self._counts(X, reset=True)
        document_frequency = (X > 0).sum(axis=0)
        self.idf_ = np.log((1 + len(X)) / (1 + document_frequency)) + 1
        return self

    def transform(self, X):
        check_is_fitted(self, "idf_")
        X = self._counts(X, reset=False)
        tf = np.where(X > 0, 1 + np.log(np.maximum(X, 1e-12)), 0.0) if self.sublinear_tf else X
        weighted = tf * self.idf_
        norms = np.linalg.norm(weighted, axis=1, keepdims=True)
        return weighted / np.where(norms > 0, norms, 1.0)

    def _counts(self, X, reset: bool) -> np.ndarray:
        X = validate_data(self, X, dtype=np.float64, reset=reset)
        if (X < 0).any():
            raise ValueError("Negative values in data: tfidf weighs term counts; use it on an "
                             "n-gram source (adsearch extract --features ngrams), scale: standard elsewhere")
        return X


def _means(X: np.ndarray, centre_of_row: np.ndarray, n_centres: int, block_rows: int) -> np.ndarray:
    """(n_centres, d) float64 mean of the rows assigned to each centre, summed a block of rows at a time."""
    sums = np.zeros((n_centres, X.shape[1]))
    for start in range(0, X.shape[0], block_rows):
        rows = slice(start, start + block_rows)
        for centre in range(n_centres):
            sums[centre] += X[rows][centre_of_row[rows] == centre].sum(axis=0, dtype=np.float64)
    return sums / np.bincount(centre_of_row, minlength=n_centres)[:, None]


def _scatter(X: np.ndarray, centres: np.ndarray, centre_of_row: np.ndarray, block_rows: int) -> np.ndarray:
    """Upper triangle (Fortran order, float64) of the sum over rows of (x - c)^T (x - c), where c is the row's
    centre (`centres[centre_of_row[i]]`); one symmetric rank-k update per block of rows."""
    scatter = np.zeros((X.shape[1], X.shape[1]), order="F")
    for start in range(0, X.shape[0], block_rows):
        rows = slice(start, start + block_rows)
        centred = X[rows].astype(np.float64) - centres[centre_of_row[rows]]
        scatter = dsyrk(1.0, centred, beta=1.0, c=scatter, trans=1, lower=0, overwrite_c=1)
    return scatter


class CovariancePCA(TransformerMixin, BaseEstimator):
    """PCA by eigendecomposition of the covariance, for more samples than features (window-level data).

    The same components and explained variances as scikit-learn's `PCA` (signs as its `svd_flip`: each
    component's largest entry positive); `n_components` is a count or, below 1, the fraction of variance to
    keep. The covariance is accumulated in float64 row blocks and decomposed in float32 (LAPACK's MRRR
    solver, only the leading eigenvectors when a count is asked), so memory is about two d x d matrices.
    """

    def __init__(self, n_components: int | float = 0.95, block_rows: int = BLOCK_ROWS):
        self.n_components = n_components
        self.block_rows = block_rows

    def fit(self, X, y=None):
        X = validate_data(self, X, dtype=[np.float64, np.float32], ensure_min_samples=2)
        n, dim = X.shape
        wanted = self.n_components
        if not (0 < wanted < 1 or (float(wanted).is_integer() and 1 <= wanted <= dim)):
            raise ValueError(f"n_components must be a fraction in (0, 1) or a count in 1..{dim}, got {wanted}")
        one_centre = np.zeros(n, np.intp)
        mean = _means(X, one_centre, 1, self.block_rows)
        covariance = _scatter(X, mean, one_centre, self.block_rows)
        covariance /= n - 1
        total_variance = float(np.trace(covariance))
        covariance = covariance.astype(np.float32, order="F")  # the float64 matrix is dropped here
        if wanted >= 1:
            subset = [dim - int(wanted), dim - 1]
            values, vectors = linalg.eigh(covariance, lower=False, driver="evr", subset_by_index=subset,
                                          overwrite_a=True, check_finite=False)
        else:
            values, vectors = linalg.eigh(covariance, lower=False, driver="evr", overwrite_a=True,
                                          check_finite=False)
        values, vectors = np.maximum(values[::-1], 0.0), vectors[:, ::-1].T
        ratio = values / total_variance
        if wanted < 1:  # as scikit-learn: the fewest components whose cumulative ratio exceeds the fraction
            keep = int(np.searchsorted(np.cumsum(ratio), wanted, side="right")) + 1
            values, vectors, ratio = values[:keep], vectors[:keep], ratio[:keep]
        signs = np.sign(vectors[np.arange(len(vectors)), np.abs(vectors).argmax(axis=1)])
        self.components_ = (vectors * signs[:, None]).astype(X.dtype)
        self.explained_variance_ = values.astype(np.float64)
        self.explained_variance_ratio_ = ratio.astype(np.float64)
        self.n_components_ = len(values)
        self.mean_ = mean[0]
        return self

    def transform(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, dtype=[np.float64, np.float32], reset=False)
        out = np.empty((X.shape[0], self.n_components_), X.dtype)
        centre = self.mean_.astype(X.dtype)
        for start in range(0, X.shape[0], self.block_rows):
            rows = slice(start, start + self.block_rows)
            out[rows] = (X[rows] - centre) @ self.components_.T
        return out


class ShrinkageLDA(ClassifierMixin, BaseEstimator):
    """Linear discriminant analysis with the pooled within-class covariance shrunk towards a scaled identity,
    `(1 - shrinkage) * S + shrinkage * trace(S) / d * I`, solved by a Cholesky factorisation.

    The same model as scikit-learn's `LinearDiscriminantAnalysis(solver="lsqr",
    covariance_estimator=ShrunkCovariance(shrinkage=...))` (shrinking each class's covariance and pooling
    them by prior equals shrinking the pooled one; a test checks it). The scatter matrix is accumulated block
    by block with a symmetric rank-k update and factorised in place: one d x d float64 matrix in memory, and
    a Cholesky solve instead of an SVD. With more features than samples, `shrinkage` must be above 0 (the
    covariance is singular otherwise).
    """

    def __init__(self, shrinkage: float = 0.5, block_rows: int = BLOCK_ROWS):
        self.shrinkage = shrinkage
        self.block_rows = block_rows

    def fit(self, X, y):
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32], ensure_min_samples=2)
        check_classification_targets(y)
        if not 0.0 <= self.shrinkage <= 1.0:
            raise ValueError(f"shrinkage must be within [0, 1], got {self.shrinkage}")
        self.classes_, target = np.unique(y, return_inverse=True)
        n_classes, (n, dim) = len(self.classes_), X.shape
        if n_classes < 2:
            raise ValueError("ShrinkageLDA needs samples of at least two classes")
        counts = np.bincount(target, minlength=n_classes)
        means = _means(X, target, n_classes, self.block_rows)
        scatter = _scatter(X, means, target, self.block_rows)  # the within-class scatter
        scatter /= n
        diagonal = np.einsum("ii->i", scatter)
        level = diagonal.sum() / dim
        scatter *= 1.0 - self.shrinkage
        diagonal += self.shrinkage * level
        try:
            factor = linalg.cho_factor(scatter, lower=False, overwrite_a=True, check_finite=False)
        except linalg.LinAlgError:
            raise ValueError(f"the within-class covariance is singular at shrinkage={self.shrinkage}: "
                             "use a shrinkage above 0") from None
        weights = linalg.cho_solve(factor, means.T, check_finite=False).T  # (n_classes, dim)
        intercepts = -0.5 * np.sum(means * weights, axis=1) + np.log(counts / n)
        if n_classes == 2:
            weights, intercepts = weights[1:] - weights[:1], intercepts[1:] - intercepts[:1]
        self.coef_ = weights.astype(X.dtype)
        self.intercept_ = intercepts.astype(X.dtype)
        self.means_ = means
        self.priors_ = counts / n
        return self

    def decision_function(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, dtype=[np.float64, np.float32], reset=False)
        scores = X @ self.coef_.T + self.intercept_
        return scores.ravel() if len(self.classes_) == 2 else scores

    def predict_proba(self, X) -> np.ndarray:
        scores = self.decision_function(X)
        if len(self.classes_) == 2:
            positive = expit(scores)
            return np.column_stack([1.0 - positive, positive])
        return softmax(scores, axis=1)

    def predict(self, X) -> np.ndarray:
        scores = self.decision_function(X)
        index = (scores > 0).astype(int) if len(self.classes_) == 2 else scores.argmax(axis=1)
        return self.classes_[index]


class CenteredKernelRidge(RegressorMixin, BaseEstimator):
    """RBF kernel ridge regression with an intercept: scikit-learn's `KernelRidge` has none, so on MMSE
    scores (mean about 24) its penalty pulls every prediction towards 0. This one fits the centred targets
    and adds their training mean back."""

    def __init__(self, *, alpha: float = 1.0, gamma: float | None = None):
        self.alpha = alpha
        self.gamma = gamma

    def fit(self, X, y):
        from sklearn.kernel_ridge import KernelRidge

        X, y = validate_data(self, X, y, y_numeric=True)
        self.intercept_ = float(np.mean(y))
        self.model_ = KernelRidge(alpha=self.alpha, kernel="rbf", gamma=self.gamma).fit(X, y - self.intercept_)
        return self

    def predict(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, reset=False)
        return self.model_.predict(X) + self.intercept_


class PLSRegressor(RegressorMixin, BaseEstimator):
    """Partial least squares regression of one target, with at most as many components as the fitted data
    allows (samples - 1, features): after PCA to a share of variance a search cannot know that number."""

    def __init__(self, *, n_components: int = 2):
        self.n_components = n_components

    def fit(self, X, y):
        from sklearn.cross_decomposition import PLSRegression

        X, y = validate_data(self, X, y, y_numeric=True)
        components = max(1, min(self.n_components, X.shape[0] - 1, X.shape[1]))
        self.model_ = PLSRegression(n_components=components).fit(X, y)
        return self

    def predict(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, reset=False)
        return np.asarray(self.model_.predict(X)).ravel()
