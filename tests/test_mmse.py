"""MMSE regression (ADReSSo task 2) through the same workflow as task 1: space, folds, screen, search, null,
ensemble, export, evaluate, predict."""

import json

import numpy as np
import optuna
import pytest
from typer.testing import CliRunner

from adsearch.cli import app
from adsearch.embed import open_cache
from adsearch.embed.synthetic import write_realistic_cache
from adsearch.search.baseline import load_nuisance_baseline
from adsearch.search.objective import FeatureSource, oof_predictions
from adsearch.search.protocol import assign_folds, mmse_strata, regression_metrics
from adsearch.search.space import SpaceError, parse_spec
from adsearch.search.storage import make_storage
from adsearch.search.study import create_or_resume
from adsearch.search.worker import run_worker

runner = CliRunner()
SPACE = {"task": "mmse", "screen": {"top": 3},
         "space": {"pooling": ["mean", "std"], "unit": ["recording", "window"], "pca": ["none", "components"],
                   "classifiers": {"ridge": {}, "kernel_ridge": {}, "pls": {}, "knn_regressor": {}}}}


@pytest.fixture(scope="module")
def mmse_study(tmp_path_factory):
    """A realistic cache whose features carry the MMSE score (not only the label), 20 trials of an MMSE
    study over it; six train recordings lose their score, so the study must leave them out."""
    root = tmp_path_factory.mktemp("mmse")
    path = write_realistic_cache(root / "cache", kind="mean", target="mmse", n_layers=4, dim=48, strength=0.4,
                                 signal_layer=2, seed=5)
    meta_file = path / "cache.json"
    meta = json.loads(meta_file.read_text())
    for item in meta["items"][:6]:
        item["mmse"] = None
    from adsearch.embed.cache import seal

    meta_file.write_text(json.dumps(seal(meta)))
    cache = open_cache(path)
    url = f"sqlite:///{root / 's.db'}"
    create_or_resume(make_storage(url), "m", cache, parse_spec(SPACE), "mmse.yaml", 20)
    run_worker("m", url, worker_index=0)
    return {"root": root, "cache": cache, "url": url, "study": optuna.load_study(study_name="m", storage=url)}


def test_planted_mmse_is_recovered_well_under_the_mean_predictor(mmse_study):
    study, cache = mmse_study["study"], mmse_study["cache"]
    assert study.direction == optuna.study.StudyDirection.MINIMIZE
    floor = load_nuisance_baseline(study)["mean_predictor"]["cv"]
    train = np.flatnonzero((cache.splits == "train") & ~np.isnan(cache.mmse))
    assert floor == pytest.approx(np.std(cache.mmse[train]), rel=0.15)  # predicting the mean: about the SD
    assert study.best_value < 0.6 * floor
    best = study.best_trial
    assert best.params.get("layer") in (1, 2, 3)  # the planted layer or a neighbour
    for name in ("cv_rmse", "cv_mae", "cv_r2", "cv_pearson_r"):
        assert name in best.user_attrs
    assert best.user_attrs["cv_r2"] > 0.5 and best.user_attrs["cv_pearson_r"] > 0.7


def test_an_mmse_study_leaves_out_recordings_without_a_score_and_stratifies_by_score(mmse_study):
    from adsearch.search.setup import StudySetup

    setup = StudySetup.from_study(mmse_study["study"])
    cache = mmse_study["cache"]
    assert setup.left_out == 6 and len(setup.train_ids) == 166 - 6
    assert not set(setup.train_ids) & {cache.ids[i] for i in range(6)}
    source = FeatureSource(cache, task="mmse")
    bins = mmse_strata(source.labels, source.groups, 5)
    assert len(np.unique(bins)) >= 3
    for fold in range(5):  # every fold spans the score range: each bin is in each fold
        assert set(bins[setup.folds[0] == fold]) == set(np.unique(bins))
    # the stored fold assignment is the one assign_folds makes from the scores
    np.testing.assert_array_equal(setup.folds, assign_folds(source.labels, source.groups, 5, 1, 0, "mmse"))


def test_out_of_fold_mmse_predictions_are_clipped_scores_that_give_the_trial_its_value(mmse_study):
    study, cache = mmse_study["study"], mmse_study["cache"]
    source = FeatureSource(cache, task="mmse")
    from adsearch.search.setup import StudySetup

    folds = StudySetup.from_study(study).folds[0]
    for trial in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))[:5]:
        oof = oof_predictions(trial)[0]
        assert np.all((oof >= 0) & (oof <= 30))
        per_fold = [regression_metrics(source.labels[folds == f], oof[folds == f])["rmse"] for f in range(5)]
        assert trial.value == pytest.approx(np.mean(per_fold), rel=1e-5)


def test_an_mmse_study_never_reads_test_items(tmp_path, monkeypatch):
    from conftest import record_feature_reads

    cache = open_cache(write_realistic_cache(tmp_path / "c", target="mmse", n_layers=3, dim=16, n_test=30, seed=1))
    test_items = set(np.flatnonzero(cache.splits == "test"))
    read = record_feature_reads(monkeypatch)
    url = f"sqlite:///{tmp_path / 's.db'}"
    create_or_resume(make_storage(url), "m", cache, parse_spec(SPACE), "s.yaml", 4)
    run_worker("m", url, worker_index=0)
    assert read and not any(items & test_items for items in read)


def test_regression_metrics_match_scikit_learn_and_scipy():
    from scipy.stats import pearsonr
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    rng = np.random.default_rng(0)
    y, p = rng.uniform(0, 30, 50), rng.uniform(0, 30, 50)
    ours = regression_metrics(y, p)
    assert ours["rmse"] == pytest.approx(np.sqrt(mean_squared_error(y, p)))
    assert ours["mae"] == pytest.approx(mean_absolute_error(y, p))
    assert ours["r2"] == pytest.approx(r2_score(y, p))
    assert ours["pearson_r"] == pytest.approx(pearsonr(y, p).statistic)


def test_the_screen_scores_regression_probes_like_a_plain_ridge_refit_per_fold():
    """The closed-form probe's held-out MMSE predictions equal scikit-learn's Ridge (unpenalised intercept)
    refitted on each fold's training rows with the same penalty, and its column scores are their RMSE."""
    from sklearn.linear_model import Ridge

    from adsearch.search.screen import RIDGE_GRID, column_scores, kfold_predictions

    rng = np.random.default_rng(1)
    X = rng.normal(size=(40, 6))
    y = np.clip(24 + 3 * X[:, 0] + rng.normal(size=40), 0, 30)
    folds = np.arange(40)[None, :] % 4
    centred = X - X.mean(axis=0)
    K = centred @ centred.T
    scale = np.linalg.eigvalsh(K - K.mean(0)[None] - K.mean(1)[:, None] + K.mean()).clip(0).mean()
    for rows, predictions in kfold_predictions(K, y, folds, RIDGE_GRID):
        train = np.setdiff1d(np.arange(40), rows)
        for j, factor in enumerate(RIDGE_GRID):
            refit = Ridge(alpha=factor * scale).fit(centred[train], y[train]).predict(centred[rows])
            np.testing.assert_allclose(predictions[:, j], refit, rtol=1e-8, atol=1e-8)
        rmse = column_scores(y[rows], predictions, "rmse")
        assert rmse[2] == pytest.approx(regression_metrics(y[rows], np.clip(predictions[:, 2], 0, 30))["rmse"])


def test_task_and_metric_must_agree_and_models_must_fit_the_task():
    assert parse_spec({"task": "mmse"}).cv.metric == "rmse"
    assert parse_spec({"task": "mmse"}).space.classifiers == {"ridge": {}}
    with pytest.raises(SpaceError, match="cv.metric f1 does not score task mmse"):
        parse_spec({"task": "mmse", "cv": {"metric": "f1"}})
    with pytest.raises(SpaceError, match="logreg: a model for task classification"):
        parse_spec({"task": "mmse", "space": {"classifiers": {"logreg": {}}}})
    with pytest.raises(SpaceError, match="ridge: a model for task mmse"):
        parse_spec({"space": {"classifiers": {"ridge": {}}}})
    with pytest.raises(SpaceError, match="calibrates P\\(AD\\)"):
        parse_spec({"task": "mmse", "space": {"calibration": ["none", "sigmoid"]}})


def test_null_ensemble_export_and_evaluate_an_mmse_study(mmse_study):
    """The rest of the workflow on the MMSE study, through the CLI."""
    url, root = mmse_study["url"], mmse_study["root"]
    result = runner.invoke(app, ["null", "--study", "m", "--storage", url, "--runs", "2", "--trials", "6"])
    assert result.exit_code == 0, result.output
    floor = mmse_study["study"]._storage.get_study_system_attrs(mmse_study["study"]._study_id)["adsearch:null"]
    assert floor["metric"] == "rmse" and floor["null_best"] == min(n["best"] for n in floor["null"])
    assert all(n["best"] > mmse_study["study"].best_value for n in floor["null"])  # permuted scores: worse
    assert floor["p_value"] == pytest.approx(1 / 3)

    result = runner.invoke(app, ["ensemble", "--study", "m", "--storage", url, "--top", "5"])
    assert result.exit_code == 0, result.output
    assert "nested CV rmse" in result.output

    out = root / "best"
    result = runner.invoke(app, ["export", "--study", "m", "--storage", url, "-o", str(out), "--top-k", "1",
                                 "--artifacts", str(root / "artifacts")])
    assert result.exit_code == 0, result.output
    test = json.loads((out / "test.json").read_text())
    cache = mmse_study["cache"]
    assert test["n"] == 71 and len(test["predictions"]) == 71
    truth = np.array([p["mmse"] for p in test["predictions"]])
    predicted = np.array([p["predicted"] for p in test["predictions"]])
    assert test["rmse"]["value"] == pytest.approx(np.sqrt(np.mean((truth - predicted) ** 2)))
    assert test["rmse"]["ci95"][0] <= test["rmse"]["value"] <= test["rmse"]["ci95"][1]
    assert test["rmse"]["value"] < test["mean_predictor"]["rmse"]
    assert test["mean_predictor"]["train_mean"] == pytest.approx(cache.mmse[6:166].mean())
    assert "paired" in test["top_k"][0] and 0 <= test["top_k"][0]["paired"]["p_value"] <= 1
    assert (out / "figures" / "test_predicted_vs_true.png").stat().st_size > 1000
    assert "predicting the training mean" in result.output

    result = runner.invoke(app, ["evaluate", str(out)])
    assert result.exit_code == 0 and "reproduced exactly" in result.output, result.output


def test_an_exported_mmse_model_predicts_new_audio_as_the_export_scored_it(synth_cache_root, synth_root, tmp_path):
    """The synthetic corpus with its MMSE files (train scores, task2.csv beside task1.csv) through the tiny
    model: an MMSE study, its export, and `predict` on a test recording giving the score the export's test
    evaluation gave it, in the CSV's mmse column, with no label."""
    import csv

    from adsearch.corpus import import_adresso

    recordings = import_adresso(synth_root, synth_root / "task1.csv").recordings
    assert all(r.mmse is not None for r in recordings)  # task2.csv was found beside task1.csv
    cache = open_cache(next(p.parent for p in synth_cache_root.glob("*/cache.json")))
    assert np.isnan(cache.mmse).sum() == 0
    url = f"sqlite:///{tmp_path / 's.db'}"
    spec = parse_spec({"task": "mmse", "cv": {"folds": 3}, "screen": {"top": 2},
                       "space": {"layers": {"low": 1, "high": 2}, "pooling": ["mean"],
                                 "classifiers": {"ridge": {}, "svr": {}}}})
    create_or_resume(make_storage(url), "m", cache, spec, "s.yaml", 4)
    run_worker("m", url, worker_index=0)
    out = tmp_path / "best"
    result = runner.invoke(app, ["export", "--study", "m", "--storage", url, "-o", str(out),
                                 "--despite-nuisance-baseline"])  # 4 trials on a tiny corpus
    assert result.exit_code == 0, result.output
    expected = json.loads((out / "test.json").read_text())["predictions"][0]
    audio = next(r.path for r in recordings if r.id == expected["id"])
    result = runner.invoke(app, ["predict", str(out), str(audio), "--segments", str(cache.meta["manifest"]["path"]),
                                 "-o", str(tmp_path / "p.csv")])
    assert result.exit_code == 0, result.output
    assert "MMSE" in result.output and "->" not in result.output
    with (tmp_path / "p.csv").open() as handle:
        row = next(csv.DictReader(handle))
    assert row["label"] == row["prob_ad"] == "" and 0 <= float(row["mmse"]) <= 30
    assert float(row["mmse"]) == pytest.approx(expected["predicted"], abs=1e-3)


def test_the_screen_hands_its_ridge_penalty_to_the_first_mmse_trials(mmse_study):
    """A screened MMSE trial starts as the probe itself: ridge at the probe's best penalty, which scores close
    to the probe (the probe standardises with all train rows, the pipeline with each training fold's)."""
    from adsearch.search.study import load_screen

    study = mmse_study["study"]
    screened = load_screen(study)
    best = screened.top(1)[0]
    assert best["alpha"] > 0
    first = study.trials[0]
    assert first.user_attrs["origin"] == "screen" and first.params["ridge.alpha"] == pytest.approx(best["alpha"])
    assert first.value == pytest.approx(best["linear"], rel=0.1)


def test_an_mmse_study_over_two_sources_fuses_them_in_an_exported_ensemble(tmp_path):
    """Two sources over the same recordings, each carrying the score with its own direction and noise: a joint
    MMSE study, then a stacked ensemble exported over both (late fusion) and evaluated once on the test split."""
    from adsearch.embed.synthetic import planted_mmse
    from adsearch.results.ensemble import export_ensemble, load_ensemble

    labels = np.random.default_rng(0).permutation(np.arange(120) % 2)
    scores = planted_mmse(labels, 0)
    caches = {name: open_cache(write_realistic_cache(tmp_path / name, target="mmse", n_train=90, n_test=30,
                                                     n_layers=3, dim=24, strength=0.4, seed=seed, labels=labels,
                                                     mmse=scores))
              for name, seed in (("a", 1), ("b", 2))}
    url = f"sqlite:///{tmp_path / 's.db'}"
    spec = parse_spec({"task": "mmse", "space": {"pooling": ["mean"], "classifiers": {"ridge": {}, "pls": {}}}})
    create_or_resume(make_storage(url), "fused", caches, spec, "s.yaml", 12)
    run_worker("fused", url, worker_index=0)
    exported = export_ensemble("fused", url, tmp_path / "ens", "stack", top=8, log=lambda _: None)
    config, folder = load_ensemble(tmp_path / "ens")
    from adsearch.results.schema import load_config

    sources = {load_config(folder / member.folder).features.source for member in config.members}
    assert sources == {"a", "b"}
    test = exported.test
    assert test["n"] == 30 and test["comparison"]["method"] == "paired bootstrap over recordings"
    assert test["ensemble"]["rmse"]["value"] < test["ensemble"]["mean_predictor"]["rmse"]
    assert test["chance"]["rmse"] == test["ensemble"]["mean_predictor"]["rmse"] and test["chance"]["pearson_r"] == 0
    import html

    page = html.unescape((tmp_path / "ens" / "report.html").read_text())
    assert "source a, layer" in page and "source b, layer" in page and "training split's mean MMSE" in page


def test_the_layer_grid_sampler_tunes_on_the_lowest_rmse_layer(tmp_path):
    from adsearch.search.samplers import LayerGridSampler

    cache = open_cache(write_realistic_cache(tmp_path / "c", target="mmse", n_layers=4, dim=24, strength=0.4,
                                             signal_layer=2, n_test=0, seed=3))
    url = f"sqlite:///{tmp_path / 's.db'}"
    spec = parse_spec({"task": "mmse", "sampler": "layer-grid", "space": {"pooling": ["mean"]}})
    create_or_resume(make_storage(url), "grid", cache, spec, "s.yaml", 6)
    run_worker("grid", url, worker_index=0)
    study = optuna.load_study(study_name="grid", storage=url)
    grid = [t for t in study.trials if t.number < 4]
    lowest = min(grid, key=lambda t: t.value).params["layer"]
    assert LayerGridSampler(spec, (0, 1, 2, 3), 0)._best_grid(study)["layer"] == lowest
    assert all(t.params["layer"] == lowest for t in study.trials[4:])
