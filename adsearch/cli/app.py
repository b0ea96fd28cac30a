"""The `adsearch` command: its Typer application, command groups and the option help they share.

Each command lives in the module of its step (corpus, extract, space, search, results, dashboard); importing
`adsearch.cli` registers them all."""

from __future__ import annotations

import contextlib
import sys
from typing import Annotated

import typer

from adsearch.cli.console import out
from adsearch.threads import quiet_openmp

app = typer.Typer(
    help="AutoML hyperparameter search over layer-wise wav2vec2 embeddings for speech-based dementia "
    "detection. Workflow: corpus -> extract -> search -> export.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts are plain: `adsearch[egemaps]` must print as typed
)
corpus_app = typer.Typer(help="Build a corpus manifest (recordings, labels, speakers, splits).", no_args_is_help=True,
                         rich_markup_mode=None)
model_app = typer.Typer(help="Speech model helpers.", no_args_is_help=True, rich_markup_mode=None)
cache_app = typer.Typer(help="Inspect embedding caches.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(corpus_app, name="corpus")
app.add_typer(model_app, name="model")
app.add_typer(cache_app, name="cache")
space_app = typer.Typer(help="Search-space files.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(space_app, name="space")

TRIALS_HELP = "Trial budget of each study: finished trials, counted across all its workers."
WORKERS_HELP = "Worker processes on this machine (one core each)."
PLUGINS_HELP = ("A Python module (importable here and on every worker machine) that registers classifiers "
                 "with adsearch.search.classifiers.register; repeatable. Added to the space's `plugins:` and "
                 "recorded on the study. Installed packages' `adsearch.classifiers` entry points need no option.")
ARTIFACTS_HELP = ("Artifact store for the study's figures (screen heat map, report), which the dashboard "
                   "shows. Recorded on the study at its first figure, so later commands find it; default: the "
                   "recorded one, else ./adsearch-artifacts.")
THREADS_HELP = ("CPU threads of the model (intra-op). Default: torch's own, one per core, capped by the CPUs this "
                "process may use (affinity, cgroup quota); OMP_NUM_THREADS is respected. Printed, and recorded "
                "with a cache.")
STORAGE_HELP = ("SQLAlchemy URL of the study database: the default is an embedded SQLite file in the working "
                 "directory; use postgresql+psycopg://user@host/db for workers on several machines. A password may "
                 "sit in the URL, in PGPASSWORD or ~/.pgpass (PostgreSQL's own), or in the file named by "
                 "ADSEARCH_STORAGE_PASSWORD_FILE (e.g. a Docker secret); it is never printed.")


def _print_version(value: bool) -> None:
    if value:
        from adsearch import __version__

        out.print(f"adsearch {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", help="Print adsearch's version and exit.",
                                                callback=_print_version, is_eager=True)] = False) -> None:
    """Output never breaks on a file name that is not UTF-8 (shown with \\x escapes instead). OpenMP threads
    of any torch a command loads wait briefly, then sleep (`threads.quiet_openmp`), set before torch loads."""
    quiet_openmp()

    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")
