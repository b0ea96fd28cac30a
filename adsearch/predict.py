"""Predicting new recordings with an exported classifier.

The speech model named in the config is loaded (local directory or HF cache) and cut down to the layers the
classifier needs; windowing, statistics and pooling are the extraction's own code, so a training
recording gets the features the cache holds. A file that cannot be used gets its own error row.
"""

from __future__ import annotations

import csv
import math
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adsearch.audio import SAMPLE_RATE, AudioError, load_audio
from adsearch.embed.cache import pool_recordings, pool_windows
from adsearch.export import CONFIG_FILE, MODEL_FILE, ExportedConfig, ExportError, load_config, load_model
from adsearch.outputs import file_written_whole, printable


@dataclass
class Prediction:
    file: str
    prob_ad: float | None = None  # probability of AD, for classifiers that estimate one
    decision: float | None = None  # the signed margin of classifiers that only have a decision function
    mmse: float | None = None  # an MMSE model's predicted score (0-30); such a model gives no label
    label: str | None = None
    n_windows: int = 0
    speech_seconds: float = 0.0
    segmentation: str = ""  # given (--segments), vad (voice activity detection) or whole
    error: str | None = None


def read_segments(path: Path | str) -> dict[str, list[tuple[float, float]]]:
    """Participant speech per file, keyed by path as given, resolved path and file name.

    Either a CSV with columns file, begin, end (seconds; several rows per file) or a corpus manifest
    (its segments column), so the speech of corpus recordings is cut exactly as for extraction.
    """
    from adsearch.corpus import CorpusError, csv_records, merge_segments, read_csv, read_manifest

    path = Path(path)
    header, rows = read_csv(path, "segments file")
    if {"path", "segments"} <= set(header):
        by_file = {}
        for rec in read_manifest(path, check_files=False):
            for key in (str(rec.path), Path(rec.path).name):
                by_file[key] = list(rec.segments)
        return by_file
    if not {"file", "begin", "end"} <= set(header):
        raise CorpusError(f"{path}: needs the columns file, begin, end (seconds), or a corpus manifest; "
                          f"found {header[:10]}")
    records, problems = csv_records(path, header, rows)
    if problems:
        raise CorpusError(problems[0])
    found: dict[str, list] = defaultdict(list)
    for line, row in records:
        try:
            begin, end = float(row["begin"]), float(row["end"])
        except ValueError:
            raise CorpusError(f"{path} line {line}: begin/end are not numbers") from None
        if not (math.isfinite(begin) and math.isfinite(end) and 0 <= begin < end):
            raise CorpusError(f"{path} line {line}: needs finite seconds with 0 <= begin < end")
        found[row["file"]].append((begin, end))
    return {name: merge_segments(spans) for name, spans in found.items()}


class Predictor:
    """An exported classifier plus the speech model it needs, ready for recordings."""

    def __init__(self, export_dir: Path | str, device: str = "auto", vad: bool = True):
        from adsearch.embed.extract import WindowEncoder
        from adsearch.embed.model import resolve_model

        export_dir = Path(export_dir)
        self.config: ExportedConfig = load_config(export_dir / CONFIG_FILE)
        model_file = export_dir / MODEL_FILE
        if not model_file.is_file():
            raise ExportError(f"{model_file}: fitted model missing; export again")
        self.classifier = load_model(model_file, self.config.plugins)
        self.vad = vad  # recordings without a segmentation: voice activity detection, else the whole file
        if vad:
            from adsearch.vad import check_vad

            check_vad()  # loaded when a file needs it; missing, it is said before any file is read
        from adsearch.embed.egemaps import EgemapsEncoder, egemaps_source, is_egemaps

        self.recogniser = None
        if self.config.transcripts is not None:  # a linguistic or text source: words first
            self._load_transcript_source(device)
            return
        if is_egemaps(self.config.model.name):  # an eGeMAPS source: openSMILE, not a speech model
            source = egemaps_source(self.config.model.name.removeprefix("opensmile/"))
            if source.revision != self.config.model.revision:
                raise ExportError(f"the classifier was trained on {self.config.model.revision}; this machine has "
                                  f"{source.revision}: install that opensmile version")
            self.encoder = EgemapsEncoder(source.name)
        else:
            source = resolve_model(self._model_location())
            if source.revision != self.config.model.revision:
                raise ExportError(
                    f"speech model {self.config.model.name!r} is revision {source.revision}, but the classifier was "
                    f"trained on features of revision {self.config.model.revision}; point the config's model.name "
                    "at that exact model")
            self.encoder = WindowEncoder(source, device, self.config.features.dtype)
        if self.config.features.layer >= self.encoder.n_layers:
            raise ExportError(f"{export_dir / CONFIG_FILE}: features.layer {self.config.features.layer} does not "
                              f"exist: {self.config.model.name} has layers 0..{self.encoder.n_layers - 1}")
        if isinstance(self.encoder, WindowEncoder):
            self.encoder.keep_layers(self.config.features.layer)

    def _model_location(self) -> str:
        """The model as the study's user named it where that still finds it (a hub id, a folder relative to
        here), else the absolute folder recorded at export: an exported folder works from any directory."""
        name, path = self.config.model.name, self.config.model.path
        if Path(name).expanduser().is_dir() or path is None or not Path(path).is_dir():
            return name
        return path

    def _load_transcript_source(self, device: str) -> None:
        """The recogniser the training transcripts came from (the same revision), and the text encoder of a
        text source: a WAV file goes through exactly the steps its training recordings went through."""
        from adsearch.embed.linguistic import FEATURES_VERSION
        from adsearch.embed.ngrams import NGRAMS_VERSION
        from adsearch.transcripts.asr import BACKENDS, load_recogniser, resolve_asr

        ref = self.config.transcripts
        if ref.backend not in BACKENDS:
            raise ExportError(f"this classifier was trained on transcripts imported from {ref.backend.upper()} "
                              f"({ref.name}); audio cannot be turned into those. Train on `adsearch transcribe` "
                              "output to predict from audio")
        asr = resolve_asr(ref.backend, ref.name)
        if asr.revision != ref.revision:
            raise ExportError(f"recogniser {ref.name!r} is revision {asr.revision}, but the classifier was trained on "
                              f"transcripts of revision {ref.revision}; install that exact model")
        self.recogniser = load_recogniser(asr, device)
        self.encoder = None
        computes = {"adsearch/linguistic": f"features-v{FEATURES_VERSION}+",
                    "adsearch/ngrams": f"ngrams-v{NGRAMS_VERSION}+"}
        if self.config.model.name in computes:
            if not self.config.model.revision.startswith(computes[self.config.model.name]):
                raise ExportError(f"the classifier was trained on {self.config.model.revision}; this adsearch computes "
                                  f"{computes[self.config.model.name].rstrip('+')}")
            if self.config.model.name == "adsearch/ngrams" and not self.config.features.vocabulary:
                raise ExportError("an n-gram classifier's config.yaml needs features.vocabulary; export it again")
            return
        from adsearch.embed.extract import resolve_device
        from adsearch.embed.model import resolve_model
        from adsearch.embed.text import TextEncoder

        source = resolve_model(self.config.model.name, with_tokenizer=True)
        if source.revision != self.config.model.revision:
            raise ExportError(f"text model {self.config.model.name!r} is revision {source.revision}, but the "
                              f"classifier was trained on revision {self.config.model.revision}")
        self.encoder = TextEncoder(source, resolve_device(device))

    def _transcript_stats(self, audio: np.ndarray, segments) -> tuple[np.ndarray, dict, list]:
        from adsearch.embed.from_transcripts import one_vector_stats
        from adsearch.embed.linguistic import linguistic_features
        from adsearch.embed.ngrams import ngram_counts
        from adsearch.transcripts.store import Transcript

        duration = len(audio) / SAMPLE_RATE
        spans = tuple((b, min(e, duration)) for b, e in segments if b < duration) or ((0.0, duration),)
        transcript = Transcript("new", tuple(self.recogniser.transcribe(audio, spans)), spans, duration)
        if self.encoder is None:
            vocabulary = self.config.features.vocabulary
            n_frames, stats = one_vector_stats(ngram_counts(transcript, vocabulary) if vocabulary is not None
                                               else linguistic_features(transcript))
        else:
            n_frames, stats = self.encoder.encode_text(transcript.text, layers=[self.config.features.layer])
        return n_frames, {name: values[0] for name, values in stats.items()}, [spans] * len(n_frames)

    def features(self, audio: np.ndarray, segments) -> tuple[np.ndarray, int, float]:
        """(X, n_windows, speech seconds): one pooled row, or one row per window for window-level configs."""
        from adsearch.embed.extract import plan_windows

        feats = self.config.features
        if self.recogniser is not None:
            n_frames, arrays, spans = self._transcript_stats(audio, segments)
            return self._pool(n_frames, arrays), len(n_frames), sum(e - b for b, e in spans[0])
        spans = plan_windows(segments, len(audio), feats.window_s, feats.min_window_s)
        if not spans:
            raise AudioError("", f"too short: no speech span of at least {feats.min_window_s} s")
        n_frames, stats = [], defaultdict(list)
        for begin, end in spans:  # one window at a time: the CPU default, and memory stays flat
            frames, window_stats = self.encoder.encode([audio[begin:end]], layers=[feats.layer])
            n_frames.append(frames[0])
            for name, values in window_stats.items():
                stats[name].append(values[0, 0])
        arrays = {name: np.stack(values) for name, values in stats.items()}
        return self._pool(np.asarray(n_frames), arrays), len(spans), sum(e - b for b, e in spans) / SAMPLE_RATE

    def _pool(self, n_frames: np.ndarray, arrays: dict) -> np.ndarray:
        feats = self.config.features
        if feats.unit == "window":
            return pool_windows(arrays.__getitem__, n_frames, feats.pooling)
        return pool_recordings(arrays.__getitem__, n_frames, np.zeros(len(n_frames), np.int64), feats.pooling)

    def predict(self, path: Path | str, segments=None) -> Prediction:
        """`segments`: participant speech in seconds; None (or empty) when the recording comes without a
        segmentation, which voice activity detection then finds (or the whole recording, vad=False)."""
        from adsearch.search.objective import recording_scores
        from adsearch.vad import speech_segments

        prediction = Prediction(printable(path))
        try:
            audio = load_audio(path)
            prediction.segmentation = "given" if segments else "vad" if self.vad else "whole"
            if prediction.segmentation == "vad":
                segments = speech_segments(audio)
                if not segments:
                    prediction.error = "no speech found by voice activity detection"
                    return prediction
            X, prediction.n_windows, prediction.speech_seconds = self.features(audio, segments or ())
        except AudioError as exc:
            prediction.error = exc.reason
            return prediction
        except Exception as exc:  # one file the model cannot take must not cost the other predictions
            prediction.error = f"{type(exc).__name__}: {str(exc)[:300]}"
            return prediction
        score, threshold = recording_scores(self.classifier, X, np.zeros(len(X), np.int64), 1)
        if self.config.task == "mmse":  # clipped to 0-30 like every score the study saw
            prediction.mmse = float(score[0])
            return prediction
        if hasattr(self.classifier, "predict_proba"):
            prediction.prob_ad = float(score[0])
        else:  # an SVM's margin is no probability: it gets its own column
            prediction.decision = float(score[0])
        prediction.label = "AD" if score[0] > threshold else "control"
        return prediction


def check_output(path: Path | str) -> Path:
    """Where predictions go, checked before any is computed: its folder is created, an existing folder or
    an unwritable place is refused."""
    path = Path(path)
    if path.is_dir():
        raise ExportError(f"-o {path}: is a folder; name a CSV file, e.g. {path / 'predictions.csv'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"-o {path}: cannot create its folder ({exc.strerror})") from None
    if not os.access(path.parent, os.W_OK):
        raise ExportError(f"-o {path}: its folder {path.parent} is not writable")
    return path


def write_predictions(predictions: list[Prediction], path: Path | str) -> None:
    """Write the CSV atomically (a crash or a full disk never leaves half a file). Text cells that a
    spreadsheet would run as a formula (starting with =, +, -, @, tab or CR) get a leading apostrophe."""
    fields = ["file", "prob_ad", "decision", "mmse", "label", "n_windows", "speech_seconds", "segmentation", "error"]
    with file_written_whole(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for p in predictions:
            writer.writerow({f: _cell(getattr(p, f)) for f in fields})


def _cell(value) -> str | float | int:
    if value is None:
        return ""
    if isinstance(value, str):
        value = printable(value)
        return "'" + value if value.startswith(("=", "+", "-", "@", "\t", "\r")) else value
    return value
