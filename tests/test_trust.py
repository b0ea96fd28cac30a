"""A search you can trust: pruning never discards a finished evaluation, the optimiser is the study's."""

import optuna
import pytest
from optuna.trial import TrialState

from adsearch.embed import open_cache
from adsearch.embed.synthetic import write_synthetic_cache
from adsearch.search.errors import StudyError
from adsearch.search.samplers import make_sampler
from adsearch.search.space import parse_spec
from adsearch.search.storage import make_storage
from adsearch.search.study import StudySetup, create_or_resume
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
    create_or_resume(make_storage(url), "s", small_cache, parse_spec({"cv": {"folds": 4}}), "s.yaml", 3)
    run_worker("s", url, worker_index=0, pruner="wilcoxon")  # nothing pruned in 3 trials
    study = optuna.load_study(study_name="s", storage=url)
    assert fold_fits(study, StudySetup.from_study(study)) == {"run": 12, "saved": 0}
    create_or_resume(make_storage(url), "p", small_cache, parse_spec({"cv": {"folds": 4}}), "s.yaml", 3)
    monkeypatch.setattr("adsearch.search.worker.make_pruner", lambda name: AlwaysPrune())
    run_worker("p", url, worker_index=0)
    study = optuna.load_study(study_name="p", storage=url)
    assert fold_fits(study, StudySetup.from_study(study)) == {"run": 3, "saved": 9}
