"""Bad, hostile and broken input: every case a clear error (exit 2, file/line/key and what to do, no
traceback), nothing silently wrong. Most cases are rows of tables run through the `adsearch` command as a
user types it; the parsers are also fuzzed with hypothesis."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from conftest import fill, speechlike, write_raw_wav, write_rows, write_wav
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from adsearch.cli import app
from adsearch.corpus import CorpusError, check_id, parse_segments, read_manifest
from adsearch.embed import open_cache
from adsearch.embed.cache import CacheError
from adsearch.embed.synthetic import write_synthetic_cache
from adsearch.io.safeyaml import YamlError, load_yaml
from adsearch.search.space import SpaceError, parse_spec

runner = CliRunner()
TINY_CACHE = dict(n_train=24, n_test=8, n_layers=2, dim=8, windows_per_item=2, signal_layer=1, signal_dims=2)
HEADER = ["id", "path", "label", "group", "split"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_clear_error(result, *expected: str) -> None:
    """Exit 2 with a one-line-per-problem message naming what is wrong; never a Python traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    for text in expected:
        assert text in result.output, (text, result.output)


# ----------------------------------------------------------------------------------------------------------
# Manifests


def _manifest(tmp_path: Path, header: list[str], rows: list[list[str]]) -> Path:
    write_wav(tmp_path / "a.wav", speechlike(1.0))
    return write_rows(tmp_path / "m.csv", header, rows)


GOOD_ROW = ["a", "a.wav", "1", "s1", "train"]
MANIFEST_CASES = {
    "repeated column": (HEADER + ["label"], [GOOD_ROW + ["0"]], ["column(s) label appear more than once"]),
    "extra field": (HEADER, [GOOD_ROW + ["surprise"]], ["line 2: 6 fields, the header has 5"]),
    "path traversal id": (HEADER, [["../../x", "a.wav", "1", "s1", "train"]], ["line 2: id '../../x' may only"]),
    "absolute id": (HEADER, [["/tmp/x", "a.wav", "1", "s1", "train"]], ["id '/tmp/x' may only hold"]),
    "hidden id": (HEADER, [[".x", "a.wav", "1", "s1", "train"]], ["must not start with '.'"]),
    "long id": (HEADER, [["x" * 300, "a.wav", "1", "s1", "train"]], ["is 300 characters long; at most 128"]),
    "infinite segment": (HEADER + ["segments"], [GOOD_ROW + ["1-inf"]], ["segment '1-inf' needs finite seconds"]),
    "nan segment": (HEADER + ["segments"], [GOOD_ROW + ["nan-3"]], ["needs finite seconds"]),
    "mmse out of range": (HEADER + ["mmse"], [GOOD_ROW + ["99"]], ["mmse '99' is outside 0..30"]),
    "mmse not a number": (HEADER + ["mmse"], [GOOD_ROW + ["high"]], ["mmse 'high' is not a number"]),
    "empty path": (HEADER, [["a", "", "1", "s1", "train"]], ["line 2: empty path"]),
    "speaker in both splits": (HEADER, [GOOD_ROW, ["b", "a.wav", "0", "s1", "test"]],
                               ["speaker(s) 's1' have recordings in both train and test"]),
}


@pytest.mark.parametrize("case", MANIFEST_CASES)
def test_bad_manifest_is_refused_with_its_line(tmp_path, case):
    header, rows, expected = MANIFEST_CASES[case]
    result = run("corpus", "csv", _manifest(tmp_path, header, rows), "-o", tmp_path / "out.csv")
    assert_clear_error(result, *expected)
    assert not (tmp_path / "out.csv").exists()


@pytest.mark.parametrize("encoding, expected", [("utf-16", "is UTF-16; save it as UTF-8"),
                                                ("latin-1", "line 2: not UTF-8 text")])
def test_manifest_in_another_encoding_is_refused(tmp_path, encoding, expected):
    text = "id,path,label,group,split\nä,a.wav,1,s1,train\n"
    (tmp_path / "m.csv").write_bytes(text.encode(encoding))
    assert_clear_error(run("corpus", "csv", tmp_path / "m.csv"), expected)


def test_a_folder_given_as_manifest_is_refused(tmp_path):
    assert_clear_error(run("corpus", "csv", tmp_path), "manifest not found (it is a folder)")


def test_adresso_file_names_that_cannot_be_ids_are_refused(synth_root, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(synth_root, root)
    wav = next((root / "ADReSSo21" / "diagnosis" / "train" / "audio" / "ad").glob("*.wav"))
    wav.rename(wav.with_name(".hidden.wav"))
    assert_clear_error(run("corpus", "adresso", root, "-o", tmp_path / "c.csv"), ".hidden.wav", "rename the file")


# ----------------------------------------------------------------------------------------------------------
# Audio


def test_truncated_and_silent_recordings_are_refused_not_scored(tmp_path):
    from adsearch.io.audio import AudioError, load_audio

    whole = write_wav(tmp_path / "whole.wav", speechlike(2.0))
    data = whole.read_bytes()
    (tmp_path / "cut.wav").write_bytes(data[: len(data) // 2])
    with pytest.raises(AudioError, match=r"truncated: the header announces 2.00 s, the file holds 1.00 s"):
        load_audio(tmp_path / "cut.wav")
    with pytest.raises(AudioError, match="silent"):
        load_audio(write_wav(tmp_path / "zero.wav", np.zeros(16000, np.float32)))
    assert len(load_audio(whole)) == 32000


# ----------------------------------------------------------------------------------------------------------
# Search spaces


def _space(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(textwrap.dedent(text))
    return path


BOMB = "\n".join([f'{chr(97)}: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
                 + [f"{chr(97 + i)}: &{chr(97 + i)} [" + ", ".join([f"*{chr(96 + i)}"] * 9) + "]" for i in range(1, 9)]
                 + ["space: {pooling: *i}"])
SPACE_CASES = {
    "C zero": ("space: {classifiers: {logreg: {C: 0}}}", "space.classifiers.logreg.C: C must be above 0"),
    "C range below zero": ("space: {classifiers: {logreg: {C: {low: -1, high: 1}}}}", "C must be above 0"),
    "no neighbours": ("space: {classifiers: {knn: {n_neighbors: 0}}}", "n_neighbors must be at least 1"),
    "subsample above one": ("space: {classifiers: {xgboost: {subsample: 2}}}", "subsample must be at most 1"),
    "nan value": ("space: {classifiers: {logreg: {C: .nan}}}", "nan is not a finite number"),
    "nan range": ("space: {pca_variance: {low: .nan, high: 0.9}}", "space.pca_variance.low"),
    "infinite range": ("space: {classifiers: {lda: {shrinkage: {low: 0.1, high: .inf}}}}",
                       "shrinkage: high: Input should be a finite number"),
    "list at top": ("- cv\n- seed\n", "the top level must be a mapping"),
    "layer-grid reference out of range": ("layer_grid: {classifier: logreg, params: {C: -1}}",
                                          "layer_grid.params.C: C must be above 0"),
    "alias bomb": (BOMB, "once its aliases (*name) are expanded"),
    "deep nesting": ("space: " + "[" * 5000 + "]" * 5000, "space.yaml: "),
}


@pytest.mark.parametrize("case", SPACE_CASES)
def test_bad_space_is_refused_by_key(tmp_path, case):
    text, expected = SPACE_CASES[case]
    started = time.perf_counter()
    assert_clear_error(run("space", "check", _space(tmp_path, text)), expected)
    assert time.perf_counter() - started < 5


def test_alias_bomb_is_refused_in_well_under_a_second_and_a_few_megabytes(tmp_path):
    script = (f"import resource, time; from adsearch.io.safeyaml import load_yaml, YamlError\n"
              f"t = time.perf_counter()\n"
              f"before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
              f"try:\n    load_yaml({str(_space(tmp_path, BOMB))!r}, 'space')\n"
              f"except YamlError:\n    pass\n"
              f"print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)")
    seconds, grown_kb = map(float, subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                                  check=True).stdout.split())
    assert seconds < 0.5 and grown_kb < 8 * 1024, (seconds, grown_kb)


def test_oversized_space_file_is_refused_before_parsing(tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_text("seed: 0\n" + "#" * (2 << 20))
    assert_clear_error(run("space", "check", path), "bytes; a search-space file of over")


# ----------------------------------------------------------------------------------------------------------
# Options


@pytest.fixture(scope="module")
def tiny_manifest(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("opts")
    write_wav(folder / "a.wav", speechlike(1.0))
    write_wav(folder / "b.wav", speechlike(1.0, seed=1))
    return write_rows(folder / "m.csv", HEADER, [["a", "a.wav", "1", "s1", "train"],
                                                 ["b", "b.wav", "0", "s2", "train"]])


@pytest.mark.parametrize("options, expected", [
    (["--window-s", "nan"], "must be finite"),
    (["--window-s", "0.001"], "--window-s (0.001) must be at least"),
    (["--min-window-s", "30"], "--min-window-s (30.0) between 0 and --window-s"),
    (["--device", "cuda"], "torch sees no CUDA device"),
    (["--device", "gpu"], "choose auto, cpu, cuda or cuda:N"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
])
def test_bad_extract_options_are_refused(tiny_manifest, tiny_model, tmp_path, options, expected):
    import torch

    if options[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert_clear_error(run("extract", tiny_manifest, "--model", tiny_model, "-o", tmp_path / "c", *options), expected)


def test_bad_storage_urls_are_refused_before_anything_is_created(tmp_path):
    (tmp_path / "plain-file").write_text("")
    cases = {f"sqlite:///{tmp_path}": "is a folder; name a database file in it",
             f"sqlite:///{tmp_path / 'plain-file' / 'x.db'}": "is a file, not a folder",
             "no url at all": "is not a database URL",
             "redis://127.0.0.1:6379/0": "'redis' is not a database SQLAlchemy knows",
             "grpc://127.0.0.1:13000": "do not go through Optuna's gRPC storage proxy"}
    for url, expected in cases.items():
        assert_clear_error(run("dashboard", "--storage", url), expected)


def test_a_port_in_use_is_reported(tmp_path):
    import socket

    from adsearch.search.storage import make_storage

    make_storage(f"sqlite:///{tmp_path / 'd.db'}")  # a study database (the dashboard creates none)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run("dashboard", "--storage", f"sqlite:///{tmp_path / 'd.db'}", "--port", port,
                     "--artifacts", tmp_path / "a")
    assert_clear_error(result, f"cannot serve on 127.0.0.1:{port}", "pass --port with a free one")


# ----------------------------------------------------------------------------------------------------------
# Caches, exported configs and models


def test_an_edited_cache_array_is_refused(tmp_path):
    cache_dir = write_synthetic_cache(tmp_path / "c", **TINY_CACHE)
    target = cache_dir / "stats" / "mean" / "L01.npy"
    values = np.load(target)
    values[0, 0] += 1.0
    np.save(target, values)
    cache = open_cache(cache_dir)
    cache.recording_features(0, "mean")  # an untouched file reads fine
    with pytest.raises(CacheError, match="L01.npy: its content differs from what cache.json records"):
        cache.recording_features(1, "mean")


@pytest.fixture(scope="module")
def exported_dir(tmp_path_factory):
    """A real export of a tiny study (logistic regression)."""
    from adsearch.results.export import export_trial
    from adsearch.search.storage import make_storage
    from adsearch.search.study import create_or_resume
    from adsearch.search.worker import run_worker

    folder = tmp_path_factory.mktemp("export")
    cache = open_cache(write_synthetic_cache(folder / "c", **TINY_CACHE))
    url = f"sqlite:///{folder / 's.db'}"
    spec = parse_spec({"cv": {"folds": 3}, "pruner": "none", "space": {"classifiers": {"logreg": {}}}})
    create_or_resume(make_storage(url), "s", cache, spec, "space.yaml", 3)
    run_worker("s", url, worker_index=0)
    export_trial("s", url, folder / "best", artifacts=folder / "artifacts", log=lambda _: None)
    return folder / "best"


@pytest.mark.parametrize("edit, expected", [
    (lambda c: c["features"].update(layer=-1), "features.layer: Input should be greater than or equal to 0"),
    (lambda c: c["features"].update(window_s=float("nan")), "features.window_s"),
    (lambda c: c["pipeline"]["params"].update(C=0), "pipeline.params.C: C must be above 0"),
    (lambda c: c["pipeline"]["params"].update(C=[1, 2]), "pipeline.params.C: one fixed value"),
])
def test_hand_edited_config_values_are_refused(exported_dir, tmp_path, edit, expected):
    import shutil

    copy = tmp_path / "best"
    shutil.copytree(exported_dir, copy)
    config = yaml.safe_load((copy / "config.yaml").read_text())
    edit(config)
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    assert_clear_error(run("predict", copy, tmp_path / "x.wav"), expected)


def _crafted_model(path: Path, function) -> Path:
    import skops.io as sio
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer

    model = make_pipeline(FunctionTransformer(func=function), LogisticRegression())
    sio.dump(model, path)
    return path


@pytest.mark.parametrize("function", [eval, exec, np.load, np.testing.assert_equal, print])
def test_a_crafted_model_file_is_refused(exported_dir, tmp_path, function):
    import shutil

    from adsearch.results.model_files import load_model
    from adsearch.results.schema import ExportError

    with pytest.raises(ExportError, match="refused: the file holds types adsearch never exports"):
        load_model(_crafted_model(tmp_path / "evil.skops", function))
    copy = tmp_path / "best"
    shutil.copytree(exported_dir, copy)
    (copy / "digests.json").unlink()  # an export older than its digests: the model file's own check
    _crafted_model(copy / "model.skops", function)
    assert_clear_error(run("predict", copy, tmp_path / "x.wav"), "refused")
    (copy / "model.skops").write_bytes(b"not a zip")
    assert_clear_error(run("predict", copy, tmp_path / "x.wav"), "not a model file adsearch can read")


def test_every_model_adsearch_exports_loads_with_the_exact_allow_list(tmp_path):
    """TRUSTED_TYPES is what every registry classifier and regressor, with every preprocessing, needs: no more,
    no less."""
    import skops.io as sio

    from adsearch.results.model_files import TRUSTED_TYPES, load_model, save_model
    from adsearch.search.classifiers import REGISTRY, Choice, IntRange
    from adsearch.search.objective import fit_pipeline
    from adsearch.search.space import TrialConfig

    rng = np.random.default_rng(0)
    needed = set()
    for name, spec in REGISTRY.items():
        base = {k: (v.options[0] if isinstance(v, Choice) else v.low if isinstance(v, IntRange)
                    else float(np.sqrt(v.low * v.high))) for k, v in spec.params.items()}
        variants = [base] + [{**base, k: option} for k, v in spec.params.items() if isinstance(v, Choice)
                             for option in v.options]
        for params, (pca, rows) in itertools.product(variants, [("none", 40), ("components", 40), ("variance", 120)]):
            X = rng.normal(size=(rows, 80)).astype(np.float32)  # 120 rows > 80 dims: covariance PCA
            y = rng.normal(24, 4, rows) if spec.is_regressor else np.arange(rows) % 2
            config = TrialConfig(layer=0, pooling="mean", unit="recording", scale="standard", pca=pca,
                                 pca_components=4 if pca == "components" else None,
                                 pca_variance=0.9 if pca == "variance" else None, l2_normalize=pca == "none",
                                 classifier=name, params=params)
            save_model(fit_pipeline(config, X, y, 0), tmp_path / "m.skops")
            needed |= set(sio.get_untrusted_types(file=tmp_path / "m.skops"))
            load_model(tmp_path / "m.skops")
        for calibration in () if spec.is_regressor else ("sigmoid", "isotonic"):  # wraps the classifier
            X, y = rng.normal(size=(60, 20)).astype(np.float32), np.arange(60) % 2
            config = TrialConfig(layer=0, pooling="mean", unit="recording", scale="standard", pca="none",
                                 l2_normalize=False, classifier=name, params=base, calibration=calibration)
            save_model(fit_pipeline(config, X, y, 0), tmp_path / "m.skops")
            needed |= set(sio.get_untrusted_types(file=tmp_path / "m.skops"))
            load_model(tmp_path / "m.skops")
    selected = TrialConfig(layer=0, pooling="mean", unit="recording", scale="standard", select="kbest", select_k=5,
                           pca="none", l2_normalize=False, classifier="logreg", params={"C": 1.0})
    save_model(fit_pipeline(selected, rng.normal(size=(40, 80)).astype(np.float32), np.arange(40) % 2, 0),
               tmp_path / "m.skops")
    needed |= set(sio.get_untrusted_types(file=tmp_path / "m.skops"))
    load_model(tmp_path / "m.skops")
    counts = rng.poisson(0.5, size=(40, 80)).astype(np.float32)  # an n-gram source's TF-IDF preprocessing
    tfidf = TrialConfig(layer=0, pooling="mean", unit="recording", scale="tfidf", pca="none", l2_normalize=False,
                        classifier="logreg", params={"C": 1.0})
    save_model(fit_pipeline(tfidf, counts, np.arange(40) % 2, 0), tmp_path / "m.skops")
    needed |= set(sio.get_untrusted_types(file=tmp_path / "m.skops"))
    load_model(tmp_path / "m.skops")
    assert needed == TRUSTED_TYPES


def test_predict_output_folder_is_checked_before_any_prediction(exported_dir, tmp_path):
    assert_clear_error(run("predict", exported_dir, tmp_path / "x.wav", "-o", tmp_path), "is a folder; name a CSV")


def test_an_export_killed_midway_leaves_no_half_written_folder(exported_dir, tmp_path, monkeypatch):
    from adsearch.results import export

    study_dir = exported_dir.parent
    url = f"sqlite:///{study_dir / 's.db'}"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "_evaluate_test", killed)
    with pytest.raises(KeyboardInterrupt):
        export.export_trial("s", url, tmp_path / "out", artifacts=tmp_path / "a", log=lambda _: None)
    assert not (tmp_path / "out").exists()
    monkeypatch.undo()
    result = export.export_trial("s", url, tmp_path / "out", artifacts=tmp_path / "a", log=lambda _: None)
    assert (result.out_dir / "config.yaml").is_file() and (result.out_dir / "report.html").is_file()
    assert not list(tmp_path.glob(".out.partial*"))


# ----------------------------------------------------------------------------------------------------------
# Studies


CREATE = """
import sys
from adsearch.embed import open_cache
from adsearch.search.space import parse_spec
from adsearch.search.storage import make_storage
from adsearch.search.study import create_or_resume
spec = parse_spec({"cv": {"folds": 3}, "space": {"classifiers": {"logreg": {}}}})
create_or_resume(make_storage(sys.argv[1]), "race", open_cache(sys.argv[2]), spec, "s.yaml", 5)
print("ok")
"""


def test_two_searches_creating_one_study_at_once_both_succeed(tmp_path):
    cache_dir = write_synthetic_cache(tmp_path / "c", **TINY_CACHE)
    url = f"sqlite:///{tmp_path / 's.db'}"
    processes = [subprocess.Popen([sys.executable, "-c", CREATE, url, str(cache_dir)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = [p.communicate(timeout=120) for p in processes]
    assert all(p.returncode == 0 for p in processes), outputs
    assert len(optuna.get_all_study_summaries(url)) == 1


@pytest.mark.slow
def test_search_fails_loudly_when_its_workers_cannot_meet_the_budget(tmp_path):
    """Every trial fails (the cache was edited after the study began): workers stop, `search` says why,
    exits 1, and does not suggest exporting."""
    cache_dir = write_synthetic_cache(tmp_path / "c", **TINY_CACHE)
    space = _space(tmp_path, "cv: {folds: 3}\npruner: none\nscreen: {enabled: false}\n"
                   "space: {layers: [1], classifiers: {logreg: {}}}\n")
    for target in (cache_dir / "stats").glob("*/L01.npy"):
        np.save(target, np.load(target) + 1)
    result = subprocess.run([sys.executable, "-m", "adsearch.cli", "search", "--cache", str(cache_dir), "--study",
                             "doomed", "--space", str(space), "--storage", f"sqlite:///{tmp_path / 's.db'}",
                             "--trials", "10", "--workers", "2"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "5 trials failed in a row" in result.stdout + result.stderr
    assert "failed: CacheError: " in result.stderr and "Traceback" not in result.stderr
    assert "stopped with exit code 2" in result.stderr
    assert "the budget is not met: 0 of 10 trials finished" in result.stderr
    assert "export it with" not in result.stdout


# ----------------------------------------------------------------------------------------------------------
# Parsers under hypothesis: they return a valid value or raise their own error, nothing else


@given(st.text(max_size=60))
def test_segment_parser_returns_sorted_finite_disjoint_segments_or_a_value_error(text):
    try:
        segments = parse_segments(text)
    except ValueError:
        return
    assert all(np.isfinite([b, e]).all() and 0 <= b < e for b, e in segments)
    assert all(segments[i][1] < segments[i + 1][0] for i in range(len(segments) - 1))


@given(st.text(max_size=200))
def test_an_accepted_id_is_a_safe_file_name(rec_id):
    if check_id(rec_id) is None:
        assert "/" not in rec_id and "\\" not in rec_id and not rec_id.startswith(".") and len(rec_id) <= 128
        assert rec_id not in ("", ".", "..") and "\x00" not in rec_id


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=400))
def test_any_manifest_bytes_give_recordings_or_a_corpus_error(tmp_path, data):
    path = tmp_path / "m.csv"
    path.write_bytes(b"id,path,label,group,split,segments\n" + data)
    try:
        recordings = read_manifest(path, check_files=False)
    except CorpusError:
        return
    assert all(check_id(r.id) is None for r in recordings)


YAML_VALUES = st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=10),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                      max_size=4), max_leaves=20)
SPACE_KEYS = st.sampled_from(["cv", "seed", "sampler", "pruner", "space", "layer_grid", "folds", "classifiers",
                              "logreg", "knn", "C", "low", "high", "log", "pooling", "layers"])


@settings(max_examples=150)
@given(st.dictionaries(SPACE_KEYS, YAML_VALUES, max_size=4))
def test_any_space_mapping_gives_a_spec_or_a_space_error(data):
    try:
        parse_spec(data, "fuzz.yaml")
    except SpaceError as exc:
        assert len(str(exc)) < 20_000


@settings(max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=300))
def test_any_yaml_text_gives_data_or_a_yaml_error(tmp_path, text):
    path = tmp_path / "any.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_yaml(path, "space")
    except YamlError as exc:
        assert str(path) in str(exc)


def test_json_roundtrip_of_the_default_space_still_validates():
    data = load_yaml(Path(__file__).parents[1] / "studies" / "default.yaml", "space")
    assert parse_spec(json.loads(json.dumps(data))).digest()


# ----------------------------------------------------------------------------------------------------------
# Second round (issue 19): each row a command as typed, each a one-line error and exit 2, nothing half-written


@pytest.mark.parametrize("rate, channels, expected", [(1, 1, "declares a sample rate of 1 Hz"),
                                                      (100, 1, "declares a sample rate of 100 Hz"),
                                                      (16000, 1024, "declares 1024 channels")])
def test_absurd_audio_headers_are_refused_before_decoding(tmp_path, tiny_model, rate, channels, expected):
    from adsearch.io.audio import AudioError, load_audio

    bad = write_raw_wav(tmp_path / "bad.wav", rate, channels, 4000 if channels == 1 else 10)
    started = time.perf_counter()
    with pytest.raises(AudioError, match=expected):
        load_audio(bad)
    assert time.perf_counter() - started < 1
    manifest = write_rows(tmp_path / "m.csv", HEADER, [["a", "bad.wav", "1", "s1", "train"]])
    assert_clear_error(run("extract", manifest, "--model", tiny_model, "-o", tmp_path / "c"),
                       "no recording could be extracted: all 1 failed", expected)
    assert not list((tmp_path / "c").glob("*/cache.json"))


def test_option_values_beyond_their_range_are_refused(tmp_path, exported_dir):
    url = f"sqlite:///{exported_dir.parent / 's.db'}"
    (tmp_path / "file").write_text("x")
    cases = [
        (["search", "--cache", tmp_path, "--study", "t", "--trials", str(10**12)], "--trials"),
        (["synth", tmp_path / "s", "--effect", "1e308"], "--effect 1e+308: give 0"),
        (["synth", tmp_path / "file"], "is a file; name a folder"),
        (["model", "tiny", tmp_path / "m", "--layers", "-1"], "--layers"),
        (["export", "--study", "s", "--storage", url, "-o", tmp_path / "x", "--top-k", "-3"], "--top-k"),
        (["search", "--cache", exported_dir.parent / "c", "--study", "t", "--storage", f"sqlite:///{tmp_path / 't.db'}",
          "--heartbeat", "10", "--grace", "5"],
         "the grace at least twice the heartbeat"),
    ]
    for args, expected in cases:
        assert_clear_error(run(*args), expected)
    assert not (tmp_path / "x").exists() and not (tmp_path / "m").exists()


def test_export_top_k_below_zero_never_looks_at_the_test_split(exported_dir, tmp_path):
    from adsearch.results.export import export_trial
    from adsearch.results.schema import ExportError

    url = f"sqlite:///{exported_dir.parent / 's.db'}"
    looks = optuna.load_study(study_name="s", storage=url).user_attrs.get("adsearch_test_looks")
    with pytest.raises(ExportError, match="--top-k -3"):
        export_trial("s", url, tmp_path / "x", top_k=-3, log=lambda _: None)
    assert optuna.load_study(study_name="s", storage=url).user_attrs.get("adsearch_test_looks") == looks


def test_a_password_file_that_never_ends_is_refused(monkeypatch):
    monkeypatch.setenv("ADSEARCH_STORAGE_PASSWORD_FILE", "/dev/zero")
    assert_clear_error(run("worker", "--study", "s", "--storage", "postgresql+psycopg://u@127.0.0.1:1/x"),
                       "/dev/zero: not a regular file")


@pytest.mark.parametrize("target, expected", [
    ("link", "is a symbolic link"), ("dangling", "is a symbolic link"), (".", "names an existing folder itself"),
    ("x" * 300, "longer than the file system allows"),
])
def test_export_targets_that_are_links_dots_or_too_long_are_refused(exported_dir, tmp_path, target, expected):
    url = f"sqlite:///{exported_dir.parent / 's.db'}"
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    path = target if target == "." else tmp_path / target
    assert_clear_error(run("export", "--study", "s", "--storage", url, "-o", path), expected)
    assert not any((tmp_path / "real").iterdir()) and not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("command", ["corpus", "export", "extract"])
def test_a_full_disk_is_one_line_and_leaves_nothing_that_looks_complete(small_mount, exported_dir, tiny_manifest,
                                                                        tiny_model, command):
    fill(small_mount)
    url = f"sqlite:///{exported_dir.parent / 's.db'}"
    args = {"corpus": ["corpus", "csv", tiny_manifest, "-o", small_mount / "out.csv"],
            "export": ["export", "--study", "s", "--storage", url, "-o", small_mount / "best",
                       "--artifacts", small_mount / "art"],
            "extract": ["extract", tiny_manifest, "--model", tiny_model, "-o", small_mount / "cache"]}[command]
    assert_clear_error(run(*args), "no space left on that device")
    assert not (small_mount / "out.csv").exists() and not (small_mount / "best").exists()
    assert not list(small_mount.glob("cache/*/cache.json")) and not list(small_mount.glob(".*partial*"))


def test_a_read_only_folder_is_one_line(small_mount, tiny_manifest):
    subprocess.run(["mount", "-o", "remount,ro", str(small_mount)], check=True)
    assert_clear_error(run("corpus", "csv", tiny_manifest, "-o", small_mount / "out.csv"), "read-only")


def test_file_names_that_are_not_utf8_are_named_not_crashed_on(synth_root, tmp_path):
    import os
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(synth_root, root)
    wav = next((root / "ADReSSo21" / "diagnosis" / "train" / "audio" / "ad").glob("*.wav"))
    os.rename(bytes(wav), bytes(wav.parent) + b"/\xff\xfe.wav")
    assert_clear_error(run("corpus", "adresso", root, "-o", tmp_path / "c.csv"), "\\udcff", "rename the file")


def test_an_emptied_part_is_reported_with_its_recording_and_redone(tmp_path, tiny_model):
    for name, seed in (("a", 0), ("b", 1), ("c", 2), ("d", 3)):
        write_wav(tmp_path / f"{name}.wav", speechlike(1.0, seed=seed))
    manifest = write_rows(tmp_path / "m.csv", HEADER, [[n, f"{n}.wav", str(i % 2), f"s{n}", "train"]
                                                       for i, n in enumerate("abcd")])
    result = run("extract", manifest, "--model", tiny_model, "-o", tmp_path / "c", "--shard", "0/2")
    assert result.exit_code == 0, result.output
    part = next((tmp_path / "c").glob("*/parts/*.npz"))
    part.write_bytes(b"")
    result = run("extract", manifest, "--model", tiny_model, "-o", tmp_path / "c")
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert f"{part.stem} (" in result.output and "was damaged" in result.output
    clean = run("extract", manifest, "--model", tiny_model, "-o", tmp_path / "clean")
    assert clean.exit_code == 0
    assert open_cache(tmp_path / "c").content_hash == open_cache(tmp_path / "clean").content_hash


@pytest.mark.parametrize("name, expected", [("a/b", "letters, digits"), ("<x>", "letters, digits"),
                                            ('"q"', "letters, digits"), ("..", "letters, digits"),
                                            ("x" * 300, "(here 300)"), ("", "1 to 100 characters")])
def test_bad_study_names_are_refused_at_creation(tmp_path, name, expected):
    cache_dir = write_synthetic_cache(tmp_path / "c", **TINY_CACHE)
    url = f"sqlite:///{tmp_path / 's.db'}"
    assert_clear_error(run("search", "--cache", cache_dir, "--study", name, "--storage", url, "--workers", "0",
                           "--artifacts", tmp_path / "art"), expected)
    assert optuna.get_all_study_summaries(url) == []
    assert not (tmp_path / "art").exists() or not any((tmp_path / "art").rglob("*.png"))


def test_screen_figures_are_named_by_slug_and_study_id(tmp_path):
    cache_dir = write_synthetic_cache(tmp_path / "c", **TINY_CACHE)
    result = run("search", "--cache", cache_dir, "--study", "My.Study-1", "--storage",
                 f"sqlite:///{tmp_path / 's.db'}", "--workers", "0", "--artifacts", tmp_path / "art")
    assert result.exit_code == 0, result.output
    assert [p.name for p in (tmp_path / "art").glob("*.png")] == ["screen-1-My.Study-1.png"]


@pytest.mark.parametrize("backend", ["sqlite", "mariadb"])
def test_study_names_compare_exactly_on_every_backend(tmp_path, backend):
    import os

    from conftest import MARIADB, server_available

    if backend == "mariadb":
        reason = server_available(MARIADB)
        if reason:
            if os.environ.get("CI") == "true":
                pytest.fail(f"CI must run the MariaDB test: {reason}")
            pytest.skip(reason)
    url = MARIADB if backend == "mariadb" else f"sqlite:///{tmp_path / 's.db'}"
    cache_dir = write_synthetic_cache(tmp_path / "c", **TINY_CACHE)
    base = f"casetest{os.getpid()}"
    try:
        result = run("search", "--cache", cache_dir, "--study", base, "--storage", url, "--workers", "0",
                     "--trials", "5", "--artifacts", tmp_path / "art")
        assert result.exit_code == 0, result.output
        upper = run("search", "--cache", cache_dir, "--study", base.upper(), "--storage", url, "--workers", "0",
                    "--trials", "9", "--artifacts", tmp_path / "art")
        if backend == "mariadb":  # the default collation cannot tell the two apart: refused, not merged
            assert_clear_error(upper, "cannot tell it from the existing study")
            from adsearch.search.budget import TrialBudget

            assert TrialBudget(url, base).get()[0] == 5  # its budget untouched
        else:
            assert upper.exit_code == 0, upper.output
        names = {s.study_name for s in optuna.get_all_study_summaries(url)}
        assert base in names and (base.upper() in names) == (backend == "sqlite")
    finally:
        for name in (base, base.upper()):
            with __import__("contextlib").suppress(KeyError):
                optuna.delete_study(study_name=name, storage=url)


def test_a_foreign_sqlite_file_is_refused_and_left_unchanged(tmp_path):
    import hashlib
    import sqlite3

    other = tmp_path / "app.db"
    with sqlite3.connect(other) as connection:
        connection.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
        connection.execute("INSERT INTO customers VALUES (1, 'x')")
    connection.close()
    before = hashlib.sha256(other.read_bytes()).hexdigest()
    for args in (["export", "--study", "s", "-o", tmp_path / "out"], ["worker", "--study", "s"],
                 ["null", "--study", "s"], ["dashboard"]):
        assert_clear_error(run(*args, "--storage", f"sqlite:///{other}"), "another application's database",
                           "was not changed")
    assert hashlib.sha256(other.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.db"]


def _broken_checkpoint(tiny_model: Path, tmp_path: Path, how: str) -> Path:
    import shutil

    from safetensors.numpy import load_file, save_file

    broken = tmp_path / how
    shutil.copytree(tiny_model, broken)
    if how == "most-weights-missing":
        weights = load_file(broken / "model.safetensors")
        save_file({k: v for k, v in list(weights.items())[:5]}, broken / "model.safetensors", metadata={"format": "pt"})
    else:  # config.json with one layer more than the weights
        config = json.loads((broken / "config.json").read_text())
        config["num_hidden_layers"] += 1
        (broken / "config.json").write_text(json.dumps(config))
    return broken


@pytest.mark.parametrize("how", ["most-weights-missing", "one-layer-more-in-config"])
def test_a_checkpoint_missing_weights_is_refused(tiny_model, tiny_manifest, tmp_path, how):
    broken = _broken_checkpoint(tiny_model, tmp_path, how)
    assert_clear_error(run("extract", tiny_manifest, "--model", broken, "-o", tmp_path / "c"),
                       "weights missing from the checkpoint", "randomly initialised")
    assert not list((tmp_path / "c").glob("*/cache.json"))


def test_a_task_head_checkpoint_loads_as_its_encoder(tmp_path):
    """A CTC checkpoint (the seed's model is one) carries lm_head.*: the head may be there, nothing else."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

    from adsearch.embed.model import load_model, resolve_model

    config = Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                            conv_dim=(32,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
                            vocab_size=32, feat_extract_norm="layer", do_stable_layer_norm=True)
    Wav2Vec2ForCTC(config).save_pretrained(tmp_path / "ctc")
    Wav2Vec2FeatureExtractor(return_attention_mask=True).save_pretrained(tmp_path / "ctc")
    _, model = load_model(resolve_model(str(tmp_path / "ctc")), "cpu", __import__("torch").float32)
    assert type(model).__name__ == "Wav2Vec2Model"


CACHE_EDITS = {
    "label flipped": lambda meta: meta["items"][0].update(label=1 - meta["items"][0]["label"]),
    "speaker renamed": lambda meta: meta["items"][0].update(group=meta["items"][1]["group"]),
    "split moved": lambda meta: meta["items"][0].update(split="test"),
    "recording removed": lambda meta: meta["items"].pop(),
    "frame count edited": lambda meta: meta["windows"]["n_frames"].__setitem__(0, 7),
    "frame count negative": lambda meta: meta["windows"]["n_frames"].__setitem__(0, -3),
    "window moved": lambda meta: meta["windows"]["item"].__setitem__(0, 1),
    "array hash swapped": lambda meta: meta["files"].update({"stats/mean/L00.npy":
                                                             meta["files"]["stats/mean/L01.npy"]}),
}


@pytest.mark.parametrize("edit", CACHE_EDITS)
def test_every_defining_field_of_cache_json_is_covered(tmp_path, edit):
    cache_dir = write_synthetic_cache(tmp_path / "c", **TINY_CACHE)
    meta = json.loads((cache_dir / "cache.json").read_text())
    CACHE_EDITS[edit](meta)
    (cache_dir / "cache.json").write_text(json.dumps(meta))
    with pytest.raises(CacheError, match="cache.json: "):
        open_cache(cache_dir)


def test_a_cache_of_the_previous_format_is_refused_with_what_to_do(tmp_path):
    cache_dir = write_synthetic_cache(tmp_path / "c", **TINY_CACHE)
    meta = json.loads((cache_dir / "cache.json").read_text())
    (cache_dir / "cache.json").write_text(json.dumps({**meta, "format_version": 1}))
    with pytest.raises(CacheError, match="cache format 1 is not the supported 2; re-run `adsearch extract`"):
        open_cache(cache_dir)


def test_search_worker_export_and_evaluate_refuse_an_edited_cache(exported_dir, tmp_path):
    """The study's cache (and a copy re-sealed by hand, so its own hash matches again) are refused."""
    import shutil

    from adsearch.embed.cache import seal

    study_dir = exported_dir.parent
    url = f"sqlite:///{study_dir / 's.db'}"
    for resealed in (False, True):
        copy = tmp_path / f"cache-{resealed}"
        shutil.copytree(study_dir / "c", copy)
        meta = json.loads((copy / "cache.json").read_text())
        meta["items"][0]["label"] = 1 - meta["items"][0]["label"]
        (copy / "cache.json").write_text(json.dumps(seal(meta) if resealed else meta))
        expected = "was created with the cache" if resealed else "edited after extraction"
        space = _space(tmp_path, "cv: {folds: 3}\npruner: none\nspace: {classifiers: {logreg: {}}}\n")
        for args in (["search", "--cache", copy, "--study", "s", "--space", space, "--storage", url, "--trials", "6"],
                     ["worker", "--study", "s", "--storage", url, "--cache", copy],
                     ["export", "--study", "s", "--storage", url, "--cache", copy, "-o", tmp_path / "out"],
                     ["evaluate", exported_dir, "--cache", copy]):
            result = run(*args)
            if args[0] == "evaluate" and resealed:
                assert_clear_error(result, "differs from the exported config's cache")
            else:
                assert_clear_error(result, expected)
        assert not (tmp_path / "out").exists()
    study = optuna.load_study(study_name="s", storage=url)
    assert len(study.trials) == 3  # no trial ran on the edited labels


EXPORT_AT_ONCE = """
import sys
from adsearch.results.export import export_trial
from adsearch.io.outputs import OutputError
try:
    export_trial("s", sys.argv[1], sys.argv[2], trial_number=int(sys.argv[3]), artifacts=sys.argv[4],
                 log=lambda _: None)
except OutputError as exc:
    print(exc)
    raise SystemExit(2)
"""


def test_two_exports_into_one_folder_one_wins_whole(exported_dir, tmp_path):
    url = f"sqlite:///{exported_dir.parent / 's.db'}"
    target = tmp_path / "best"
    processes = [subprocess.Popen([sys.executable, "-c", EXPORT_AT_ONCE, url, str(target), str(trial),
                                   str(tmp_path / "art")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for trial in (0, 2)]
    outputs = [p.communicate(timeout=300) for p in processes]
    codes = sorted(p.returncode for p in processes)
    assert codes == [0, 2], outputs
    loser = outputs[[p.returncode for p in processes].index(2)][0]
    assert "another process is writing this folder" in loser or "already exists" in loser or "meanwhile" in loser
    config = yaml.safe_load((target / "config.yaml").read_text())
    test = json.loads((target / "test.json").read_text())
    assert config["study"]["trial"] == test["trial"]
    assert f"<td>trial</td><td>{test['trial']}</td>" in (target / "report.html").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "best"]  # no partial folder, no lock left


def test_a_worker_whose_trial_was_failed_under_it_goes_on(tmp_path, monkeypatch, capsys):
    from adsearch.search import worker
    from adsearch.search.storage import make_storage
    from adsearch.search.study import create_or_resume

    cache = open_cache(write_synthetic_cache(tmp_path / "c", **TINY_CACHE))
    url = f"sqlite:///{tmp_path / 's.db'}"
    spec = parse_spec({"cv": {"folds": 3}, "pruner": "none", "screen": {"enabled": False},
                       "space": {"classifiers": {"logreg": {}}}})
    create_or_resume(make_storage(url), "s", cache, spec, "space.yaml", 3)
    real_call = worker.Objective.__call__
    other = make_storage(url)
    victims = []

    def stale_meanwhile(self, trial):
        value = real_call(self, trial)
        if not victims:  # what another worker's fail_stale_trials does to a trial whose heartbeat came late
            victims.append(trial.number)
            other.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
            from adsearch.search.budget import TrialBudget

            TrialBudget(url, "s").release()
        return value

    monkeypatch.setattr(worker.Objective, "__call__", stale_meanwhile)
    report = worker.run_worker("s", url, worker_index=0)
    assert report.failed == 1 and "was failed by another worker while it ran" in capsys.readouterr().err
    states = [t.state for t in optuna.load_study(study_name="s", storage=url).trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 3 and states[victims[0]] == optuna.trial.TrialState.FAIL


@pytest.mark.slow
def test_sigterm_to_search_stops_its_workers(tmp_path):
    import os
    import signal

    cache_dir = write_realistic_cache_dir(tmp_path)
    space = _space(tmp_path, "cv: {folds: 4}\npruner: none\nscreen: {enabled: false}\nspace: {pooling: [mean], "
                   "classifiers: {random_forest: {n_estimators: 150, max_depth: 6, max_features: sqrt, "
                   "min_samples_leaf: 1}}}\n")
    search = subprocess.Popen([sys.executable, "-m", "adsearch.cli", "search", "--cache", str(cache_dir), "--study",
                               "term", "--space", str(space), "--storage", f"sqlite:///{tmp_path / 's.db'}",
                               "--trials", "500", "--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    children: set[int] = set()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(children) < 2:
        time.sleep(0.5)
        for task in Path(f"/proc/{search.pid}/task").glob("*/children"):
            children |= {int(pid) for pid in task.read_text().split()}
    assert len(children) >= 2, search.stderr.read() if search.poll() is not None else "no workers started"
    time.sleep(3)  # trials under way
    search.send_signal(signal.SIGTERM)
    out, err = search.communicate(timeout=60)
    assert search.returncode == 130, out + err
    assert "interrupted" in err and "run the same command again to resume" in err and "Traceback" not in err
    time.sleep(1)
    alive = [pid for pid in children if Path(f"/proc/{pid}").exists()
             and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive, "workers outlived the search they belonged to"


def write_realistic_cache_dir(tmp_path: Path) -> Path:
    from adsearch.embed.synthetic import write_realistic_cache

    return write_realistic_cache(tmp_path / "rc", n_train=80, n_test=10, n_layers=4, dim=32)
