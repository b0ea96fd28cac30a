"""The `adsearch` command line: thin wrappers that parse options, show progress and report errors."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from adsearch.embed.model import DEFAULT_MODEL
from adsearch.search.budget import MAX_TRIALS

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

def _console(stderr: bool) -> Console:
    """Never break paths or commands across lines; piped into a log (CI, tee, SLURM), where rich would
    assume 80 columns and cut bars' labels short, take a wide line unless COLUMNS says otherwise."""
    stream = sys.stderr if stderr else sys.stdout
    piped = not stream.isatty() and "COLUMNS" not in os.environ
    return Console(stderr=stderr, soft_wrap=True, width=PIPED_WIDTH if piped else None)


PIPED_WIDTH = 160
out = _console(stderr=False)
err = _console(stderr=True)


def _print_version(value: bool) -> None:
    if value:
        from adsearch import __version__

        out.print(f"adsearch {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", help="Print adsearch's version and exit.",
                                                callback=_print_version, is_eager=True)] = False) -> None:
    """Output never breaks on a file name that is not UTF-8 (shown with \\x escapes instead)."""
    import sys

    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")


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


def _print_warnings(warnings: list[str], limit: int = 20) -> None:
    for warning in warnings[:limit]:
        err.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
    if len(warnings) > limit:
        err.print(f"[yellow]... and {len(warnings) - limit} more warnings[/]")


def _summarise_corpus(recordings, manifest: Path) -> None:
    from collections import Counter

    counts = Counter((r.split, r.label) for r in recordings)
    parts = []
    for split in ("train", "test"):
        n = sum(v for (s, _), v in counts.items() if s == split)
        if n:
            scored = sum(r.split == split and r.mmse is not None for r in recordings)
            parts.append(f"{split} {n} (AD {counts[split, 1]}, control {counts[split, 0]}, "
                         f"unlabelled {counts[split, None]}; {scored} with an MMSE score)")
    out.print(f"wrote {manifest}: {'; '.join(parts)}", highlight=False)


# ----------------------------------------------------------------------------------------------------------
# corpus


@corpus_app.command("adresso")
def corpus_adresso(
    root: Annotated[Path, typer.Argument(help="Unpacked ADReSSo 2021 archives (the folder holding ADReSSo21/, "
                                              "or ADReSSo21/diagnosis itself).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Manifest CSV to write.")] = Path("corpus.csv"),
    test_labels: Annotated[Path | None, typer.Option(help="The separately released test label file "
                                                          "(task1.csv: ID, Dx).")] = None,
    test_mmse: Annotated[Path | None, typer.Option(help="The test split's MMSE scores (task2.csv: ID, MMSE), for "
                                                        "MMSE studies; default: task2.csv beside --test-labels, "
                                                        "when it is there.")] = None,
    keep: Annotated[str, typer.Option(help="participant: the participant's (PAR) speech. For a shortcut control: "
                                           "non-participant (interviewer speech and pauses) or non-speech "
                                           "(outside every speaker segment); recordings whose PAR time is "
                                           "unknown are dropped, never kept whole.")] = "participant",
) -> None:
    """Import the ADReSSo 2021 diagnosis layout, keeping participant (PAR) speech only (or, with --keep, the
    parts outside it: a control that shows how much label information lies outside the speech)."""
    from adsearch.corpus import import_adresso, write_manifest

    with user_errors():
        result = import_adresso(root, test_labels, keep, test_mmse)
        _print_warnings(result.warnings)
        manifest = write_manifest(result.recordings, output)
    _summarise_corpus(result.recordings, manifest)


@corpus_app.command("csv")
def corpus_csv(
    file: Annotated[Path, typer.Argument(help="Your manifest: id, path, label, group, split[, mmse, segments].")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Validated manifest to write.")] = Path("corpus.csv"),
    vad: Annotated[bool, typer.Option("--vad/--no-vad", help="Give recordings without segments the speech that "
                                                             "voice activity detection (silero-vad) finds; "
                                                             "interviewer speech is kept too.")] = False,
) -> None:
    """Validate a manifest of another corpus and write it in canonical form.

    label is 1 (AD), 0 (control) or empty (unlabelled, test only); group is the speaker (recordings of one
    speaker never straddle folds); segments lists participant speech as `begin-end` seconds joined by `;`
    (empty = whole recording); segmentation (optional) says where they came from. Relative paths are taken
    relative to FILE's folder.
    """
    from adsearch.corpus import read_manifest, write_manifest

    with user_errors():
        recordings = read_manifest(file)
        if vad:
            from adsearch.vad import VAD_CAVEAT, segment_unsegmented

            todo = sum(1 for rec in recordings if not rec.segments and rec.segmentation != "whole")
            with _bar() as progress:
                task = progress.add_task("voice activity detection", total=todo)
                recordings, warnings = segment_unsegmented(recordings, lambda: progress.advance(task))
                _complete(progress)
            _print_warnings(warnings)
            found = sum(1 for rec in recordings if rec.segmentation == "vad")
            out.print(f"{found} of {todo} recording(s) without segments segmented by voice activity detection: "
                      f"{VAD_CAVEAT}", highlight=False)
        manifest = write_manifest(recordings, output)
    _summarise_corpus(recordings, manifest)


# ----------------------------------------------------------------------------------------------------------
# synth and model


@app.command()
def synth(
    output: Annotated[Path, typer.Argument(help="Folder to write the corpus into.")],
    n_train: Annotated[int, typer.Option(help="Training recordings (ADReSSo: 166).")] = 166,
    n_test: Annotated[int, typer.Option(help="Test recordings (ADReSSo: 71).")] = 71,
    effect: Annotated[float, typer.Option(help="Strength of the AD speech markers; 0 = no group difference.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Random seed.", min=0, max=2**32 - 1)] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing synthetic corpus in OUTPUT.")] = False,
    markers: Annotated[str, typer.Option(help="Which markers differ between the groups: all; acoustic (rate, "
                                              "hesitation pauses); linguistic (filled pauses, repetitions, empty "
                                              "phrases). The others are drawn alike for both groups.")] = "all",
) -> None:
    """Write a synthetic corpus in the exact ADReSSo layout, spoken by eSpeak NG.

    AD speakers talk slower, pause more and longer, use more filled pauses and repetitions and fewer
    content words, each scaled by --effect. Test labels go to OUTPUT/task1.csv, drawn parameters to
    OUTPUT/markers.csv.
    """
    from adsearch.synth import synthesize_corpus

    with user_errors(), _bar() as progress:
        task = progress.add_task("synthesising", total=n_train + n_test)
        synthesize_corpus(output, n_train, n_test, effect, seed, overwrite,
                          on_recording=lambda _: progress.advance(task), markers=markers)
    out.print(f"wrote {n_train} train and {n_test} test recordings under {output}/ADReSSo21/diagnosis; "
              f"test labels in {output}/task1.csv", highlight=False)
    out.print(f"next: adsearch corpus adresso {output} --test-labels {output}/task1.csv -o corpus.csv",
              highlight=False)


@model_app.command("tiny")
def model_tiny(
    output: Annotated[Path, typer.Argument(help="Folder to save the model into (save_pretrained format).")],
    seed: Annotated[int, typer.Option(help="Seed for the random weights.", min=0, max=2**32 - 1)] = 0,
    hidden_size: Annotated[int, typer.Option(help="Hidden size (an even number: two attention heads).", min=4,
                                             max=4096)] = 32,
    layers: Annotated[int, typer.Option(help="Transformer layers.", min=1, max=64)] = 4,
    kind: Annotated[str, typer.Option(help="wav2vec2; wav2vec2-ctc: with a CTC head over letters and a processor, "
                                           "for `adsearch transcribe --asr ctc` (its words are random); whisper: "
                                           "a Whisper model, whose encoder layers `extract` caches.")] = "wav2vec2",
) -> None:
    """Save a tiny randomly initialised wav2vec2 (stable layer norm, masked preprocessor) for tests and demos.

    It loads through the same from_pretrained path as a real checkpoint; its embeddings carry no meaning.
    """
    from adsearch.embed.model import save_tiny_model

    with user_errors():
        save_tiny_model(output, seed, hidden_size, layers, kind)
    out.print(f"saved a tiny random {kind} ({layers} layers, hidden size {hidden_size}) to {output}")


# ----------------------------------------------------------------------------------------------------------
# extract


class _CountProgress:
    """A bar over recordings, for work whose cost is not audio seconds (features from transcripts)."""

    def __init__(self, progress: Progress, what: str):
        self.progress, self.what, self.task = progress, what, None

    def start(self, n_recordings: int, audio_seconds: float, n_done: int) -> None:
        if n_done:
            err.print(f"resuming: {n_done} of {n_recordings} recordings already done")
        self.task = self.progress.add_task(f"{self.what}: recordings", total=n_recordings, completed=n_done)

    def advance(self, n_recordings: int, audio_seconds: float) -> None:
        self.progress.advance(self.task, n_recordings)


class _AudioSpeedColumn(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} audio-s/s" if speed else "-- audio-s/s", style="cyan")


def _complete(progress: Progress) -> None:
    """A finished run's bars stand at their totals (estimated from the manifest's segments, they can differ
    from what was done by the spans too short to use, and a bar left at 580/581 reads as work missing)."""
    for task in progress.tasks:
        if task.total is not None:
            progress.update(task.id, completed=task.total)


def _bar(*columns: ProgressColumn) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed:,.0f}/{task.total:,.0f}"),
        *columns, TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=False,
    )


class _RichExtractProgress:
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


@app.command()
def extract(
    manifest: Annotated[Path, typer.Argument(help="Corpus manifest from `adsearch corpus`.")],
    output: Annotated[Path, typer.Option("-o", "--output", "--cache-root",
                                         help="Cache root; each corpus/model/settings combination gets its own "
                                              "sub-folder (--cache-root, as in finetune).")],
    model: Annotated[str, typer.Option(help="Hugging Face id or local directory of a wav2vec2-family model.")] = (
        DEFAULT_MODEL),
    revision: Annotated[str | None, typer.Option(help="Hub revision (branch, tag or commit).")] = None,
    window_s: Annotated[float, typer.Option(help="Longest window in seconds (bounds memory, attention cost).")] = 20.0,
    min_window_s: Annotated[float, typer.Option(help="Shorter speech spans are skipped.")] = 0.5,
    batch_size: Annotated[int | None, typer.Option(help="Windows per forward pass (default: 16 on CUDA, "
                                                        "1 on CPU, where batching only costs memory).")] = None,
    device: Annotated[str, typer.Option(help="auto (CUDA if present), cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (bf16/fp16 on CUDA, fp32 on CPU), float32, bfloat16, "
                                            "float16.")] = "auto",
    features: Annotated[str, typer.Option(help="model: the speech model's hidden states; egemaps: openSMILE's 25 "
                                               "eGeMAPSv02 low-level descriptors per 10 ms, pooled like a layer; "
                                               "egemaps-functionals: the 88 functionals per window (with --window-s "
                                               "600: per recording), needs adsearch[egemaps]; linguistic: "
                                               "interpretable features of the --transcripts (rates, pauses, "
                                               "fillers, lexical diversity, information units); ngrams: word 1- and "
                                               "2-gram counts of the --transcripts (search them with scale: tfidf, "
                                               "fitted inside the folds); text: every layer "
                                               "of --text-model over the --transcripts.")] = "model",
    transcripts: Annotated[Path | None, typer.Option(help="Transcript folder from `adsearch transcribe` (for "
                                                          "--features linguistic or text).")] = None,
    text_model: Annotated[str | None, typer.Option(help="Hugging Face text encoder (id or save_pretrained "
                                                        "folder, BERT family) for --features text.")] = None,
    shard: Annotated[str | None, typer.Option(help="K/N: extract only the K-th of N shards (0 <= K < N) into the "
                                                   "same -o (shared file system), e.g. --shard "
                                                   "$SLURM_ARRAY_TASK_ID/8 or $JOB_COMPLETION_INDEX/8. The last "
                                                   "shard to finish consolidates the cache.")] = None,
) -> None:
    """Run every recording through the speech model once and cache every layer's pooled statistics.

    Participant speech is cut into windows of at most --window-s seconds; per window and layer the
    cache keeps frame count, mean, M2, max and min, from which every pooling is derived exactly.
    Interrupted runs resume where they stopped; unreadable or too-short files are reported and skipped.
    """
    from adsearch.embed.extract import ExtractSettings
    from adsearch.embed.extract import extract as run_extract
    from adsearch.work import parse_shard

    if features in ("linguistic", "ngrams", "text") or transcripts is not None or text_model is not None:
        from adsearch.embed.from_transcripts import extract_from_transcripts

        with user_errors(), _bar() as progress:
            result = extract_from_transcripts(manifest, output, features, transcripts, text_model, device,
                                              _CountProgress(progress, "features"))
            _complete(progress)
        _print_extract_result(result, shard)
        return
    with user_errors(), _bar(_AudioSpeedColumn()) as progress:
        result = run_extract(manifest, output, model, ExtractSettings(window_s, min_window_s, dtype),
                             batch_size=batch_size, device=device, revision=revision,
                             progress=_RichExtractProgress(progress), shard=parse_shard(shard) if shard else None,
                             features=features)
        if not result.remaining:
            _complete(progress)
    _print_extract_result(result, shard)


def _print_extract_result(result, shard: str | None) -> None:
    _print_warnings(result.redone)
    if result.remaining:
        out.print(f"shard {shard} done: {result.n_computed} recording(s) extracted here; {result.remaining} of other "
                  f"shards still to go. The last shard to finish consolidates {result.cache_dir}.", highlight=False)
        return
    if result.n_computed == 0 and not result.failures:
        out.print("cache already complete, nothing to do")
    if result.failures:
        err.print(f"[yellow]{len(result.failures)} recording(s) skipped:[/]")
        for failure in result.failures:
            err.print(f"  {failure.id}  {failure.path}: {failure.reason}", highlight=False)
    out.print(f"cache: {result.cache_dir} ({result.n_items} recordings); search it with --cache {result.cache_dir}",
              highlight=False)
    if result.compute_seconds > 0 and result.audio_seconds > 0:
        out.print(f"{result.audio_seconds:,.0f} s of audio in {result.compute_seconds:,.1f} s "
                  f"({result.audio_seconds / result.compute_seconds:,.1f}x real time)")


class _RichFinetuneProgress:
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


@app.command()
def transcribe(
    manifest: Annotated[Path, typer.Argument(help="Corpus manifest from `adsearch corpus`.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Transcript root; each recogniser/corpus "
                                                                "combination gets its own sub-folder.")],
    asr: Annotated[str, typer.Option(help="whisper: faster-whisper (CTranslate2); ctc: the CTC head of a "
                                          "wav2vec2-family model, e.g. the seed's own model.")] = "whisper",
    model: Annotated[str | None, typer.Option(help="whisper: a CTranslate2 model folder or a faster-whisper name "
                                                   "(default: the offline Whisper tiny.en of adsearch[asr]); ctc: a "
                                                   "Hugging Face id or folder (default: the seed's model).")] = None,
    device: Annotated[str, typer.Option(help="auto (CUDA if present), cpu, cuda or cuda:N.")] = "auto",
    shard: Annotated[str | None, typer.Option(help="K/N: transcribe only the K-th of N shards into the same -o; the "
                                                   "last to finish writes transcripts.json.")] = None,
    from_chat: Annotated[Path | None, typer.Option(help="Import CHAT files ({id}.cha, *PAR tier) from this "
                                                        "folder instead of running a recogniser.")] = None,
    from_csv: Annotated[Path | None, typer.Option(help="Import a CSV id,text[,words] instead of running a "
                                                       "recogniser (words: JSON [[word, start, end], ...]).")] = None,
) -> None:
    """Transcribe the participant's speech of every recording once (or import transcripts you have).

    Only the manifest's participant segments are decoded. Each transcript keeps words with start, end and
    the recogniser's probability. Interrupted runs resume; unreadable or digitally silent audio is listed and
    skipped (as by `extract`); a recording in which no word is heard gets an empty transcript.
    Next: `adsearch extract MANIFEST --features linguistic --transcripts FOLDER`.
    """
    from adsearch.transcripts.imports import import_transcripts
    from adsearch.transcripts.run import transcribe as run_transcribe
    from adsearch.work import parse_shard

    with user_errors():
        if from_chat is not None or from_csv is not None:
            found = import_transcripts(manifest, output, from_chat, from_csv)
            folder, n_items, failures = found.path, len(found.meta["items"]), found.meta["failures"]
            seconds = compute = 0.0
        else:
            with _bar(_AudioSpeedColumn()) as progress:
                result = run_transcribe(manifest, output, asr, model, device, parse_shard(shard) if shard else None,
                                        progress=_RichExtractProgress(progress, "transcribing"))
                if not result.remaining:
                    _complete(progress)
            if result.remaining:
                out.print(f"shard {shard} done; {result.remaining} recording(s) of other shards still to go. The "
                          f"last shard to finish completes {result.folder}.", highlight=False)
                return
            folder, n_items, failures = result.folder, result.n_items, result.failures
            seconds, compute = result.audio_seconds, result.compute_seconds
    if failures:
        err.print(f"[yellow]{len(failures)} recording(s) without a transcript:[/]")
        for failure in failures:
            err.print(f"  {failure['id']}  {failure['path']}: {escape(failure['reason'])}", highlight=False)
    out.print(f"transcripts: {folder} ({n_items} recordings)", highlight=False)
    if compute > 0:
        out.print(f"{seconds:,.0f} s of speech in {compute:,.1f} s ({seconds / compute:,.1f}x real time)")
    out.print(f"next: adsearch extract {manifest} --features linguistic --transcripts {folder} -o CACHE_ROOT",
              highlight=False)


@app.command()
def finetune(
    manifest: Annotated[Path, typer.Argument(help="Corpus manifest (train recordings are fine-tuned on).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder for the fine-tuned models (fold-K/, full/) "
                                                                "and finetune.json; a rerun resumes in it.")],
    model: Annotated[str, typer.Option(help="Hugging Face id or local directory of a wav2vec2-family model.")] = (
        DEFAULT_MODEL),
    folds: Annotated[int, typer.Option(help="Speaker-grouped folds for cross-fitting.", min=2, max=20)] = 5,
    folds_from: Annotated[str | None, typer.Option(help="Take the fold assignment of this study instead (with "
                                                        "--storage).")] = None,
    storage: Annotated[str, typer.Option(help=_STORAGE_HELP, envvar="ADSEARCH_STORAGE")] = "sqlite:///adsearch.db",
    crossfit: Annotated[bool, typer.Option(help="--no-crossfit: one model on every train recording (naive; the "
                                                "cache, study note and report say CV optimistic).")] = True,
    cache_root: Annotated[Path | None, typer.Option(help="Where the cross-fitted cache goes (default: OUTPUT/cache)."
                                                    )] = None,
    epochs: Annotated[int, typer.Option(help="Most epochs per model (early stopping may end sooner).")] = 10,
    batch_size: Annotated[int, typer.Option(help="An optimiser step takes --batch-size x --accumulate windows; on "
                                                 "the CPU --batch-size per forward pass.")] = 4,
    accumulate: Annotated[int, typer.Option(help="See --batch-size (on the CPU: passes per optimiser step, "
                                                 "gradient accumulation).")] = 2,
    micro_batch: Annotated[int, typer.Option(help="Windows per forward/backward pass. 0: on CUDA the fewest passes "
                                                  "per step that fit the card's free memory (measured on it), on "
                                                  "the CPU --batch-size. The loss is normalised over the whole "
                                                  "step, so this changes memory and speed, not the optimisation; "
                                                  "the choice is recorded in each model's done.json.")] = 0,
    checkpointing: Annotated[str, typer.Option(help="Gradient checkpointing (recompute activations in the backward "
                                                    "pass: less memory, about a third more compute): auto (only "
                                                    "when the passes do not fit without it), on, off.")] = "auto",
    encoder_lr: Annotated[float, typer.Option(help="AdamW learning rate of the transformer.")] = 3e-5,
    head_lr: Annotated[float, typer.Option(help="AdamW learning rate of the linear head.")] = 1e-3,
    freeze_layers: Annotated[int, typer.Option(help="Lower transformer layers kept frozen.")] = 0,
    window_s: Annotated[float, typer.Option(help="Training window length in seconds.")] = 10.0,
    patience: Annotated[int, typer.Option(help="Epochs without a better validation score before stopping.")] = 3,
    seed: Annotated[int, typer.Option(help="Seed of folds, validation split, initialisation and batches.")] = 0,
    device: Annotated[str, typer.Option(help="auto (CUDA if present), cpu, cuda or cuda:N.")] = "auto",
) -> None:
    """Fine-tune the speech model on the AD labels, cross-fitted, and extract a cache from it.

    Per fold, a model fine-tuned on the other folds extracts that fold's train recordings; a model fine-tuned
    on the whole train split extracts the test recordings (and is the one export and predict use). The cache
    records the folds and which model produced each item; a study on it uses exactly those folds. A killed
    run resumes from its last epoch; finished folds are never redone.
    """
    import optuna

    from adsearch.embed.extract import ExtractSettings
    from adsearch.finetune.train import FinetuneError, FinetuneSettings, extract_crossfit
    from adsearch.finetune.train import finetune as run_finetune

    with user_errors():
        try:
            settings = FinetuneSettings(epochs=epochs, batch_size=batch_size, accumulate=accumulate,
                                        micro_batch=micro_batch, checkpointing=checkpointing,
                                        encoder_lr=encoder_lr, head_lr=head_lr, freeze_layers=freeze_layers,
                                        window_s=window_s, patience=patience, seed=seed)
        except FinetuneError as exc:
            raise ValueError(str(exc)) from None
        assignment = None
        if folds_from:
            from adsearch.search.storage import make_storage
            from adsearch.search.study import StudySetup

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            try:
                store = make_storage(storage, create=False)
                setup = StudySetup.from_study(optuna.load_study(study_name=folds_from, storage=store))
            except KeyError:
                raise ValueError(f"--folds-from: no study {folds_from!r} in this storage") from None
            if setup.folds.shape[0] != 1:
                raise ValueError(f"--folds-from: study {folds_from!r} uses {setup.folds.shape[0]} repeats; "
                                 "cross-fitting needs one fold assignment")
            assignment = (setup.train_ids, setup.folds[0])
        with _bar(TextColumn("{task.fields[info]}")) as progress:
            record = run_finetune(manifest, model, output, settings, folds, assignment, crossfit, device,
                                  _RichFinetuneProgress(progress))
        for name, done in record["models"].items():
            passes = done.get("passes")
            how = (f"; {passes['micro_batch']} window(s) per pass, checkpointing "
                   f"{'on' if passes['checkpointing'] else 'off'} ({passes['chosen']})" if passes else "")
            out.print(f"{name}: {done['epochs_run']} epoch(s), best validation balanced accuracy "
                      f"{done['best_validation']:.3f}, trained on {len(done['trained_on'])} recordings{how} -> "
                      f"{done['path']}", highlight=False)
        with _bar(_AudioSpeedColumn()) as progress:
            cache_dir = extract_crossfit(manifest, output, cache_root or output / "cache", ExtractSettings(),
                                         device=device, progress_for=lambda name: _RichExtractProgress(
                                             progress, f"{name} model extracting"))
    out.print(f"cache: {cache_dir}" + ("" if crossfit else "  (CV optimistic: --no-crossfit)"), highlight=False)


# ----------------------------------------------------------------------------------------------------------
# search


space_app = typer.Typer(help="Search-space files.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(space_app, name="space")

_TRIALS_HELP = "Trial budget of each study: finished trials, counted across all its workers."
_WORKERS_HELP = "Worker processes on this machine (one core each)."
_PLUGINS_HELP = ("A Python module (importable here and on every worker machine) that registers classifiers "
                 "with adsearch.search.classifiers.register; repeatable. Added to the space's `plugins:` and "
                 "recorded on the study. Installed packages' `adsearch.classifiers` entry points need no option.")
_ARTIFACTS_HELP = ("Artifact store for the study's figures (screen heat map, report), which the dashboard "
                   "shows. Recorded on the study at its first figure, so later commands find it; default: the "
                   "recorded one, else ./adsearch-artifacts.")
_STORAGE_HELP = ("SQLAlchemy URL of the study database: the default is an embedded SQLite file in the working "
                 "directory; use postgresql+psycopg://user@host/db for workers on several machines. A password may "
                 "sit in the URL, in PGPASSWORD or ~/.pgpass (PostgreSQL's own), or in the file named by "
                 "ADSEARCH_STORAGE_PASSWORD_FILE (e.g. a Docker secret); it is never printed.")


@space_app.command("check")
def space_check(
    space: Annotated[Path, typer.Argument(help="Search-space YAML file.")],
    cache: Annotated[Path | None, typer.Option(help="Also check the layers against this cache.")] = None,
    plugins: Annotated[list[str] | None, typer.Option(help=_PLUGINS_HELP)] = None,
) -> None:
    """Validate a search-space file and print what it searches."""
    import optuna

    from adsearch.embed import open_cache
    from adsearch.search.space import check_layers, classifier_params, load_spec

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with user_errors():
        spec = load_spec(space, plugins)
        layers = check_layers(spec, open_cache(cache).n_layers, str(space)) if cache else None
    out.print(f"{space}: valid (hash {spec.digest()})", highlight=False)
    if spec.plugins:
        out.print(f"plugins {', '.join(spec.plugins)}", highlight=False)
    out.print(f"task {spec.task}; cv {spec.cv.folds} folds x {spec.cv.repeats}, metric {spec.cv.metric}, sampler "
              f"{spec.sampler}, pruner {spec.pruner}, seed {spec.seed}")
    out.print(f"layers {_describe_layers(layers, spec.space.layers)}; pooling {', '.join(spec.space.pooling)}; "
              f"unit {', '.join(spec.space.unit)}; pca {', '.join(spec.space.pca)}", highlight=False)
    for name in spec.space.classifiers:
        params = "; ".join(f"{k} {_describe_param(kind, value)}" for k, (kind, value) in
                           classifier_params(spec, name).items())
        out.print(f"  {name}: {params}", highlight=False)


def _describe_layers(checked, layers) -> str:
    if checked:
        return f"{checked[0]}..{checked[-1]}" if list(checked) == list(range(checked[0], checked[-1] + 1)) else (
            ", ".join(map(str, checked)))
    if isinstance(layers, list):
        return ", ".join(map(str, layers))
    return f"{layers.low}..{'last' if layers.high is None else layers.high}"


def _describe_param(kind: str, value) -> str:
    """`range 0.0001..100 (log)`, `one of uniform, distance`, `= 0.5`: what a person writes in the YAML."""
    if kind == "range":
        return f"range {value.low:g}..{value.high:g}" + (" (log)" if value.log else "")
    if kind == "choice":
        return "one of " + ", ".join(str(option) for option in value)
    return f"= {value}"


def _study_summary(study, budget: int) -> None:
    from adsearch.search.protocol import direction
    from adsearch.search.study import StudySetup, best_summary, describe_config, fold_fits, trial_counts

    counts = trial_counts(study)
    setup = StudySetup.from_study(study)
    fits = fold_fits(study, setup)
    saved = f"; pruning ({setup.pruner}) saved {fits['saved']} of {fits['run'] + fits['saved']} fold fits" if (
        counts["pruned"]) else ""
    out.print(f"study {study.study_name}: {counts['finished']}/{budget} finished ({counts['complete']} complete, "
              f"{counts['pruned']} pruned), {counts['failed']} failed, {counts['running']} running{saved}",
              highlight=False)
    if setup.spec.task == "mmse":
        lower = ", lower is better" if direction(setup.spec.cv.metric) == "minimize" else ""
        out.print(f"task mmse ({setup.spec.cv.metric}{lower}): {len(setup.train_ids)} train recordings with an MMSE "
                  f"score, {setup.left_out} without one left out", highlight=False)
    from adsearch.search.null import NULL_ATTR, describe, stale_floor

    floor = study._storage.get_study_system_attrs(study._study_id).get(NULL_ATTR)
    best = best_summary(study, setup)
    if floor:
        out.print("noise floor: " + describe(floor), highlight=False)
        stale = stale_floor(floor, best["value"], counts["finished"], study.study_name) if best else None
        if stale:
            err.print(f"[yellow]warning:[/] {escape(stale)}", highlight=False)
    if best:
        out.print(f"best: trial {best['number']}, CV {best['value']:.4f}: {describe_config(best['config'])}",
                  highlight=False)
    from adsearch.search.baseline import describe as describe_baseline
    from adsearch.search.baseline import duration_warning, load_duration_baseline

    baseline = load_duration_baseline(study)
    if baseline:
        out.print("duration-only baseline: CV " + describe_baseline(baseline), highlight=False)
        warning = duration_warning(best["value"], baseline, floor) if best else None
        if warning:
            err.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)


@app.command()
def search(
    cache: Annotated[list[str], typer.Option(help="Embedding cache from `adsearch extract`. Give it several "
                                                  "times (optionally as NAME=PATH) to search feature sources side by "
                                                  "side: pre-trained, fine-tuned, eGeMAPS, another model; `source` "
                                                  "is then a parameter, with each source's own layers.",
                                             envvar="ADSEARCH_CACHE")],
    study: Annotated[str, typer.Option(help="Study name; an existing study is resumed.")],
    space: Annotated[Path, typer.Option(help="Search-space YAML (the default is found from any working folder: "
                                             "here, else adsearch's own).")] = Path("studies/default.yaml"),
    storage: Annotated[str, typer.Option(help=_STORAGE_HELP, envvar="ADSEARCH_STORAGE")] = "sqlite:///adsearch.db",
    trials: Annotated[int, typer.Option(help=_TRIALS_HELP, min=1,
                                        max=MAX_TRIALS)] = 100,
    workers: Annotated[int, typer.Option(help="Worker processes on this machine (one core each); 0 creates or "
                                              "resumes the study and sets its budget without running a trial "
                                              "(workers join with `adsearch worker`).")] = 1,
    sampler: Annotated[str | None, typer.Option(help="Sampler of a new study instead of the space's: tpe, random, "
                                                     "layer-grid, gp (needs torch), qmc. Recorded on the study; "
                                                     "every worker that joins uses it.")] = None,
    pruner: Annotated[str | None, typer.Option(help="Pruner of a new study instead of the space's: none, wilcoxon, "
                                                    "median. Recorded on the study.")] = None,
    override_optimiser: Annotated[bool, typer.Option(
        help="Let --sampler/--pruner differ from what an existing study recorded (this command's workers only; "
             "warns).")] = False,
    heartbeat: Annotated[int, typer.Option(help="Seconds between worker heartbeats.")] = 10,
    grace: Annotated[int, typer.Option(help="Seconds without heartbeat before a trial counts as dead.")] = 30,
    artifacts: Annotated[Path | None, typer.Option(help=_ARTIFACTS_HELP, envvar="ADSEARCH_ARTIFACTS")] = None,
    plugins: Annotated[list[str] | None, typer.Option(help=_PLUGINS_HELP)] = None,
    task: Annotated[str | None, typer.Option(help="classification (AD vs control) or mmse (regression of the MMSE "
                                                  "score; recordings without one are left out) instead of the "
                                                  "space's `task:`. An mmse space lists regressors "
                                                  "(studies/mmse.yaml).")] = None,
) -> None:
    """Create or resume a study and run worker processes until it has --trials finished trials.

    One Optuna study searches layer, pooling, unit, preprocessing, classifier and its hyperparameters
    jointly, scoring each trial by speaker-grouped cross-validation on the train split. More workers can
    join from any shell or machine with `adsearch worker --study NAME --storage URL`.
    """
    import time as _time

    from adsearch.results.report import upload_screen
    from adsearch.search.space import load_spec
    from adsearch.search.storage import make_storage, mask_url
    from adsearch.search.study import (
        StudySetup,
        best_summary,
        create_or_resume,
        describe_config,
        name_sources,
        trial_counts,
    )
    from adsearch.search.worker import spawn_workers

    if workers < 0:
        err.print("[bold red]error:[/] --workers must be at least 0")
        raise typer.Exit(2)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with user_errors():
        spec = load_spec(space, plugins, task)
        opened = name_sources([_named_cache(value) for value in cache])
        the_study = create_or_resume(make_storage(storage, heartbeat, grace), study, opened, spec, str(space), trials,
                                     sampler, pruner, override_optimiser,
                                     log=lambda message: out.print(message, highlight=False),
                                     on_screen=lambda new, screened: upload_screen(new, screened, artifacts))
    counts = trial_counts(the_study)
    if workers == 0:
        out.print(f"study {study} is ready: {counts['finished']} of {trials} trials finished; start workers with "
                  f"`adsearch worker --study {study}` and the same storage", highlight=False)
        return
    if counts["finished"] >= trials:
        out.print(f"study {study} already has {counts['finished']} finished trials (budget {trials})")
    else:
        one_cache = None if isinstance(opened, dict) else str(opened.path)
        kwargs = {"study_name": study, "storage_url": storage, "cache_path": one_cache, "sampler": sampler,
                  "pruner": pruner, "override_optimiser": override_optimiser, "heartbeat_interval": heartbeat,
                  "grace_period": grace}
        processes = spawn_workers(workers, kwargs)
        setup = StudySetup.from_study(the_study)
        with _stopping_workers(processes, lambda: trial_counts(the_study)["finished"], trials), \
                _bar(TextColumn("{task.fields[best]}")) as progress:
            task = progress.add_task(f"{study}: trials", total=trials, completed=counts["finished"], best="")
            while any(p.is_alive() for p in processes):
                _time.sleep(1.0)
                counts = trial_counts(the_study)
                best = best_summary(the_study, setup)
                text = (f"best {best['value']:.3f} (#{best['number']}): {describe_config(best['config'])}"
                        if best else "")
                progress.update(task, completed=counts["finished"], best=text[:100])
        _report_worker_exits(processes)
    _study_summary(the_study, trials)
    counts = trial_counts(the_study)
    if counts["finished"] < trials:
        err.print(f"[bold red]error:[/] the budget is not met: {counts['finished']} of {trials} trials finished. "
                  "Run the same command again to resume.", highlight=False)
        raise typer.Exit(1)
    if counts["complete"] == 0:
        err.print("[bold red]error:[/] no trial completed, so there is nothing to export; see the errors above "
                  "and the `error` attribute of the failed trials", highlight=False)
        raise typer.Exit(1)
    out.print(f"export it with: adsearch export --study {study} --storage {mask_url(storage)} -o {study}-best",
              highlight=False)


def _named_cache(value: str):
    """`PATH` or `NAME=PATH` (a path that exists as given is never split at '=')."""
    from adsearch.embed import open_cache

    name, sep, path = value.partition("=")
    if sep and not Path(value).exists():
        return name, open_cache(path)
    return None, open_cache(value)


@contextlib.contextmanager
def _stopping_workers(processes, finished, budget: int) -> Iterator[None]:
    """Ctrl-C or SIGTERM (a service manager's stop) ends this command and its workers together, with one
    line instead of every worker's traceback. A trial cut short stays RUNNING until its heartbeat is stale;
    then a resumed search fails it and runs its parameters again."""
    import signal

    def terminated(signum, _frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    except KeyboardInterrupt:
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
        try:
            done = f": {finished()}/{budget} trials finished"
        except Exception:  # the database may be what failed
            done = ""
        err.print(f"interrupted{done}; run the same command again to resume (trials cut short are failed and "
                  "retried once their heartbeat is stale)", highlight=False)
        raise typer.Exit(130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def _report_worker_exits(processes) -> None:
    """Say how each worker that did not end cleanly ended: its own message, if any, is above."""
    import signal

    for index, process in enumerate(processes):
        if process.exitcode and process.exitcode < 0:
            name = signal.Signals(-process.exitcode).name
            err.print(f"[yellow]warning:[/] worker {index} was killed by {name}"
                      + (" (out of memory?)" if name == "SIGKILL" else ""))
        elif process.exitcode:
            err.print(f"[yellow]warning:[/] worker {index} stopped with exit code {process.exitcode} (its message "
                      "is above)")


@app.command()
def compare(
    cache: Annotated[Path, typer.Option(help="Embedding cache every run searches.", envvar="ADSEARCH_CACHE")],
    output: Annotated[Path, typer.Option("-o", "--output", help="New (or empty) folder for the table, figures "
                                                                "and the runs' study databases.")],
    space: Annotated[Path, typer.Option(help="Search-space YAML (the same for every run; its seed fixes the "
                                             "folds).")] = Path("studies/default.yaml"),
    samplers: Annotated[str, typer.Option(help="Comma-separated samplers: tpe, random, layer-grid, gp, qmc.")] = (
        "tpe,random,layer-grid"),
    runs: Annotated[int, typer.Option("--runs", "--seeds", help="Studies per sampler (sampler seeds 0..N-1); "
                                                              "--seeds is the old name.", min=1, max=100)] = 5,
    trials: Annotated[int, typer.Option(help=_TRIALS_HELP, min=1, max=MAX_TRIALS)] = 60,
    workers: Annotated[int, typer.Option(help=_WORKERS_HELP, min=1)] = 1,
    target: Annotated[float | None, typer.Option(help="Score to reach (default: 95 % of the best score any run "
                                                      "found; for RMSE or MAE 5 % above the lowest).")] = None,
) -> None:
    """Compare optimisers honestly: every sampler x seed at the same budget, folds and cache.

    Writes compare.csv / compare.md (final best, trials and CPU seconds to the target, agreement on layer and
    pooling, pruning), runs.json and the best-so-far figures (vs trials and vs CPU seconds, median and
    quartiles across seeds). The same seeds give the same table, CPU-time columns aside.
    """
    import optuna

    from adsearch.embed import open_cache
    from adsearch.search.compare import default_target, run_all, summarise, write_outputs
    from adsearch.search.samplers import SAMPLERS
    from adsearch.search.space import check_layers, load_spec

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    names = [name.strip() for name in samplers.split(",") if name.strip()]
    with user_errors(interrupted=f"the runs finished so far are in {output}; run again with a new -o"):
        unknown = [name for name in names if name not in SAMPLERS]
        if unknown or not names:
            raise ValueError(f"--samplers: {', '.join(unknown) or 'none given'}; choose from {', '.join(SAMPLERS)}")
        if output.exists() and (not output.is_dir() or any(output.iterdir())):
            raise ValueError(f"{output}: exists and is not an empty folder; name a new folder so no earlier "
                             "comparison is overwritten")
        spec = load_spec(space)
        opened = open_cache(cache)
        check_layers(spec, opened.n_layers, str(space))
        with _bar() as progress:
            task = progress.add_task("runs", total=len(names) * runs)
            done = run_all(opened.path, spec, names, list(range(runs)), trials, output, workers,
                           on_done=lambda run: progress.advance(task))
        goal = target if target is not None else default_target(done)
        rows = summarise(done, goal)
        paths = write_outputs(done, rows, output, f"adsearch compare: {', '.join(names)} x {runs} seeds, "
                                                  f"{trials} trials, cache {opened.path.name}")
    out.print((output / "compare.md").read_text(), highlight=False)
    out.print("written: " + ", ".join(str(p) for p in paths), highlight=False)


@app.command()
def null(
    study: Annotated[str, typer.Option(help="The study whose noise floor to measure.")],
    storage: Annotated[str, typer.Option(help=_STORAGE_HELP, envvar="ADSEARCH_STORAGE")] = "sqlite:///adsearch.db",
    runs: Annotated[int, typer.Option(help="Null studies (label permutations); p can be no smaller than "
                                           "1 / (runs + 1).", min=1, max=1000)] = 10,
    trials: Annotated[int | None, typer.Option(help=_TRIALS_HELP + " Default: as many as the study has finished; "
                                                    "fewer makes the floor too low and p optimistic.",
                                               min=1, max=MAX_TRIALS)] = None,
    workers: Annotated[int, typer.Option(help=_WORKERS_HELP, min=1)] = 1,
) -> None:
    """Measure what the search finds when speech says nothing about the label.

    Runs the same search (cache, space, folds, sampler, screen) on train labels permuted across speakers,
    --runs times, as studies STUDY~null0, STUDY~null1, ... in the same storage (workers anywhere can join
    them), then prints the best real CV beside the best null CVs and the permutation p-value, and records
    them on the study (study note, report).
    """
    import time as _time

    import optuna
    import optuna_dashboard

    from adsearch.embed import open_cache
    from adsearch.search.baseline import load_duration_baseline
    from adsearch.search.null import create_null_studies, describe, record, summarise
    from adsearch.search.storage import make_storage, mask_url
    from adsearch.search.study import StudySetup, load_screen, open_study, study_note, trial_counts
    from adsearch.search.worker import spawn_workers

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with user_errors():
        store = make_storage(storage, create=False)
        main, _ = open_study(store, study, mask_url(storage))
        finished = trial_counts(main)["finished"]
        budget = trials or finished
        if budget < 1:
            raise ValueError(f"study {study!r} has no finished trial yet; pass --trials")
        if budget < finished:
            err.print(f"[yellow]warning:[/] {budget} trials per null study, the study has {finished}: the null "
                      "floor comes out weaker than a full null search would find, and p optimistic", highlight=False)
        names = create_null_studies(store, study, runs, budget)
        with _bar() as progress:  # one bar over the null studies, one over the current study's trials
            task = progress.add_task("null studies", total=len(names))
            for name in names:
                null_study = optuna.load_study(study_name=name, storage=store)
                if trial_counts(null_study)["finished"] < budget:
                    trial_task = progress.add_task(f"{name}: trials", total=budget,
                                                   completed=trial_counts(null_study)["finished"])
                    processes = spawn_workers(workers, {"study_name": name, "storage_url": storage})
                    with _stopping_workers(processes, lambda s=null_study: trial_counts(s)["finished"], budget):
                        while any(p.is_alive() for p in processes):
                            _time.sleep(1.0)
                            progress.update(trial_task, completed=trial_counts(null_study)["finished"])
                    progress.update(trial_task, completed=trial_counts(null_study)["finished"])
                    _report_worker_exits(processes)
                progress.advance(task)
        summary = summarise(store, study)
        record(store, study, summary)
        setup = StudySetup.from_study(main)  # the study note gains the floor
        optuna_dashboard.save_note(main, study_note(open_cache(setup.cache_path), setup, load_screen(main),
                                                    load_duration_baseline(main))
                                   + "\n\n**Noise floor**: " + describe(summary) + ".")
    out.print(f"study {study}: " + describe(summary), highlight=False)
    if summary["unfinished"]:
        err.print(f"[yellow]warning:[/] not counted (budget not met): {', '.join(summary['unfinished'])}",
                  highlight=False)


@app.command()
def worker(
    study: Annotated[str, typer.Option(help="Name of an existing study.")],
    storage: Annotated[str, typer.Option(help=_STORAGE_HELP, envvar="ADSEARCH_STORAGE")] = "sqlite:///adsearch.db",
    cache: Annotated[Path | None, typer.Option(envvar="ADSEARCH_CACHE",
                                               help="The study's cache, if it lives elsewhere on this machine "
                                                    "(its content must match).")] = None,
    sampler: Annotated[str | None, typer.Option(help="Use another sampler than the study recorded (needs "
                                                     "--override-optimiser; the default is the study's own).")] = None,
    pruner: Annotated[str | None, typer.Option(help="Use another pruner than the study recorded (needs "
                                                    "--override-optimiser).")] = None,
    override_optimiser: Annotated[bool, typer.Option(help="Allow --sampler/--pruner to differ from the study's; "
                                                          "prints a warning and marks this worker's trials.")] = False,
    heartbeat: Annotated[int, typer.Option(help="Seconds between heartbeats.")] = 10,
    grace: Annotated[int, typer.Option(help="Seconds without heartbeat before a trial counts as dead.")] = 30,
    max_outage: Annotated[float, typer.Option(help="Seconds to keep retrying (with backoff) while the database is "
                                                   "unreachable before this worker stops.", min=0)] = 300.0,
) -> None:
    """Join an existing study from any shell or machine and run trials until its budget is met.

    The study supplies the cache, the search space, the CV folds and the budget; a worker refuses a cache
    whose content differs from the one the study was created with.
    """
    from adsearch.search.worker import run_worker

    with user_errors():
        report = run_worker(study, storage, str(cache) if cache else None, sampler, pruner, override_optimiser,
                            heartbeat_interval=heartbeat, grace_period=grace, max_outage_seconds=max_outage)
    out.print(f"worker done: ran {report.ran} trial(s), {report.failed} failed")


# ----------------------------------------------------------------------------------------------------------
# finishing a study


@app.command()
def export(
    study: Annotated[str, typer.Option(help="Study name.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="New folder for config, model and report.")],
    storage: Annotated[str, typer.Option(help=_STORAGE_HELP, envvar="ADSEARCH_STORAGE")] = "sqlite:///adsearch.db",
    trial: Annotated[int | None, typer.Option(help="Trial number to export (default: the best).")] = None,
    top_k: Annotated[int, typer.Option(help="Also test the next K configurations; exact McNemar vs the exported "
                                            "one (an MMSE study: paired bootstrap of the metric).", min=0,
                                       max=1000)] = 0,
    cache: Annotated[Path | None, typer.Option(help="The study's cache, if it moved (content must match).",
                                               envvar="ADSEARCH_CACHE")] = None,
    artifacts: Annotated[Path | None, typer.Option(help=_ARTIFACTS_HELP, envvar="ADSEARCH_ARTIFACTS")] = None,
    control_study: Annotated[str | None, typer.Option(help="A shortcut-control study in the same storage (the same "
                                                           "search on a `--keep non-participant` or `--keep "
                                                           "non-speech` cache): its best CV goes in the report, "
                                                           "with a warning when it is well above chance.")] = None,
) -> None:
    """Freeze a trial: config.yaml, the refit pipeline (model.skops), one held-out test evaluation, report.

    The test split is read only here. Accuracy, sensitivity and specificity get Wilson intervals; balanced
    accuracy, F1 and ROC AUC bootstrap intervals; CV - test is printed beside them. An MMSE study: RMSE, MAE,
    R2 and Pearson r with bootstrap intervals, beside predicting the training mean. Without test
    labels (scores) the export stops after the refit.
    """
    from adsearch.results.export import export_trial

    with user_errors():
        result = export_trial(study, storage, output, trial, top_k, str(cache) if cache else None, artifacts,
                              log=lambda message: out.print(message, highlight=False), control_study=control_study)
    cv = result.config.cv
    out.print(f"trial {result.config.study.trial}: CV {cv.metric} {cv.mean:.4f} +/- {cv.std:.4f}"
              + (f"; on {cv.fresh.repeats} fresh fold assignments {cv.fresh.mean:.4f} +/- {cv.fresh.std:.4f} "
                 f"(selection optimism, CV - fresh: {cv.fresh.optimism:+.4f})" if cv.fresh else ""))
    for line in result.warnings:
        err.print(f"[yellow]warning:[/] {line}", highlight=False)
    if result.test and result.config.task == "mmse":
        _print_mmse_test(result.test, cv.metric, result.top_k)
    elif result.test:
        test = result.test
        for name in ("accuracy", "balanced_accuracy", "f1", "roc_auc", "sensitivity", "specificity"):
            low, high = test[name]["ci95"]
            out.print(f"  test {name:<18} {test[name]['value']:.4f}  95 % [{low:.3f}, {high:.3f}] "
                      f"({test[name]['method']})")
        (tn, fp), (fn, tp) = test["confusion"]["matrix"]
        out.print(f"  confusion (rows true control/AD): [[{tn}, {fp}], [{fn}, {tp}]] on {test['n']} of "
                  f"{test['labelled']} labelled test recordings")
        if test.get("calibration"):
            out.print(f"  calibration of P(AD): Brier {test['calibration']['brier']:.4f} (0.25 = always 0.5), "
                      f"expected calibration error {test['calibration']['ece']:.4f}")
        out.print(f"  CV - test ({cv.metric}): {test['cv_minus_test']:+.4f} (positive: the CV was optimistic, as "
                  "is the selection optimism above)")
        for row in result.top_k:
            out.print(f"  trial {row['trial']}: CV {row['cv_mean']:.4f}, test accuracy {row['test']['accuracy']:.4f}, "
                      f"McNemar p = {row['mcnemar']['p_value']:.3f}")
    out.print(f"report: {result.out_dir / 'report.html'}", highlight=False)


def _print_mmse_test(test: dict, metric: str, top_k: list[dict]) -> None:
    for name in ("rmse", "mae", "r2", "pearson_r"):
        low, high = test[name]["ci95"]
        out.print(f"  test {name:<10} {test[name]['value']:.4f}  95 % [{low:.3f}, {high:.3f}] ({test[name]['method']})")
    floor = test["mean_predictor"]
    out.print(f"  predicting the training mean ({floor['train_mean']:.2f}) for every recording: RMSE "
              f"{floor['rmse']:.4f}, MAE {floor['mae']:.4f}, on {test['n']} of {test['labelled']} test recordings "
              "with an MMSE score")
    out.print(f"  CV - test ({metric}, as an improvement): {test['cv_minus_test']:+.4f} (positive: the CV was "
              "optimistic)")
    for row in top_k:
        paired = row["paired"]
        out.print(f"  trial {row['trial']}: CV {row['cv_mean']:.4f}, test RMSE {row['test']['rmse']:.4f}; the exported "
                  f"one better by {paired['improvement']:+.4f} {metric}, paired bootstrap p = {paired['p_value']:.3f}")


@app.command()
def evaluate(
    config: Annotated[Path, typer.Argument(help="config.yaml written by `adsearch export` (or its folder).")],
    cache: Annotated[Path | None, typer.Option(help="The cache the study used, or a folder holding it (default: "
                                                    "the path recorded at export); chosen by content hash.",
                                               envvar="ADSEARCH_CACHE")] = None,
) -> None:
    """Re-run the cross-validation of an exported config (of each member of an exported ensemble) and check it
    reproduces the study's score."""
    from adsearch.results.ensemble import is_ensemble, reproduce_members
    from adsearch.results.export import cache_for, load_config, reproduce_cv

    if is_ensemble(config):
        with user_errors():
            members = reproduce_members(config, cache)
        for trial, same in members:
            out.print(f"member trial {trial}: " + ("reproduced exactly" if same else "DIFFERS from the study"))
        if not all(same for _, same in members):
            raise typer.Exit(1)
        out.print(f"all {len(members)} members reproduced exactly")
        return
    with user_errors():
        exported = load_config(config)
        scores = reproduce_cv(exported, cache_for(exported, cache))
    mean = sum(scores) / len(scores)
    out.print(f"CV {exported.cv.metric}: {mean:.6f} over {len(scores)} folds "
              f"({', '.join(f'{s:.4f}' for s in scores)})")
    if scores == exported.cv.fold_scores:
        out.print("reproduced exactly: identical fold scores to the study's trial "
                  f"{exported.study.trial}")
    else:
        err.print(f"[yellow]differs from the study's {exported.cv.mean:.6f} "
                  f"({', '.join(f'{s:.4f}' for s in exported.cv.fold_scores)})[/]")
        raise typer.Exit(1)


@app.command()
def predict(
    export_dir: Annotated[Path, typer.Argument(help="Folder written by `adsearch export`.")],
    audio: Annotated[list[Path], typer.Argument(help="Recordings (any rate, mono or stereo, WAV/FLAC).")],
    segments: Annotated[Path | None, typer.Option(help="Participant speech: a CSV file,begin,end (seconds) or a "
                                                       "corpus manifest. Files not in it are segmented by voice "
                                                       "activity detection (see --vad).")] = None,
    vad: Annotated[bool, typer.Option("--vad/--no-vad", help="For files without --segments: keep the speech that "
                                                             "silero-vad finds (every speaker's: the interviewer's "
                                                             "cannot be told apart without a diarisation), or use "
                                                             "the whole recording.")] = True,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Write predictions CSV here.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Probability of AD (or, from an MMSE model, the MMSE score) for new recordings, through the exported
    speech model layer, pooling and pipeline.

    Only as many transformer layers run as the chosen layer needs. A file that cannot be read gets an
    error row; the others are still predicted. The `segmentation` column says which speech each file used.
    """
    from adsearch.results.ensemble import EnsemblePredictor, is_ensemble
    from adsearch.results.predict import Predictor, check_output, read_segments, write_predictions
    from adsearch.vad import VAD_CAVEAT

    with user_errors():
        if output:
            check_output(output)
        spans = read_segments(segments) if segments else {}
        predictor = (EnsemblePredictor(export_dir, device, vad) if is_ensemble(export_dir)
                     else Predictor(export_dir, device, vad))
    unsegmented = [path for path in audio
                   if not spans.get(str(path), spans.get(str(path.resolve()), spans.get(path.name)))]
    if unsegmented:
        err.print(f"[yellow]note:[/] {len(unsegmented)} of {len(audio)} file(s) have no segmentation"
                  + (" (pass --segments)" if not segments else f" in {escape(str(segments))}") + ": "
                  + (escape(VAD_CAVEAT) if vad else "each is used whole, interviewer speech and pauses included"),
                  highlight=False)
    predictions = []
    for path in audio:
        found = spans.get(str(path), spans.get(str(path.resolve()), spans.get(path.name)))
        prediction = predictor.predict(path, found)
        predictions.append(prediction)
        if prediction.error:
            err.print(f"[red]{escape(prediction.file)}: {escape(prediction.error)}[/]", highlight=False)
        else:
            score = (f"MMSE {prediction.mmse:.1f} (predicted)" if prediction.mmse is not None
                     else f"P(AD) = {prediction.prob_ad:.3f}" if prediction.prob_ad is not None
                     else f"decision {prediction.decision:+.3f}")
            label = f" -> {prediction.label}" if prediction.label else ""
            out.print(f"{prediction.file}: {score}{label} "
                      f"({prediction.n_windows} windows, {prediction.speech_seconds:.1f} s of speech, "
                      f"segmentation: {prediction.segmentation})", highlight=False, markup=False)
    if output:
        with user_errors():
            write_predictions(predictions, output)
        out.print(f"wrote {output}", highlight=False)
    if all(p.error for p in predictions):
        raise typer.Exit(1)


@app.command()
def ensemble(
    study: Annotated[str, typer.Option(help="Study name.")],
    storage: Annotated[str, typer.Option(help=_STORAGE_HELP, envvar="ADSEARCH_STORAGE")] = "sqlite:///adsearch.db",
    method: Annotated[str, typer.Option(help="caruana: greedy selection with replacement, averaged; stack: a "
                                             "regularised logistic (MMSE: ridge) model on the members' scores. "
                                             "Across feature sources either is late fusion.")] = "caruana",
    top: Annotated[int, typer.Option(help="Candidates: the best N completed trials.", min=2, max=1000)] = 20,
    rounds: Annotated[int, typer.Option(help="Selection rounds of caruana (members, counted with repetition).",
                                        min=1, max=1000)] = 20,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Export the ensemble to this new folder: "
                                                                       "each member refitted once, the held-out "
                                                                       "test beside the best single trial; "
                                                                       "evaluate and predict take the folder.")
                      ] = None,
) -> None:
    """Ensemble the study's best trials (Caruana et al. 2004 selection, or stacking), with an honest CV.

    Built from the out-of-fold scores every completed trial keeps. The printed CV is nested: on each fold the
    candidates are ranked and the ensemble built on the other folds only, and the best single trial is chosen
    the same way, so the two compare like with like. With -o the ensemble is exported like a single model.
    """
    import optuna

    from adsearch.results.ensemble import export_ensemble
    from adsearch.search.ensemble import ensemble_cv
    from adsearch.search.objective import FeatureSource
    from adsearch.search.storage import make_storage, mask_url
    from adsearch.search.study import load_cache_for, open_study

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with user_errors():
        if output is not None:
            exported = export_ensemble(study, storage, output, method, top, rounds,
                                       log=lambda message: out.print(message, highlight=False))
            record = exported.config.cv
            result = (record.metric, exported.study_best, record.ensemble.fold_scores, record.best_single.fold_scores,
                      [(m.trial, m.weight) for m in exported.config.members])
        else:
            loaded, setup = open_study(make_storage(storage, create=False), study, mask_url(storage))
            labels = FeatureSource(load_cache_for(setup, study), setup.null_seed, task=setup.spec.task).labels
            computed = ensemble_cv(loaded, labels, setup.folds, setup.spec.cv.metric, top, rounds, method)
            result = (setup.spec.cv.metric, loaded.best_value, computed.ensemble_folds, computed.single_folds,
                      list(zip(computed.trials, computed.weights, strict=True)))
    metric, study_best, ensemble_folds, single_folds, members = result
    weights = ", ".join(f"trial {number} x{weight:.3g}" for number, weight in members)
    out.print(f"{method} ensemble of the best {top} trials, built on all train recordings: {weights}",
              highlight=False)
    out.print(f"nested CV {metric} on {len(ensemble_folds)} folds: ensemble {np.mean(ensemble_folds):.4f} +/- "
              f"{np.std(ensemble_folds):.4f}; best single trial chosen the same way {np.mean(single_folds):.4f} +/- "
              f"{np.std(single_folds):.4f} (the study's best CV, {study_best:.4f}, was chosen on "
              "all folds and is optimistic)", highlight=False)
    if output is not None and exported.test:
        test = exported.test
        out.print(f"held-out test {metric} ({test['n']} recordings): ensemble {test['ensemble'][metric]['value']:.4f} "
                  "[{:.3f}, {:.3f}]".format(*test["ensemble"][metric]["ci95"])
                  + f", best single trial {test['best_single_trial']} {test['best_single'][metric]['value']:.4f} "
                  "[{:.3f}, {:.3f}]".format(*test["best_single"][metric]["ci95"])
                  + f"; paired comparison p = {test['comparison']['p_value']:.3f} "
                  f"({test['comparison'].get('method', 'exact McNemar')})", highlight=False)
    if output is not None:
        out.print(f"report: {output / 'report.html'}", highlight=False)


@app.command()
def studies(
    storage: Annotated[str, typer.Option(help=_STORAGE_HELP, envvar="ADSEARCH_STORAGE")] = "sqlite:///adsearch.db",
) -> None:
    """List the studies in a storage: finished trials of the budget, best CV, and their null studies."""
    import optuna

    from adsearch.search.storage import make_storage, mask_url
    from adsearch.search.study import list_studies

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with user_errors():
        rows = list_studies(make_storage(storage, create=False))
    if not rows:
        out.print(f"no study in {mask_url(storage)}; create one with `adsearch search`", highlight=False)
        return
    width = max(len(row["name"]) for row in rows)
    out.print(f"{'study':<{width}}  {'finished':>13}  {'best CV':>8}", highlight=False)
    for row in rows:
        done = f"{row['finished']}/{row['budget'] if row['budget'] is not None else '?'}"
        best = f"{row['best']:.4f}" if row["best"] is not None else "-"
        out.print(f"{row['name']:<{width}}  {done:>13}  {best:>8}", highlight=False, markup=False)


@app.command()
def dashboard(
    storage: Annotated[str, typer.Option(help=_STORAGE_HELP, envvar="ADSEARCH_STORAGE")] = "sqlite:///adsearch.db",
    host: Annotated[str, typer.Option(help="Address to bind. The dashboard has NO authentication: keep 127.0.0.1, "
                                           "or put an authenticating proxy in front.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.", min=1, max=65535)] = 8080,
    artifacts: Annotated[Path | None, typer.Option(
        help="Artifact store of the figures (screen heat map, report). Default: the one the studies recorded, "
             "else ./adsearch-artifacts.", envvar="ADSEARCH_ARTIFACTS")] = None,
    allowed_host: Annotated[list[str] | None, typer.Option(
        help="Another host name the dashboard may be reached by (e.g. behind a proxy); repeatable. Loopback names "
             "and the bound address are always allowed; requests naming any other host are refused.")] = None,
    writable: Annotated[bool | None, typer.Option(
        "--writable/--read-only", help="Allow changes (delete studies, notes, uploads) from the dashboard's own "
                                       "page. Default: writable on loopback, read-only when bound beyond it.",
        show_default=False)] = None,
) -> None:
    """Serve optuna-dashboard for the study storage (history, importances, notes, report figures).

    Only requests naming a loopback host, the bound address or an --allowed-host are answered (other web pages
    in your browser cannot read or change studies), and writes must come from the dashboard's own page.
    """
    from adsearch.dashboard import guarded_app, is_loopback, serve
    from adsearch.search.storage import make_storage

    with user_errors():
        store = make_storage(storage)
        _check_port_free(host, port)
    if artifacts is None:
        from adsearch.results.report import DEFAULT_ARTIFACTS, recorded_stores

        stores = recorded_stores(store)
        artifacts = Path(stores[0] if stores else DEFAULT_ARTIFACTS)
        if len(stores) > 1:
            err.print(f"[yellow]warning:[/] the studies recorded {len(stores)} artifact stores "
                      f"({escape(', '.join(stores))}); showing figures from {escape(str(artifacts))} only (pass "
                      "--artifacts for another)", highlight=False)
    artifacts.mkdir(parents=True, exist_ok=True)
    loopback = is_loopback(host)
    read_only = not loopback if writable is None else not writable
    allowed = list(allowed_host or []) + ([host] if host not in ("0.0.0.0", "::") else [])
    if not loopback:
        err.print(f"[yellow]warning:[/] serving on {escape(host)} without authentication: anyone who reaches it can "
                  + ("read every study" if read_only else "change or delete studies"), highlight=False)
    url_host = f"[{host}]" if ":" in host else host
    out.print(f"dashboard: http://{url_host}:{port}/dashboard ({'read-only' if read_only else 'writable'}; "
              "Ctrl-C stops it)", highlight=False)
    with contextlib.suppress(KeyboardInterrupt):
        serve(guarded_app(store, str(artifacts), allowed, read_only), host, port)


def _check_port_free(host: str, port: int) -> None:
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ValueError(f"--host {host!r}: not an address of this machine ({exc.strerror})") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise ValueError(f"cannot serve on {host}:{port} ({exc.strerror}); another program (another "
                             "dashboard?) uses it: pass --port with a free one") from None


@cache_app.command("info")
def cache_info(path: Annotated[Path, typer.Argument(help="Cache directory (or the extract -o root).")]) -> None:
    """Summarise a cache: model, layers, items per split and label, windows, failures."""
    from adsearch.embed import open_cache

    with user_errors():
        cache = open_cache(path)
    meta = cache.meta
    out.print(f"cache      {cache.path}", highlight=False)
    out.print(f"model      {meta['model']['name']} @ {meta['model']['revision']}", highlight=False)
    meaning = "; ".join(f"{k} = {v}" for k, v in meta["layers"].get("meaning", {}).items())
    out.print(f"layers     {cache.n_layers}, dim {cache.dim} ({meaning})", highlight=False)
    if "transcripts" in meta:
        source = meta["transcripts"]["source"]
        out.print(f"transcripts {meta['transcripts']['path']} ({source['backend']}: {source['name']})", highlight=False)
    if "feature_names" in meta:
        names = meta["feature_names"]
        more = f", ... ({len(names)} in all, in cache.json)" if len(names) > 25 else ""
        out.print(f"features   {', '.join(names[:25])}{more}", highlight=False)
    for split in ("train", "test"):
        labels = cache.labels[cache.splits == split]
        if len(labels):
            out.print(f"{split:<10} {len(labels)} recordings (AD {(labels == 1).sum()}, control {(labels == 0).sum()}, "
                      f"unlabelled {(labels == -1).sum()})")
    out.print(f"windows    {meta['n_windows']} (window {meta['settings']['window_s']} s)")
    out.print(f"failures   {len(meta['failures'])}")
    out.print(f"hash       {cache.content_hash[:16]}")


if __name__ == "__main__":
    app()
