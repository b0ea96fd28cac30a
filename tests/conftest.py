"""Shared fixtures: a tiny random wav2vec2 saved with save_pretrained, and a small synthetic ADReSSo corpus."""

from __future__ import annotations

import csv
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
MARIADB = "mysql+pymysql://root@127.0.0.1:3306/test"


def server_available(url: str = POSTGRES) -> str | None:
    """None if the database server at `url` answers, else why not (tests print it when they skip)."""
    import sqlalchemy as sa

    try:
        engine = sa.create_engine(url)
        with engine.connect() as connection:
            connection.execute(sa.text("select 1"))
        engine.dispose()
    except Exception as exc:
        return f"{url.split('://')[0]} not reachable at {url}: {type(exc).__name__}"
    return None


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from adsearch.embed.model import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    from adsearch.synth import synthesize_corpus

    root = tmp_path_factory.mktemp("synth")
    synthesize_corpus(root, n_train=12, n_test=4, effect=1.0, seed=3)
    return root


@pytest.fixture(scope="session")
def synth_manifest(synth_root, tmp_path_factory) -> Path:
    from adsearch.corpus import import_adresso, write_manifest

    result = import_adresso(synth_root, synth_root / "task1.csv")
    return write_manifest(result.recordings, tmp_path_factory.mktemp("manifest") / "corpus.csv")


@pytest.fixture(scope="session")
def synth_cache_root(synth_manifest, tiny_model, tmp_path_factory) -> Path:
    """The `-o` root of `adsearch extract corpus.csv --model TINY` with default settings, extracted once per
    session: tests that need that cache read it (or copy the root) instead of extracting again."""
    from adsearch.embed.extract import extract

    root = tmp_path_factory.mktemp("synth-cache")
    extract(synth_manifest, root, str(tiny_model), device="cpu")
    return root


def speechlike(seconds: float, rate: int = 16_000, seed: int = 0) -> np.ndarray:
    """Amplitude-modulated harmonic noise: cheap, deterministic, not silence."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.5 * t)
    voiced = sum(np.sin(2 * np.pi * k * np.cumsum(f0) / rate) / k for k in range(1, 6))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)
    return (0.2 * envelope * voiced + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


def write_wav(path: Path, audio: np.ndarray, rate: int = 16_000, subtype: str = "PCM_16") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, audio, rate, subtype=subtype)
    return path


def write_rows(path: Path, header: list, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_raw_wav(path: Path, rate: int, channels: int, frames: int) -> Path:
    """A PCM WAV declaring any rate and channel count (libsndfile writes only sensible ones)."""
    import struct

    data = b"\x01\x00" * channels * frames
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * channels * 2, channels * 2, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", len(data)) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return path


@pytest.fixture
def small_mount(tmp_path):
    """A 1 MiB tmpfs (root only): filled to the brim, or remounted read-only, it gives the real errors."""
    folder = tmp_path / "mnt"
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        reason = f"cannot mount a tmpfs here ({done.stderr.strip()})"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the full-disk tests: {reason}")
        pytest.skip(reason)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path) -> None:
    """Write into `folder` until its file system is full."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)


def record_feature_reads(monkeypatch) -> list[set[int]]:
    """Spy on every feature read from any cache: the returned list gets the item indices of each read (all
    items for a read without `items`), so a test can assert that no test item was ever read."""
    from adsearch.embed.cache import EmbeddingCache

    read: list[set[int]] = []
    for method in ("recording_features", "window_features"):
        real = getattr(EmbeddingCache, method)

        def spy(self, layer, pooling, items=None, real=real):
            read.append(set(range(len(self.ids))) if items is None else set(np.asarray(items).tolist()))
            return real(self, layer, pooling, items)

        monkeypatch.setattr(EmbeddingCache, method, spy)
    return read


def interrupt_extraction(command: list[str], cache_root: Path) -> tuple[int, str, str]:
    """Run an `adsearch extract` command, press Ctrl-C once its first recording's part is written, and return
    (exit code, stdout, stderr). As from a terminal: a shell that starts jobs in the background (CI) passes
    SIGINT on as ignored, and Python then never raises KeyboardInterrupt, so the child restores it."""
    import signal
    import time

    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(cache_root.glob("*/parts/*.npz")):
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    return process.returncode, out, err
