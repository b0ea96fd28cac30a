"""Synthetic embedding caches with a planted label signal, for tests and search benchmarks.

They have the exact on-disk layout of `adsearch extract` output, so the search reads them through the
same `open_cache`. The signal sits in one layer (weaker in its neighbours) and one pooled statistic:

* "mean": class-dependent window means in a few dimensions (linear);
* "std": class-dependent spread of frames in a few dimensions (visible only to std pooling);
* "max": class-dependent peaks (visible only to max pooling);
* nonlinear=True: the class-1 shift has a random sign per recording, so class means coincide and only
  non-linear classifiers (RBF SVM, kNN, trees) can separate the classes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from adsearch.embed.cache import FORMAT_VERSION, META_FILE, STATS, file_digest, stat_path


def write_synthetic_cache(
    path: Path | str,
    n_train: int = 166,
    n_test: int = 71,
    n_layers: int = 25,
    dim: int = 1024,
    windows_per_item: int = 4,
    signal_layer: int = 12,
    signal_pooling: str = "mean",
    strength: float = 1.0,
    nonlinear: bool = False,
    signal_dims: int = 8,
    seed: int = 0,
) -> Path:
    """Write a cache directory and return it; labels are balanced, one recording per speaker."""
    if signal_pooling not in ("mean", "std", "max"):
        raise ValueError("signal_pooling must be mean, std or max")
    rng = np.random.default_rng(seed)
    path = Path(path)
    n_items = n_train + n_test
    labels = rng.permutation(np.arange(n_items) % 2)
    n_windows = n_items * windows_per_item
    window_item = np.repeat(np.arange(n_items), windows_per_item)
    frames = rng.integers(50, 1000, n_windows)
    signs = rng.choice([-1.0, 1.0], n_items) if nonlinear else np.ones(n_items)
    dims = rng.choice(dim, signal_dims, replace=False)
    for layer in range(n_layers):
        weight = strength * max(0.0, 1 - abs(layer - signal_layer) / 3)  # neighbours carry a weaker signal
        speaker = rng.normal(0, 1, (n_items, dim)).astype(np.float32)  # per-recording offsets
        mean = speaker[window_item] + rng.normal(0, 0.5, (n_windows, dim)).astype(np.float32)
        std = np.exp(rng.normal(0, 0.3, (n_windows, dim))).astype(np.float32)
        shift = (weight * labels * signs)[window_item][:, None]
        if signal_pooling == "mean":
            mean[:, dims] += shift
        elif signal_pooling == "std":
            std[:, dims] *= np.exp(0.5 * shift)
        peak = mean + std * (2.5 + rng.normal(0, 0.3, (n_windows, dim)).astype(np.float32))
        if signal_pooling == "max":
            peak[:, dims] += 2 * shift
        values = {"mean": mean, "m2": std**2 * frames[:, None], "max": peak,
                  "min": mean - std * (2.5 + rng.normal(0, 0.3, (n_windows, dim)).astype(np.float32))}
        for stat in STATS:
            target = stat_path(path, stat, layer)
            target.parent.mkdir(parents=True, exist_ok=True)
            np.save(target, values[stat].astype(np.float32))
    splits = ["train"] * n_train + ["test"] * n_test
    items = [{"id": f"r{i:04d}", "label": int(labels[i]), "group": f"spk{i:04d}", "split": splits[i],
              "mmse": None, "path": "", "n_windows": windows_per_item} for i in range(n_items)]
    digest = hashlib.sha256(json.dumps([n_train, n_test, n_layers, dim, windows_per_item, signal_layer,
                                        signal_pooling, strength, nonlinear, signal_dims, seed]).encode())
    meta = {
        "format_version": FORMAT_VERSION, "items": items, "n_windows": n_windows,
        "windows": {"item": window_item.tolist(), "n_frames": frames.tolist(),
                    "start_sample": [0] * n_windows, "end_sample": (frames * 320).tolist()},
        "content_hash": digest.hexdigest(), "dim": dim, "stats": list(STATS),
        "files": {stat_path(path, stat, layer).relative_to(path).as_posix(): file_digest(stat_path(path, stat, layer))
                  for stat in STATS for layer in range(n_layers)},
        "layers": {"count": n_layers, "meaning": {"all": "synthetic"}},
        "model": {"name": "synthetic", "revision": "none"},
        "settings": {"window_s": 20.0, "min_window_s": 0.5, "dtype": "float32", "sample_rate": 16000},
        "manifest": {"path": "", "hash": ""}, "failures": [], "versions": {},
        "synthetic": {"signal_layer": signal_layer, "signal_pooling": signal_pooling, "nonlinear": nonlinear,
                      "strength": strength, "signal_dims": dims.tolist()},
    }
    (path / META_FILE).write_text(json.dumps(meta))
    return path
