"""A search you can trust: pruning never discards a finished evaluation, the optimiser is the study's."""

import csv
import json

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
    from adsearch.search.objective import FeatureSource
    from adsearch.search.protocol import assign_folds
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
    from conftest import record_feature_reads

    cache = open_cache(write_realistic_cache(tmp_path / "c", kind="mean", n_layers=3, dim=16, n_test=30, seed=0))
    test_items = set(np.flatnonzero(cache.splits == "test"))
    read = record_feature_reads(monkeypatch)
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


# ----------------------------------------------------------------------------------------------------------
# Noise floor: null studies, fresh folds, shortcut controls


def test_label_permutation_keeps_speakers_counts_and_is_reproducible():
    from adsearch.search.protocol import permute_labels

    groups = np.array(["a", "a", "b", "c", "c", "c", "d", "e", "f", "g"])
    labels = np.array([1, 1, 0, 1, 1, 1, 0, 0, 1, 0])
    permuted = permute_labels(labels, groups, seed=3)
    for speaker in set(groups):
        assert len(set(permuted[groups == speaker])) == 1  # a speaker keeps one label
    per_speaker = lambda y: sorted(y[np.unique(groups, return_index=True)[1]])  # noqa: E731
    assert per_speaker(permuted) == per_speaker(labels)  # the same labels, given to other speakers
    assert (permuted == permute_labels(labels, groups, seed=3)).all()
    assert any((permute_labels(labels, groups, seed=s) != labels).any() for s in range(5))
    with pytest.raises(StudyError, match="speaker 'a' has recordings with different labels"):
        permute_labels(np.array([1, 0, 0]), np.array(["a", "a", "b"]), seed=0)


def test_null_studies_keep_folds_and_budget_and_score_permuted_labels(tmp_path):
    from adsearch.search.null import create_null_studies, summarise
    from adsearch.search.objective import Objective

    cache = open_cache(write_realistic_cache(tmp_path / "c", kind="mean", n_layers=4, dim=32, n_test=20, seed=0))
    url = f"sqlite:///{tmp_path / 's.db'}"
    spec = parse_spec({"screen": {"top": 2}, "space": {"classifiers": {"logreg": {}}}})
    main = create_or_resume(make_storage(url), "main", cache, spec, "s.yaml", 4)
    run_worker("main", url, worker_index=0)
    names = create_null_studies(make_storage(url), "main", runs=2, budget=3)
    assert names == ["main~null0", "main~null1"]
    main_setup = StudySetup.from_study(main)
    for name in names:
        run_worker(name, url, worker_index=0)
        study = optuna.load_study(study_name=name, storage=url)
        setup = StudySetup.from_study(study)
        assert (setup.folds == main_setup.folds).all() and setup.train_ids == main_setup.train_ids
        assert setup.sampler == main_setup.sampler and setup.null_seed is not None
        assert len(study.get_trials()) == 3 and all(t.state == TrialState.COMPLETE for t in study.get_trials())
        objective = Objective(setup, cache)
        assert (np.sort(objective.source.labels) == np.sort(cache.labels[cache.splits == "train"])).all()
        assert (objective.source.labels != cache.labels[cache.splits == "train"]).any()
    summary = summarise(make_storage(url), "main")
    assert summary["n"] == 2 and summary["real_best"] == main.best_value
    assert summary["p_value"] == (1 + sum(n["best"] >= main.best_value for n in summary["null"])) / 3
    with pytest.raises(StudyError, match="is itself a null study"):
        create_null_studies(make_storage(url), "main~null0", runs=1, budget=1)


def test_null_command_records_the_floor_and_export_reports_it_with_fresh_folds(tmp_path):
    import yaml
    from typer.testing import CliRunner

    from adsearch.cli import app
    from adsearch.results.export import export_trial
    from adsearch.results.schema import ExportError

    cache = open_cache(write_realistic_cache(tmp_path / "c", kind="mean", n_layers=3, dim=32, n_test=20, seed=1))
    url = f"sqlite:///{tmp_path / 's.db'}"
    spec = parse_spec({"screen": {"top": 1}, "space": {"classifiers": {"logreg": {}}}})
    create_or_resume(make_storage(url), "main", cache, spec, "s.yaml", 3)
    run_worker("main", url, worker_index=0)
    result = CliRunner().invoke(app, ["null", "--study", "main", "--storage", url, "--runs", "2"])
    assert result.exit_code == 0, result.output
    assert "vs the best CV of 2 label-permuted searches" in result.output and "permutation p = " in result.output
    assert "main~null0: trials" in result.output and "main~null1: trials" in result.output  # trial-level bars
    with pytest.raises(ExportError, match="is a null study"):
        export_trial("main~null1", url, tmp_path / "nope", artifacts=tmp_path / "a", log=lambda m: None)
    exported = export_trial("main", url, tmp_path / "out", artifacts=tmp_path / "a", log=lambda m: None,
                            control_study="main~null0")
    assert any("shortcut control 'main~null0'" in w for w in exported.warnings) == (
        optuna.load_study(study_name="main~null0", storage=url).best_value > 0.6)
    config = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    fresh = config["cv"]["fresh"]
    assert fresh["repeats"] == 5 and fresh["seed"] == 10_000
    assert fresh["optimism"] == pytest.approx(config["cv"]["mean"] - fresh["mean"])
    report = (tmp_path / "out" / "report.html").read_text()
    assert "label-permuted searches" in report and "fresh fold assignments" in report
    assert "shortcut control" in report and "main~null0" in report
    # the study grows after the null searches: search and export say the floor is out of date, and how to fix it
    from adsearch.search.null import NULL_ATTR, stale_floor

    create_or_resume(make_storage(url), "main", cache, spec, "s.yaml", 6)
    run_worker("main", url, worker_index=0)
    grown = export_trial("main", url, tmp_path / "out2", artifacts=tmp_path / "a", log=lambda m: None)
    assert any("noise floor is out of date" in w and "adsearch null --study main --trials 6" in w
               for w in grown.warnings), grown.warnings
    result = CliRunner().invoke(app, ["null", "--study", "main", "--storage", url, "--runs", "2", "--trials", "6"])
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="main", storage=url)
    floor = study._storage.get_study_system_attrs(study._study_id)[NULL_ATTR]
    assert stale_floor(floor, study.best_value, 6, "main") is None and floor["real_trials"] == 6


# ----------------------------------------------------------------------------------------------------------
# adsearch compare


def test_compare_gives_the_same_table_for_the_same_seeds(tmp_path):
    from typer.testing import CliRunner

    from adsearch.cli import app
    from adsearch.search.compare import DETERMINISTIC

    cache = write_realistic_cache(tmp_path / "c", kind="mean", n_layers=4, dim=32, n_test=0, seed=2)
    space = tmp_path / "space.yaml"
    space.write_text("cv: {folds: 3}\nscreen: {top: 2}\nspace: {pooling: [mean, std], classifiers: {logreg: {}, "
                     "knn: {}}}\n")
    tables = []
    for attempt, runs in (("a", "--runs"), ("b", "--seeds")):  # --seeds: the old name still works
        result = CliRunner().invoke(app, ["compare", "--cache", str(cache), "--space", str(space), "--samplers",
                                          "tpe,random", runs, "2", "--trials", "6", "--workers", "2",
                                          "-o", str(tmp_path / attempt)])
        assert result.exit_code == 0, result.output
        rows = list(csv.DictReader((tmp_path / attempt / "compare.csv").open()))
        tables.append([{key: row[key] for key in DETERMINISTIC} for row in rows])
        runs = json.loads((tmp_path / attempt / "runs.json").read_text())
        assert len(runs) == 4 and all(len(run["values"]) == 6 for run in runs)
        assert (tmp_path / attempt / "best_vs_trials.png").stat().st_size > 0
        assert (tmp_path / attempt / "best_vs_cpu.png").stat().st_size > 0
    assert tables[0] == tables[1] and [row["sampler"] for row in tables[0]] == ["tpe", "random"]
    again = CliRunner().invoke(app, ["compare", "--cache", str(cache), "--space", str(space), "-o",
                                     str(tmp_path / "a")])
    assert again.exit_code == 2 and "not an empty folder" in again.output
    (tmp_path / "file").write_text("x")
    onto_a_file = CliRunner().invoke(app, ["compare", "--cache", str(cache), "-o", str(tmp_path / "file")])
    assert onto_a_file.exit_code == 2 and "not an empty folder" in onto_a_file.output
    unknown = CliRunner().invoke(app, ["compare", "--cache", str(cache), "--samplers", "tpe,cmaes", "-o",
                                       str(tmp_path / "c2")])
    assert unknown.exit_code == 2 and "cmaes" in unknown.output


def test_null_studies_never_read_test_items(tmp_path, monkeypatch):
    from conftest import record_feature_reads

    from adsearch.search.null import create_null_studies

    cache = open_cache(write_realistic_cache(tmp_path / "c", kind="mean", n_layers=3, dim=16, n_test=30, seed=0))
    url = f"sqlite:///{tmp_path / 's.db'}"
    spec = parse_spec({"screen": {"top": 1}, "space": {"unit": ["recording", "window"],
                                                       "classifiers": {"logreg": {}}}})
    create_or_resume(make_storage(url), "main", cache, spec, "s.yaml", 2)
    test_items = set(np.flatnonzero(cache.splits == "test"))
    read = record_feature_reads(monkeypatch)
    create_null_studies(make_storage(url), "main", runs=1, budget=4)
    run_worker("main~null0", url, worker_index=0)
    assert read and not any(items & test_items for items in read)


def test_the_floor_warning_tells_too_few_null_runs_from_a_score_inside_the_floor():
    from adsearch.results.export import honesty_warnings

    class Exported:
        class cv:  # noqa: N801 - stands in for the pydantic record
            metric = "balanced_accuracy"

    def floor(real, nulls):
        return {"real_best": real, "n": len(nulls), "null": [{"best": b} for b in nulls], "null_max": max(nulls),
                "p_value": (1 + sum(b >= real for b in nulls)) / (1 + len(nulls))}

    [few] = honesty_warnings(Exported, floor(0.9, [0.6, 0.65, 0.7]), None)
    assert "better than all 3 label-permuted searches" in few and "--runs 19" in few
    [inside] = honesty_warnings(Exported, floor(0.66, [0.6, 0.65, 0.7]), None)
    assert "not better than the noise floor: 1 of 3" in inside
    assert honesty_warnings(Exported, floor(0.9, [0.6] * 19), None) == []

    class ExportedMmse:  # lower is better: a null search reaches the real RMSE by going at or below it
        class cv:  # noqa: N801
            metric = "rmse"

    rmse_floor = {"real_best": 4.0, "n": 3, "null": [{"best": b} for b in (3.9, 5.1, 5.3)], "null_max": 5.3,
                  "null_best": 3.9, "p_value": 0.5}
    [inside] = honesty_warnings(ExportedMmse, rmse_floor, None)
    assert "not better than the noise floor: 1 of 3" in inside and "(best 3.9000" in inside
    clear = {**rmse_floor, "null": [{"best": b} for b in (5.0, 5.1, 5.3)], "null_best": 5.0, "p_value": 0.25}
    assert "better than all 3" in honesty_warnings(ExportedMmse, clear, None)[0]


def test_sources_over_other_recordings_or_names_are_refused(tmp_path):
    from adsearch.search.study import name_sources

    a = open_cache(write_realistic_cache(tmp_path / "a", kind="mean", n_layers=2, dim=8, n_test=4, seed=0))
    b = open_cache(write_realistic_cache(tmp_path / "b", kind="mean", n_layers=2, dim=8, n_test=4, seed=1))
    c = open_cache(write_realistic_cache(tmp_path / "c", kind="mean", n_layers=2, dim=8, n_train=150, n_test=4))
    url = f"sqlite:///{tmp_path / 's.db'}"
    for other in (b, c):  # other labels (seed 1), other recordings (150 train)
        with pytest.raises(StudyError, match="other train recordings, labels or speakers"):
            create_or_resume(make_storage(url), "s", {"a": a, "o": other}, parse_spec({}), "s.yaml", 2)
    with pytest.raises(StudyError, match="a source name is 1-40"):
        name_sources([("bad name", a), (None, b)])
    assert list(name_sources([(None, a), (None, a)])) == ["synthetic-realistic", "synthetic-realistic-2"]
    study = create_or_resume(make_storage(url), "s", {"x": a, "y": a}, parse_spec({}), "s.yaml", 2)
    with pytest.raises(StudyError, match="created with the sources"):
        create_or_resume(make_storage(url), "s", {"x": a, "z": a}, parse_spec({}), "s.yaml", 2)
    assert StudySetup.from_study(study).source_layers == {"x": (0, 1), "y": (0, 1)}
