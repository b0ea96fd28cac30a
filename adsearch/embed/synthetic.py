"""Synthetic embedding caches with a planted label signal, for tests and search benchmarks.

They have the exact on-disk layout of `adsearch extract` output, so the search reads them through the
same `open_cache`. Two kinds:

`write_realistic_cache` (for benchmarks of the search itself) imitates what makes real wav2vec2 features
hard: correlated low-rank features that change smoothly from layer to layer, a few outlier dimensions tens of
times larger than the rest, recordings of different lengths with a nuisance direction tied to length, and a
weak label signal spread over many dimensions that peaks at one layer and fades over a few, calibrated so the
planted configuration scores about 0.80 balanced accuracy in 5-fold CV.

`write_synthetic_cache` (for fast tests) is isotropic: the signal sits in one layer (weaker in its neighbours)
and one pooled statistic:

* "mean": class-dependent window means in a few dimensions (linear);
* "std": class-dependent spread of frames in a few dimensions (visible only to std pooling);
* "max": class-dependent peaks (visible only to max pooling);
* nonlinear=True: the class-1 shift has a random sign per recording, so class means coincide and only
  non-linear classifiers (RBF SVM, kNN, trees) can separate the classes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from adsearch.embed.cache import FORMAT_VERSION, META_FILE, STATS, file_hashes, seal, stat_path


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
        _save_layer(path, layer, values)
    return _write_meta(path, labels, n_train, np.full(n_items, windows_per_item), frames, n_layers, dim,
                       "synthetic", {"signal_layer": signal_layer, "signal_pooling": signal_pooling,
                                     "nonlinear": nonlinear, "strength": strength, "signal_dims": dims.tolist()})


def _save_layer(path: Path, layer: int, values: dict[str, np.ndarray]) -> None:
    for stat in STATS:
        target = stat_path(path, stat, layer)
        target.parent.mkdir(parents=True, exist_ok=True)
        np.save(target, values[stat].astype(np.float32))


def _write_meta(path: Path, labels: np.ndarray, n_train: int, windows_per_item: np.ndarray, frames: np.ndarray,
                n_layers: int, dim: int, model: str, synthetic: dict, mmse: np.ndarray | None = None,
                conditions: list[dict] | None = None) -> Path:
    """cache.json of a synthetic cache whose arrays are written: one recording per speaker, train first."""
    n_items = len(labels)
    window_item = np.repeat(np.arange(n_items), windows_per_item)
    items = [{"id": f"r{i:04d}", "label": int(labels[i]), "group": f"spk{i:04d}",
              "split": "train" if i < n_train else "test", "mmse": None if mmse is None else float(mmse[i]),
              "path": "",
              "n_windows": int(windows_per_item[i]), **({"conditions": conditions[i]} if conditions else {})}
             for i in range(n_items)]
    meta = {
        "format_version": FORMAT_VERSION, "items": items, "n_windows": len(window_item),
        "windows": {"item": window_item.tolist(), "n_frames": frames.tolist(),
                    "start_sample": [0] * len(window_item), "end_sample": (frames * 320).tolist()},
        "dim": dim, "stats": list(STATS), "files": file_hashes(path, n_layers),
        "layers": {"count": n_layers, "meaning": {"all": "synthetic"}},
        "model": {"name": model, "revision": "none"},
        "settings": {"window_s": 20.0, "min_window_s": 0.5, "dtype": "float32", "sample_rate": 16000},
        "manifest": {"path": "", "hash": ""}, "failures": [], "versions": {}, "synthetic": synthetic,
    }
    (path / META_FILE).write_text(json.dumps(seal(meta)))
    return path


REALISTIC_KINDS = ("mean", "spread", "nonlinear", "none")
# Kinds a layer x pooling screen cannot solve alone (issue 25, benchmarks/search.py hard):
# "shortcut": recording length follows the label in the train split only, the early layers encode length
#     strongly, a weaker genuine class shift sits at the signal layer (deconfounded CV tells them apart);
# "interaction": the label is the product of a mean shift's sign and a spread change's sign at one layer;
# "sparse": a class shift in 3 dimensions only; "extreme": short bursts in a few dimensions that only max
#     pooling keeps (the window means barely move).
HARD_KINDS = ("shortcut", "interaction", "sparse", "extreme")
# Signal strength per kind that puts the planted configuration's 5-fold CV near 0.80 balanced accuracy on
# 166 train recordings x 256 dims (chosen by scanning strengths; `benchmarks/search.py quality` reports each
# cache's oracle: 0.77-0.93, mean 0.83, BENCHMARKS.md).
CALIBRATED_STRENGTH = {"mean": 0.11, "spread": 0.12, "nonlinear": 1.3, "none": 0.0, "shortcut": 0.10,
                       "interaction": 1.0, "sparse": 0.7, "extreme": 1.0}
# The MMSE signal strength (target="mmse", kind "mean") that puts the planted configuration's 5-fold CV near
# R2 0.45, RMSE about 4 on a score SD of about 5.4: between ADReSSo's official baseline (RMSE 5.28) and its
# best systems (3.85). Scanned: 0.08 gives R2 0.29, 0.12 gives 0.57.
CALIBRATED_MMSE_STRENGTH = 0.10
# The pooling that sees each planted kind: with the planted layer, the "oracle" configuration.
PLANTED_POOLING = {"mean": "mean", "spread": "std", "nonlinear": "mean", "none": "mean", "shortcut": "mean",
                   "interaction": "mean+std", "sparse": "mean", "extreme": "max"}


def write_realistic_cache(
    path: Path | str,
    kind: str = "mean",
    strength: float | None = None,
    signal_layer: int | None = None,
    n_train: int = 166,
    n_test: int = 71,
    n_layers: int = 25,
    dim: int = 256,
    rank: int = 12,
    seed: int = 0,
    target: str = "label",
    labels: np.ndarray | None = None,
    mmse: np.ndarray | None = None,
) -> Path:
    """Write a cache whose features behave like pooled wav2vec2 hidden states (see the module docstring).

    Every recording gets an MMSE score (controls about 29 +/- 1, AD about 20 +/- 5, as on ADReSSo).
    `target="label"` plants the label (a class shift), `target="mmse"` the score itself: the shift grows with
    the impairment (29 - MMSE), so a regressor can recover the score and not only the class.
    `labels` and `mmse` (one per recording, train first) replace the drawn ones: two caches written with the
    same of both and different seeds are two feature sources over the same recordings with independent signals.

    `kind`: "mean" (a class shift of the window means along a dense direction: linear, seen by mean pooling),
    "spread" (class-dependent frame spread along that direction: seen by std pooling, not by means),
    "nonlinear" (the class-1 shift has a random sign per recording: class means coincide, only non-linear
    classifiers separate them) or "none" (no signal: the null floor). The signal peaks at `signal_layer`
    (default: drawn from the middle layers) and fades over about two layers each side."""
    if kind not in REALISTIC_KINDS + HARD_KINDS:
        raise ValueError(f"kind must be one of {', '.join(REALISTIC_KINDS + HARD_KINDS)}")
    if target not in ("label", "mmse"):
        raise ValueError("target must be label or mmse")
    rng = np.random.default_rng(seed)
    strength = CALIBRATED_STRENGTH[kind] if strength is None else strength
    if signal_layer is None:
        signal_layer = int(rng.integers(n_layers // 4, 3 * n_layers // 4 + 1))
    path = Path(path)
    n_items = n_train + n_test
    drawn = rng.permutation(np.arange(n_items) % 2)
    labels = drawn if labels is None else np.asarray(labels, np.int64)
    if labels.shape != (n_items,):
        raise ValueError(f"labels: one per recording ({n_items}), not {labels.shape}")
    # Recording lengths: log-normal around a minute, cut into windows of at most 20 s (50 frames/s); in the
    # shortcut kind the AD recordings of the train split are longer (in the test split they are not).
    seconds = np.clip(rng.lognormal(np.log(60), 0.5, n_items), 8, 300)
    if kind == "shortcut":
        seconds = np.where((labels == 1) & (np.arange(n_items) < n_train), seconds * 3.0, seconds)
    windows_per_item = np.ceil(seconds / 20).astype(int)
    window_item = np.repeat(np.arange(n_items), windows_per_item)
    n_windows = len(window_item)
    frames = np.minimum(20.0, seconds[window_item] - 20.0 * (np.arange(n_windows) - np.repeat(
        np.cumsum(windows_per_item) - windows_per_item, windows_per_item)))
    frames = np.maximum(1, (np.maximum(frames, 0.5) * 50).astype(int))
    # Speaker and window latent factors, shared by all layers; loadings rotate smoothly across layers.
    speaker = rng.normal(0, 1, (n_items, rank))
    latent = speaker[window_item] + 0.6 * rng.normal(0, 1, (n_windows, rank))
    loadings_a, loadings_b = rng.normal(0, 1, (2, rank, dim)) / np.sqrt(rank)
    outliers = rng.choice(dim, 4, replace=False)
    outlier_level = rng.normal(0, 1, (n_items, len(outliers)))
    length = (np.log(seconds) - np.log(60))[window_item][:, None]
    nuisance_a, nuisance_b = rng.normal(0, 1, (2, dim))
    direction = rng.normal(0, 1, dim)
    spread = rng.random(dim) < 0.25  # the signal spreads over about a quarter of the dims (at least one)
    spread[0] |= not spread.any()
    direction *= spread
    direction /= np.linalg.norm(direction) / np.sqrt(dim / 4)  # per-dim size about 1 where it is non-zero
    signs = rng.choice([-1.0, 1.0], n_items) if kind in ("nonlinear", "interaction") else np.ones(n_items)
    # interaction: the spread moves up or down with the sign of the mean shift times the label's sign
    spread_sign = np.where(labels == 1, signs, -signs)
    few = np.random.default_rng([seed, 3]).choice(dim, 3, replace=False)  # the sparse and extreme kinds' dimensions
    mmse = planted_mmse(labels, seed) if mmse is None else np.asarray(mmse, np.float64)
    planted = labels if target == "label" else (29.0 - mmse) / 9.0  # about 0 for controls, 1 for a typical AD
    per_window = (planted * signs)[window_item][:, None]
    if kind == "interaction":
        per_window = signs[window_item][:, None]
    for layer in range(n_layers):
        angle = 0.5 * np.pi * layer / max(1, n_layers - 1)
        loadings = np.cos(angle) * loadings_a + np.sin(angle) * loadings_b
        nuisance = np.cos(angle) * nuisance_a + np.sin(angle) * nuisance_b
        weight = strength * np.exp(-0.5 * ((layer - signal_layer) / 1.5) ** 2)  # peaks, fades over ~2 layers
        # length is encoded everywhere; the shortcut kind's early layers encode it strongly, its middle ones weakly
        length_weight = 3.0 * np.exp(-layer / 2.5) if kind == "shortcut" else 0.8
        mean = latent @ loadings + 0.5 * rng.normal(0, 1, (n_windows, dim)) + length_weight * length * nuisance
        mean[:, outliers] = 30 * (1 + 0.1 * layer) * (1 + 0.3 * outlier_level[window_item]
                                                      + 0.1 * rng.normal(0, 1, (n_windows, len(outliers))))
        log_std = 0.3 * rng.normal(0, 1, (n_items, dim))[window_item] + 0.1 * rng.normal(0, 1, (n_windows, dim))
        if kind in ("mean", "nonlinear", "shortcut", "interaction"):
            mean += weight * per_window * direction
        elif kind == "spread":
            log_std += weight * per_window * np.abs(direction)
        elif kind == "sparse":
            mean[:, few] += weight * per_window
        if kind == "interaction":
            log_std += weight * 0.5 * spread_sign[window_item][:, None] * np.abs(direction)
        std = np.exp(log_std)
        std[:, outliers] *= 10
        peak = mean + std * (2.5 + 0.3 * rng.normal(0, 1, (n_windows, dim)))
        if kind == "extreme":  # a burst of a few frames: the maximum moves, the mean hardly
            peak[:, few] += weight * 3 * per_window * std[:, few]
        values = {"mean": mean, "m2": std**2 * frames[:, None], "max": peak,
                  "min": mean - std * (2.5 + 0.3 * rng.normal(0, 1, (n_windows, dim)))}
        _save_layer(path, layer, values)
    conditions = drawn_conditions(np.random.default_rng([seed, 4]), seconds)
    return _write_meta(path, labels, n_train, windows_per_item, frames, n_layers, dim, "synthetic-realistic",
                       {"kind": kind, "signal_layer": signal_layer, "signal_pooling": PLANTED_POOLING[kind],
                        "nonlinear": kind in ("nonlinear", "interaction"), "strength": strength, "realistic": True,
                        "target": target, "dimensions": few.tolist() if kind in ("sparse", "extreme") else None},
                       mmse, conditions)


def drawn_conditions(rng: np.random.Generator, seconds: np.ndarray) -> list[dict]:
    """What extraction measures of each recording (`io.audio.recording_conditions`), drawn alike for both groups:
    only the length carries what the kind plants in it."""
    n = len(seconds)
    level = rng.normal(-26, 4, n)
    noise = level - rng.normal(35, 6, n)
    return [{"sample_rate": 16000.0, "channels": 1.0, "seconds": round(float(seconds[i]), 4),
             "level_dbfs": round(float(level[i]), 3), "noise_floor_dbfs": round(float(noise[i]), 3),
             "snr_db": round(float(level[i] - noise[i] + 8), 3), "clipped_share": 0.0,
             "segments": int(rng.integers(3, 15))} for i in range(n)]


def planted_mmse(labels: np.ndarray, seed: int) -> np.ndarray:
    """Whole MMSE scores like ADReSSo's: controls 29 +/- 1, AD 20 +/- 5, within 0-30 (their own random stream,
    so the features of a seed are the same with or without them)."""
    rng = np.random.default_rng([seed, 30])
    score = np.where(labels == 1, rng.normal(20, 5, len(labels)), rng.normal(29, 1, len(labels)))
    return np.clip(np.round(score), 0, 30)
