"""The layer-wise embedding cache: layout on disk and the reader every search worker uses.

One cache directory holds one (model + revision, manifest content, extraction settings) combination:

    cache.json                 metadata: items, labels, groups, splits, windows, layers, dims, versions, hash
    stats/{stat}/L{layer}.npy  float32 (n_windows, dim) per statistic and layer, memory-mapped on read

The statistics per window and layer are frame count, mean, M2 (sum of squared deviations from the mean),
max and min. Window-level and recording-level mean, std, max and min follow exactly from them (Chan's
merge for M2), so one extraction serves every pooling strategy. A reader of one layer and one statistic
opens one file and touches nothing else.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from adsearch.io.digest import file_digest

FORMAT_VERSION = 2  # 2: the content hash covers cache.json's defining fields (1 covered the arrays alone)
META_FILE = "cache.json"
STATS = ("mean", "m2", "max", "min")
POOLINGS: dict[str, tuple[str, ...]] = {
    "mean": ("mean",),
    "std": ("std",),
    "mean+std": ("mean", "std"),
    "max": ("max",),
    "min+max": ("min", "max"),
    "mean+std+max": ("mean", "std", "max"),
}
# What poolings concatenate; each also reads on its own (the search memoises features per statistic).
POOLED_STATISTICS = ("mean", "std", "max", "min")


# Windows pooled per read: 1,024 windows x 1,024 dims x 4 bytes = 4 MB per raw statistic.
CHUNK_WINDOWS = 1024


class CacheError(RuntimeError):
    pass


def stat_path(cache_dir: Path, stat: str, layer: int) -> Path:
    return cache_dir / "stats" / stat / f"L{layer:02d}.npy"


def file_hashes(cache_dir: Path, n_layers: int) -> dict[str, str]:
    """SHA-256 of every array file, by path relative to the cache: what readers verify before a first read."""
    return {stat_path(cache_dir, stat, layer).relative_to(cache_dir).as_posix():
            file_digest(stat_path(cache_dir, stat, layer)) for stat in STATS for layer in range(n_layers)}


# What defines a cache's data: its recordings (ids, labels, speakers, splits, MMSE), windows and frame
# counts, shape, model, settings, fold assignment of a cross-fitted cache, and (through their SHA-256) the
# arrays. The content hash covers all of it, so an edit of cache.json is as visible as an edit of an array.
DEFINING_KEYS = ("format_version", "items", "windows", "n_windows", "dim", "layers", "stats", "files", "model",
                 "settings", "crossfit")
# Defining only where present (sources read from transcripts), so the hashes of other caches stay as they were.
OPTIONAL_DEFINING_KEYS = ("transcripts", "feature_names")


def content_hash_of(meta: dict) -> str:
    """The content hash of a cache from its metadata's defining fields (`DEFINING_KEYS`)."""
    defining = {key: meta.get(key) for key in DEFINING_KEYS}
    defining.update({key: meta[key] for key in OPTIONAL_DEFINING_KEYS if key in meta})
    return hashlib.sha256(json.dumps(defining, sort_keys=True, allow_nan=True).encode()).hexdigest()


def seal(meta: dict) -> dict:
    """Set `meta`'s content hash (the last step before cache.json is written)."""
    meta["content_hash"] = content_hash_of(meta)
    return meta


def _find_cache_dir(path: Path) -> Path:
    if (path / META_FILE).is_file():
        return path
    if not path.is_dir():
        raise CacheError(f"{path}: cache directory not found")
    found = sorted(p.parent for p in path.glob(f"*/{META_FILE}"))
    if len(found) == 1:
        return found[0]
    if found:
        listed = "\n  ".join(str(p) for p in found)
        raise CacheError(f"{path} holds {len(found)} caches; pass one of them:\n  {listed}")
    if (path / "parts").is_dir() or any(path.glob("*/parts")):
        raise CacheError(f"{path}: extraction has not finished; run `adsearch extract` again to resume it")
    raise CacheError(f"{path}: no {META_FILE} here or one level below; is this an `adsearch extract` output?")


@dataclass(frozen=True)
class EmbeddingCache:
    """Read-only view of a finished cache; arrays are memory-mapped and sliced per layer and statistic.

    Each array file is checked against the SHA-256 that `cache.json` records for it the first time this
    object reads it (an edited, swapped or truncated array would otherwise give silently wrong scores), and
    its shape and type on every read."""

    path: Path
    meta: dict
    _verified: set = field(default_factory=set, compare=False, repr=False)
    _verify_lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)

    # -- what the cache describes -------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.meta["layers"]["count"]

    @property
    def dim(self) -> int:
        return self.meta["dim"]

    @property
    def content_hash(self) -> str:
        return self.meta["content_hash"]

    @cached_property
    def ids(self) -> list[str]:
        return [item["id"] for item in self.meta["items"]]

    @cached_property
    def labels(self) -> np.ndarray:
        """1 = AD, 0 = control, -1 = unlabelled."""
        return np.array([-1 if i["label"] is None else i["label"] for i in self.meta["items"]], np.int64)

    @cached_property
    def mmse(self) -> np.ndarray:
        """The MMSE score (0-30) of each recording, NaN where the manifest gave none."""
        return np.array([np.nan if i.get("mmse") is None else i["mmse"] for i in self.meta["items"]], np.float64)

    def targets(self, task: str) -> np.ndarray:
        """What a study of `task` predicts: the labels (classification) or the MMSE scores (mmse)."""
        return self.mmse if task == "mmse" else self.labels

    def with_target(self, split: str, task: str) -> np.ndarray:
        """The items of `split` whose target is known (a label, or an MMSE score), as sorted indices."""
        known = ~np.isnan(self.mmse) if task == "mmse" else self.labels >= 0
        return np.flatnonzero((self.splits == split) & known)

    @cached_property
    def groups(self) -> np.ndarray:
        return np.array([item["group"] for item in self.meta["items"]])

    @cached_property
    def splits(self) -> np.ndarray:
        return np.array([item["split"] for item in self.meta["items"]])

    @cached_property
    def window_item(self) -> np.ndarray:
        """Index into `ids` of each window; windows of one recording are contiguous."""
        return np.asarray(self.meta["windows"]["item"], np.int64)

    @cached_property
    def window_frames(self) -> np.ndarray:
        return np.asarray(self.meta["windows"]["n_frames"], np.int64)

    @cached_property
    def one_vector(self) -> bool:
        """One window of one frame per recording (linguistic features, n-gram counts): every pooling of it is
        the vector itself (std 0) and a window is the recording, so a study does not search pooling or unit."""
        return bool(len(self.window_item) == len(self.ids) and (self.window_frames == 1).all())

    # -- raw statistics -----------------------------------------------------------------------------------
    def stat_file(self, layer: int, stat: str) -> Path:
        """The array file of one statistic of one layer, verified against cache.json before its first use."""
        _checked(stat)
        if not 0 <= layer < self.n_layers:
            raise CacheError(f"layer {layer} is outside this cache's layers 0..{self.n_layers - 1}")
        path = stat_path(self.path, stat, layer)
        name = path.relative_to(self.path).as_posix()
        with self._verify_lock:
            if name not in self._verified:
                expected = self.meta.get("files", {}).get(name)
                if not path.is_file():
                    raise CacheError(f"{path}: missing from the cache; extract it again")
                if expected is None or file_digest(path) != expected:
                    raise CacheError(f"{path}: its content differs from what {META_FILE} records (edited, replaced "
                                     "or damaged); extract the cache again")
                self._verified.add(name)
        return path

    def window_stat(self, layer: int, stat: str) -> np.ndarray:
        """The (n_windows, dim) array of one statistic of one layer, memory-mapped."""
        return np.load(self.stat_file(layer, stat), mmap_mode="r")

    # -- pooled features ----------------------------------------------------------------------------------
    def windows_of(self, items: np.ndarray | None) -> np.ndarray:
        """Indices of the windows of `items` (all windows if None), in cache order."""
        if items is None:
            return np.arange(len(self.window_item))
        return np.flatnonzero(np.isin(self.window_item, items))

    def window_owner(self, items: np.ndarray) -> np.ndarray:
        """For each window of `items` (in `windows_of` order): the position in `items` of its recording."""
        position = np.full(len(self.ids), -1)
        position[items] = np.arange(len(items))
        return position[self.window_item[self.windows_of(items)]]

    def _chunks(self, rows: np.ndarray) -> list[np.ndarray]:
        """`rows` (sorted window indices) cut into runs of whole recordings of about CHUNK_WINDOWS windows:
        features are pooled one run at a time, so the raw statistics and float64 temporaries in memory
        stay a few megabytes however large the cache is; only the pooled output is full size."""
        if len(rows) == 0:
            return []
        cuts, last = [], 0
        for start in recording_starts(self.window_item[rows])[1:]:
            if start - last >= CHUNK_WINDOWS:
                cuts.append(start)
                last = start
        return np.split(rows, cuts)

    def _reader(self, layer: int, rows: np.ndarray) -> Callable[[str], np.ndarray]:
        """A statistic getter for `rows`, read with plain file reads so only those rows occupy memory
        (pages of a memory map would count towards the worker's resident memory until it is dropped)."""
        if not 0 <= layer < self.n_layers:
            raise CacheError(f"layer {layer} is outside this cache's layers 0..{self.n_layers - 1}")
        return lambda stat: _read_rows(self.stat_file(layer, stat), rows, (len(self.window_item), self.dim))

    def window_features(self, layer: int, pooling: str, items: np.ndarray | None = None) -> np.ndarray:
        """(n_windows, k * dim) float32: each window of `items` (default: all) pooled on its own."""
        rows = self.windows_of(items)
        out = np.empty((len(rows), len(_pooling_parts(pooling)) * self.dim), np.float32)
        done = 0
        for chunk in self._chunks(rows):
            out[done:done + len(chunk)] = pool_windows(self._reader(layer, chunk), self.window_frames[chunk],
                                                       pooling)
            done += len(chunk)
        return out

    def recording_features(self, layer: int, pooling: str, items: np.ndarray | None = None) -> np.ndarray:
        """(n_items, k * dim) float32, rows in the order of `items` (default: all): all frames of a recording
        pooled, derived exactly from its windows. Windows of other recordings are not read."""
        if items is not None and np.any(np.diff(items) <= 0):
            order = np.argsort(items)
            pooled = self.recording_features(layer, pooling, np.asarray(items)[order])
            return pooled[np.argsort(order)]
        rows = self.windows_of(items)
        n_recordings = len(recording_starts(self.window_item[rows]))
        out = np.empty((n_recordings, len(_pooling_parts(pooling)) * self.dim), np.float32)
        done = 0
        for chunk in self._chunks(rows):
            pooled = pool_recordings(self._reader(layer, chunk), self.window_frames[chunk], self.window_item[chunk],
                                     pooling)
            out[done:done + len(pooled)] = pooled
            done += len(pooled)
        return out


def _checked(stat: str) -> str:
    if stat not in STATS:
        raise CacheError(f"unknown statistic {stat!r}; the cache holds {', '.join(STATS)}")
    return stat


def _read_rows(path: Path, rows: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Rows of a 2-D float32 .npy file of `shape`, read with pread-style file reads (sorted `rows`)."""
    header = np.load(path, mmap_mode="r")  # parses the header only; no data page is touched
    offset, dtype = header.offset, header.dtype
    if header.shape != shape or dtype != np.float32:
        raise CacheError(f"{path}: holds {dtype} {header.shape}, {META_FILE} says float32 {shape}; extract again")
    del header
    row_bytes = shape[1] * dtype.itemsize
    out = np.empty((len(rows), shape[1]), dtype)
    with path.open("rb") as handle:
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1  # contiguous runs of rows
        for run_rows, run_out in zip(np.split(rows, breaks), np.split(np.arange(len(rows)), breaks), strict=True):
            if len(run_rows):
                handle.seek(offset + int(run_rows[0]) * row_bytes)
                handle.readinto(memoryview(out[run_out[0]:run_out[-1] + 1]).cast("B"))
    return out


def recording_starts(window_item: np.ndarray) -> np.ndarray:
    """Positions where a new recording's run of windows begins (windows of a recording are contiguous)."""
    if len(window_item) == 0:
        return np.empty(0, np.intp)
    return np.flatnonzero(np.r_[True, window_item[1:] != window_item[:-1]])


def pool_windows(stat: Callable[[str], np.ndarray], n_frames: np.ndarray, pooling: str) -> np.ndarray:
    """Pool each window from its statistics; `stat(name)` returns the (n_windows, dim) array of one."""
    names = _pooling_parts(pooling)
    out = None
    for i, name in enumerate(names):  # written into one array: no float64 or concatenation copies
        values = stat("m2" if name == "std" else name)
        if out is None:
            dim = values.shape[1]
            out = np.empty((values.shape[0], dim * len(names)), np.float32)
        block = out[:, i * dim:(i + 1) * dim]
        if name == "std":
            np.divide(values, n_frames[:, None].astype(np.float32), out=block)
            np.sqrt(block, out=block)
        else:
            block[:] = values
    return out


def pool_recordings(stat: Callable[[str], np.ndarray], n_frames: np.ndarray, window_item: np.ndarray,
                    pooling: str, block: int = 256) -> np.ndarray:
    """Pool all frames of each recording exactly from its windows (contiguous runs of `window_item`).

    Means are frame-weighted; M2 merges with Chan's formula (sum of M2 plus between-window terms), which
    stays exact where summing squares in float32 would cancel; max and min are element-wise. The float64
    work runs `block` columns at a time, so its temporaries stay small however many windows there are.
    """
    starts = recording_starts(window_item)
    owner = np.cumsum(np.r_[False, window_item[1:] != window_item[:-1]])  # run index of each window
    names = _pooling_parts(pooling)
    needed = {"m2" if n == "std" else n for n in names} | ({"mean"} if "std" in names else set())
    arrays = {name: stat(name) for name in needed}
    dim = next(iter(arrays.values())).shape[1]
    frames = np.add.reduceat(n_frames, starts).astype(np.float64)[:, None]
    weights = n_frames[:, None].astype(np.float64)
    out = np.empty((len(starts), dim * len(names)), np.float32)
    for low in range(0, dim, block):
        cols = slice(low, min(low + block, dim))
        if "mean" in arrays:
            mean_w = np.asarray(arrays["mean"][:, cols], np.float64)
            mean = np.add.reduceat(mean_w * weights, starts) / frames
        for i, name in enumerate(names):
            target = out[:, i * dim + cols.start:i * dim + cols.stop]
            if name == "mean":
                target[:] = mean
            elif name == "std":
                between = weights * (mean_w - mean[owner]) ** 2
                m2 = np.add.reduceat(np.asarray(arrays["m2"][:, cols], np.float64), starts)
                target[:] = np.sqrt((m2 + np.add.reduceat(between, starts)) / frames)
            elif name == "max":
                target[:] = np.maximum.reduceat(arrays["max"][:, cols], starts)
            elif name == "min":
                target[:] = np.minimum.reduceat(arrays["min"][:, cols], starts)
    return out


def _pooling_parts(pooling: str) -> tuple[str, ...]:
    """The pooled statistics a pooling concatenates; a pooled statistic is its own single part."""
    if pooling in POOLED_STATISTICS:
        return (pooling,)
    try:
        return POOLINGS[pooling]
    except KeyError:
        raise CacheError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}") from None


def open_cache(path: Path | str) -> EmbeddingCache:
    """Open a finished cache by its directory (or the `-o` root of `adsearch extract` if it holds one).

    cache.json must still match its content hash and be consistent (windows, frame counts, labels): an
    edited label or frame count would otherwise give silently wrong scores."""
    cache_dir = _find_cache_dir(Path(path))
    meta_file = cache_dir / META_FILE
    try:
        meta = json.loads(meta_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CacheError(f"{meta_file}: not valid JSON ({exc}); extract the cache again") from None
    if not isinstance(meta, dict):
        raise CacheError(f"{meta_file}: not a cache description; extract the cache again")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CacheError(
            f"{cache_dir}: cache format {meta.get('format_version')} is not the supported {FORMAT_VERSION}; "
            "re-run `adsearch extract` with this version"
        )
    if meta.get("content_hash") != content_hash_of(meta):
        raise CacheError(f"{meta_file}: edited after extraction: its recordings, labels, speakers, splits, windows "
                         "or frame counts no longer match its content hash; extract the cache again (or restore "
                         "the original file)")
    _check_consistent(meta, meta_file)
    return EmbeddingCache(cache_dir, meta)


def _check_consistent(meta: dict, meta_file: Path) -> None:
    """Shapes and values a correct extraction always writes (a hand-made cache.json may not)."""
    try:
        items, windows = meta["items"], meta["windows"]
        item, frames = np.asarray(windows["item"], np.int64), np.asarray(windows["n_frames"], np.int64)
        counts = [int(i["n_windows"]) for i in items]
        labels = {i["label"] for i in items}
        splits = {i["split"] for i in items}
        n_layers, dim = int(meta["layers"]["count"]), int(meta["dim"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CacheError(f"{meta_file}: malformed ({type(exc).__name__}: {exc}); extract the cache again") from None
    problems = []
    if len(item) != len(frames) or len(item) != meta.get("n_windows") or len(item) != sum(counts):
        problems.append("window lists and counts disagree")
    elif len(item) and (np.any(np.diff(item) < 0) or item[0] < 0 or item[-1] >= len(items)
                        or np.bincount(item, minlength=len(items)).tolist() != counts):
        problems.append("windows do not follow their recordings")
    if len(frames) and frames.min() < 1:
        problems.append("a window has no frames")
    if not labels <= {0, 1, None}:
        problems.append(f"labels {sorted(map(str, labels - {0, 1, None}))} are not 0, 1 or empty")
    if not splits <= {"train", "test"}:
        problems.append(f"splits {sorted(map(str, splits - {'train', 'test'}))} are not train or test")
    if n_layers < 1 or dim < 1:
        problems.append("no layers or no dimensions")
    if problems:
        raise CacheError(f"{meta_file}: {'; '.join(problems)}; extract the cache again")
