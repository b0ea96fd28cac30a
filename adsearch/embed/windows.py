"""Windows: participant speech cut into pieces the speech model takes, and batches of them."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from adsearch.io.audio import SAMPLE_RATE

MIN_WINDOW_SAMPLES = 400  # the CNN front end needs 400 samples for its first frame


def plan_windows(
    segments: Sequence[tuple[float, float]], n_samples: int, window_s: float, min_window_s: float
) -> list[tuple[int, int]]:
    """Split each speech segment evenly into windows of at most `window_s` (none spans two segments).

    Even splitting avoids a tiny tail window; windows under `min_window_s` are dropped.
    """
    spans = [(round(b * SAMPLE_RATE), min(round(e * SAMPLE_RATE), n_samples)) for b, e in segments]
    if not segments:
        spans = [(0, n_samples)]
    max_len = int(window_s * SAMPLE_RATE)
    min_len = max(int(min_window_s * SAMPLE_RATE), MIN_WINDOW_SAMPLES)
    windows = []
    for begin, end in spans:
        if end - begin < min_len:
            continue
        pieces = math.ceil((end - begin) / max_len)
        bounds = np.linspace(begin, end, pieces + 1).round().astype(int)
        windows += [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b - a >= min_len]
    return windows


@dataclass
class Window:
    item: int  # which recording: an index into the caller's list, or the extraction's running number
    start: int
    end: int
    audio: np.ndarray


def make_batches(windows: list[Window], batch_size: int, equal_lengths: bool) -> Iterator[list[Window]]:
    """Longest first, so padding inside a batch stays small; optionally only equal lengths together."""
    ordered = sorted(windows, key=lambda w: w.end - w.start, reverse=True)
    batch: list[Window] = []
    for window in ordered:
        if batch and (len(batch) == batch_size or (equal_lengths and len(window.audio) != len(batch[0].audio))):
            yield batch
            batch = []
        batch.append(window)
    if batch:
        yield batch


def pack_batches(carried: list[Window], new: list[Window], batch_size: int) -> tuple[list[list[Window]], list[Window]]:
    """(full batches, windows left for the next group) from the windows the last group left and this group's:
    while groups hold at least batch_size - 1 windows (extract's hold about four batches), every batch but the
    run's last is full (on a GPU a half-empty batch costs almost a full one's time). What is
    left is at most batch_size - 1 of this group's shortest windows, so no window waits twice and memory stays
    bounded. For models that take an attention mask (any lengths in one batch)."""
    spare = min((len(carried) + len(new)) % batch_size, len(new))
    ordered = sorted(new, key=lambda w: w.end - w.start, reverse=True)
    now, later = ordered[:len(ordered) - spare], ordered[len(ordered) - spare:]
    return list(make_batches(carried + now, batch_size, equal_lengths=False)), later
