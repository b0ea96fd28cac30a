"""`adsearch corpus`, `synth` and `model tiny`: manifests, synthetic corpora, tiny models."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from adsearch.cli.app import THREADS_HELP, app, corpus_app, model_app
from adsearch.cli.console import bar, complete, out, print_threads, print_warnings, user_errors


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
        print_warnings(result.warnings)
        manifest = write_manifest(result.recordings, output)
    _summarise_corpus(result.recordings, manifest)


@corpus_app.command("csv")
def corpus_csv(
    file: Annotated[Path, typer.Argument(help="Your manifest: id, path, label, group, split[, mmse, segments].")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Validated manifest to write.")] = Path("corpus.csv"),
    vad: Annotated[bool, typer.Option("--vad/--no-vad", help="Give recordings without segments the speech that "
                                                             "voice activity detection (silero-vad) finds; "
                                                             "interviewer speech is kept too.")] = False,
    threads: Annotated[int | None, typer.Option(help=THREADS_HELP, min=1, max=1024)] = None,
) -> None:
    """Validate a manifest of another corpus and write it in canonical form.

    label is 1 (AD), 0 (control) or empty (unlabelled, test only); group is the speaker (recordings of one
    speaker never straddle folds); segments lists participant speech as `begin-end` seconds joined by `;`
    (empty = whole recording); segmentation (optional) says where they came from. Relative paths are taken
    relative to FILE's folder.
    """
    from adsearch.corpus import label_conflicts, read_manifest, write_manifest

    with user_errors():
        recordings = read_manifest(file)
        print_warnings(label_conflicts(recordings))
        if vad:
            from adsearch.vad import VAD_CAVEAT, segment_unsegmented

            print_threads(threads)
            todo = sum(1 for rec in recordings if not rec.segments and rec.segmentation != "whole")
            with bar() as progress:
                task = progress.add_task("voice activity detection", total=todo)
                recordings, warnings = segment_unsegmented(recordings, lambda: progress.advance(task))
                complete(progress)
            print_warnings(warnings)
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

    with user_errors(), bar() as progress:
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

    if output.exists() and not output.is_dir():
        raise typer.BadParameter(f"{output} is a file; name a folder for the model (it is created)",
                                 param_hint="OUTPUT")
    with user_errors():
        save_tiny_model(output, seed, hidden_size, layers, kind)
    out.print(f"saved a tiny random {kind} ({layers} layers, hidden size {hidden_size}) to {output}")
