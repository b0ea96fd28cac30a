"""Reading recordings as 16 kHz mono float32, whatever rate, channel count or sample format they come in.

wav2vec2-family feature extractors refuse anything but 16 kHz and never resample, so every path into a
speech model goes through `load_audio`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 16_000


class AudioError(Exception):
    """A recording that cannot be used; the message says which file and why."""

    def __init__(self, path: Path | str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def audio_duration(path: Path | str) -> float:
    """Duration in seconds from the file header alone (no decoding)."""
    try:
        info = sf.info(str(path))
    except Exception as exc:  # soundfile raises several types for unreadable files
        raise AudioError(path, f"cannot read audio header ({exc})") from exc
    return info.frames / info.samplerate


def load_audio(path: Path | str, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode, downmix to mono and resample with soxr's anti-aliasing filter (VHQ)."""
    path = Path(path)
    if not path.exists():
        raise AudioError(path, "file does not exist")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:
        raise AudioError(path, f"cannot decode audio ({exc})") from exc
    if data.shape[0] == 0:
        raise AudioError(path, "file holds no audio samples")
    mono = data.mean(axis=1, dtype=np.float32)
    if not np.isfinite(mono).all():
        raise AudioError(path, "audio contains NaN or infinite samples")
    if rate != sample_rate:
        mono = soxr.resample(mono, rate, sample_rate, quality="VHQ").astype(np.float32, copy=False)
    return np.ascontiguousarray(mono)
