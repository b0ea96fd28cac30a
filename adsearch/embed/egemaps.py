"""eGeMAPS features (openSMILE) in the cache format: the ADReSSo challenge's acoustic baseline family as
one more feature source, windowed and pooled exactly like a speech model's layers.

Two feature sets (`adsearch extract --features ...`):

* `egemaps`: the 25 eGeMAPSv02 low-level descriptors every 10 ms; per window the cache keeps their frame
  count, mean, M2, max and min, so every pooling (mean, std, max, ...) derives from them as for a layer.
* `egemaps-functionals`: the 88 eGeMAPSv02 functionals of each window, stored as one "frame" per window
  (mean = max = min = the functionals, M2 = 0); recording-level mean pooling averages them over windows.
  With `--window-s 600` each recording's participant speech is one window: the 88 functionals at
  recording level, the challenge baseline's own representation.

Either is a cache with one "layer" (index 0). The `opensmile` package (PyPI, extra `adsearch[egemaps]`)
ships its own binary: no system package, no torch.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from adsearch.embed.model import ModelError, ModelSource

FEATURE_SETS = ("egemaps", "egemaps-functionals")
PREFIX = "opensmile/"


def is_egemaps(name: str) -> bool:
    return name.startswith(PREFIX)


def egemaps_source(features: str) -> ModelSource:
    """What plays the speech model's part in the cache key, the cache metadata and an exported config."""
    if features not in FEATURE_SETS:
        raise ModelError(f"--features {features!r}: choose model, {' or '.join(FEATURE_SETS)}")
    opensmile = _opensmile()
    return ModelSource(f"{PREFIX}{features}", Path(opensmile.__file__).parent,
                       f"opensmile-{opensmile.__version__}-eGeMAPSv02")


@contextmanager
def _ctrl_c_between_calls() -> Iterator[Callable[[], bool]]:
    """openSMILE's C callback swallows the KeyboardInterrupt that Ctrl-C raises inside it, so Ctrl-C did not
    stop `extract --features egemaps`: here Ctrl-C is noted, the running call finishes, and KeyboardInterrupt
    is raised between calls (main thread only; elsewhere signals are not Python's to handle)."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield lambda: bool(caught)
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
    if caught:
        raise KeyboardInterrupt


def _opensmile():
    try:
        import opensmile
    except ImportError:
        raise ModelError("eGeMAPS features need the opensmile package: pip install 'adsearch[egemaps]'") from None
    return opensmile


class EgemapsEncoder:
    """`WindowEncoder`'s interface over openSMILE: per-window statistics of one "layer"."""

    masked = True  # windows of any length batch together
    device = "cpu"
    dtype_name = "float32"
    n_layers = 1

    def __init__(self, name: str):
        opensmile = _opensmile()
        self.functionals = name.removeprefix(PREFIX) == "egemaps-functionals"
        level = opensmile.FeatureLevel.Functionals if self.functionals else opensmile.FeatureLevel.LowLevelDescriptors
        self.smile = opensmile.Smile(feature_set=opensmile.FeatureSet.eGeMAPSv02, feature_level=level)
        self.dim = len(self.smile.feature_names)

    def keep_layers(self, last: int) -> None:
        if last != 0:
            raise ModelError(f"eGeMAPS caches have one layer (0), not {last}")

    def submit(self, windows: Sequence[np.ndarray], layers: Sequence[int] | None = None) -> Future:
        """`encode` at once (openSMILE runs here, on the CPU), its result waiting as `WindowEncoder.submit`'s."""
        done: Future = Future()
        done.set_result(self.encode(windows, layers))
        return done

    def encode(self, windows: Sequence[np.ndarray], layers: Sequence[int] | None = None
               ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(n_frames (B,), {stat: (1, B, dim)}) as `WindowEncoder.encode`."""
        if layers is not None and list(layers) != [0]:
            raise ModelError("eGeMAPS caches have one layer (0)")
        frames, stats = [], {"mean": [], "m2": [], "max": [], "min": []}
        with _ctrl_c_between_calls() as interrupted:
            computed = [self.smile.process_signal(np.asarray(audio, np.float32), 16_000).to_numpy(np.float64)
                        for audio in windows if not interrupted()]
        for values in computed:
            values = np.nan_to_num(values)
            if len(values) == 0:
                values = np.zeros((1, self.dim))
            mean = values.mean(axis=0)
            frames.append(len(values))
            stats["mean"].append(mean)
            stats["m2"].append(((values - mean) ** 2).sum(axis=0))
            stats["max"].append(values.max(axis=0))
            stats["min"].append(values.min(axis=0))
        return np.asarray(frames, np.int64), {k: np.asarray(v, np.float32)[None] for k, v in stats.items()}
