import datetime
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import optuna
import pytest
from conftest import MARIADB, POSTGRES, server_available
from optuna.trial import TrialState

from adsearch.embed import open_cache
from adsearch.embed.cache import seal
from adsearch.embed.synthetic import write_synthetic_cache
from adsearch.io.digest import file_digest
from adsearch.search import objective as objective_module
from adsearch.search.budget import TrialBudget
from adsearch.search.errors import StudyError
from adsearch.search.objective import FeatureSource, cross_validate
from adsearch.search.protocol import ProtocolError, assign_folds
from adsearch.search.samplers import make_sampler
from adsearch.search.space import TrialConfig, parse_spec
from adsearch.search.storage import make_storage
from adsearch.search.study import create_or_resume, trial_counts
from adsearch.search.worker import run_worker

SMALL = dict(n_train=40, n_test=10, n_layers=4, dim=16, windows_per_item=3, signal_layer=2, signal_dims=4)


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    return open_cache(write_synthetic_cache(tmp_path_factory.mktemp("cache") / "c", **SMALL))


def config(**overrides) -> TrialConfig:
    values = dict(layer=2, pooling="mean", unit="recording", scale="standard", pca="none", l2_normalize=False,
                  classifier="logreg", params={"C": 1.0})
    return TrialConfig(**{**values, **overrides})


def test_folds_keep_each_speaker_in_one_fold_and_stay_stratified():
    rng = np.random.default_rng(0)
    groups = np.repeat([f"s{i}" for i in range(30)], rng.integers(1, 4, 30))
    speaker_label = {g: i % 2 for i, g in enumerate(dict.fromkeys(groups))}
    labels = np.array([speaker_label[g] for g in groups])
    folds = assign_folds(labels, groups, folds=5, repeats=3, seed=1)
    assert folds.shape == (3, len(groups))
    for assignment in folds:
        for group in set(groups):
            assert len(set(assignment[groups == group])) == 1
        for fold in range(5):
            assert 0.25 < labels[assignment == fold].mean() < 0.75
    assert not np.array_equal(folds[0], folds[1])  # repeats differ
    with pytest.raises(ProtocolError, match="lower cv.folds"):
        assign_folds(labels[:6], groups[:6], folds=5, repeats=1, seed=0)


def test_cv_never_reads_test_items(tmp_path):
    clean = open_cache(write_synthetic_cache(tmp_path / "a", **SMALL))
    poisoned_dir = write_synthetic_cache(tmp_path / "b", **SMALL)
    test_windows = np.flatnonzero(clean.splits[clean.window_item] == "test")
    for path in (poisoned_dir / "stats").rglob("*.npy"):
        values = np.load(path)
        values[test_windows] = np.nan  # any test item reaching a fit would make it fail or change
        np.save(path, values)
    meta = json.loads((poisoned_dir / "cache.json").read_text())
    for item in meta["items"]:
        if item["split"] == "test":
            item["label"] = 1 - item["label"]
    meta["files"] = {name: file_digest(poisoned_dir / name) for name in meta["files"]}  # a consistent cache
    (poisoned_dir / "cache.json").write_text(json.dumps(seal(meta)))
    poisoned = open_cache(poisoned_dir)
    for unit in ("recording", "window"):
        source_a, source_b = FeatureSource(clean), FeatureSource(poisoned)
        folds = assign_folds(source_a.labels, source_a.groups, 5, 1, 0)
        a = cross_validate(config(unit=unit), source_a, folds, "roc_auc", 0)
        b = cross_validate(config(unit=unit), source_b, folds, "roc_auc", 0)
        assert a.fold_scores == b.fold_scores and len(a.fold_scores) == 5


@pytest.mark.parametrize("unit", ["recording", "window"])
def test_in_place_scaling_never_touches_the_cached_features(small_cache, unit):
    source = FeatureSource(small_cache)
    folds = assign_folds(source.labels, source.groups, 4, 1, 0)
    before = source.get(2, "mean", unit).copy()
    cross_validate(config(unit=unit, l2_normalize=True), source, folds, "accuracy", 0)
    np.testing.assert_array_equal(source.get(2, "mean", unit), before)


@pytest.mark.parametrize("unit", ["recording", "window"])
def test_memoised_statistics_assemble_every_pooling_exactly(small_cache, unit):
    from adsearch.embed.cache import POOLINGS

    source = FeatureSource(small_cache)
    train = source.train
    for pooling in POOLINGS:
        direct = (small_cache.recording_features(2, pooling, train) if unit == "recording"
                  else small_cache.window_features(2, pooling, train))
        np.testing.assert_array_equal(source.get(2, pooling, unit), direct)
    # six poolings, four statistics: each statistic is read and kept once
    assert sorted(source._memo) == [(2, s, unit) for s in ("max", "mean", "min", "std")]


@pytest.mark.parametrize("unit", ["recording", "window"])
def test_features_read_fold_by_fold_score_the_same_as_memoised_ones(small_cache, unit):
    folds = assign_folds(FeatureSource(small_cache).labels, FeatureSource(small_cache).groups, 4, 1, 0)
    memoised = FeatureSource(small_cache)
    per_fold = FeatureSource(small_cache, budget_bytes=0)  # nothing fits: every fold reads its rows
    cfg = config(unit=unit, pooling="mean+std")
    assert not per_fold._fits_memo(cfg.pooling, unit)
    first = cross_validate(cfg, memoised, folds, "roc_auc", 0)
    assert memoised._memo and cross_validate(cfg, per_fold, folds, "roc_auc", 0).fold_scores == first.fold_scores
    assert not per_fold._memo


def test_window_level_cv_keeps_all_windows_of_a_recording_on_one_side(small_cache, monkeypatch):
    source = FeatureSource(small_cache)
    folds = assign_folds(source.labels, source.groups, 4, 1, 0)
    real_fit = objective_module.fit_pipeline
    seen = []

    def spy(cfg, X, y, seed, **kwargs):
        seen.append({tuple(row) for row in X})
        return real_fit(cfg, X, y, seed, **kwargs)

    monkeypatch.setattr(objective_module, "fit_pipeline", spy)
    cross_validate(config(unit="window"), source, folds, "accuracy", 0)
    X = source.get(2, "mean", "window")
    for fold, train_rows in enumerate(seen):
        valid_items = np.flatnonzero(folds[0] == fold)
        valid_windows = {tuple(X[i]) for i in np.flatnonzero(np.isin(source.window_owner, valid_items))}
        assert train_rows and not (train_rows & valid_windows)


SCORE_SCRIPT = """
import json, sys
from adsearch.embed import open_cache
from adsearch.io.digest import file_digest
from adsearch.search.objective import FeatureSource, cross_validate
from adsearch.search.protocol import assign_folds
from adsearch.search.space import TrialConfig
source = FeatureSource(open_cache(sys.argv[1]))
folds = assign_folds(source.labels, source.groups, 5, 2, 7)
configs = json.loads(sys.argv[2])
print(json.dumps([cross_validate(TrialConfig(**c), source, folds, "roc_auc", 7).fold_scores for c in configs]))
"""


def test_same_parameters_give_identical_scores_in_two_processes(small_cache):
    configs = [
        config().model_dump(),
        config(classifier="rbf_svm", params={"C": 3.0, "gamma": 0.01}, pca="components", pca_components=6).model_dump(),
        config(classifier="random_forest", unit="window", pooling="mean+std",
               params={"n_estimators": 30, "max_depth": 4, "max_features": "sqrt", "min_samples_leaf": 2}).model_dump(),
        config(classifier="xgboost", params={"n_estimators": 20, "max_depth": 3, "learning_rate": 0.1,
                                             "subsample": 0.8, "colsample_bytree": 0.5}).model_dump(),
        config(classifier="catboost", params={"iterations": 20, "depth": 3, "learning_rate": 0.1,
                                              "l2_leaf_reg": 3.0}).model_dump(),
        config(classifier="mlp", l2_normalize=True,
               params={"hidden_units": 16, "alpha": 1e-3, "learning_rate_init": 1e-3}).model_dump(),
    ]
    runs = [subprocess.run([sys.executable, "-c", SCORE_SCRIPT, str(small_cache.path), json.dumps(configs)],
                           capture_output=True, text=True, check=True).stdout for _ in range(2)]
    first, second = (json.loads(r) for r in runs)
    assert first == second
    assert all(len(scores) == 10 for scores in first)


def test_signal_layer_scores_best(tmp_path):
    cache = open_cache(write_synthetic_cache(tmp_path / "c", **{**SMALL, "n_train": 120, "strength": 1.5}))
    source = FeatureSource(cache)
    folds = assign_folds(source.labels, source.groups, 5, 1, 0)
    scores = [cross_validate(config(layer=layer), source, folds, "roc_auc", 0).mean for layer in range(4)]
    assert int(np.argmax(scores)) == 2 and scores[2] > 0.85


def search_command(cache, storage, study, trials, workers, *extra):
    return [sys.executable, "-m", "adsearch.cli", "search", "--cache", str(cache), "--study", study,
            "--storage", storage, "--trials", str(trials), "--workers", str(workers), *map(str, extra)]


def write_space(tmp_path, text):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


FAST_SPACE = """
cv: {folds: 4}
pruner: none
space:
  pooling: [mean, mean+std]
  classifiers: {logreg: {}, lda: {}, knn: {}}
"""


# Trials of ~0.3 s: long enough that one worker cannot finish the budget before the others have started.
SHARED_SPACE = """
cv: {folds: 4, repeats: 2}
pruner: none
space:
  pooling: [mean, mean+std]
  classifiers:
    random_forest: {n_estimators: 30, max_depth: [3, 6], max_features: sqrt, min_samples_leaf: 1}
"""


@pytest.mark.slow
def test_three_workers_on_sqlite_finish_exactly_the_budget(small_cache, tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    space = write_space(tmp_path, SHARED_SPACE)
    done = subprocess.run(search_command(small_cache.path, storage, "exact", 25, 3, "--space", space),
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    study = optuna.load_study(study_name="exact", storage=storage)
    counts = trial_counts(study)
    assert counts["finished"] == 25 and counts["failed"] == 0 and counts["running"] == 0
    assert len(study.get_trials()) == 25
    assert len({t.user_attrs["worker"] for t in study.get_trials()}) >= 2
    assert "study exact: 25/25 finished" in done.stdout and "export it with" in done.stdout
    # the layer screen ran before the workers: printed, its heat map uploaded, its top cells the first trials
    enqueued = re.search(r"(\d+) enqueued as the first trials", done.stdout)
    assert "screening 4 layers x 2 poolings" in done.stdout and enqueued and 1 <= int(enqueued.group(1)) <= 10
    assert list((tmp_path / "adsearch-artifacts").rglob("*")), "no screen heat map artifact"
    screened = [t for t in study.get_trials() if t.user_attrs.get("origin") == "screen"]
    assert sorted(t.number for t in screened) == list(range(int(enqueued.group(1))))
    trial = study.best_trial
    attrs = trial.user_attrs
    assert attrs["cv_balanced_accuracy"] == pytest.approx(trial.value)
    assert {"cv_accuracy", "cv_roc_auc", "cv_f1", "cv_std", "fit_seconds", "worker"} <= set(attrs)
    assert sorted(trial.intermediate_values) == list(range(8))
    assert np.mean(list(trial.intermediate_values.values())) == pytest.approx(trial.value)
    # resuming with a larger budget runs only the difference
    more = subprocess.run(search_command(small_cache.path, storage, "exact", 30, 2, "--space", space),
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert more.returncode == 0, more.stderr
    assert trial_counts(optuna.load_study(study_name="exact", storage=storage))["finished"] == 30


def worker_pids(parent: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent:
                pids.append(int(entry))
    return pids


SLOW_SPACE = """
cv: {folds: 4}
pruner: none
space:
  pooling: [mean]
  classifiers:
    random_forest: {n_estimators: 150, max_depth: 6, max_features: sqrt, min_samples_leaf: 1}
"""


@pytest.mark.slow
def test_killed_worker_leaves_nothing_running_and_budget_is_met(small_cache, tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    space = write_space(tmp_path, SLOW_SPACE)
    command = search_command(small_cache.path, storage, "kill", 6, 2, "--space", space, "--heartbeat", 1,
                             "--grace", 3)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    victim_trial = None
    deadline = time.monotonic() + 120
    while victim_trial is None and time.monotonic() < deadline:
        time.sleep(0.05)
        try:
            study = optuna.load_study(study_name="kill", storage=storage)
        except KeyError:
            continue
        children = worker_pids(proc.pid)
        for trial in study.get_trials(states=(TrialState.RUNNING,)):
            worker = trial.user_attrs.get("worker", "")
            pid = int(worker.rsplit(":", 1)[1]) if worker else -1
            just_started = (datetime.datetime.now() - trial.datetime_start).total_seconds() < 0.3
            if pid in children and just_started:  # (a trial about to end might finish before the kill lands)
                os.kill(pid, signal.SIGKILL)
                victim_trial = trial.number
                break
    assert victim_trial is not None, "no running trial to kill"
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, out + err
    study = optuna.load_study(study_name="kill", storage=storage)
    trials = study.get_trials()
    states = [t.state for t in trials]
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states
    assert sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states) == 6
    assert trials[victim_trial].state == TrialState.FAIL
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == victim_trial]
    assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE
    # the retry re-runs exactly what the victim had chosen
    assert trials[victim_trial].params == retried[0].params


def test_budget_reservations_are_exact_under_contention(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    url = f"sqlite:///{tmp_path / 'b.db'}"
    make_storage(url)
    budget = TrialBudget(url, "s")
    budget.set(50, 0)
    with ThreadPoolExecutor(8) as pool:
        granted = sum(pool.map(lambda _: budget.reserve(), range(200)))
    assert granted == 50 and budget.get() == (50, 50)
    budget.release()
    assert budget.reserve() and not budget.reserve()
    assert budget.reconcile(50, 47) and budget.get() == (50, 47)
    assert not budget.reconcile(50, 10)  # someone changed it meanwhile: leave it


POP_WAITING = """
import sys
import optuna
from adsearch.search.storage import make_storage
study = optuna.load_study(study_name="queue", storage=make_storage(sys.argv[1]))
claimed = []
while (trial_id := study._pop_waiting_trial_id()) is not None:
    claimed.append(trial_id)
print(" ".join(map(str, claimed)))
"""


def test_a_waiting_trial_is_claimed_by_one_worker_only_on_sqlite(tmp_path):
    # Retried (stale) and enqueued trials wait in the queue; Optuna's claim is read-check-write, which
    # SQLite only makes atomic with BEGIN IMMEDIATE. Without it, 3 processes claimed 16-25 of 300 twice.
    url = f"sqlite:///{tmp_path / 'q.db'}"
    study = optuna.create_study(study_name="queue", storage=make_storage(url))
    for x in range(300):
        study.enqueue_trial({"x": x}, skip_if_exists=False)
    processes = [subprocess.Popen([sys.executable, "-c", POP_WAITING, url], stdout=subprocess.PIPE, text=True)
                 for _ in range(3)]
    claimed = [int(t) for p in processes for t in p.communicate(timeout=120)[0].split()]
    assert all(p.returncode == 0 for p in processes)
    assert len(claimed) == 300 and len(set(claimed)) == 300


def test_worker_refuses_another_cache_or_space_and_unknown_study(small_cache, tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    spec = parse_spec({"cv": {"folds": 4}})
    create_or_resume(make_storage(url), "mine", small_cache, spec, "space.yaml", 5)
    other = open_cache(write_synthetic_cache(tmp_path / "other", **{**SMALL, "seed": 9}))
    with pytest.raises(StudyError, match="was created with the cache .* Use that cache"):
        run_worker("mine", url, cache_path=str(other.path))
    with pytest.raises(StudyError, match="different search space"):
        create_or_resume(make_storage(url), "mine", small_cache, parse_spec({"cv": {"folds": 3}}), "x.yaml", 5)
    with pytest.raises(StudyError, match="no study 'nobody'"):
        run_worker("nobody", url)


def test_worker_fails_loudly_when_every_trial_fails(small_cache, tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 's.db'}"
    create_or_resume(make_storage(url), "broken", small_cache, parse_spec({"cv": {"folds": 4}}), "s.yaml", 20)

    def explode(*args, **kwargs):
        raise RuntimeError("classifier exploded")

    monkeypatch.setattr("adsearch.search.objective.cross_validate", explode)
    with pytest.raises(StudyError, match="5 trials failed in a row; last error: .*classifier exploded"):
        run_worker("broken", url)
    assert TrialBudget(url, "broken").get() == (20, 0)  # failed trials gave their slots back


def test_layer_grid_sampler_walks_layers_with_reference_settings_then_tunes(small_cache):
    spec = parse_spec({"space": {"pooling": ["mean", "max"], "classifiers": {"logreg": {}, "knn": {}}},
                       "layer_grid": {"pooling": "max", "classifier": "logreg", "params": {"C": 0.5}}})
    from adsearch.search.space import suggest

    sampler = make_sampler("layer-grid", spec, (0, 1, 2, 3), seed=0)
    study = optuna.create_study(sampler=sampler, direction="maximize")
    for number in range(10):
        trial = study.ask()
        cfg = suggest(trial, spec, (0, 1, 2, 3))
        if number < 4:
            assert (cfg.layer, cfg.pooling, cfg.classifier, cfg.params) == (number, "max", "logreg", {"C": 0.5})
            study.tell(trial, 1.0 if number == 2 else 0.5)
        else:
            assert (cfg.layer, cfg.pooling) == (2, "max")
            study.tell(trial, 0.6)


@pytest.mark.slow
@pytest.mark.parametrize("url", [POSTGRES, MARIADB], ids=["postgresql", "mariadb"])
def test_two_workers_on_a_database_server(small_cache, tmp_path, url):
    reason = server_available(url)
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the database server test: {reason}")
        pytest.skip(reason)
    name = f"srv-{uuid.uuid4().hex[:8]}"
    space = write_space(tmp_path, FAST_SPACE)
    try:
        done = subprocess.run(search_command(small_cache.path, url, name, 12, 2, "--space", space),
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert done.returncode == 0, done.stdout + done.stderr
        counts = trial_counts(optuna.load_study(study_name=name, storage=url))
        assert counts["finished"] == 12 and counts["failed"] == 0 and counts["running"] == 0, done.stderr
    finally:
        optuna.delete_study(study_name=name, storage=url)


def test_passwords_come_from_a_secret_file_and_are_never_shown(tmp_path, monkeypatch):
    from adsearch.search.storage import StorageError, mask_url, with_password

    (tmp_path / "secret").write_text("s3cr3t\n")
    monkeypatch.setenv("ADSEARCH_STORAGE_PASSWORD_FILE", str(tmp_path / "secret"))
    filled = with_password("postgresql+psycopg://adsearch@db:5432/adsearch")
    assert filled == "postgresql+psycopg://adsearch:s3cr3t@db:5432/adsearch"
    assert with_password("postgresql+psycopg://u:given@db/x").endswith("u:given@db/x")  # the URL's own wins
    assert "s3cr3t" not in mask_url(filled) and "***" in mask_url(filled)
    with pytest.raises(StorageError) as info:  # nothing listens on port 1
        make_storage("postgresql+psycopg://adsearch@127.0.0.1:1/adsearch")
    assert "s3cr3t" not in str(info.value) and "adsearch:***@127.0.0.1:1" in str(info.value)
    monkeypatch.setenv("ADSEARCH_STORAGE_PASSWORD_FILE", str(tmp_path / "missing"))
    with pytest.raises(StorageError, match="ADSEARCH_STORAGE_PASSWORD_FILE=.*cannot read it"):
        with_password("postgresql+psycopg://adsearch@db/adsearch")


@pytest.mark.filterwarnings("ignore::UserWarning")  # scikit-learn on single-class draws; compared all the same
def test_numpy_metrics_match_scikit_learn():
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

    from adsearch.search.objective import metrics

    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(2, 30))
        y = rng.integers(0, 2, n)
        score = rng.integers(0, 5, n) / 4 if trial % 2 else rng.random(n)  # with and without ties
        got = metrics(y, score, 0.5)
        predicted = (score > 0.5).astype(int)
        assert got["accuracy"] == pytest.approx(accuracy_score(y, predicted))
        with np.errstate(all="ignore"):
            assert got["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, predicted))
        assert got["f1"] == pytest.approx(f1_score(y, predicted, zero_division=0))
        if len(set(y)) == 2:
            assert got["roc_auc"] == pytest.approx(roc_auc_score(y, score))
        else:
            assert np.isnan(got["roc_auc"])


def test_knn_with_more_neighbours_than_a_fold_has_is_capped(small_cache):
    source = FeatureSource(small_cache)
    folds = assign_folds(source.labels, source.groups, 4, 1, 0)
    knn = config(classifier="knn", params={"n_neighbors": 500, "weights": "uniform", "metric": "euclidean"})
    result = cross_validate(knn, source, folds, "accuracy", 0)
    assert len(result.fold_scores) == 4


def _stored_trial(url: str, number: int) -> optuna.trial.FrozenTrial:
    """The trial as another process would read it: a fresh, write-through storage."""
    return optuna.load_study(study_name="w", storage=make_storage(url)).trials[number]


def test_coalesced_writes_wait_then_land_together_with_the_state_change(tmp_path):
    url = f"sqlite:///{tmp_path / 'w.db'}"
    study = optuna.create_study(study_name="w", storage=make_storage(url, coalesce_seconds=3600),
                                direction="maximize")
    trial = study.ask()
    x = trial.suggest_float("x", 0, 1)
    assert _stored_trial(url, 0).params == {"x": x}  # parameters go at once: a retry re-runs them
    trial.set_user_attr("worker", "w0")
    assert _stored_trial(url, 0).user_attrs == {}  # still waiting

    for step, value in enumerate([0.5, float("nan"), float("inf")]):
        trial.report(value, step)
    trial.set_user_attr("cv_std", 0.1)
    trial.set_user_attr("cv_std", 0.2)  # the last value wins
    assert _stored_trial(url, 0).intermediate_values == {}
    mine = study._storage.get_trial(trial._trial_id)  # this process reads what it wrote
    assert mine.intermediate_values[0] == 0.5 and mine.user_attrs["cv_std"] == 0.2
    trial.set_user_attr("cv_accuracy", 0.7)
    # the study-wide read Optuna's cache makes (its `_get_trials` hook) sends waiting writes first too
    assert study.get_trials(deepcopy=False)[0].user_attrs["cv_accuracy"] == 0.7
    trial.set_user_attr("cv_accuracy", 0.75)
    study._storage.set_trial_intermediate_value(trial._trial_id, 0, 0.55)  # a repeated step overwrites
    study.tell(trial, 0.6)

    stored = _stored_trial(url, 0)
    assert stored.state == TrialState.COMPLETE and stored.value == 0.6
    assert stored.user_attrs == {"worker": "w0", "cv_std": 0.2, "cv_accuracy": 0.75}
    assert stored.intermediate_values[0] == 0.55 and stored.intermediate_values[2] == float("inf")
    assert np.isnan(stored.intermediate_values[1])


def test_coalesced_writes_raise_where_optuna_raises(tmp_path):
    storage = make_storage(f"sqlite:///{tmp_path / 'w.db'}", coalesce_seconds=3600)
    study = optuna.create_study(study_name="w", storage=storage)
    trial = study.ask()
    with pytest.raises(TypeError):
        storage.set_trial_user_attr(trial._trial_id, "bad", object())  # not JSON: refused now, not later
    study.tell(trial, 1.0)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        storage.set_trial_user_attr(trial._trial_id, "late", 1)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        storage.set_trial_intermediate_value(trial._trial_id, 0, 1.0)
    with pytest.raises(KeyError):
        storage.set_trial_user_attr(trial._trial_id + 100, "missing", 1)
    with pytest.raises(ValueError):  # a parameter whose distribution contradicts the study's
        other = study.ask()
        other.suggest_float("x", 0, 1)
        storage.set_trial_param(other._trial_id, "x", 1.0, optuna.distributions.CategoricalDistribution(["a"]))


def test_a_trial_failed_by_another_worker_drops_its_waiting_writes_and_its_state_change_raises(tmp_path):
    url = f"sqlite:///{tmp_path / 'w.db'}"
    mine = make_storage(url, coalesce_seconds=3600)
    study = optuna.create_study(study_name="w", storage=mine)
    trial, other = study.ask(), study.ask()
    trial.report(0.5, 0)
    make_storage(url).set_trial_state_values(trial._trial_id, TrialState.FAIL)  # e.g. failed as stale
    assert study._storage.get_trial(other._trial_id).number == 1  # reads of other trials go on
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        mine.set_trial_state_values(trial._trial_id, TrialState.COMPLETE, [1.0])


def test_a_slow_trial_sends_its_writes_within_coalesce_seconds(tmp_path):
    url = f"sqlite:///{tmp_path / 'w.db'}"
    study = optuna.create_study(study_name="w", storage=make_storage(url, coalesce_seconds=2))
    trial = study.ask()
    trial.report(1.0, 0)
    trial.set_user_attr("a", 1)
    assert _stored_trial(url, 0).intermediate_values == {}  # waits (up to 2 s)
    deadline = time.monotonic() + 10
    while _stored_trial(url, 0).user_attrs != {"a": 1} and time.monotonic() < deadline:
        time.sleep(0.05)  # nothing else is called: the timer sends them
    stored = _stored_trial(url, 0)
    assert stored.intermediate_values == {0: 1.0} and stored.user_attrs == {"a": 1}


def test_the_storage_pickles_with_its_settings_and_waiting_writes(tmp_path):
    import pickle

    url = f"sqlite:///{tmp_path / 'w.db'}"
    storage = make_storage(url, coalesce_seconds=3600)
    study = optuna.create_study(study_name="w", storage=storage)
    trial = study.ask()
    trial.report(0.25, 0)
    copy = pickle.loads(pickle.dumps(storage))  # a study handed to a process pool
    assert copy.coalesce_seconds == 3600 and copy.url == storage.url
    assert copy.get_trial(trial._trial_id).intermediate_values == {0: 0.25}


def test_an_in_memory_sqlite_storage_works(tmp_path):
    study = optuna.create_study(storage=make_storage("sqlite:///:memory:"))
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    assert len(study.trials) == 3


def _write_transactions_of_a_worker(cache, url: str, coalesce_seconds: float) -> int:
    import sqlalchemy as sa

    spec = parse_spec({"cv": {"folds": 3}, "pruner": "none", "space": {"classifiers": {"logreg": {}}}})
    create_or_resume(make_storage(url), "s", cache, spec, "space.yaml", 8)
    writing, transactions = set(), []

    def on_statement(connection, _cursor, statement, *_args) -> None:
        if statement.lstrip().split()[0].upper() in ("INSERT", "UPDATE", "DELETE"):
            writing.add(id(connection))

    def on_commit(connection) -> None:
        if id(connection) in writing:
            writing.discard(id(connection))
            transactions.append(connection)

    sa.event.listen(sa.engine.Engine, "after_cursor_execute", on_statement)
    sa.event.listen(sa.engine.Engine, "commit", on_commit)
    try:
        run_worker("s", url, worker_index=0, coalesce_seconds=coalesce_seconds)
    finally:
        sa.event.remove(sa.engine.Engine, "after_cursor_execute", on_statement)
        sa.event.remove(sa.engine.Engine, "commit", on_commit)
    trials = optuna.load_study(study_name="s", storage=url).trials
    assert len(trials) == 8 and all(len(t.intermediate_values) == 3 and "cv_accuracy" in t.user_attrs
                                    and t.user_attrs["worker"] for t in trials)
    return len(transactions)


def test_a_worker_coalesces_its_writes_into_few_transactions(small_cache, tmp_path):
    one_by_one = _write_transactions_of_a_worker(small_cache, f"sqlite:///{tmp_path / 'a.db'}", 0)
    coalesced = _write_transactions_of_a_worker(small_cache, f"sqlite:///{tmp_path / 'b.db'}", 60)
    assert coalesced < one_by_one * 0.6, (coalesced, one_by_one)  # measured 81 vs 153 for 8 trials


def test_a_stale_trial_is_requeued_before_its_budget_slot_is_given_back(tmp_path, monkeypatch):
    """Released first, the slot could go to a worker that starts a fresh trial and leaves the retry WAITING
    once the budget is full; requeued first, whoever takes the slot runs the retry."""
    from adsearch.search.storage import StaleTrialHandler

    url = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(study_name="stale", storage=make_storage(url))
    budget = TrialBudget(url, "stale")
    budget.set(1, 1)
    stale = study.ask()
    stale.suggest_float("x", 0, 1)
    waiting_when_released = []
    real_release = TrialBudget.release

    def release(self):
        waiting_when_released.append(len(study.get_trials(states=(TrialState.WAITING,))))
        real_release(self)

    monkeypatch.setattr(TrialBudget, "release", release)
    study._storage.set_trial_state_values(stale._trial_id, TrialState.FAIL)
    StaleTrialHandler(url, max_retry=3)(study, study.trials[0])
    assert waiting_when_released == [1] and budget.get() == (1, 0)
    assert study.get_trials(states=(TrialState.WAITING,))[0].params == study.trials[0].params


def test_a_heartbeat_lost_to_an_outage_is_a_warning_not_a_dead_thread(tmp_path, monkeypatch, caplog):
    import sqlalchemy as sa
    from optuna.storages._heartbeat import HeartbeatThread

    storage = make_storage(f"sqlite:///{tmp_path / 'h.db'}", heartbeat_interval=1, grace_period=2)
    study = optuna.create_study(storage=storage)
    trial_id = study.ask()._trial_id
    calls = []

    def unreachable(self, trial_id):
        calls.append(trial_id)
        if len(calls) == 1:
            raise optuna.exceptions.StorageInternalError("commit failed") from sa.exc.OperationalError(
                "SELECT 1", {}, Exception("server closed the connection unexpectedly"))

    monkeypatch.setattr(optuna.storages.RDBStorage, "record_heartbeat", unreachable)
    thread = HeartbeatThread(trial_id, storage)
    thread.start()
    time.sleep(1.5)  # the first beat fails, the second one (1 s later) goes through
    thread.join()
    assert len(calls) == 2, "the heartbeat thread died on the failed beat"
    assert "heartbeat not recorded (" in caplog.text and "server closed the connection unexpectedly" in caplog.text


def test_every_completed_trial_keeps_out_of_fold_scores_equal_to_a_rerun(tmp_path):
    """Ensembles and calibration need each trial's out-of-fold predictions: stored compactly with the trial,
    equal bit for bit to a re-run of its configuration, and agreeing with its per-fold scores."""
    from adsearch.search.objective import OOF_ATTR, metrics, oof_predictions
    from adsearch.search.setup import StudySetup
    from adsearch.search.study import trial_config

    cache = open_cache(write_synthetic_cache(tmp_path / "c", n_train=40, n_test=0, n_layers=3, dim=8, signal_layer=1))
    url = f"sqlite:///{tmp_path / 's.db'}"
    spec = parse_spec({"cv": {"folds": 3, "repeats": 2}, "screen": {"enabled": False},
                       "space": {"unit": ["recording", "window"], "classifiers": {"logreg": {}, "rbf_svm": {}}}})
    create_or_resume(make_storage(url), "oof", cache, spec, "space.yaml", 8)
    run_worker("oof", url, worker_index=0)
    study = optuna.load_study(study_name="oof", storage=url)
    setup = StudySetup.from_study(study)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 8 and {t.params["unit"] for t in complete} == {"recording", "window"}
    source = FeatureSource(cache)
    for trial in complete:
        stored = oof_predictions(trial)
        assert stored.shape == (2, 40) and not np.isnan(stored).any()
        assert len(json.dumps(trial.system_attrs[OOF_ATTR])) < 600  # 80 float32 in base64, not a float list
        again = cross_validate(trial_config(setup, trial.params), source, setup.folds, "balanced_accuracy",
                               setup.spec.seed)
        np.testing.assert_array_equal(stored, again.oof)
        for repeat, assignment in enumerate(setup.folds):
            for fold in range(3):
                valid = assignment == fold
                score = metrics(source.labels[valid], stored[repeat, valid], 0.0)["balanced_accuracy"]
                assert score == pytest.approx(trial.intermediate_values[repeat * 3 + fold])


def test_calibration_inside_the_folds_is_a_search_choice(tmp_path):
    """space.calibration: a margin classifier calibrated in each training fold gives probabilities (its
    out-of-fold scores lie within +-0.5 of the 0.5 threshold); uncalibrated it gives margins."""
    from adsearch.search.objective import oof_predictions
    from adsearch.search.setup import StudySetup
    from adsearch.search.study import trial_config

    cache = open_cache(write_synthetic_cache(tmp_path / "c", n_train=48, n_test=0, n_layers=2, dim=8, signal_layer=1))
    url = f"sqlite:///{tmp_path / 's.db'}"
    spec = parse_spec({"cv": {"folds": 3}, "screen": {"enabled": False}, "sampler": "random",
                       "space": {"calibration": ["none", "sigmoid", "isotonic"],
                                 "classifiers": {"linear_svm": {"C": 10.0}}}})
    create_or_resume(make_storage(url), "cal", cache, spec, "space.yaml", 12)
    run_worker("cal", url, worker_index=0)
    study = optuna.load_study(study_name="cal", storage=url)
    setup = StudySetup.from_study(study)
    seen = set()
    for trial in study.trials:
        config = trial_config(setup, trial.params)
        seen.add(config.calibration)
        oof = oof_predictions(trial)
        if config.calibration == "none":
            assert np.abs(oof).max() > 0.5  # a margin of C=10: not a probability
        else:
            assert np.abs(oof).max() <= 0.5  # P(AD) - 0.5
    assert seen == {"none", "sigmoid", "isotonic"}
    default = parse_spec({})
    assert default.space.calibration == ["none"]  # not a parameter unless the space asks for it


def test_the_nested_ensemble_cv_equals_a_hand_written_nested_loop():
    """Selection and weights inside the folds: a hand-written loop on a small case gives the same numbers."""
    from adsearch.search.ensemble import caruana, nested_cv
    from adsearch.search.objective import metrics

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 15)
    scores = rng.normal(size=(6, 30)) + np.outer(rng.uniform(0, 1.5, 6), y - 0.5)  # members of mixed quality
    assignment = np.arange(30) % 3

    def score(truth, s):
        return metrics(truth, s, 0.0)["balanced_accuracy"]

    expected_ensemble, expected_single = [], []
    for fold in range(3):
        inner, outer = assignment != fold, assignment == fold
        order = sorted(range(6), key=lambda i: -score(y[inner], scores[i][inner]))[:4]  # stable: ties by index
        chosen, total, best, best_counts = [0] * 4, np.zeros(int(inner.sum())), -1.0, None
        for size in range(1, 11):
            gains = [score(y[inner], (total + scores[order[i]][inner]) / size) for i in range(4)]
            pick = gains.index(max(gains))
            chosen[pick] += 1
            total = total + scores[order[pick]][inner]
            if gains[pick] > best:
                best, best_counts = gains[pick], list(chosen)
        mix = sum(w * scores[order[i]][outer] for i, w in enumerate(best_counts)) / sum(best_counts)
        expected_ensemble.append(score(y[outer], mix))
        expected_single.append(score(y[outer], scores[order[0]][outer]))
    ensemble, single = nested_cv(scores, y, assignment, "balanced_accuracy", top=4, rounds=10)
    assert ensemble == pytest.approx(expected_ensemble) and single == pytest.approx(expected_single)
    assert caruana(scores, y, "balanced_accuracy", rounds=10).sum() >= 1


def test_nested_stacking_equals_a_hand_written_loop_and_mmse_stacking_clips():
    """Stacking: a logistic regression on the top candidates' scores, fitted on the other folds only."""
    from sklearn.linear_model import LogisticRegression

    from adsearch.search.ensemble import build, nested_cv
    from adsearch.search.objective import metrics

    rng = np.random.default_rng(1)
    y = np.repeat([0, 1], 15)
    scores = rng.normal(size=(5, 30)) + np.outer(rng.uniform(0, 1.5, 5), y - 0.5)
    assignment = np.arange(30) % 3

    def score(truth, s):
        return metrics(truth, s, 0.0)["balanced_accuracy"]

    expected = []
    for fold in range(3):
        inner, outer = assignment != fold, assignment == fold
        order = sorted(range(5), key=lambda i: -score(y[inner], scores[i][inner]))[:3]
        model = LogisticRegression(C=1.0, max_iter=2000, random_state=0).fit(scores[order][:, inner].T, y[inner])
        expected.append(score(y[outer], model.decision_function(scores[order][:, outer].T)))
    ensemble, _ = nested_cv(scores, y, assignment, "balanced_accuracy", top=3, method="stack")
    assert ensemble == pytest.approx(expected)
    mmse = rng.uniform(0, 30, 30)
    combination = build("stack", np.vstack([mmse + 40, mmse - 40]), mmse, "rmse")
    assert np.all(combination.apply(np.vstack([mmse + 40, mmse - 40]) * 3, regression=True) <= 30)


def test_the_ensemble_command_reports_a_nested_cv_beside_the_best_single_trial(tmp_path):
    from typer.testing import CliRunner

    from adsearch.cli import app

    cache = write_synthetic_cache(tmp_path / "c", n_train=60, n_test=0, n_layers=3, dim=16, signal_layer=1)
    url = f"sqlite:///{tmp_path / 's.db'}"
    spec = parse_spec({"cv": {"folds": 3}, "space": {"classifiers": {"logreg": {}, "knn": {}, "lda": {}}}})
    create_or_resume(make_storage(url), "ens", open_cache(cache), spec, "space.yaml", 12)
    run_worker("ens", url, worker_index=0)
    result = CliRunner().invoke(app, ["ensemble", "--study", "ens", "--storage", url, "--top", "6"])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert re.search(r"nested CV balanced_accuracy on 3 folds: ensemble 0\.\d{4} \+/- 0\.\d{4}; best single trial "
                     r"chosen the same way 0\.\d{4}", said), said
    assert re.search(r"caruana ensemble of the best 6 trials, built on all train recordings: trial \d+ x[\d.]+", said)
    missing = CliRunner().invoke(app, ["ensemble", "--study", "nope", "--storage", url])
    assert missing.exit_code == 2 and "ens" in missing.output


@pytest.mark.parametrize("task", ["classification", "mmse"])
def test_one_two_and_three_named_sources_search_like_an_unnamed_one(task, tmp_path):
    """`--cache NAME=PATH` once is a study over one source (no `source` parameter, every trial completes,
    as without the name); twice or three times, `source` is searched. Classification and MMSE alike."""
    import optuna
    from typer.testing import CliRunner

    from adsearch.cli import app
    from adsearch.embed.synthetic import planted_mmse, write_realistic_cache

    labels = np.random.default_rng(0).permutation(np.arange(60) % 2)
    scores = planted_mmse(labels, 0)
    paths = [write_realistic_cache(tmp_path / name, target="label" if task == "classification" else "mmse",
                                   n_train=48, n_test=12, n_layers=2, dim=12, strength=0.4, seed=seed,
                                   labels=labels, mmse=scores)
             for seed, name in enumerate(("a", "b", "c"))]
    space = tmp_path / "space.yaml"
    models = "{logreg: {}, knn: {}}" if task == "classification" else "{ridge: {}, knn_regressor: {}}"
    space.write_text(f"task: {task}\ncv: {{folds: 3}}\nscreen: {{top: 2}}\n"
                     f"space: {{pooling: [mean, max], classifiers: {models}}}\n")
    url = f"sqlite:///{tmp_path / 's.db'}"
    for n in (1, 2, 3):
        caches = [option for name, path in zip("abc"[:n], paths, strict=False)
                  for option in ("--cache", f"{name}={path}")]
        result = CliRunner().invoke(app, ["search", *caches, "--space", str(space), "--study", f"s{n}",
                                          "--storage", url, "--trials", "4"])
        assert result.exit_code == 0, result.output
        study = optuna.load_study(study_name=f"s{n}", storage=url)
        states = [t.state for t in study.trials]
        assert states == [optuna.trial.TrialState.COMPLETE] * 4, [t.user_attrs.get("error") for t in study.trials]
        sources = {t.params.get("source") for t in study.trials}
        assert sources == {None} if n == 1 else sources <= set("abc"[:n])
