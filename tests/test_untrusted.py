"""Numbers and files adsearch did not make (issue 26): non-finite scores, transcripts of other audio, contradictory
labels, MMSE values out of range, the dashboard's storage and host checks, ensembles without candidates, study
notes with markup in folder names, stopped workers and exports. Each case through the `adsearch` command as a
user types it where there is one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
from conftest import interrupt_extraction, speechlike, write_rows, write_wav
from typer.testing import CliRunner

from adsearch.cli import app
from adsearch.embed import open_cache
from adsearch.embed.synthetic import write_synthetic_cache
from adsearch.search.space import parse_spec

runner = CliRunner()
TINY = dict(n_train=24, n_test=8, n_layers=2, dim=8, windows_per_item=2, signal_layer=1, signal_dims=2)


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_clear_error(result, *expected: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())
    for part in expected:
        assert part in text, (part, result.output)


def _study(tmp_path: Path, name: str = "s", classifiers=("logreg",), trials: int = 3) -> str:
    from adsearch.search.storage import make_storage
    from adsearch.search.study import create_or_resume
    from adsearch.search.worker import run_worker

    cache = open_cache(write_synthetic_cache(tmp_path / f"c-{name}", **TINY))
    url = f"sqlite:///{tmp_path / 's.db'}"
    spec = parse_spec({"cv": {"folds": 3}, "pruner": "none", "screen": {"enabled": False},
                       "space": {"classifiers": {c: {} for c in classifiers}}})
    create_or_resume(make_storage(url), name, cache, spec, "space.yaml", trials)
    run_worker(name, url, worker_index=0)
    return url


def test_a_model_whose_scores_are_nan_fails_its_trial_with_that_reason(tmp_path, monkeypatch):
    """Not a trial completing at 0.500: the trial fails and says why."""
    from adsearch.search import objective

    real = objective.scores_of

    def nan_scores(model, X):
        score, threshold = real(model, X)
        return np.full_like(score, np.nan), threshold

    from adsearch.search.errors import StudyError

    monkeypatch.setattr(objective, "scores_of", nan_scores)
    with pytest.raises(StudyError, match="5 trials failed in a row; last error: NonFiniteScores: repeat 1, fold 1: "
                                         "8 of 8 out-of-fold scores are NaN or infinite"):
        _study(tmp_path, trials=2)
    trials = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 's.db'}").get_trials(deepcopy=False)
    assert {t.state.name for t in trials} == {"FAIL"} and len(trials) == 5
    assert all("NaN or infinite" in t.user_attrs["error"] for t in trials)


def test_a_cache_part_is_never_written_with_a_non_finite_value(tmp_path):
    from adsearch.io.outputs import NonFiniteError, save_atomic_npz

    with pytest.raises(NonFiniteError, match="mean: 1 of 4 values are NaN or infinite"):
        save_atomic_npz(tmp_path / "p.npz", mean=np.array([1.0, np.inf, 2.0, 3.0], np.float32))
    assert not list(tmp_path.iterdir())
    save_atomic_npz(tmp_path / "ok.npz", start=np.array([0]), mean=np.ones(2, np.float32))
    assert (tmp_path / "ok.npz").is_file()


def test_linguistic_features_of_transcripts_of_other_audio_are_refused(synth_manifest, tmp_path):
    """A manifest with its audio paths rotated by one: each recording would get another recording's words."""
    from adsearch.corpus import read_manifest, write_manifest
    from adsearch.transcripts.imports import import_transcripts

    chat = tmp_path / "chat"
    chat.mkdir()
    recordings = read_manifest(synth_manifest)
    for rec in recordings:
        (chat / f"{rec.id}.cha").write_text(f"@Begin\n*PAR:\tthe boy {rec.id} takes a cookie .\n@End\n")
    import_transcripts(synth_manifest, tmp_path / "transcripts", chat_dir=chat)
    paths = [rec.path for rec in recordings]
    from dataclasses import replace

    rotated = write_manifest([replace(rec, path=paths[(i + 1) % len(paths)]) for i, rec in enumerate(recordings)],
                             tmp_path / "rotated.csv")
    assert_clear_error(run("extract", rotated, "--features", "linguistic", "--transcripts", tmp_path / "transcripts",
                           "-o", tmp_path / "cache"),
                       f"{recordings[0].id}: its audio {paths[1]} is not the audio that was transcribed")
    assert run("extract", synth_manifest, "--features", "linguistic", "--transcripts", tmp_path / "transcripts",
               "-o", tmp_path / "cache").exit_code == 0
    # an edited transcript file is refused, also when the cache from it is already complete
    folder = next(p.parent for p in (tmp_path / "transcripts").glob("*/transcripts.json"))
    edited = folder / "recordings" / f"{recordings[0].id}.json"
    edited.write_bytes(edited.read_bytes() + b" ")
    assert_clear_error(run("extract", synth_manifest, "--features", "linguistic", "--transcripts",
                           tmp_path / "transcripts", "-o", tmp_path / "cache"), "was changed after transcription")


def test_contradictory_labels_are_warned_about_naming_the_rows(tmp_path):
    audio = write_wav(tmp_path / "a.wav", speechlike(1.0))
    other = write_wav(tmp_path / "b.wav", speechlike(1.0, seed=1))
    manifest = write_rows(tmp_path / "m.csv", ["id", "path", "label", "group", "split"],
                          [["r1", audio, "1", "s1", "train"], ["r2", other, "0", "s1", "train"],
                           ["r3", audio, "0", "s3", "train"]])
    result = run("corpus", "csv", manifest, "-o", tmp_path / "out.csv")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "speaker 's1' has AD and control recordings (r1: 1, r2: 0)" in text
    assert f"{audio} is listed under ids with different labels (r1: 1, r3: 0)" in text


@pytest.mark.parametrize("value", ["-5", "99", "nan-ish", "inf"])
def test_adresso_mmse_out_of_range_is_refused_with_its_file_and_line(synth_root, tmp_path, value):
    root = tmp_path / "adresso"
    shutil.copytree(synth_root, root)
    scores = root / "ADReSSo21" / "diagnosis" / "train" / "adresso-train-mmse-scores.csv"
    lines = scores.read_text().splitlines()
    header = [c.strip().lower() for c in lines[0].split(",")]
    cells = lines[2].split(",")
    cells[header.index("mmse")] = value
    lines[2] = ",".join(cells)
    scores.write_text("\n".join(lines) + "\n")
    assert_clear_error(run("corpus", "adresso", root, "-o", tmp_path / "c.csv"), f"{scores} line 3",
                       f"mmse '{value}'")


def test_the_dashboard_refuses_missing_and_foreign_databases_and_bad_allowed_hosts(tmp_path):
    import sqlite3

    assert_clear_error(run("dashboard", "--storage", f"sqlite:///{tmp_path / 'none.db'}"), "no study database at")
    assert not (tmp_path / "none.db").exists()
    lookalike = tmp_path / "app.db"
    with sqlite3.connect(lookalike) as connection:  # a table named like Optuna's, but not Optuna's schema
        connection.execute("CREATE TABLE studies (id INTEGER PRIMARY KEY, title TEXT)")
    connection.close()
    before = lookalike.read_bytes()
    assert_clear_error(run("dashboard", "--storage", f"sqlite:///{lookalike}"), "another application's database")
    assert lookalike.read_bytes() == before
    url = _study(tmp_path)
    for host, expected in (("", "give a host name"), ("name:8080", "without scheme, port or path"),
                           ("http://x", "without scheme"), ("a b", "is not a host name")):
        assert_clear_error(run("dashboard", "--storage", url, "--allowed-host", host), expected)


def test_the_dashboard_answers_static_files_without_an_accept_encoding_header(tmp_path):
    from adsearch.dashboard import guarded_app
    from adsearch.search.storage import make_storage

    app_ = guarded_app(make_storage(_study(tmp_path)), str(tmp_path / "art"), [], read_only=True)
    statuses = []
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/static/bundle.js", "HTTP_HOST": "127.0.0.1:8080",
               "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8080", "wsgi.url_scheme": "http", "QUERY_STRING": "",
               "wsgi.input": None, "wsgi.errors": sys.stderr}
    b"".join(app_(environ, lambda status, headers, exc_info=None: statuses.append(status)))
    assert statuses and not statuses[0].startswith("500"), statuses


def test_a_study_note_cannot_carry_markup_from_a_folder_name(tmp_path):
    from adsearch.search.study import code_span

    hostile = "x`![track](http://evil.example/p.png)`y"
    span = code_span(hostile)
    assert span == "``x`![track](http://evil.example/p.png)`y``"
    assert code_span("`a`") == "`` `a` ``" and code_span("plain") == "`plain`"
    cache = write_synthetic_cache(tmp_path / "c`![i](http://e.example/i.png)`", **TINY)
    from adsearch.search.storage import make_storage
    from adsearch.search.study import create_or_resume

    url = f"sqlite:///{tmp_path / 'n.db'}"
    study = create_or_resume(make_storage(url), "n", open_cache(cache), parse_spec({"cv": {"folds": 3}}),
                             "space.yaml", 1)
    attrs = study._storage.get_study_system_attrs(study._study_id)
    note = "".join(str(v) for k, v in sorted(attrs.items()) if "note" in k)
    assert f"**Cache**: {code_span(cache.resolve())} (content" in note, note[:500]
    assert "![i]" not in note.replace(code_span(cache.resolve()), "")  # the only image syntax is inside the span


def test_an_ensemble_says_how_many_trials_it_left_out(tmp_path):
    from adsearch.search.objective import OOF_ATTR

    url = _study(tmp_path, trials=4)
    import sqlite3

    study = optuna.load_study(study_name="s", storage=url)
    with sqlite3.connect(tmp_path / "s.db") as connection:  # as if run before adsearch kept out-of-fold scores
        for trial in study.get_trials(deepcopy=False)[:3]:
            connection.execute("DELETE FROM trial_system_attributes WHERE trial_id = ? AND key = ?",
                               (trial._trial_id, OOF_ATTR))
    connection.close()
    result = run("ensemble", "--study", "s", "--storage", url, "--top", "3")
    assert_clear_error(result, "needs at least two completed trials with out-of-fold scores; 1 of 4 have them",
                       "3 left out")


def test_a_worker_stopped_by_sigterm_fails_its_own_trial(tmp_path):
    """Not RUNNING until another worker's grace expires: the trial is FAIL as soon as the worker has gone."""
    plugin = tmp_path / "plugins"
    plugin.mkdir()
    (plugin / "slow_plugin.py").write_text('''
import time
from sklearn.linear_model import LogisticRegression
from adsearch.search.classifiers import FloatRange, register

class Slow(LogisticRegression):
    def fit(self, X, y, sample_weight=None):
        if len(X) not in (12, 24):  # the smoke test fits 12 and 24 rows; the study's folds 16 or 32
            time.sleep(600)
        return super().fit(X, y, sample_weight=sample_weight)

@register("slow_logreg", "sleeps", {"C": FloatRange(0.1, 1.0, above=0)})
def _build(p, seed):
    return Slow(C=p["C"])
''')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(plugin), os.environ.get("PYTHONPATH", "")]))
    cache = write_synthetic_cache(tmp_path / "c", **TINY)
    space = tmp_path / "space.yaml"
    space.write_text(json.dumps({"cv": {"folds": 3}, "screen": {"enabled": False}, "plugins": ["slow_plugin"],
                                 "space": {"classifiers": {"slow_logreg": {}}}}))
    url = f"sqlite:///{tmp_path / 's.db'}"
    worker = subprocess.Popen([sys.executable, "-m", "adsearch.cli", "search", "--cache", str(cache), "--space",
                               str(space), "--study", "s", "--storage", url, "--trials", "1", "--workers", "1"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    storage_trials = []
    while time.monotonic() < deadline and not storage_trials:
        time.sleep(1)
        try:
            storage_trials = optuna.load_study(study_name="s", storage=url).get_trials(deepcopy=False)
        except (KeyError, ValueError):
            continue
    assert storage_trials and storage_trials[0].state.name == "RUNNING", worker.poll()
    worker.send_signal(signal.SIGTERM)  # its worker process gets SIGTERM when it dies (PR_SET_PDEATHSIG)
    worker.wait(60)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        trial = optuna.load_study(study_name="s", storage=url).get_trials(deepcopy=False)[0]
        if trial.state.name != "RUNNING":
            break
        time.sleep(0.5)
    assert trial.state.name == "FAIL", (trial.state, worker.stdout.read()[-2000:])


def test_what_is_written_whole_gets_the_umasks_modes_and_a_stale_partial_folder_is_removed(tmp_path):
    from adsearch.io.outputs import file_written_whole, folder_written_whole

    stale = tmp_path / ".best.partial-k1ll3d"  # what a SIGKILLed export leaves
    (stale / "figures").mkdir(parents=True)
    previous = os.umask(0o022)
    try:
        with folder_written_whole(tmp_path / "best") as work:
            (work / "figures").mkdir()
            (work / "config.yaml").write_text("x: 1\n")
        with file_written_whole(tmp_path / "predictions.csv") as tmp:
            tmp.write_text("file,label\n")
    finally:
        os.umask(previous)
    assert not stale.exists()
    assert (tmp_path / "best").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "best" / "figures").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "best" / "config.yaml").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "predictions.csv").stat().st_mode & 0o777 == 0o644


def test_sigterm_while_a_folder_is_written_removes_its_partial_folder_and_lock(tmp_path):
    code = (
        "import os, signal, sys\n"
        "from adsearch.io.outputs import folder_written_whole\n"
        "with folder_written_whole(sys.argv[1]) as work:\n"
        "    (work / 'half.txt').write_text('x')\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    import time; time.sleep(30)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "best")], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0 and "KeyboardInterrupt" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no `.best.partial-*`, no `.best.lock`, no `best`


def test_predict_and_evaluate_refuse_an_export_edited_after_it_was_written(tmp_path):
    """features.layer edited in config.yaml gave another answer with exit 0; now the file is named."""
    import yaml

    from adsearch.results.export import export_trial

    url = _study(tmp_path, trials=2)
    export_trial("s", url, tmp_path / "best", log=lambda _: None, despite_nuisance_baseline=True)
    copy = tmp_path / "edited"
    shutil.copytree(tmp_path / "best", copy)
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["features"]["layer"] = 1 - config["features"]["layer"]
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    audio = write_wav(tmp_path / "x.wav", speechlike(2.0))
    for args in (["predict", copy, audio], ["evaluate", copy / "config.yaml"]):
        assert_clear_error(run(*args), f"{copy / 'config.yaml'} was changed after the export")
    shutil.copytree(tmp_path / "best", tmp_path / "model-swapped")
    (tmp_path / "model-swapped" / "model.skops").write_bytes((tmp_path / "best" / "model.skops").read_bytes() + b"\0")
    assert_clear_error(run("evaluate", tmp_path / "model-swapped" / "config.yaml"), "model.skops was changed")


def test_imported_word_times_beyond_the_recording_are_refused(synth_manifest, tmp_path):
    """Word times of 1e300 s put infinity into a float32 linguistic cache with only a NumPy warning."""
    from adsearch.corpus import read_manifest

    rec = read_manifest(synth_manifest)[0]
    table = tmp_path / "t.csv"
    for end, expected in (("1e300", "the time 1e+300 s of 'boy'"), ("10000", "the time 10000 s of 'boy'")):
        table.write_text('id,text,words\n' + f'{rec.id},the boy,"[[""the"", 0.1, 0.4], [""boy"", 0.5, {end}]]"\n')
        assert_clear_error(run("transcribe", synth_manifest, "--from-csv", table, "-o", tmp_path / "out"),
                           f"{table}: {rec.id}: {expected}", "is not within the recording")


def test_progress_goes_to_a_log_as_plain_lines_every_five_percent_or_thirty_seconds():
    """Piped into a file, rich draws nothing until the end: 30-67 minutes of empty logs on a busy machine."""
    import io

    from rich.console import Console

    from adsearch.cli.console import LoggedProgress

    log = io.StringIO()
    progress = LoggedProgress(console=Console(file=log, force_terminal=False, width=160))
    with progress:
        task = progress.add_task("extracting 0/40 recordings; audio s", total=1000)
        for _ in range(100):
            progress.advance(task, 10)  # 1 % at a time
    lines = [line for line in log.getvalue().splitlines() if "(%" not in line and " %) after " in line]
    assert 18 <= len(lines) <= 21, log.getvalue()  # one per 5 %, not one per step
    assert lines[0].startswith("extracting 0/40 recordings; audio s: 50/1,000 (5 %) after ")
    terminal = io.StringIO()
    quiet = LoggedProgress(console=Console(file=terminal, force_terminal=True, width=160))
    with quiet:
        task = quiet.add_task("x", total=10)
        quiet.advance(task, 10)
    assert " %) after " not in terminal.getvalue()  # a terminal has its bar


def test_ctrl_c_stops_an_egemaps_extraction(tmp_path):
    """openSMILE's callback swallowed Ctrl-C: only SIGTERM stopped `extract --features egemaps`."""
    rows = []
    for i in range(120):
        write_wav(tmp_path / f"r{i}.wav", speechlike(8.0, seed=i))
        rows.append([f"r{i}", f"r{i}.wav", str(i % 2), f"s{i}", "train"])
    manifest = write_rows(tmp_path / "m.csv", ["id", "path", "label", "group", "split"], rows)
    command = [sys.executable, "-m", "adsearch.cli", "extract", str(manifest), "--features", "egemaps", "-o",
               str(tmp_path / "c")]
    returncode, out, err = interrupt_extraction(command, tmp_path / "c")
    assert returncode == 130, out + err
    assert "interrupted" in err and "Traceback" not in err
    assert len(list((tmp_path / "c").glob("*/parts/*.npz"))) < 120  # it stopped, it did not finish
