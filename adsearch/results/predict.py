"""Predicting new recordings with an exported classifier.

Loading the export (config.yaml and its model file), the file's features (`features.FileFeatures`), then
the score: P(AD), an SVM's margin or the MMSE score. A file that cannot be used gets its own error row.
"""
import csv
import math
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adsearch.io.audio import AudioError, load_audio
from adsearch.io.outputs import file_written_whole, printable
from adsearch.results.features import FileFeatures
from adsearch.results.model_files import load_model
from adsearch.results.schema import CONFIG_FILE, MODEL_FILE, ExportedConfig, ExportError, load_config
from adsearch.results.shared import SharedModels

# Why a score without the participant's segmentation is not the study's kind of score (the study's features
# came from the participant's speech only): said per file, in the CSV and on the terminal.
NOT_COMPARABLE = {
    "vad": "not comparable with the study's scores: voice activity detection keeps the interviewer's speech too; "
           "pass --segments with this file's participant speech (a CSV file,begin,end or the corpus manifest)",
    "whole": "not comparable with the study's scores: the whole recording was used, interviewer and pauses "
             "included; pass --segments with this file's participant speech (a CSV or the corpus manifest)",
}


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
    note: str = ""  # why a score is not comparable with the study's (no participant segmentation)


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
    """An exported classifier plus the feature models it needs, ready for recordings."""

    def __init__(self, export_dir: Path | str, device: str = "auto", vad: bool = True,
                 shared: SharedModels | None = None, threads: int | None = None):
        """`shared`: models and per-file steps shared with other predictors (an ensemble's members); whoever
        passes it calls its `trim()` once every predictor is built, and `forget()` between files."""
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
        self.features = FileFeatures(self.config, export_dir / CONFIG_FILE, device, self.shared, threads)
        if self.owns_shared:
            self.shared.trim()

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
            if prediction.segmentation != "given":
                prediction.note = NOT_COMPARABLE[prediction.segmentation]
            if prediction.segmentation == "vad":
                segments = self.shared.once(("vad", str(path)), lambda: speech_segments(audio))
                if not segments:
                    prediction.error = "no speech found by voice activity detection"
                    return prediction
            X, prediction.n_windows, prediction.speech_seconds = self.features.of(audio, segments or ())
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
    fields = ["file", "prob_ad", "decision", "mmse", "label", "n_windows", "speech_seconds", "segmentation", "error",
              "note"]
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
