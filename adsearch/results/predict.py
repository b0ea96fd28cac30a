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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from adsearch.embed.cache import pool_recordings, pool_windows
from adsearch.io.audio import SAMPLE_RATE, AudioError, load_audio
from adsearch.io.outputs import file_written_whole, printable
from adsearch.results.export import CONFIG_FILE, MODEL_FILE, ExportedConfig, ExportError, load_config, load_model

T = TypeVar("T")


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


class SharedModels:
    """Models loaded once, and each file's steps done once, for every Predictor that shares this: an
    ensemble's members often run one speech model (at different layers), one recogniser or one VAD on the
    same file. Keys say what a thing is (model folder, revision, device, dtype; the file and the span), so
    sharing never changes a member's numbers. `forget()` between files."""

    def __init__(self) -> None:
        self._models: dict[tuple, object] = {}
        self._layers: dict[tuple, set[int]] = defaultdict(set)
        self._trimmed = False
        self._steps: dict[tuple, object] = {}

    def model(self, key: tuple, load: Callable[[], T]) -> T:
        if key not in self._models:
            self._models[key] = load()
        return self._models[key]

    def speech_encoder(self, source, device: str, dtype: str, layer: int):
        """The speech model of `source`, to be cut down (`trim`) to the highest layer any sharer needs."""
        from adsearch.embed.extract import WindowEncoder

        key = ("speech", str(source.path), source.revision, device, dtype)
        encoder = self.model(key, lambda: WindowEncoder(source, device, dtype))
        if layer >= encoder.n_layers:
            raise ExportError(f"features.layer {layer} does not exist: {source.name} has layers "
                              f"0..{encoder.n_layers - 1}")
        if self._trimmed:
            raise ExportError("a speech model was shared after it was cut down to its layers; build every "
                              "predictor before the first prediction")
        self._layers[key].add(layer)
        return encoder

    def trim(self) -> None:
        """Drop the layers above what the sharers need (a classifier on layer k needs only k layers run)."""
        for key, layers in self._layers.items():
            self._models[key].keep_layers(max(layers))
        self._trimmed = True

    def layers_of(self, encoder, layer: int) -> list[int]:
        """Every layer the sharers of `encoder` need (one forward pass serves them all); [layer] for a model
        that has no layers to choose from (eGeMAPS)."""
        return sorted(next((found for key, found in self._layers.items() if self._models[key] is encoder), {layer}))

    def once(self, key: tuple, compute: Callable[[], T]) -> T:
        """A step of the current file (decoding, VAD, a window's statistics, a transcription), done once."""
        if key not in self._steps:
            self._steps[key] = compute()
        return self._steps[key]

    def forget(self) -> None:
        self._steps.clear()


class Predictor:
    """An exported classifier plus the speech model it needs, ready for recordings."""

    def __init__(self, export_dir: Path | str, device: str = "auto", vad: bool = True,
                 shared: SharedModels | None = None):
        """`shared`: models and per-file steps shared with other predictors (an ensemble's members); whoever
        passes it calls its `trim()` once every predictor is built, and `forget()` between files."""
        from adsearch.embed.model import resolve_model

        export_dir = Path(export_dir)
        self.owns_shared = shared is None
        self.shared = shared or SharedModels()
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
        layer = self.config.features.layer
        if is_egemaps(self.config.model.name):  # an eGeMAPS source: openSMILE, not a speech model
            source = egemaps_source(self.config.model.name.removeprefix("opensmile/"))
            if source.revision != self.config.model.revision:
                raise ExportError(f"the classifier was trained on {self.config.model.revision}; this machine has "
                                  f"{source.revision}: install that opensmile version")
            if layer != 0:
                raise ExportError(f"{export_dir / CONFIG_FILE}: features.layer {layer} does not exist: eGeMAPS "
                                  "caches have one layer (0)")
            self.encoder = self.shared.model(("egemaps", source.name), lambda: EgemapsEncoder(source.name))
        else:
            source = resolve_model(self._model_location())
            if source.revision != self.config.model.revision:
                raise ExportError(
                    f"speech model {self.config.model.name!r} is revision {source.revision}, but the classifier was "
                    f"trained on features of revision {self.config.model.revision}; point the config's model.name "
                    "at that exact model")
            try:
                self.encoder = self.shared.speech_encoder(source, device, self.config.features.dtype, layer)
            except ExportError as exc:
                raise ExportError(f"{export_dir / CONFIG_FILE}: {exc}") from None
            if self.owns_shared:
                self.shared.trim()

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
        self.recogniser = self.shared.model(("asr", ref.backend, asr.name, asr.revision, device),
                                            lambda: load_recogniser(asr, device))
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
        self.encoder = self.shared.model(("text", str(source.path), source.revision, device),
                                         lambda: TextEncoder(source, resolve_device(device)))

    def _transcript_stats(self, audio: np.ndarray, segments) -> tuple[np.ndarray, dict, list]:
        from adsearch.embed.from_transcripts import one_vector_stats
        from adsearch.embed.linguistic import linguistic_features
        from adsearch.embed.ngrams import ngram_counts
        from adsearch.transcripts.store import Transcript

        duration = len(audio) / SAMPLE_RATE
        spans = tuple((b, min(e, duration)) for b, e in segments if b < duration) or ((0.0, duration),)
        words = self.shared.once(("transcribe", id(self.recogniser), spans),
                                 lambda: tuple(self.recogniser.transcribe(audio, spans)))
        transcript = Transcript("new", words, spans, duration)
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
        layers = self.shared.layers_of(self.encoder, feats.layer)
        mine = layers.index(feats.layer)
        n_frames, stats = [], defaultdict(list)
        for begin, end in spans:  # one window at a time: the CPU default, and memory stays flat
            frames, window_stats = self.shared.once(
                ("window", id(self.encoder), begin, end),  # every sharer's layers from one forward pass
                lambda begin=begin, end=end: self.encoder.encode([audio[begin:end]], layers=layers))
            n_frames.append(frames[0])
            for name, values in window_stats.items():
                stats[name].append(values[mine, 0])
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
        try:
            return self._predict(path, segments)
        finally:
            if self.owns_shared:
                self.shared.forget()  # this file's audio and steps

    def _predict(self, path: Path | str, segments) -> Prediction:
        from adsearch.search.objective import recording_scores
        from adsearch.vad import speech_segments

        prediction = Prediction(printable(path))
        try:
            audio = self.shared.once(("audio", str(path)), lambda: load_audio(path))
            prediction.segmentation = "given" if segments else "vad" if self.vad else "whole"
            if prediction.segmentation == "vad":
                segments = self.shared.once(("vad", str(path)), lambda: speech_segments(audio))
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
