"""Voice activity detection for recordings that come without a segmentation (silero-vad, which ships its
model inside the package: it works offline).

It finds speech, not the participant: an interviewer's questions are speech too, and telling speakers apart
needs a diarisation. Models trained on participant segments therefore see somewhat different input when a
new recording is segmented this way; `predict` and `corpus csv` say so, and record which segmentation each
recording got ("participant", "given", "vad" or "whole").
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from adsearch.corpus import Recording, Segment, merge_segments
from adsearch.io.audio import SAMPLE_RATE

VAD_CAVEAT = ("voice activity detection finds the speech of every speaker: the interviewer's speech cannot be "
              "told from the participant's without a diarisation, so it is included")


class VadError(ValueError):
    """Voice activity detection is not available here."""


_MISSING = ("voice activity detection needs torch and silero-vad: pip install 'adsearch[extract]' (or give a "
            "segmentation, or --no-vad to use whole recordings)")


def check_vad() -> None:
    """Fail early, without loading anything, where voice activity detection cannot run."""
    from importlib.util import find_spec

    if find_spec("torch") is None or find_spec("silero_vad") is None:
        raise VadError(_MISSING)


@lru_cache(maxsize=1)
def load_vad():
    """The silero-vad model, loaded once per process; a clear error where it is not installed."""
    try:
        import torch
    except ImportError:
        raise VadError(_MISSING) from None
    threads = torch.get_num_threads()
    try:
        from silero_vad import load_silero_vad
    except ImportError:
        raise VadError(_MISSING) from None
    finally:
        torch.set_num_threads(threads)  # importing silero_vad sets torch to one thread for the whole process
    return load_silero_vad()  # the TorchScript model inside the installed package, never a download


def speech_segments(samples: np.ndarray, rate: int = SAMPLE_RATE, threshold: float = 0.5,
                    min_speech_s: float = 0.25, min_silence_s: float = 1.0, pad_s: float = 0.2) -> list[Segment]:
    """Seconds (begin, end) of speech in a mono recording at 16 kHz; an empty list when there is none.
    Pauses under `min_silence_s` stay inside a segment, as in an utterance-level speaker segmentation (the
    training data's): pauses are part of what the models learn from."""
    import torch
    from silero_vad import get_speech_timestamps

    model = load_vad()
    if rate != SAMPLE_RATE:
        raise VadError(f"voice activity detection runs at {SAMPLE_RATE} Hz, not {rate}")
    with torch.no_grad():
        stamps = get_speech_timestamps(torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32)), model,
                                       threshold=threshold, sampling_rate=rate,
                                       min_speech_duration_ms=int(min_speech_s * 1000),
                                       min_silence_duration_ms=int(min_silence_s * 1000),
                                       speech_pad_ms=int(pad_s * 1000))
    return merge_segments((stamp["start"] / rate, stamp["end"] / rate) for stamp in stamps)


def segment_unsegmented(recordings: list[Recording], advance=lambda: None) -> tuple[list[Recording], list[str]]:
    """The recordings, those without segments given the speech voice activity detection finds in them
    (segmentation "vad"); warnings for those it finds none in or cannot read (they stay whole)."""
    from dataclasses import replace

    from adsearch.io.audio import AudioError, load_audio

    load_vad()
    done, warnings = [], []
    for rec in recordings:
        if not rec.segments and rec.segmentation != "whole":
            try:
                found = speech_segments(load_audio(rec.path))
            except AudioError as exc:
                found, reason = [], f"{exc} (kept whole; extraction will report it)"
            else:
                reason = f"{rec.id}: no speech found by voice activity detection; kept whole"
            if found:
                rec = replace(rec, segments=tuple(found), segmentation="vad")
            else:
                warnings.append(reason)
            advance()
        done.append(rec)
    return done, warnings
