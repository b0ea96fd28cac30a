"""The commands as a user types them (in-process through typer's runner, same code path as the script)."""

import re

from conftest import interrupt_extraction, speechlike, write_rows, write_wav
from typer.testing import CliRunner

from adsearch.cli import app
from adsearch.embed import open_cache

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_full_foundation_workflow(synth_root, tiny_model, tmp_path):
    manifest = tmp_path / "corpus.csv"
    result = run("corpus", "adresso", synth_root, "--test-labels", synth_root / "task1.csv", "-o", manifest)
    assert result.exit_code == 0, result.output
    assert "train 12" in result.output and "test 4" in result.output
    result = run("extract", manifest, "--model", tiny_model, "-o", tmp_path / "cache", "--window-s", "5")
    assert result.exit_code == 0, result.output
    assert "cache:" in result.output and "(16 recordings)" in result.output
    cache = open_cache(tmp_path / "cache")
    assert cache.path.name.startswith(f"corpus-{tiny_model.name}-")  # a person tells corpora and models apart
    assert f"--cache {cache.path}" in " ".join(result.output.split())  # the exact path to search
    assert cache.meta["settings"]["window_s"] == 5.0
    result = run("cache", "info", tmp_path / "cache")
    assert result.exit_code == 0 and "layers     5" in result.output
    result = run("extract", manifest, "--model", tiny_model, "-o", tmp_path / "cache", "--window-s", "5")
    assert "already complete" in result.output


def test_csv_corpus_validates_and_rewrites(tmp_path):
    write_wav(tmp_path / "audio" / "x.wav", speechlike(1.0))
    mine = write_rows(tmp_path / "mine.csv", ["id", "path", "label", "group", "split"],
                      [["x", "audio/x.wav", "1", "spk1", "train"], ["y", "audio/x.wav", "", "spk2", "test"]])
    result = run("corpus", "csv", mine, "-o", tmp_path / "out" / "corpus.csv")
    assert result.exit_code == 0, result.output
    assert str(tmp_path / "audio" / "x.wav") in (tmp_path / "out" / "corpus.csv").read_text()
    bad = write_rows(tmp_path / "bad.csv", ["id", "path", "label", "group", "split"],
                     [["x", "nope.wav", "2", "", "train"]])
    result = run("corpus", "csv", bad)
    assert result.exit_code == 2
    assert "bad.csv line 2" in result.output and "label '2'" in result.output


def test_extract_reports_skipped_files_and_clear_errors(tmp_path, tiny_model):
    write_wav(tmp_path / "ok.wav", speechlike(2.0))
    (tmp_path / "broken.wav").write_bytes(b"\x00" * 100)
    manifest = write_rows(tmp_path / "m.csv", ["id", "path", "label", "group", "split"],
                          [["ok", "ok.wav", "1", "a", "train"], ["broken", "broken.wav", "0", "b", "train"]])
    result = run("extract", manifest, "--model", tiny_model, "-o", tmp_path / "c")
    assert result.exit_code == 0, result.output
    assert "1 recording(s) skipped" in result.output and "broken" in result.output
    result = run("extract", manifest, "--model", tmp_path / "no-such-model/", "-o", tmp_path / "c")
    assert result.exit_code == 2 and "model directory not found" in result.output
    result = run("extract", tmp_path / "missing.csv", "--model", tiny_model, "-o", tmp_path / "c")
    assert result.exit_code == 2 and "manifest not found" in result.output
    result = run("cache", "info", tmp_path / "nothing")
    assert result.exit_code == 2 and "cache directory not found" in result.output


def test_model_tiny_and_synth_refuse_to_overwrite(tmp_path):
    assert run("model", "tiny", tmp_path / "m").exit_code == 0
    result = run("model", "tiny", tmp_path / "m")
    assert result.exit_code == 2 and "already holds a model" in result.output
    assert run("synth", tmp_path / "s", "--n-train", "4", "--n-test", "0").exit_code == 0
    result = run("synth", tmp_path / "s", "--n-train", "4", "--n-test", "0")
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert len(list((tmp_path / "s").rglob("*.wav"))) == 4


def test_help_explains_every_command():
    for command in (["--help"], ["corpus", "adresso", "--help"], ["corpus", "csv", "--help"], ["synth", "--help"],
                    ["extract", "--help"], ["model", "tiny", "--help"], ["cache", "info", "--help"]):
        result = run(*command)
        assert result.exit_code == 0 and "Usage" in result.output
        assert "<bool>" not in result.output  # flags read --flag / --no-flag
    assert "adsearch[egemaps]" in run("extract", "--help").output  # help is plain text, not markup


def test_space_check_validates_and_summarises(tmp_path):
    result = run("space", "check", "studies/default.yaml")
    assert result.exit_code == 0 and "valid (hash" in result.output and "catboost:" in result.output
    assert "logreg: C range 0.0001..100 (log)" in result.output and "knn: n_neighbors range 1..31; weights one of " \
        "uniform, distance" in result.output
    assert "Range(" not in result.output and "['" not in result.output  # no Python reprs
    bad = tmp_path / "bad.yaml"
    bad.write_text("cv: {metric: auc}\n")
    result = run("space", "check", bad)
    assert result.exit_code == 2 and "cv.metric" in result.output


def test_worker_and_search_report_unknown_study_and_bad_cache(tmp_path):
    storage = f"sqlite:///{tmp_path / 'x.db'}"
    result = run("worker", "--study", "ghost", "--storage", storage)
    assert result.exit_code == 2 and "no study database at" in result.output and "adsearch search" in result.output
    assert not (tmp_path / "x.db").exists()  # a mistyped --storage leaves no empty database behind
    result = run("search", "--cache", tmp_path / "missing", "--study", "s", "--storage", storage)
    assert result.exit_code == 2 and "cache directory not found" in result.output


def test_version_is_printed():
    from adsearch import __version__

    result = run("--version")
    assert result.exit_code == 0 and result.output.strip() == f"adsearch {__version__}"


def test_studies_lists_what_a_storage_holds_and_a_typo_shows_it(tmp_path):
    from adsearch.embed.synthetic import write_synthetic_cache
    from adsearch.search.space import parse_spec
    from adsearch.search.storage import make_storage
    from adsearch.search.study import create_or_resume

    cache = open_cache(write_synthetic_cache(tmp_path / "c", n_train=20, n_test=4, n_layers=2, dim=8,
                                             signal_layer=1))
    url = f"sqlite:///{tmp_path / 's.db'}"
    create_or_resume(make_storage(url), "adresso-1", cache, parse_spec({"cv": {"folds": 3}}), "s.yaml", 7)
    result = run("studies", "--storage", url)
    assert result.exit_code == 0 and "adresso-1" in result.output and "0/7" in result.output, result.output
    result = run("worker", "--study", "adreso-1", "--storage", url)
    assert result.exit_code == 2 and "no study 'adreso-1'" in result.output and "it holds adresso-1" in result.output


def test_ctrl_c_during_extract_is_one_line_and_the_rerun_resumes(tmp_path, tiny_model):
    import subprocess
    import sys

    rows = []
    for i in range(160):  # about 10 s of extraction at 100x real time: SIGINT lands well before the end
        write_wav(tmp_path / f"r{i}.wav", speechlike(6.0, seed=i))
        rows.append([f"r{i}", f"r{i}.wav", str(i % 2), f"s{i}", "train"])
    manifest = write_rows(tmp_path / "m.csv", ["id", "path", "label", "group", "split"], rows)
    command = [sys.executable, "-m", "adsearch.cli", "extract", str(manifest), "--model", str(tiny_model), "-o",
               str(tmp_path / "c"), "--window-s", "1"]
    returncode, out, err = interrupt_extraction(command, tmp_path / "c")
    assert returncode == 130, out + err
    assert "interrupted: run the same command again to resume" in err and "Traceback" not in err
    said = [line for line in err.splitlines() if not re.search(r" \(\d+ %\) after \d+ s", line)]
    assert len(said) < 10, err  # beside the log's progress lines: the bar and one line, no worker tracebacks
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "resuming:" in done.stderr, done.stderr


def test_piped_output_keeps_whole_labels_and_bars_end_at_their_totals(synth_manifest, tiny_model, tmp_path):
    """In a log (CI, tee, SLURM) rich would assume 80 columns and cut a bar's label; a finished bar must
    stand at its total (it is estimated from the segments, and spans too short to use are never advanced)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    done = subprocess.run([sys.executable, "-m", "adsearch.cli", "extract", str(synth_manifest), "--model",
                           str(tiny_model), "-o", str(tmp_path / "cache"), "--window-s", "1", "--min-window-s", "0.9"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "…" not in done.stderr and "audio-s/s" in done.stderr
    bar = next(line for line in done.stderr.splitlines() if "recordings; audio s" in line and "audio-s/s" in line)
    logged = [line for line in done.stderr.splitlines()
              if re.search(r"recordings; audio s: [\d,]+/[\d,]+ \(\d+ %\)", line)]
    assert logged, done.stderr  # a log also gets plain progress lines on the way (every 5 % or 30 s)
    assert re.search(r"extracting 16/16 recordings; audio s .* (\d[\d,]*)/\1 ", bar), bar


def test_an_option_means_the_same_in_every_command():
    """--workers, --trials and the cache root read alike wherever they appear (they used to mean runs at a time,
    trials per run and a budget; -o in extract was --cache-root in finetune)."""
    import click
    import typer

    cli = typer.main.get_command(app)
    options = {}
    for name, command in cli.commands.items():
        if isinstance(command, click.Group):
            continue
        for param in command.params:
            options.setdefault(param.name, {})[name] = (param.help or "", param.opts)
    assert len({help_.split(" Default:")[0] for help_, _ in options["trials"].values()}) == 1, options["trials"]
    workers = {help_.split(";")[0].rstrip(".") for help_, _ in options["workers"].values()}
    assert workers == {"Worker processes on this machine (one core each)"}, workers
    assert "--cache-root" in options["output"]["extract"][1] and "--cache-root" in options["cache_root"]["finetune"][1]
    assert "--runs" in options["runs"]["compare"][1] and "--runs" in options["runs"]["null"][1]
    assert "seeds" not in options
