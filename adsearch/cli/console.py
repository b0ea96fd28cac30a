"""What every command shares: the consoles, one-line errors instead of tracebacks, progress bars."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text


def _console(stderr: bool) -> Console:
    """Never break paths or commands across lines; piped into a log (CI, tee, SLURM), where rich would
    assume 80 columns and cut bars' labels short, take a wide line unless COLUMNS says otherwise."""
    stream = sys.stderr if stderr else sys.stdout
    piped = not stream.isatty() and "COLUMNS" not in os.environ
    return Console(stderr=stderr, soft_wrap=True, width=PIPED_WIDTH if piped else None)


PIPED_WIDTH = 160
out = _console(stderr=False)
err = _console(stderr=True)


@contextlib.contextmanager
def user_errors(interrupted: str = "run the same command again to resume; finished work is kept"
                ) -> Iterator[None]:
    """Turn expected input errors into one red message and exit code 2, without a traceback. Errors of the
    operating system (a full disk, a read-only folder, a name too long) say which path and what to do.
    Ctrl-C is one line saying what happens next (`interrupted`), exit code 130."""
    from adsearch.corpus import CorpusError
    from adsearch.embed.cache import CacheError
    from adsearch.io.audio import AudioError
    from adsearch.io.outputs import describe_os_error

    expected: tuple[type[Exception], ...] = (AudioError, CorpusError, CacheError, ValueError)
    with contextlib.suppress(ImportError):
        from adsearch.embed.model import ModelError
        from adsearch.synth import SynthError

        expected += (ModelError, SynthError)
    from adsearch.transcripts.asr import AsrError

    expected += (AsrError,)
    try:
        yield
    except expected as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        raise typer.Exit(2) from None
    except OSError as exc:
        err.print(f"[bold red]error:[/] {escape(describe_os_error(exc))}", highlight=False)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        err.print(f"interrupted: {escape(interrupted)}", highlight=False)
        raise typer.Exit(130) from None


def print_threads(requested: int | None):
    """Choose the model's CPU threads (`threads.choose_threads`: --threads, else OMP_NUM_THREADS, else torch's
    default capped by the usable CPUs) and say so: a run on a shared node shows what it took."""
    from adsearch.threads import choose_threads

    with user_errors():
        plan = choose_threads(requested)
    err.print(f"threads: {plan.threads} ({plan.how})", highlight=False)
    return plan


def print_warnings(warnings: list[str], limit: int = 20) -> None:
    for warning in warnings[:limit]:
        err.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
    if len(warnings) > limit:
        err.print(f"[yellow]... and {len(warnings) - limit} more warnings[/]")


class CountProgress:
    """A bar over recordings, for work whose cost is not audio seconds (features from transcripts)."""

    def __init__(self, progress: Progress, what: str):
        self.progress, self.what, self.task = progress, what, None

    def start(self, n_recordings: int, audio_seconds: float, n_done: int) -> None:
        if n_done:
            err.print(f"resuming: {n_done} of {n_recordings} recordings already done")
        self.task = self.progress.add_task(f"{self.what}: recordings", total=n_recordings, completed=n_done)

    def advance(self, n_recordings: int, audio_seconds: float) -> None:
        self.progress.advance(self.task, n_recordings)


class AudioSpeedColumn(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} audio-s/s" if speed else "-- audio-s/s", style="cyan")


def complete(progress: Progress) -> None:
    """A finished run's bars stand at their totals (estimated from the manifest's segments, they can differ
    from what was done by the spans too short to use, and a bar left at 580/581 reads as work missing)."""
    for task in progress.tasks:
        if task.total is not None:
            progress.update(task.id, completed=task.total)


class LoggedProgress(Progress):
    """Rich's bars, plus, where the output is not a terminal (a log file, CI, SLURM), a plain line per task
    every LOG_SECONDS or LOG_SHARE of its total: rich draws nothing there until the work ends, and an
    extraction on a busy machine left 30-67 minutes of empty log."""

    LOG_SECONDS = 30.0
    LOG_SHARE = 0.05

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._logged: dict = {}

    def update(self, task_id, **kwargs) -> None:
        super().update(task_id, **kwargs)
        self._log(task_id)

    def advance(self, task_id, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._log(task_id)

    def _log(self, task_id) -> None:
        import time

        if self.console.is_terminal:
            return
        task = self._tasks[task_id]
        now = time.monotonic()
        share = task.completed / task.total if task.total else 0.0
        since, logged_share = self._logged.setdefault(task_id, (now, 0.0))
        if now - since < self.LOG_SECONDS and share - logged_share < self.LOG_SHARE:
            return
        self._logged[task_id] = (now, share)
        elapsed = task.elapsed or 0.0
        left = f", about {task.time_remaining:.0f} s left" if task.time_remaining is not None and share < 1 else ""
        self.console.print(Text(f"{Text.from_markup(task.description).plain}: {task.completed:,.0f}/"
                                f"{task.total:,.0f} ({100 * share:.0f} %) after {elapsed:.0f} s{left}"))


def bar(*columns: ProgressColumn) -> Progress:
    return LoggedProgress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed:,.0f}/{task.total:,.0f}"),
        *columns, TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=False,
    )


class RichExtractProgress:
    """Bar over audio seconds (so speed is audio-s/s and the ETA is honest), with recordings counted."""

    def __init__(self, progress: Progress, doing: str = "extracting"):
        self.progress, self.doing = progress, doing
        self.task = None
        self.done = self.total = 0

    def start(self, n_recordings: int, audio_seconds: float, n_done: int) -> None:
        self.done, self.total = n_done, n_recordings
        if n_done:
            err.print(f"resuming: {n_done} of {n_recordings} recordings already done")
        self.task = self.progress.add_task(self._label(), total=max(audio_seconds, 1e-9))

    def advance(self, n_recordings: int, audio_seconds: float) -> None:
        self.done += n_recordings
        self.progress.update(self.task, advance=audio_seconds, description=self._label())

    def _label(self) -> str:
        return f"{self.doing} {self.done}/{self.total} recordings; audio s"


class RichFinetuneProgress:
    """Bars for fine-tuning: one over the models (folds + full), one over the current epoch's batches with
    the running loss; a line per epoch with the validation loss and score."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.models = None
        self.batches = None
        self.losses: list[float] = []

    def fold(self, name: str, index: int, total: int) -> None:
        if self.models is None:
            self.models = self.progress.add_task("models", total=total, info="")
        self.progress.update(self.models, completed=index, info=name)

    def epoch(self, name: str, epoch: int, epochs: int, batches: int) -> None:
        if self.batches is not None:
            self.progress.remove_task(self.batches)
        self.losses = []
        self.batches = self.progress.add_task(f"{name} epoch {epoch + 1}/{epochs}", total=batches, info="")

    def step(self, loss: float) -> None:
        self.losses.append(loss)
        self.progress.update(self.batches, advance=1, info=f"loss {np.mean(self.losses[-20:]):.3f}")

    def validated(self, name: str, epoch: int, loss: float, score: float, best: float) -> None:
        self.progress.console.print(f"{name} epoch {epoch + 1}: train loss {np.mean(self.losses):.4f}, validation "
                                    f"loss {loss:.4f}, balanced accuracy {score:.3f} (best {best:.3f})",
                                    highlight=False)
