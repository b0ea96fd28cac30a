"""Export, evaluate, predict: a real (tiny-model) cache of the synthetic corpus, a short study, then the end."""

import json
import re
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
import yaml
from typer.testing import CliRunner

from adsearch.cli import app
from adsearch.embed import open_cache
from adsearch.embed.cache import seal
from adsearch.embed.extract import ExtractSettings, extract
from adsearch.io.outputs import OutputError
from adsearch.results.export import export_trial
from adsearch.results.model_files import load_model
from adsearch.results.schema import ExportError, load_config
from adsearch.results.statistics import mcnemar_exact, wilson
from adsearch.search.space import parse_spec
from adsearch.search.storage import make_storage
from adsearch.search.study import create_or_resume
from adsearch.search.worker import run_worker

runner = CliRunner()
SPACE = {"cv": {"folds": 3}, "pruner": "none", "seed": 3,
         "space": {"layers": {"low": 1, "high": 3}, "pooling": ["mean", "mean+std"], "unit": ["recording", "window"],
                   "classifiers": {"logreg": {}, "knn": {}}}}


@pytest.fixture(scope="module")
def study_env(synth_manifest, tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    cache = open_cache(extract(synth_manifest, root / "cache", str(tiny_model), ExtractSettings(window_s=5)).cache_dir)
    url = f"sqlite:///{root / 'study.db'}"
    study = create_or_resume(make_storage(url), "s", cache, parse_spec(SPACE), "space.yaml", 10)
    run_worker("s", url, worker_index=0)
    return {"root": root, "cache": cache, "url": url, "study": study, "manifest": synth_manifest}


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def exported(study_env):
    out = study_env["root"] / "best"
    # 10 trials on the small synthetic corpus tie its nuisance-only baseline: exported by name (the gate's own
    # tests are in tests/test_hard.py)
    result = export_trial("s", study_env["url"], out, top_k=2, artifacts=study_env["root"] / "artifacts",
                          log=lambda _: None, despite_nuisance_baseline=True)
    return out, result


def test_export_writes_config_model_test_evaluation_and_report(exported, study_env):
    out, result = exported
    study = optuna.load_study(study_name="s", storage=study_env["url"])
    config = load_config(out / "config.yaml")
    chosen = study.trials[config.study.trial]  # the best of the 5 best by fresh folds (tests/test_hard.py)
    assert config.cv.selection["by"] == "fresh folds" and config.cv.selection["chosen"] == chosen.number
    assert config.cv.selection["study_best"] == study.best_trial.number
    assert config.cv.mean == chosen.value
    assert config.cv.fold_scores == [chosen.intermediate_values[i] for i in range(3)]
    assert config.model.revision == study_env["cache"].meta["model"]["revision"]
    assert config.cache.content_hash == study_env["cache"].content_hash
    assert {"numpy", "scikit-learn", "optuna"} <= set(config.versions)
    test = json.loads((out / "test.json").read_text())
    assert test["n"] == 4 and len(test["predictions"]) == 4
    for name in ("accuracy", "balanced_accuracy", "f1", "roc_auc"):
        low, high = test[name]["ci95"]
        assert low <= test[name]["value"] <= high
    assert sum(map(sum, test["confusion"]["matrix"])) == 4
    (tn, fp), (fn, tp) = test["confusion"]["matrix"]
    share = (fn + tp) / 4  # every test figure beside what a constant prediction scores
    assert test["chance"]["accuracy"] == max(share, 1 - share) and test["chance"]["f1"] == 2 * share / (1 + share)
    assert test["chance"]["balanced_accuracy"] == test["chance"]["roc_auc"] == 0.5
    assert test["cv_minus_test"] == pytest.approx(config.cv.mean - test["balanced_accuracy"]["value"])
    assert config.cv.fresh.optimism == pytest.approx(config.cv.mean - config.cv.fresh.mean)  # read the same way
    assert test["labelled"] == test["n"] and test["unreadable"] == []
    assert len(result.top_k) == 2 and all(0 <= r["mcnemar"]["p_value"] <= 1 for r in result.top_k)
    html = (out / "report.html").read_text()
    assert "`" not in html and "<code>adsearch null" in html  # commands set as code, not literal backticks
    assert "<td>interval</td><td>chance</td>" in html and "Chance: a constant prediction" in html
    assert not re.search(r"=\d\.\d{6,}", html)  # hyperparameters to 4 significant digits
    labels = test["confusion"]["labels"]
    assert f"<td>true {labels[1]}</td><td>{test['confusion']['matrix'][1][0]}</td>" in html
    for figure in ("layer_curve", "best_per_pooling", "best_per_classifier", "history", "test_confusion"):
        assert (out / "figures" / f"{figure}.png").stat().st_size > 1000
        assert f"figures/{figure}.png" in html
    uploaded = optuna.artifacts.get_all_artifact_meta(study, storage=study.__dict__["_storage"])
    assert {meta.filename for meta in uploaded} >= {"layer_curve.png", "test_confusion.png"}
    assert [look["trial"] for look in study.user_attrs["adsearch_test_looks"]] == [config.study.trial]


def test_refit_model_loads_from_skops_and_matches(exported, study_env):
    out, _ = exported
    model = load_model(out / "model.skops")
    config = load_config(out).trial_config()
    from adsearch.results.export import fit_on, item_features

    cache = study_env["cache"]
    test = np.flatnonzero(cache.splits == "test")
    X, _ = item_features(cache, config, test)
    refit = fit_on(cache, config, np.flatnonzero(cache.splits == "train"), 3)
    np.testing.assert_array_equal(model.predict(X), refit.predict(X))


def test_evaluate_reproduces_the_study_score_exactly(exported, study_env):
    out, _ = exported
    result = run("evaluate", out / "config.yaml", "--cache", study_env["cache"].path)
    assert result.exit_code == 0, result.output
    assert "reproduced exactly" in result.output


def test_export_bad_inputs(study_env, exported, tmp_path):
    out, _ = exported
    with pytest.raises(OutputError, match="already exists and is not an empty folder"):
        export_trial("s", study_env["url"], out)
    with pytest.raises(ExportError, match="no study 'nope'"):
        export_trial("nope", study_env["url"], tmp_path / "x")
    study = optuna.load_study(study_name="s", storage=study_env["url"])
    with pytest.raises(ExportError, match=f"has trials 0..{len(study.trials) - 1}, not 99"):
        export_trial("s", study_env["url"], tmp_path / "x", trial_number=99)
    failed = study.ask()
    study.tell(failed, state=optuna.trial.TrialState.FAIL)
    with pytest.raises(ExportError, match=f"trial {failed.number} is FAIL, not COMPLETE"):
        export_trial("s", study_env["url"], tmp_path / "x", trial_number=failed.number)
    result = run("export", "--study", "s", "--storage", study_env["url"], "-o", out)
    assert result.exit_code == 2 and "already exists" in result.output


@pytest.mark.parametrize("edit,message", [
    (lambda c: c["pipeline"].update(classifier="svm"), "pipeline.classifier: unknown classifier 'svm'"),
    (lambda c: c["pipeline"]["params"].update(gamma=1), "pipeline.params: "),
    (lambda c: c["features"].pop("layer"), "features.layer: Field required"),
    (lambda c: c["features"].update(pooling="median"), "features.pooling: 'median'"),
    (lambda c: c.update(extra=1), "extra: Extra inputs are not permitted"),
])
def test_hand_edited_invalid_config_is_reported_by_key(exported, study_env, tmp_path, edit, message):
    out, _ = exported
    data = yaml.safe_load((out / "config.yaml").read_text())
    edit(data)
    broken = tmp_path / "config.yaml"
    broken.write_text(yaml.safe_dump(data))
    with pytest.raises(ExportError, match="invalid config") as info:
        load_config(broken)
    assert message in str(info.value)
    result = run("evaluate", broken, "--cache", study_env["cache"].path)
    assert result.exit_code == 2 and message in result.output


def test_export_without_test_labels_stops_after_refit(study_env, tmp_path):
    import shutil

    copy = tmp_path / "cache"
    shutil.copytree(study_env["cache"].path, copy)
    meta = json.loads((copy / "cache.json").read_text())
    for item in meta["items"]:
        if item["split"] == "test":
            item["label"] = None
    (copy / "cache.json").write_text(json.dumps(seal(meta)))  # a cache made without test labels
    url = f"sqlite:///{tmp_path / 'nolabels.db'}"
    spec = parse_spec({**SPACE, "space": {**SPACE["space"], "classifiers": {"logreg": {}}}})
    create_or_resume(make_storage(url), "s", open_cache(copy), spec, "space.yaml", 2)
    run_worker("s", url, worker_index=0)
    messages = []
    result = export_trial("s", url, tmp_path / "out", artifacts=tmp_path / "art", log=messages.append,
                          despite_nuisance_baseline=True)
    assert result.test is None and not (tmp_path / "out" / "test.json").exists()
    assert (tmp_path / "out" / "model.skops").exists()
    assert any("no test labels" in m for m in messages)


def test_predicting_a_training_recording_reproduces_the_cached_features(exported, study_env):
    from adsearch.corpus import read_manifest
    from adsearch.io.audio import load_audio
    from adsearch.results.predict import Predictor

    out, _ = exported
    predictor = Predictor(out, device="cpu")
    config = predictor.config
    cache = study_env["cache"]
    layers = predictor.features.encoder.model.encoder.layers
    assert len(layers) == max(config.features.layer, 1)  # only the layers needed
    recordings = {r.id: r for r in read_manifest(study_env["manifest"])}
    for index in (0, 5):
        rec = recordings[cache.ids[index]]
        X, n_windows, _ = predictor.features.of(load_audio(rec.path), rec.segments)
        if config.features.unit == "recording":
            expected = cache.recording_features(config.features.layer, config.features.pooling)[index][None]
        else:
            expected = cache.window_features(config.features.layer, config.features.pooling)[cache.window_item == index]
        assert n_windows == cache.meta["items"][index]["n_windows"]
        np.testing.assert_allclose(X, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layer", [0, 2, 4])
def test_keep_layers_reproduces_every_hidden_state(tiny_model, layer):
    from conftest import speechlike

    from adsearch.embed.encoder import WindowEncoder
    from adsearch.embed.model import resolve_model

    full = WindowEncoder(resolve_model(str(tiny_model)), "cpu", "float32")
    cut = WindowEncoder(resolve_model(str(tiny_model)), "cpu", "float32")
    cut.keep_layers(layer)
    audio = [speechlike(1.5, seed=layer)]
    _, expected = full.encode(audio)
    _, got = cut.encode(audio, layers=[layer])
    for stat in ("mean", "m2", "max", "min"):
        np.testing.assert_allclose(got[stat][0], expected[stat][layer], rtol=1e-5, atol=1e-5)


def test_predict_cli_bad_file_gets_its_own_error(exported, study_env, tmp_path):
    out, _ = exported
    cache = study_env["cache"]
    test_audio = cache.meta["items"][int(np.flatnonzero(cache.splits == "test")[0])]["path"]
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF nothing")
    csv_out = tmp_path / "p.csv"
    result = run("predict", out, test_audio, broken, "--segments", study_env["manifest"], "-o", csv_out)
    assert result.exit_code == 1, result.output  # every row written, and the failure in the exit status
    assert "1 of 2 file(s) could not be predicted" in result.output
    rows = csv_out.read_text().splitlines()
    assert rows[0] == "file,prob_ad,decision,mmse,label,n_windows,speech_seconds,segmentation,error,note"
    good, bad = rows[1].split(","), rows[2].split(",")
    assert 0 <= float(good[1]) <= 1 and good[2] == good[3] == "" and good[4] in ("AD", "control")
    assert good[7:] == ["given", "", ""]
    assert bad[1] == "" and "cannot decode" in rows[2]
    assert "broken.wav: cannot decode" in result.output


def test_wilson_and_mcnemar_known_values():
    low, high = wilson(8, 10)
    assert (round(low, 3), round(high, 3)) == (0.490, 0.943)
    # All right or all wrong: the interval must still contain the observed proportion exactly (float
    # rounding in a hand-written formula once gave 0.9999999999999999 as the upper end at 4 of 4).
    for n in (1, 4, 71):
        assert wilson(n, n)[1] == 1.0 and wilson(n, n)[0] < 1.0
        assert wilson(0, n)[0] == 0.0 and wilson(0, n)[1] > 0.0
    a = np.array([True] * 5 + [True] * 10)
    b = np.array([False] * 5 + [True] * 10)
    result = mcnemar_exact(a, b)
    assert result["only_best_right"] == 5 and result["p_value"] == pytest.approx(0.0625)


def test_a_margin_classifier_writes_a_decision_not_a_probability(tmp_path, monkeypatch):
    from sklearn.svm import LinearSVC

    from adsearch.results.predict import Predictor, write_predictions
    from adsearch.results.shared import SharedModels

    predictor = object.__new__(Predictor)  # the speech model is not needed to score given features
    predictor.classifier = LinearSVC().fit(np.array([[0.0], [1.0], [2.0], [3.0]]), [0, 0, 1, 1])
    predictor.vad = False
    predictor.config = SimpleNamespace(task="classification")
    predictor.owns_shared, predictor.shared = True, SharedModels()
    predictor.features = SimpleNamespace(of=lambda audio, segments: (np.array([[2.9]]), 1, 1.0))
    monkeypatch.setattr("adsearch.results.predict.load_audio", lambda path: np.zeros(16000, np.float32))
    prediction = predictor.predict(tmp_path / "x.wav")
    assert prediction.prob_ad is None and prediction.decision > 0 and prediction.label == "AD"
    write_predictions([prediction], tmp_path / "p.csv")
    header, row = (tmp_path / "p.csv").read_text().splitlines()
    assert header.startswith("file,prob_ad,decision") and row.split(",")[1] == ""


def test_predict_keeps_every_other_prediction_whatever_one_file_does(exported, study_env, tmp_path):
    """A 1 Hz WAV, a name that is not UTF-8 and a name a spreadsheet would run as a formula, beside a good
    recording: every file gets its row, the CSV is written, nothing is lost to one file."""
    import csv
    import os
    import shutil

    from conftest import write_raw_wav

    out, _ = exported
    cache = study_env["cache"]
    good = cache.meta["items"][int(np.flatnonzero(cache.splits == "test")[0])]["path"]
    write_raw_wav(tmp_path / "one-hz.wav", rate=1, channels=1, frames=4000)
    odd = os.fsdecode(bytes(tmp_path) + b"/\xff.wav")
    shutil.copy(good, odd)
    formula = tmp_path / "=HYPERLINK(x).wav"
    shutil.copy(good, formula)
    csv_out = tmp_path / "p.csv"
    result = run("predict", out, tmp_path / "one-hz.wav", odd, good, formula, "-o", csv_out)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output  # the 1 Hz file
    rows = list(csv.DictReader(csv_out.open(encoding="utf-8")))
    assert len(rows) == 4
    assert "declares a sample rate of 1 Hz" in rows[0]["error"] and rows[0]["prob_ad"] == ""
    assert rows[1]["file"].endswith("\\xff.wav") and rows[1]["error"] == "" and rows[1]["label"]
    assert rows[2]["error"] == "" and 0 <= float(rows[2]["prob_ad"]) <= 1
    assert rows[3]["file"].startswith(str(tmp_path))  # a full path cannot start with '=' ...
    bare = run("predict", out, formula.name, "-o", tmp_path / "q.csv")  # ... a bare name can
    assert bare.exit_code in (0, 1), bare.output
    assert next(csv.DictReader((tmp_path / "q.csv").open()))["file"] == "'=HYPERLINK(x).wav"


def test_an_exported_layer_the_model_lacks_is_refused(exported, tmp_path):
    import shutil

    out, _ = exported
    copy = tmp_path / "best"
    shutil.copytree(out, copy)
    (copy / "digests.json").unlink()  # an export older than its digests: the layer's own check
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["features"]["layer"] = 1000
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    result = run("predict", copy, tmp_path / "x.wav")
    assert result.exit_code == 2 and "features.layer 1000 does not exist" in result.output, result.output
    assert "Traceback" not in result.output


def test_predictions_onto_a_full_disk_are_one_line(exported, study_env, small_mount):
    from conftest import fill

    out, _ = exported
    cache = study_env["cache"]
    good = cache.meta["items"][int(np.flatnonzero(cache.splits == "test")[0])]["path"]
    fill(small_mount)
    result = run("predict", out, good, "-o", small_mount / "p.csv")
    assert result.exit_code == 2 and "no space left on that device" in result.output, result.output
    assert "Traceback" not in result.output and not (small_mount / "p.csv").exists()
    assert [p.name for p in small_mount.iterdir()] == ["filler"]  # no temporary file left


def test_an_unreadable_labelled_test_recording_is_counted_and_named(tiny_model, tmp_path):
    """'9 of 10 evaluated' must be said: published results use the whole test split."""
    from conftest import speechlike, write_rows, write_wav

    rows = []
    for i in range(12):
        split = "train" if i < 8 else "test"
        write_wav(tmp_path / f"r{i}.wav", speechlike(1.5, seed=i))
        rows.append([f"r{i}", f"r{i}.wav", str(i % 2), f"s{i}", split])
    (tmp_path / "r11.wav").write_bytes(b"RIFF broken")
    manifest = write_rows(tmp_path / "m.csv", ["id", "path", "label", "group", "split"], rows)
    cache = open_cache(extract(manifest, tmp_path / "cache", str(tiny_model)).cache_dir)
    url = f"sqlite:///{tmp_path / 's.db'}"
    spec = parse_spec({"cv": {"folds": 2}, "screen": {"enabled": False}, "space": {"classifiers": {"logreg": {}}}})
    create_or_resume(make_storage(url), "s", cache, spec, "space.yaml", 2)
    run_worker("s", url, worker_index=0)
    result = run("export", "--study", "s", "--storage", url, "-o", tmp_path / "best", "--artifacts", tmp_path / "a")
    assert result.exit_code == 0, result.output
    test = json.loads((tmp_path / "best" / "test.json").read_text())
    assert (test["n"], test["labelled"], [u["id"] for u in test["unreadable"]]) == (3, 4, ["r11"])
    assert "3 of 4 labelled test recordings evaluated; 1 could not be read (r11: " in result.output
    assert "on 3 of 4 labelled test recordings" in result.output
    assert "3 of 4 labelled recordings, 1 unreadable: r11" in (tmp_path / "best" / "report.html").read_text()


def test_report_says_what_a_layer_is_and_rounds_hyperparameters():
    from types import SimpleNamespace

    from adsearch.results.report import format_params, layer_axis_label

    egemaps = SimpleNamespace(n_layers=1, meta={"layers": {"meaning": {"0": "eGeMAPS low-level descriptors"}}})
    assert layer_axis_label(egemaps) == "layer (one layer: eGeMAPS low-level descriptors)"
    assert "transformer" not in layer_axis_label(egemaps)
    assert layer_axis_label(SimpleNamespace(n_layers=25, meta={})) == "layer (0 = input to the first layer)"
    assert format_params({"C": 0.012345678901234567, "kernel": "rbf", "n": 3}) == "C=0.01235, kernel=rbf, n=3"


def test_an_exported_folder_works_from_any_directory(synth_manifest, tmp_path, monkeypatch):
    """A study run with relative names (model "tiny", cache "cache/...") exports absolute paths and hashes:
    evaluate finds its cache (also among several under a root, by hash) and predict its model from elsewhere."""
    from pathlib import Path

    from adsearch.corpus import read_manifest

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert run("model", "tiny", "tiny").exit_code == 0
    for window in ("5", "4"):  # two caches under one root
        assert run("extract", synth_manifest, "--model", "tiny", "-o", "cache", "--window-s", window).exit_code == 0
    first = next(p for p in Path("cache").iterdir() if open_cache(p).meta["settings"]["window_s"] == 5.0)
    Path("space.yaml").write_text("cv: {folds: 3}\nscreen: {enabled: false}\nspace: {classifiers: {logreg: {}}}\n")
    result = run("search", "--cache", first, "--space", "space.yaml", "--study", "t", "--storage", "sqlite:///t.db",
                 "--trials", 3)
    assert result.exit_code == 0, result.output
    assert run("export", "--study", "t", "--storage", "sqlite:///t.db", "-o", "best").exit_code == 0

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(work / "best")
    assert config.model.name == "tiny" and Path(config.model.path) == (work / "tiny").resolve()
    assert Path(config.cache.path) == (work / first).resolve()
    for args in ([], ["--cache", work / "cache"]):
        result = run("evaluate", work / "best", *args)
        assert result.exit_code == 0 and "reproduced exactly" in result.output, result.output
    result = run("evaluate", work / "best", "--cache", elsewhere)
    assert result.exit_code == 2 and "holds no cache with the exported config's content hash" in result.output
    rec = next(r for r in read_manifest(synth_manifest) if r.split == "test")
    result = run("predict", work / "best", rec.path, "-o", "p.csv")
    assert result.exit_code == 0, result.output
    import csv

    row = next(csv.DictReader((elsewhere / "p.csv").open()))
    assert row["error"] == "" and row["label"] in ("AD", "control")


def test_the_artifact_store_is_given_once_at_search_and_found_by_export_and_dashboard(tmp_path, monkeypatch):
    """`--artifacts` was needed on search, export and dashboard alike; the study records it now."""
    from adsearch.embed.synthetic import write_synthetic_cache
    from adsearch.results.report import ARTIFACTS_ATTR, recorded_stores

    cache = write_synthetic_cache(tmp_path / "cache", n_train=30, n_test=10, n_layers=3, dim=8, signal_layer=1)
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"cv": {"folds": 3}, "space": {"classifiers": {"logreg": {}}}}))
    url = f"sqlite:///{tmp_path / 's.db'}"
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    result = run("search", "--cache", cache, "--study", "s", "--space", space, "--storage", url, "--trials", 3,
                 "--artifacts", tmp_path / "store")
    assert result.exit_code == 0, result.output
    heat_map = list((tmp_path / "store").glob("screen-*.png"))
    assert len(heat_map) == 1
    study = optuna.load_study(study_name="s", storage=url)
    assert study._storage.get_study_system_attrs(study._study_id)[ARTIFACTS_ATTR] == str((tmp_path / "store").resolve())
    result = run("export", "--study", "s", "--storage", url, "-o", tmp_path / "best")
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "elsewhere" / "adsearch-artifacts").exists()
    uploaded = optuna.artifacts.get_all_artifact_meta(study, storage=study.__dict__["_storage"])
    assert len(uploaded) > 1  # the heat map and the report's figures, all in the recorded store
    assert len([p for p in (tmp_path / "store").rglob("*") if p.is_file()]) >= len(uploaded)
    assert recorded_stores(make_storage(url)) == [str((tmp_path / "store").resolve())]
    assert "nuisance-only baseline: CV" in " ".join(run("search", "--cache", cache, "--study", "s", "--space", space,
                                                       "--storage", url, "--trials", 4).output.split())


def test_a_recording_without_a_segmentation_gets_voice_activity_detection_and_says_so(exported, study_env, tmp_path):
    """predict without --segments used the whole recording silently, interviewer included."""
    import csv

    from adsearch.corpus import read_manifest

    out, _ = exported
    rec = next(r for r in read_manifest(study_env["manifest"]) if r.split == "test")
    rows = {}
    for name, options in {"vad": [], "whole": ["--no-vad"], "given": ["--segments", study_env["manifest"]]}.items():
        result = run("predict", out, rec.path, *options, "-o", tmp_path / f"{name}.csv")
        assert result.exit_code == 0, result.output
        rows[name] = next(csv.DictReader((tmp_path / f"{name}.csv").open()))
        assert rows[name]["segmentation"] == name and f"segmentation: {name}" in result.output
        # per file, in the CSV and on the terminal: a score without the participant's segments is another kind
        comparable = name == "given"
        assert (rows[name]["note"] == "") == comparable
        assert ("not comparable with the study's scores" in " ".join(result.output.split())) != comparable
        assert comparable or "pass --segments" in rows[name]["note"]
    said = " ".join(result.output.split())
    assert "have no segmentation" not in said  # the given segments cover it
    said = " ".join(run("predict", out, rec.path).output.split())
    assert "1 of 1 file(s) have no segmentation (pass --segments)" in said and "interviewer" in said
    given = sum(e - b for b, e in rec.segments)
    speech = {name: float(row["speech_seconds"]) for name, row in rows.items()}
    assert speech["given"] == pytest.approx(given, abs=0.1)
    assert given * 0.8 < speech["vad"] < speech["whole"]  # the participant's speech and the interviewer's, no pauses
    report = (out / "report.html").read_text()
    assert "participant speech from the corpus&#x27;s speaker segmentation" in report or \
        "participant speech from the corpus's speaker segmentation" in report


def test_every_study_reports_its_nuisance_only_baseline(exported, study_env):
    """Recording length, speaking time and how the recordings were made can predict the label on DementiaBank:
    the score to beat is theirs. Recomputed here from the audio files themselves."""
    import optuna_dashboard
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler  # a column constant in a training part scales by 1

    from adsearch.corpus import read_manifest
    from adsearch.io.audio import audio_duration, load_audio
    from adsearch.search.baseline import NUISANCE_ATTR
    from adsearch.search.setup import StudySetup

    study, cache = study_env["study"], study_env["cache"]
    baseline = study._storage.get_study_system_attrs(study._study_id)[NUISANCE_ATTR]
    durations, conditions = baseline["features"][:3], baseline["features"][3:]
    assert durations == ["recording_seconds", "speech_seconds", "segments"]
    assert {"level_dbfs", "noise_floor_dbfs", "snr_db"} <= set(conditions)  # what varies across the recordings
    # by hand: the same numbers per train recording (durations logged, conditions measured again from the
    # audio), scikit-learn's own metric, the study's folds
    recordings = {r.id: r for r in read_manifest(study_env["manifest"])}
    windows = cache.meta["windows"]
    train = np.flatnonzero(cache.splits == "train")
    rows = []
    for i in train:
        rec = recordings[cache.ids[i]]
        spoken = sum(e - s for item, s, e in zip(windows["item"], windows["start_sample"], windows["end_sample"],
                                                 strict=True) if item == i) / 16000
        measured: dict = {}
        load_audio(rec.path, conditions=measured)
        rows.append([*np.log1p([audio_duration(rec.path), spoken, max(len(rec.segments), 1)]),
                     *(measured[name] for name in conditions)])
    X, y = np.array(rows), cache.labels[train]
    folds = StudySetup.from_study(study).folds
    expected = []
    for fold in range(int(folds.max()) + 1):
        valid = folds[0] == fold
        model = make_pipeline(StandardScaler(), LogisticRegression()).fit(X[~valid], y[~valid])
        expected.append(balanced_accuracy_score(y[valid], model.predict(X[valid])))
    assert baseline["fold_scores"] == pytest.approx(expected)
    assert "Nuisance-only baseline" in optuna_dashboard.get_note(study)
    out, _ = exported
    report = (out / "report.html").read_text()
    assert "nuisance-only baseline" in report and f"CV {baseline['cv']:.4f}" in report


def test_a_best_score_within_the_noise_floor_of_the_nuisance_baseline_is_warned_about():
    from adsearch.search.baseline import nuisance_warning

    baseline = {"cv": 0.68, "metric": "balanced_accuracy"}
    floor = {"n": 5, "null_max": 0.62}  # a search over noise gets 0.12 above chance
    assert ("does not beat the nuisance-only baseline 0.6800 by more than the best label-permuted search got "
            "above chance (+0.120 balanced_accuracy)") in nuisance_warning(0.75, baseline, floor)
    assert nuisance_warning(0.85, baseline, floor) is None
    assert "at all" in nuisance_warning(0.67, baseline) and nuisance_warning(0.70, baseline) is None


def test_the_test_split_reports_how_calibrated_p_ad_is(exported, study_env):
    """A screening tool's P(AD) is read as a probability: Brier score, ECE and a reliability figure."""
    from sklearn.metrics import brier_score_loss

    out, _ = exported
    test = json.loads((out / "test.json").read_text())
    assert load_model(out / "model.skops").predict_proba  # logreg or kNN: probabilities
    labels = [p["label"] for p in test["predictions"]]
    scores = [p["score"] for p in test["predictions"]]
    assert test["calibration"]["brier"] == pytest.approx(brier_score_loss(labels, scores))
    assert sum(b["n"] for b in test["calibration"]["bins"]) == test["n"]
    report = (out / "report.html").read_text()
    assert "Calibration of P(AD) on the test split: Brier score" in report and "test_reliability.png" in report
    # and on the chosen trial's out-of-fold predictions, which the study kept
    from adsearch.search.objective import oof_predictions

    config = load_config(out)
    trial = optuna.load_study(study_name="s", storage=study_env["url"]).trials[config.study.trial]
    oof = oof_predictions(trial)
    train = np.flatnonzero(study_env["cache"].splits == "train")
    labels = np.tile(study_env["cache"].labels[train], len(oof))
    assert config.cv.calibration["brier"] == pytest.approx(brier_score_loss(labels, oof.ravel() + 0.5), rel=1e-6)
    assert "calibration of P(AD), out-of-fold" in report


@pytest.mark.parametrize("method", ["caruana", "stack"])
def test_an_ensemble_exports_evaluates_and_predicts_like_a_single_model(study_env, tmp_path, method):
    """`adsearch ensemble -o`: members refitted once as single-trial exports, the test split scored once beside
    the best single trial (McNemar), `evaluate` reproduces every member, `predict` gives each test recording
    the combined score the export's test evaluation gave it."""
    import csv

    out = tmp_path / "ensemble"
    result = run("ensemble", "--study", "s", "--storage", study_env["url"], "--top", "4", "--method", method,
                 "-o", out)
    assert result.exit_code == 0, result.output
    import optuna

    best = optuna.load_study(study_name="s", storage=study_env["url"]).best_value
    assert f"the study's best CV, {best:.4f}, was chosen on all folds" in " ".join(result.output.split())
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["kind"] == "ensemble" and config["method"] == method and config["members"]
    for member in config["members"]:
        assert (out / "members" / f"trial-{member['trial']}" / "model.skops").is_file()
    if method == "caruana":
        assert sum(m["weight"] for m in config["members"]) == pytest.approx(1.0) and config["intercept"] == 0
    test = json.loads((out / "test.json").read_text())
    assert test["n"] == 4 and "only_best_right" in test["comparison"]
    assert 0 <= test["comparison"]["p_value"] <= 1
    labels = [study_env["cache"].labels[study_env["cache"].ids.index(p["id"])] for p in test["predictions"]]
    share = np.mean(labels)
    assert test["chance"]["accuracy"] == max(share, 1 - share) and test["chance"]["balanced_accuracy"] == 0.5
    page = (out / "report.html").read_text()
    assert "layer " in page and ("logreg(" in page or "knn(" in page)  # what each member is
    assert "nuisance-only baseline" in page and "<td>chance</td><td>0.5000</td>" in page.replace("\n", "")
    assert "Chance: a constant prediction" in page and "alone right on" in page
    assert len(config["cv"]["ensemble"]["fold_scores"]) == 3

    evaluated = run("evaluate", out)
    assert evaluated.exit_code == 0 and "members reproduced exactly" in evaluated.output, evaluated.output

    cache = study_env["cache"]
    expected = test["predictions"][0]
    audio = cache.meta["items"][cache.ids.index(expected["id"])]["path"]
    predicted = run("predict", out, audio, "--segments", study_env["manifest"], "-o", tmp_path / "p.csv")
    assert predicted.exit_code == 0, predicted.output
    with (tmp_path / "p.csv").open() as handle:
        row = next(csv.DictReader(handle))
    assert float(row["decision"]) == pytest.approx(expected["ensemble"], abs=1e-3)
    assert row["label"] == ("AD" if expected["ensemble"] > 0 else "control") and row["prob_ad"] == ""


def test_ensemble_members_share_their_speech_model_and_its_forward_passes(study_env, tmp_path, monkeypatch):
    """Members on one speech model load it once and run it once per window for all their layers; each
    member's prediction is exactly what it gives alone."""
    from adsearch.embed.encoder import WindowEncoder
    from adsearch.results.ensemble import EnsemblePredictor
    from adsearch.results.predict import Predictor, read_segments

    url = f"sqlite:///{tmp_path / 'layers.db'}"  # three trials, one per layer, all members of a stack
    space = {**SPACE, "space": {**SPACE["space"], "unit": ["recording"], "classifiers": {"logreg": {}}}}
    study = create_or_resume(make_storage(url), "l", study_env["cache"], parse_spec(space), "space.yaml", 3)
    for layer in (1, 2, 3):
        study.enqueue_trial({"layer": layer})
    run_worker("l", url, worker_index=0)
    out = tmp_path / "ensemble"
    result = run("ensemble", "--study", "l", "--storage", url, "--top", "3", "--method", "stack", "-o", out)
    assert result.exit_code == 0, result.output
    config = yaml.safe_load((out / "config.yaml").read_text())
    layers = {yaml.safe_load((out / "members" / f"trial-{m['trial']}" / "config.yaml").read_text())["features"]["layer"]
              for m in config["members"]}
    assert layers == {1, 2, 3}  # members on three layers of one model
    built, windows = [], []
    real_init, real_submit = WindowEncoder.__init__, WindowEncoder.submit
    monkeypatch.setattr(WindowEncoder, "__init__", lambda self, *a, **k: built.append(1) or real_init(self, *a, **k))
    monkeypatch.setattr(WindowEncoder, "submit", lambda self, w, *a: windows.append(len(w)) or real_submit(self, w, *a))
    ensemble = EnsemblePredictor(out, "cpu")
    assert len(built) == 1 and len(ensemble.members) == len(config["members"])
    assert ensemble.shared.layers_of(ensemble.members[0].features.encoder, -1) == sorted(layers)
    cache = study_env["cache"]
    path = cache.meta["items"][0]["path"]
    segments = read_segments(study_env["manifest"])[path]
    shared = [member.predict(path, segments) for member in ensemble.members]
    assert len(windows) == shared[0].n_windows  # one forward pass per window, whatever the number of members
    ensemble.predict(path, segments)
    for member, together in zip(config["members"], shared, strict=True):
        alone = Predictor(out / "members" / f"trial-{member['trial']}", "cpu").predict(path, segments)
        assert (alone.prob_ad, alone.decision, alone.label) == (together.prob_ad, together.decision, together.label)
