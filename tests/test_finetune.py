"""Fine-tuning with cross-fitting, on the CPU with the tiny random wav2vec2 and the synthetic corpus."""

import json

import numpy as np
import pytest

from adsearch.corpus import read_manifest, write_manifest
from adsearch.embed import open_cache
from adsearch.finetune.crossfit import extract_crossfit, finetune
from adsearch.finetune.settings import FinetuneError, FinetuneSettings
from adsearch.finetune.train import train_one

FAST = dict(epochs=1, batch_size=4, accumulate=1, window_s=4.0, patience=5, seed=0)


@pytest.fixture(scope="module")
def crossfitted(synth_manifest, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft")
    record = finetune(synth_manifest, str(tiny_model), out / "models", FinetuneSettings(**FAST), folds=3,
                      device="cpu")
    cache_dir = extract_crossfit(synth_manifest, out / "models", out / "cache", device="cpu")
    return {"record": record, "cache": open_cache(cache_dir), "out": out}


@pytest.mark.slow
def test_a_few_steps_lower_the_training_loss(synth_manifest, tiny_model, tmp_path):
    train = [r for r in read_manifest(synth_manifest) if r.split == "train"]
    settings = FinetuneSettings(epochs=4, batch_size=4, accumulate=1, window_s=4.0, encoder_lr=1e-4, head_lr=1e-2,
                                patience=10, warmup=0.0)
    record = train_one(tiny_model, train, tmp_path / "m", settings, "cpu")
    per_epoch = [float(np.mean(part)) for part in np.array_split(record["losses"], 4)]
    assert per_epoch[-1] < 0.85 * per_epoch[0] and per_epoch == sorted(per_epoch, reverse=True), per_epoch
    assert (tmp_path / "m" / "best" / "config.json").is_file()  # save_pretrained: extract and predict load it


@pytest.mark.slow
def test_no_fold_is_extracted_by_a_model_that_trained_on_it(crossfitted, tiny_model):
    from adsearch.embed.model import resolve_model

    cache, record = crossfitted["cache"], crossfitted["record"]
    crossfit = cache.meta["crossfit"]
    assert crossfit["enabled"] and set(crossfit["models"]) == {"fold-0", "fold-1", "fold-2", "full"}
    fold_of = dict(zip(crossfit["folds"]["train_ids"], crossfit["folds"]["assignment"][0], strict=True))
    for item in cache.meta["items"]:
        producer = item["producer"]
        trained_on = set(json.loads((crossfitted["out"] / "models" / producer / "done.json").read_text())
                         ["trained_on"])
        assert item["id"] not in trained_on, (item["id"], producer)
        if item["split"] == "train":
            assert producer == f"fold-{fold_of[item['id']]}"
            # the model that trained on the other folds saw every other train recording, not this fold's
            assert trained_on == {i for i, f in fold_of.items() if f != fold_of[item["id"]]}
        else:
            assert producer == "full" and trained_on == set(fold_of)
    for model in crossfit["models"].values():  # the recorded revision is the checkpoint's own content hash
        assert model["revision"] == resolve_model(model["path"]).revision
        assert model["revision"] != resolve_model(str(tiny_model)).revision  # fine-tuning changed the weights
    assert cache.meta["model"]["revision"] == crossfit["models"]["full"]["revision"]
    assert record["models"]["full"]["trained_on"] == crossfit["folds"]["train_ids"]


def test_merged_features_are_each_producers_own(crossfitted, synth_manifest, tmp_path):
    from adsearch.embed.extract import extract

    cache = crossfitted["cache"]
    item = next(i for i, it in enumerate(cache.meta["items"]) if it["producer"] == "fold-1")
    rec = next(r for r in read_manifest(synth_manifest) if r.id == cache.ids[item])
    alone = open_cache(extract(write_manifest([rec], tmp_path / "one.csv"), tmp_path / "c",
                               cache.meta["crossfit"]["models"]["fold-1"]["path"], device="cpu").cache_dir)
    for layer in (0, cache.n_layers - 1):
        np.testing.assert_array_equal(cache.recording_features(layer, "mean+std", np.array([item])),
                                      alone.recording_features(layer, "mean+std", np.array([0])))


def test_a_study_on_a_crossfitted_cache_uses_its_folds_and_refuses_others(crossfitted, tmp_path):
    from adsearch.search.errors import StudyError
    from adsearch.search.space import parse_spec
    from adsearch.search.storage import make_storage
    from adsearch.search.study import StudySetup, create_or_resume

    cache = crossfitted["cache"]
    url = f"sqlite:///{tmp_path / 's.db'}"
    for cv in ({"folds": 5}, {"folds": 3, "repeats": 2}):
        with pytest.raises(StudyError, match="fine-tuned with cross-fitting on 3 folds.*set cv.folds: 3"):
            create_or_resume(make_storage(url), "s", cache, parse_spec({"cv": cv}), "s.yaml", 2)
    study = create_or_resume(make_storage(url), "s", cache, parse_spec({"cv": {"folds": 3}}), "s.yaml", 2)
    setup = StudySetup.from_study(study)
    fold_of = dict(zip(*[cache.meta["crossfit"]["folds"][k] for k in ("train_ids",)],
                       cache.meta["crossfit"]["folds"]["assignment"][0], strict=True))
    assert setup.folds.tolist() == [[fold_of[i] for i in setup.train_ids]]


def test_a_killed_finetune_resumes_from_its_last_epoch_and_skips_finished_folds(synth_manifest, tiny_model,
                                                                                tmp_path, monkeypatch):
    import adsearch.finetune.train as ft

    train = [r for r in read_manifest(synth_manifest) if r.split == "train"]
    settings = FinetuneSettings(**{**FAST, "epochs": 3})

    def killed(epoch):
        if epoch == 1:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        train_one(tiny_model, train, tmp_path / "m", settings, "cpu", on_epoch=killed)
    assert (tmp_path / "m" / "checkpoint.pt").is_file() and not (tmp_path / "m" / "done.json").exists()
    started = []
    real = ft.FinetuneProgress.epoch
    monkeypatch.setattr(ft.FinetuneProgress, "epoch", lambda self, name, epoch, *a: started.append(epoch))
    record = train_one(tiny_model, train, tmp_path / "m", settings, "cpu")
    assert started == [2] and record["epochs_run"] == 3  # epochs 0 and 1 were not run again
    assert record["passes"]["micro_batch"] == 4  # recorded at the start, kept through the resume
    assert not (tmp_path / "m" / "checkpoint.pt").exists()
    monkeypatch.setattr(ft.FinetuneProgress, "epoch", real)
    built = []
    monkeypatch.setattr(ft, "build", lambda *a: built.append(a))
    assert train_one(tiny_model, train, tmp_path / "m", settings, "cpu") == record and not built


def test_passes_fit_the_memory_without_checkpointing_when_they_can():
    from adsearch.finetune.passes import choose_passes

    gb = 2**30
    # a pass of n windows needs 2 + n GB without checkpointing, 2 + n/4 GB with; out of memory above 9 GB
    def needs(size, recompute):
        need = (2 + size / (4 if recompute else 1)) * gb
        return None if need > 9 * gb else need

    tried = []
    logged = lambda size, recompute: tried.append((size, recompute)) or needs(size, recompute)  # noqa: E731
    assert choose_passes([1, 2, 4, 8], "auto", logged, 8 * gb) == (4, False, 6 * gb)
    assert tried == [(8, False), (4, False)]  # checkpointing would not halve the passes: not tried
    tried.clear()
    # 1 window per pass without checkpointing, 4 with: four times the passes; checkpointing pays
    assert choose_passes([1, 2, 4, 8], "auto", logged, 3.5 * gb) == (4, True, 3 * gb)
    assert tried == [(8, False), (4, False), (2, False), (1, False), (8, True), (4, True)]
    assert choose_passes([1, 2, 4, 8], "on", needs, 20 * gb) == (8, True, 4 * gb)
    assert choose_passes([1, 2, 4, 8], "off", needs, 3.5 * gb) == (1, False, 3 * gb)
    assert choose_passes([4], "auto", needs, 20 * gb) == (4, False, 6 * gb)
    with pytest.raises(FinetuneError, match=r"pass of 1 window.*2.0 GB usable; without checkpointing: 3.0 GB; "
                                            r"with checkpointing: 2.2 GB.*--window-s"):
        choose_passes([1, 2, 4, 8], "auto", needs, 2.0 * gb)


def test_the_passes_change_memory_not_the_optimisation(synth_manifest, tiny_model, tmp_path):
    """One step of 4 windows in 1, 2 or 4 passes gives the same model (dropout and SpecAugment off, so
    only the split differs), and each records how its passes were chosen."""
    import shutil

    import torch

    quiet = tmp_path / "quiet-model"
    shutil.copytree(tiny_model, quiet)
    config = json.loads((quiet / "config.json").read_text())
    for key in ("hidden_dropout", "attention_dropout", "activation_dropout", "feat_proj_dropout", "layerdrop"):
        config[key] = 0.0
    config["apply_spec_augment"] = False
    (quiet / "config.json").write_text(json.dumps(config))
    train = [r for r in read_manifest(synth_manifest) if r.split == "train"][:10]
    weights, losses = {}, {}
    for micro in (4, 2, 1):
        settings = FinetuneSettings(**{**FAST, "micro_batch": micro, "encoder_lr": 1e-3})
        record = train_one(quiet, train, tmp_path / f"m{micro}", settings, "cpu")
        assert record["passes"] == {"micro_batch": micro, "checkpointing": False, "free_gb": None,
                                    "peak_gb": None, "chosen": "given (CPU: memory is not measured)"}
        assert set(record["seconds_by_part_this_run"]) == {"setup", "training", "validation", "saving"}
        losses[micro] = record["losses"]
        from safetensors.torch import load_file
        weights[micro] = load_file(tmp_path / f"m{micro}" / "best" / "model.safetensors")
    for micro in (2, 1):  # each step's class-balanced loss over its 4 windows, however many passes
        np.testing.assert_allclose(losses[micro], losses[4], rtol=1e-4)
        for key, value in weights[4].items():
            if key.endswith("k_proj.bias"):  # its gradient is zero up to rounding (softmax ignores a key bias),
                continue  # and AdamW scales rounding noise up to full steps
            torch.testing.assert_close(weights[micro][key], value, rtol=1e-3, atol=1e-4,  # a step: ~1e-3
                                       msg=lambda m, key=key: f"{key}: {m}")
    changed = [k for k, v in weights[4].items() if not torch.equal(v, load_file(tiny_model / "model.safetensors")[k])]
    assert changed  # trained: the comparison is not between untouched weights


def test_a_checkpoint_that_cannot_be_written_stops_the_finetune_with_its_reason(synth_manifest, tiny_model,
                                                                                  tmp_path, monkeypatch):
    """Checkpoints are written by a thread while the next epoch trains; its failure is not lost there."""
    import torch

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    train = [r for r in read_manifest(synth_manifest) if r.split == "train"]
    with pytest.raises(FinetuneError, match=r"writing the checkpoint .*checkpoint.pt failed: .*No space left"):
        train_one(tiny_model, train, tmp_path / "m", FinetuneSettings(**{**FAST, "epochs": 2}), "cpu")
    assert not (tmp_path / "m" / "done.json").exists() and not (tmp_path / "m" / "checkpoint.pt").exists()


def test_bad_settings_and_a_changed_rerun_are_refused(synth_manifest, tiny_model, tmp_path):
    with pytest.raises(FinetuneError, match="--epochs"):
        FinetuneSettings(epochs=0)
    with pytest.raises(FinetuneError, match="learning rates"):
        FinetuneSettings(encoder_lr=2.0)
    with pytest.raises(FinetuneError, match=r"--micro-batch 9: between 1 and --batch-size x --accumulate \(8\)"):
        FinetuneSettings(batch_size=4, accumulate=2, micro_batch=9)
    with pytest.raises(FinetuneError, match="--checkpointing 'always': choose auto, on, off"):
        FinetuneSettings(checkpointing="always")
    finetune(synth_manifest, str(tiny_model), tmp_path, FinetuneSettings(**FAST), folds=2, crossfit=False,
             device="cpu")
    with pytest.raises(FinetuneError, match="other settings, folds or model"):
        finetune(synth_manifest, str(tiny_model), tmp_path, FinetuneSettings(**{**FAST, "epochs": 2}), folds=2,
                 crossfit=False, device="cpu")


# ----------------------------------------------------------------------------------------------------------
# eGeMAPS as a feature source


@pytest.mark.parametrize("features, dim", [("egemaps", 25), ("egemaps-functionals", 88)])
def test_egemaps_caches_have_the_cache_format_and_predict(synth_manifest, tmp_path, features, dim):
    from adsearch.embed.extract import extract
    from adsearch.results.export import export_trial
    from adsearch.results.predict import Predictor
    from adsearch.search.space import parse_spec
    from adsearch.search.storage import make_storage
    from adsearch.search.study import create_or_resume
    from adsearch.search.worker import run_worker

    result = extract(synth_manifest, tmp_path / "cache", "ignored", features=features)
    cache = open_cache(result.cache_dir)
    assert (cache.n_layers, cache.dim) == (1, dim) and cache.meta["model"]["name"] == f"opensmile/{features}"
    assert "torch" not in cache.meta["versions"]
    assert "eGeMAPSv02" in cache.meta["layers"]["meaning"]["0"]  # not a transformer's input
    X = cache.recording_features(0, "mean+std")
    assert X.shape == (len(cache.ids), 2 * dim) and np.isfinite(X).all() and X[:, :dim].std(axis=0).max() > 0
    if features == "egemaps":  # LLDs: many 10 ms frames per window
        assert cache.window_frames.min() > 50
    else:  # functionals: one "frame" per window
        assert (cache.window_frames == 1).all()
    url = f"sqlite:///{tmp_path / 's.db'}"
    create_or_resume(make_storage(url), "e", cache, parse_spec({"cv": {"folds": 3}, "space": {
        "classifiers": {"logreg": {}}}}), "s.yaml", 3)
    run_worker("e", url, worker_index=0)
    export_trial("e", url, tmp_path / "best", artifacts=tmp_path / "a", log=lambda m: None,
                 despite_nuisance_baseline=True)  # a few trials on a tiny corpus: the gate is tested in test_hard
    recording = next(r for r in read_manifest(synth_manifest) if r.split == "test")
    predicted = Predictor(tmp_path / "best").predict(recording.path, recording.segments)
    stored = json.loads((tmp_path / "best" / "test.json").read_text())["predictions"]
    expected = next(p["score"] for p in stored if p["id"] == recording.id)
    assert predicted.error is None and predicted.prob_ad == pytest.approx(expected, rel=1e-5, abs=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Feature sources side by side


@pytest.mark.slow
def test_a_study_over_pretrained_finetuned_and_egemaps_sources_exports_each(crossfitted, synth_manifest,
                                                                           synth_cache_root, tmp_path):
    import optuna
    from optuna.trial import TrialState

    from adsearch.embed.extract import extract
    from adsearch.results.export import export_trial, reproduce_cv
    from adsearch.results.predict import Predictor
    from adsearch.results.schema import load_config
    from adsearch.search.null import create_null_studies
    from adsearch.search.space import parse_spec
    from adsearch.search.storage import make_storage
    from adsearch.search.study import StudySetup, create_or_resume, load_screen, name_sources
    from adsearch.search.worker import run_worker

    pretrained = open_cache(synth_cache_root)  # default settings, extracted once per session
    egemaps = open_cache(extract(synth_manifest, tmp_path / "ege", "", features="egemaps").cache_dir)
    sources = name_sources([(None, pretrained), (None, crossfitted["cache"]), (None, egemaps)])
    assert list(sources) == ["tiny", "finetuned", "egemaps"]
    url = f"sqlite:///{tmp_path / 's.db'}"
    spec = parse_spec({"cv": {"folds": 3}, "space": {"pooling": ["mean", "mean+std"],
                                                     "classifiers": {"logreg": {}}}})
    with pytest.raises(Exception, match="set cv.folds: 3"):  # the fine-tuned source imposes its folds
        create_or_resume(make_storage(url), "x", sources, parse_spec({"cv": {"folds": 4}}), "s.yaml", 2)
    study = create_or_resume(make_storage(url), "s", sources, spec, "s.yaml", 24)
    setup = StudySetup.from_study(study)
    assert set(setup.sources) == set(sources) and setup.source_layers["egemaps"] == (0,)
    fold_of = dict(zip(crossfitted["cache"].meta["crossfit"]["folds"]["train_ids"],
                       crossfitted["cache"].meta["crossfit"]["folds"]["assignment"][0], strict=True))
    assert setup.folds.tolist() == [[fold_of[i] for i in setup.train_ids]]
    screened = load_screen(study)  # every source's layers screened and ranked together
    assert set(screened.sources) == set(sources) and len(screened.layers) == sum(map(len, setup.source_layers.values()))
    run_worker("s", url, worker_index=0)
    everything = sorted(optuna.load_study(study_name="s", storage=url).get_trials(), key=lambda t: t.number)
    first = [t for t in everything if t.user_attrs.get("origin") == "screen"]
    assert [t.number for t in first] == list(range(len(screened.enqueued)))  # the portfolio, inside the budget
    assert first[0].params["source"] == screened.top(1)[0]["source"]
    trials = [t for t in everything if t.value is not None]
    assert {t.params["source"] for t in trials} == set(sources)
    assert all(("layer." + t.params["source"] in t.params) == (t.params["source"] != "egemaps") for t in trials)
    test_rec = next(r for r in read_manifest(synth_manifest) if r.split == "test")
    for source, cache in sources.items():
        best = max((t for t in trials if t.params["source"] == source), key=lambda t: t.value)
        out = tmp_path / f"best-{source}"
        export_trial("s", url, out, trial_number=best.number, artifacts=tmp_path / "a", log=lambda m: None)
        config = load_config(out)
        assert config.features.source == source and config.cache.content_hash == cache.content_hash
        assert config.model.revision == cache.meta["model"]["revision"]
        assert reproduce_cv(config, cache) == pytest.approx(config.cv.fold_scores)  # evaluate
        stored = json.loads((out / "test.json").read_text())["predictions"]
        predicted = Predictor(out).predict(test_rec.path, test_rec.segments)
        expected = next(p["score"] for p in stored if p["id"] == test_rec.id)
        assert predicted.error is None and predicted.prob_ad == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert "layer_curve.png" in {p.name for p in (tmp_path / "best-egemaps" / "figures").iterdir()}
    # the noise floor of a multi-source study: null studies over the same sources
    [null] = create_null_studies(make_storage(url), "s", runs=1, budget=3)
    run_worker(null, url, worker_index=0)
    assert len(optuna.load_study(study_name=null, storage=url).get_trials(states=(TrialState.COMPLETE,))) == 3


@pytest.mark.slow
def test_the_finetune_command_without_crossfit_marks_everything_cv_optimistic(synth_manifest, tiny_model, tmp_path):
    from typer.testing import CliRunner

    from adsearch.cli import app
    from adsearch.results.export import export_trial
    from adsearch.search.space import parse_spec
    from adsearch.search.storage import make_storage
    from adsearch.search.study import create_or_resume
    from adsearch.search.worker import run_worker

    result = CliRunner().invoke(app, ["finetune", str(synth_manifest), "--model", str(tiny_model), "-o",
                                      str(tmp_path / "ft"), "--no-crossfit", "--epochs", "1", "--window-s", "4",
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "full: 1 epoch(s)" in result.output and "CV optimistic" in result.output
    assert "4 window(s) per pass, checkpointing off (given (CPU" in " ".join(result.output.split())
    assert "full model extracting 16/16 recordings" in result.output  # each model's bar says which it is
    cache = open_cache(tmp_path / "ft" / "cache")
    assert cache.meta["crossfit"]["enabled"] is False and {i["producer"] for i in cache.meta["items"]} == {"full"}
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = create_or_resume(make_storage(url), "naive", cache, parse_spec({"cv": {"folds": 3}}), "s.yaml", 2)
    from optuna_dashboard._note import get_note_from_system_attrs

    note = get_note_from_system_attrs(study._storage.get_study_system_attrs(study._study_id), None)["body"]
    assert "**CV optimistic**" in note
    run_worker("naive", url, worker_index=0)
    export_trial("naive", url, tmp_path / "best", artifacts=tmp_path / "a", log=lambda m: None,
                 despite_nuisance_baseline=True)
    assert "CV optimistic" in (tmp_path / "best" / "report.html").read_text()
    again = CliRunner().invoke(app, ["finetune", str(synth_manifest), "--model", str(tiny_model), "-o",
                                     str(tmp_path / "ft"), "--epochs", "0"])
    assert again.exit_code == 2 and "--epochs" in again.output
