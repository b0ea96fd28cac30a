"""Sharing work between processes on one machine or many: deterministic shards, exclusive claims on one
item, and JSON files that appear whole. `extract` and `transcribe` both split a manifest this way."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from adsearch.corpus import Recording
from adsearch.io.audio import AudioError, audio_duration


class ExtractProgress(Protocol):
    """What a long run over recordings tells its progress bar: recordings and seconds of speech."""

    def start(self, n_recordings: int, audio_seconds: float, n_done: int) -> None: ...
    def advance(self, n_recordings: int, audio_seconds: float) -> None: ...


def speech_seconds(rec: Recording) -> float:
    """Seconds of participant speech (the whole file without segments); 0 for audio that cannot be read."""
    try:
        return sum(e - b for b, e in rec.segments) or audio_duration(rec.path)
    except AudioError:
        return 0.0


class Claim:
    """An exclusive claim on one recording (or on consolidation) shared by every process that extracts into
    the same folder, on one machine or several over a shared file system: a POSIX record lock on
    `parts/{id}.lock`. The kernel (or the NFS lock manager) drops it when its process ends in any way, so a
    killed extraction never leaves a claim behind; the lock file itself stays until consolidation."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def take(self) -> bool:
        import fcntl

        fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def wait(self) -> None:
        import fcntl

        fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.lockf(fd, fcntl.LOCK_EX)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def parse_shard(text: str) -> tuple[int, int]:
    """`K/N` (0 <= K < N, as SLURM array ids from 0 and Kubernetes' JOB_COMPLETION_INDEX count) -> (K, N)."""
    match = re.fullmatch(r"\s*(\d{1,6})\s*/\s*(\d{1,6})\s*", text)
    if not match or not 0 <= int(match[1]) < int(match[2]):
        raise ValueError(f"--shard {text[:40]!r}: give K/N with 0 <= K < N, e.g. 0/4 ... 3/4 for four jobs")
    return int(match[1]), int(match[2])


def shard_of(recordings: Sequence[Recording], shard: tuple[int, int] | None) -> list[Recording]:
    """The K-th of N deterministic shards: every N-th recording in id order, starting at the K-th."""
    if shard is None:
        return list(recordings)
    index, count = shard
    return [rec for i, rec in enumerate(sorted(recordings, key=lambda r: r.id)) if i % count == index]
