"""Reading recordings as 16 kHz mono float32, whatever rate, channel count or sample format they come in.

wav2vec2-family feature extractors refuse anything but 16 kHz and never resample, so every path into a
speech model goes through `load_audio`.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 16_000
SILENCE_PEAK = 1e-5  # -100 dBFS: below any microphone's noise floor, i.e. digital silence
# Bounds checked from the header before anything is decoded: a few KB declaring 1 Hz would ask soxr for
# gigabytes, 1,024 channels or hours of 384 kHz audio would fill memory. Telephone speech (8 kHz) and studio
# rates (up to 384 kHz) pass; 4 kHz is already below any speech recording's rate.
MIN_RATE, MAX_RATE = 4_000, 384_000
MAX_CHANNELS = 32
MAX_DECODED_BYTES = 2 << 30  # float32 samples of all channels: 2 GiB, e.g. 9 hours of 16 kHz stereo


class AudioError(Exception):
    """A recording that cannot be used; the message says which file and why."""

    def __init__(self, path: Path | str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def _without_file_object(exc: Exception) -> str:
    """libsndfile's message without the Python file object it was given (`Error opening <_io.BufferedReader
    name='...'>: ...`): the path is said once, in front."""
    return re.sub(r"Error opening <_io\.\w+ name=.*?>: ", "", str(exc)).strip() or type(exc).__name__


def audio_duration(path: Path | str) -> float:
    """Duration in seconds from the file header alone (no decoding)."""
    try:
        with Path(path).open("rb") as raw:  # a file object: libsndfile cannot open names that are not UTF-8
            info = sf.info(raw)
    except Exception as exc:  # soundfile raises several types for unreadable files
        raise AudioError(path, f"cannot read audio header ({_without_file_object(exc)})") from exc
    _check_header(Path(path), info.samplerate, info.channels, info.frames)
    return info.frames / info.samplerate


def _wav_declared_frames(path: Path) -> int | None:
    """Frames a RIFF/WAVE file's data chunk announces (libsndfile quietly shortens a truncated one), or None
    for other formats and streamed WAVs whose size field was never filled in."""
    with path.open("rb") as handle:
        if handle.read(12)[8:12] != b"WAVE":
            return None
        block_align = None
        for _ in range(64):  # chunks before 'data': fmt, LIST, fact, ...
            header = handle.read(8)
            if len(header) < 8:
                return None
            chunk, size = header[:4], int.from_bytes(header[4:], "little")
            if chunk == b"fmt ":
                block_align = int.from_bytes(handle.read(16)[12:14], "little")
                handle.seek(size - 16 + (size & 1), 1)
            elif chunk == b"data":
                if not block_align or size in (0, 0xFFFFFFFF):
                    return None
                return size // block_align
            else:
                handle.seek(size + (size & 1), 1)
    return None


def _check_header(path: Path, rate: int, channels: int, frames: int) -> None:
    if not MIN_RATE <= rate <= MAX_RATE:
        raise AudioError(path, f"declares a sample rate of {rate} Hz; speech recordings have {MIN_RATE:,} to "
                               f"{MAX_RATE:,} Hz (a damaged or mislabelled file?)")
    if not 1 <= channels <= MAX_CHANNELS:
        raise AudioError(path, f"declares {channels} channels; at most {MAX_CHANNELS} are read")
    if frames * channels * 4 > MAX_DECODED_BYTES:
        raise AudioError(path, f"would decode to {frames * channels * 4 / 2**30:.1f} GiB ({frames / rate / 3600:.1f} "
                               f"h x {channels} channels); cut it into recordings under "
                               f"{MAX_DECODED_BYTES / 2**30:.0f} GiB")


def load_audio(path: Path | str, sample_rate: int = SAMPLE_RATE, conditions: dict | None = None) -> np.ndarray:
    """Decode, downmix to mono and resample with soxr's anti-aliasing filter (VHQ). `conditions`, if given, is
    filled with how the recording was made (`recording_conditions`), measured on the way at no extra read."""
    path = Path(path)
    if not path.exists():
        raise AudioError(path, "file does not exist")
    try:
        with path.open("rb") as raw, sf.SoundFile(raw) as handle:  # (names need not be UTF-8)
            declared, rate = handle.frames, handle.samplerate
            _check_header(path, rate, handle.channels, declared)
            data = handle.read(dtype="float32", always_2d=True)
    except AudioError:
        raise
    except Exception as exc:
        raise AudioError(path, f"cannot decode audio ({_without_file_object(exc)})") from exc
    if data.shape[0] == 0:
        raise AudioError(path, "file holds no audio samples")
    declared = max(declared, _wav_declared_frames(path) or 0)
    if data.shape[0] < declared:
        raise AudioError(path, f"truncated: the header announces {declared / rate:.2f} s, the file holds "
                               f"{data.shape[0] / rate:.2f} s; re-export or re-download it")
    mono = data.mean(axis=1, dtype=np.float32)
    if not np.isfinite(mono).all():
        raise AudioError(path, "audio contains NaN or infinite samples")
    if float(np.max(np.abs(mono))) < SILENCE_PEAK:
        raise AudioError(path, f"silent: no sample reaches {SILENCE_PEAK:g} of full scale (-100 dBFS); a model "
                               "would score it with confidence it does not have")
    if rate != sample_rate:
        mono = soxr.resample(mono, rate, sample_rate, quality="VHQ").astype(np.float32, copy=False)
    if conditions is not None:
        conditions.update(recording_conditions(data, rate, mono, sample_rate))
    return np.ascontiguousarray(mono)


CLIPPED = 0.999  # of full scale: a sample at or above it was (almost surely) clipped by the recorder
FRAME_S = 0.025  # frames of the level statistics


def recording_conditions(raw: np.ndarray, rate: int, mono: np.ndarray, mono_rate: int) -> dict[str, float]:
    """How a recording was made, measured without any label: what a classifier could pick up instead of the
    speaker (DementiaBank's recordings differ in device, room and level). `raw` (frames, channels) as decoded,
    `mono` the downmix at `mono_rate`. Levels in dB of full scale over 25 ms frames: the noise floor is the
    10th percentile frame, the signal-to-noise ratio the 90th percentile frame over it; `clipped_share` the
    share of raw samples at 0.999 of full scale or above."""
    frame = max(1, int(FRAME_S * mono_rate))
    usable = len(mono) // frame * frame or len(mono)
    rms = np.sqrt(np.mean(np.square(mono[:usable].astype(np.float64)).reshape(-1, min(frame, usable)), axis=1))
    frame_db = 20 * np.log10(np.maximum(rms, 1e-10))
    noise, loud = np.percentile(frame_db, [10, 90])
    level = 20 * np.log10(max(float(np.sqrt(np.mean(np.square(mono.astype(np.float64))))), 1e-10))
    return {"sample_rate": float(rate), "channels": float(raw.shape[1]), "seconds": round(raw.shape[0] / rate, 4),
            "level_dbfs": round(float(level), 3), "noise_floor_dbfs": round(float(noise), 3),
            "snr_db": round(float(loud - noise), 3),
            "clipped_share": round(float(np.mean(np.abs(raw) >= CLIPPED)), 6)}
