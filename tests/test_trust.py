"""A search you can trust: pruning never discards a finished evaluation, the optimiser is the study's."""

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from adsearch.embed import open_cache
from adsearch.embed.synthetic import write_realistic_cache, write_synthetic_cache
from adsearch.search.errors import StudyError
from adsearch.search.samplers import make_sampler
from adsearch.search.space import parse_spec
from adsearch.search.storage import make_storage
from adsearch.search.study import StudySetup, create_or_resume, load_screen
from adsearch.search.worker import run_worker

SMALL = dict(n_train=40, n_test=10, n_layers=4, dim=16, windows_per_item=3, signal_layer=2, signal_dims=4)


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    return open_cache(write_synthetic_cache(tmp_path_factory.mktemp("cache") / "c", **SMALL))


class AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study, trial):
        return True


def test_a_trial_is_never_pruned_after_its_last_fold(small_cache, tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 's.db'}"
    spec = {"cv": {"folds": 2, "repeats": 2}, "space": {"pooling": ["mean"]}}
    create_or_resume(make_storage(url), "s", small_cache, parse_spec(spec), "s.yaml", 4)
    asked = []

    def prune_on_the_last_fold_only(self, study, trial):
        step = trial.last_step
        asked.append(step)
        return step == 3  # 2 folds x 2 repeats: steps 0..3

    monkeypatch.setattr(AlwaysPrune, "prune", prune_on_the_last_fold_only)
    monkeypatch.setattr("adsearch.search.worker.make_pruner", lambda name: AlwaysPrune())
    run_worker("s", url, worker_index=0)
    trials = optuna.load_study(study_name="s", storage=url).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert all(t.value is not None and "cv_balanced_accuracy" in t.user_attrs for t in trials)
    assert all(t.user_attrs["folds_run"] == 4 for t in trials)
    assert 3 not in asked  # the pruner is not even asked after the last fold


def test_a_pruned_trial_records_how_many_folds_ran(small_cache, tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 's.db'}"
    create_or_resume(make_storage(url), "s", small_cache, parse_spec({"cv": {"folds": 4}}), "s.yaml", 3)
    monkeypatch.setattr("adsearch.search.worker.make_pruner", lambda name: AlwaysPrune())
    run_worker("s", url, worker_index=0)
    trials = optuna.load_study(study_name="s", storage=url).get_trials()
    assert [t.state for t in trials] == [TrialState.PRUNED] * 3
    assert [t.user_attrs["folds_run"] for t in trials] == [1, 1, 1]


def test_the_sampler_recorded_at_creation_is_the_one_a_joining_worker_uses(small_cache, tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 's.db'}"
    spec = parse_spec({"cv": {"folds": 4}, "sampler": "tpe", "pruner": "wilcoxon"})
    study = create_or_resume(make_storage(url), "s", small_cache, spec, "s.yaml", 2, sampler="random", pruner="none")
    setup = StudySetup.from_study(study)
    assert (setup.sampler, setup.pruner) == ("random", "none")
    assert study.metric_names == ["balanced_accuracy"]
    used = []
    real = make_sampler

    def spy(name, *args):
        used.append(name)
        return real(name, *args)

    monkeypatch.setattr("adsearch.search.worker.make_sampler", spy)
    run_worker("s", url, worker_index=0)  # no --sampler: the study's own
    assert used == ["random"]
    # Resuming with another optimiser needs an explicit override, which warns and marks the trials.
    with pytest.raises(StudyError, match="created with sampler 'random'.*--override-optimiser"):
        create_or_resume(make_storage(url), "s", small_cache, spec, "s.yaml", 4, sampler="tpe")
    with pytest.raises(StudyError, match="created with sampler 'random'"):
        run_worker("s", url, sampler="tpe")
    create_or_resume(make_storage(url), "s", small_cache, spec, "s.yaml", 4, sampler="tpe", override=True)
    run_worker("s", url, sampler="tpe", override_optimiser=True, worker_index=1)
    trials = optuna.load_study(study_name="s", storage=url).get_trials()
    assert used[-1] == "tpe"
    assert [t.user_attrs.get("sampler") for t in trials] == [None, None, "tpe", "tpe"]


@pytest.mark.parametrize("name", ["gp", "qmc", "tpe", "random", "layer-grid"])
def test_every_named_sampler_runs_a_study(small_cache, tmp_path, name):
    url = f"sqlite:///{tmp_path / 's.db'}"
    create_or_resume(make_storage(url), "s", small_cache, parse_spec({"cv": {"folds": 4}}), "s.yaml", 12,
                     sampler=name, pruner="none")
    run_worker("s", url, worker_index=0)
    trials = optuna.load_study(study_name="s", storage=url).get_trials()
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 12


def test_an_unknown_sampler_is_refused_before_the_study_exists(small_cache, tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    with pytest.raises(StudyError, match="unknown sampler 'cmaes'; choose one of tpe, random, layer-grid, gp, qmc"):
        create_or_resume(make_storage(url), "s", small_cache, parse_spec({}), "s.yaml", 2, sampler="cmaes")
    assert optuna.study.get_all_study_names(url) == []


def test_fold_fits_count_what_pruning_saved(small_cache, tmp_path, monkeypatch):
    from adsearch.search.study import fold_fits

    url = f"sqlite:///{tmp_path / 's.db'}"
    create_or_resume(make_storage(url), "s", small_cache, parse_spec({"cv": {"folds": 4}}), "s.yaml", 3,
                     pruner="wilcoxon")
    run_worker("s", url, worker_index=0)  # nothing pruned in 3 trials
    study = optuna.load_study(study_name="s", storage=url)
    assert fold_fits(study, StudySetup.from_study(study)) == {"run": 12, "saved": 0}
    create_or_resume(make_storage(url), "p", small_cache, parse_spec({"cv": {"folds": 4}}), "s.yaml", 3)
    monkeypatch.setattr("adsearch.search.worker.make_pruner", lambda name: AlwaysPrune())
    run_worker("p", url, worker_index=0)
    study = optuna.load_study(study_name="p", storage=url)
    assert fold_fits(study, StudySetup.from_study(study)) == {"run": 3, "saved": 9}


# ----------------------------------------------------------------------------------------------------------
# Layer screening


def test_the_closed_form_probe_equals_a_ridge_fitted_per_fold():
    from sklearn.linear_model import Ridge

    from adsearch.search.screen import kfold_predictions

    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 15))
    y = np.where(rng.random(40) < 0.5, 1.0, -1.0)
    folds = np.array([np.arange(40) % 4, rng.permutation(np.arange(40) % 5)])  # two repeats, 4 and 5 folds
    ridges = np.array([0.01, 1.0])
    centred = X - X.mean(axis=0)
    scale = np.linalg.eigvalsh(centred @ centred.T).clip(0).mean()
    got = kfold_predictions(X @ X.T, y, folds, ridges)
    assert len(got) == 9
    expected_rows = [np.flatnonzero(a == f) for a in folds for f in range(int(a.max()) + 1)]
    for (rows, predictions), expected in zip(got, expected_rows, strict=True):
        np.testing.assert_array_equal(rows, expected)
        train = np.setdiff1d(np.arange(40), rows)
        for r, ridge in enumerate(ridges):
            model = Ridge(alpha=scale * ridge).fit(X[train], y[train])
            np.testing.assert_allclose(predictions[:, r], model.predict(X[rows]), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("kind, seen_by", [("mean", {"mean"}), ("spread", {"std", "max", "min"}),
                                           ("nonlinear", {"mean"})])
def test_the_screen_finds_the_planted_layer_and_statistic_on_realistic_caches(tmp_path, kind, seen_by):
    from adsearch.embed.cache import POOLINGS
    from adsearch.search.objective import FeatureSource, assign_folds
    from adsearch.search.screen import screen

    cache = open_cache(write_realistic_cache(tmp_path / "c", kind=kind, n_layers=9, n_test=0, seed=1))
    planted = cache.meta["synthetic"]["signal_layer"]
    source = FeatureSource(cache)
    folds = assign_folds(source.labels, source.groups, 5, 1, 0)
    result = screen(source, folds, tuple(range(9)), list(POOLINGS), "balanced_accuracy")
    best = result.top(1)[0]
    assert abs(best["layer"] - planted) <= 1 and set(POOLINGS[best["pooling"]]) & seen_by, result.top(3)
    assert best["probe"] == ("kernel" if kind == "nonlinear" else best["probe"])
    assert best["score"] > 0.7
    far = [i for i, layer in enumerate(result.layers) if abs(layer - planted) >= 4]
    assert result.best()[far].max() < best["score"] - 0.05


def test_screening_trials_come_first_and_keep_the_budget_exact(tmp_path):
    cache = open_cache(write_realistic_cache(tmp_path / "c", kind="mean", n_layers=6, dim=48, n_test=20, seed=0))
    url = f"sqlite:///{tmp_path / 's.db'}"
    spec = parse_spec({"screen": {"top": 4}, "pruner": "none",
                       "space": {"classifiers": {"logreg": {}, "rbf_svm": {}}}})
    create_or_resume(make_storage(url), "small", cache, spec, "s.yaml", 3)  # budget below `top`
    create_or_resume(make_storage(url), "big", cache, spec, "s.yaml", 7)
    for name, budget in (("small", 3), ("big", 7)):
        study = optuna.load_study(study_name=name, storage=url)
        assert len(study.get_trials(states=(TrialState.WAITING,))) == min(4, budget)
        run_worker(name, url, worker_index=0)
        trials = sorted(study.get_trials(), key=lambda t: t.number)
        assert len(trials) == budget and all(t.state == TrialState.COMPLETE for t in trials)
        origins = [t.user_attrs.get("origin") for t in trials]
        assert origins == ["screen"] * min(4, budget) + [None] * (budget - min(4, budget))
    screened = load_screen(optuna.load_study(study_name="big", storage=url))
    first = trials[0].params
    assert (first["layer"], first["pooling"]) == (screened.top(1)[0]["layer"], screened.top(1)[0]["pooling"])
    # resuming does not screen or enqueue again
    create_or_resume(make_storage(url), "big", cache, spec, "s.yaml", 9)
    assert not optuna.load_study(study_name="big", storage=url).get_trials(states=(TrialState.WAITING,))


def test_the_screen_never_reads_test_items(tmp_path, monkeypatch):
    from adsearch.embed.cache import EmbeddingCache

    cache = open_cache(write_realistic_cache(tmp_path / "c", kind="mean", n_layers=3, dim=16, n_test=30, seed=0))
    test_items = set(np.flatnonzero(cache.splits == "test"))
    read = []
    real = EmbeddingCache.recording_features

    def spy(self, layer, pooling, items=None):
        read.append(set(range(len(self.ids))) if items is None else set(np.asarray(items).tolist()))
        return real(self, layer, pooling, items)

    monkeypatch.setattr(EmbeddingCache, "recording_features", spy)
    create_or_resume(make_storage(f"sqlite:///{tmp_path / 's.db'}"), "s", cache, parse_spec({}), "s.yaml", 5)
    assert read and not any(items & test_items for items in read)


@pytest.mark.parametrize("metric", ["balanced_accuracy", "accuracy", "f1", "roc_auc"])
def test_the_screen_scores_columns_exactly_as_the_search_does(metric):
    from adsearch.search.objective import metrics
    from adsearch.search.screen import column_scores

    rng = np.random.default_rng(1)
    for labels in (rng.integers(0, 2, 30), np.ones(12, int)):
        predictions = np.round(rng.normal(size=(len(labels), 6)), 1)  # ties included
        expected = [metrics(labels, predictions[:, c], 0.0)[metric] for c in range(6)]
        np.testing.assert_allclose(column_scores(labels, predictions, metric), expected, equal_nan=True)
