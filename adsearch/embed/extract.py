"""Every recording through the speech model once; every layer's pooled statistics to the cache.

The model runs in `encoder.py`, windows and batches are made in `windows.py`; this module runs the whole:
claims, decoding ahead of the model, one batch in flight, per-recording parts, consolidation.

Nothing is lost on a crash: each finished recording is written atomically to `parts/{id}.npz`; a rerun
skips those and recomputes nothing. The final layer-major arrays and `cache.json` are written only once
every recording is done or has failed; `cache.json` goes last, so its presence means "complete".
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import platform
import re
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from adsearch import __version__
from adsearch.corpus import Recording, manifest_digest, read_manifest, segmentation_counts
from adsearch.embed.cache import FORMAT_VERSION, META_FILE, STATS, CacheError, file_hashes, seal, stat_path
from adsearch.embed.encoder import WindowEncoder, default_batch_size, resolve_device, resolve_dtype
from adsearch.embed.model import ModelSource, resolve_model
from adsearch.embed.windows import MIN_WINDOW_SAMPLES, Window, make_batches, pack_batches, plan_windows
from adsearch.io.audio import SAMPLE_RATE, AudioError, load_audio
from adsearch.io.outputs import NonFiniteError, save_atomic_npz, shortened, write_json_atomic
from adsearch.threads import ThreadPlan, choose_threads
from adsearch.work import Claim, ExtractProgress, shard_of, speech_seconds

WHISPER_LAYERS = {"0": "input to the first encoder layer (log-mel convolutions + positions)",
                  "i (1..N)": "output of encoder layer i, over the window's real frames only (Whisper pads every "
                              "window to 30 s; padded frames are never pooled)"}


@dataclass(frozen=True)
class ExtractSettings:
    """Everything that changes the cached numbers (and so is part of the cache key)."""

    window_s: float = 20.0
    min_window_s: float = 0.5
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.window_s) and math.isfinite(self.min_window_s)):
            raise ValueError(f"--window-s {self.window_s} and --min-window-s {self.min_window_s} must be finite")
        if self.window_s * SAMPLE_RATE < MIN_WINDOW_SAMPLES or not 0 <= self.min_window_s <= self.window_s:
            raise ValueError(f"--window-s ({self.window_s}) must be at least {MIN_WINDOW_SAMPLES / SAMPLE_RATE} s "
                             f"and --min-window-s ({self.min_window_s}) between 0 and --window-s")
        if self.window_s > 600:
            raise ValueError(f"--window-s {self.window_s}: at most 600 s (attention cost grows with its square)")


@dataclass
class Failure:
    id: str
    path: str
    reason: str
    split: str | None = None  # with the label: a labelled test recording lost here is missing from the test
    label: int | None = None


@dataclass
class ExtractResult:
    cache_dir: Path
    n_items: int
    n_computed: int  # recordings computed by this run (not resumed from parts)
    failures: list[Failure] = field(default_factory=list)
    audio_seconds: float = 0.0
    compute_seconds: float = 0.0
    remaining: int = 0  # recordings of other shards not extracted yet (the cache is not consolidated)
    redone: list[str] = field(default_factory=list)  # damaged parts found on resume, extracted again


# ----------------------------------------------------------------------------------------------------------
# The extraction run


def cache_key(source: ModelSource, manifest_hash: str, settings: ExtractSettings) -> str:
    blob = json.dumps(
        {"model": source.name, "revision": source.revision, "manifest": manifest_hash,
         "settings": asdict(settings), "format": FORMAT_VERSION},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def cache_dir_for(out_root: Path, source: ModelSource, key: str, manifest: Path | str) -> Path:
    """`<manifest>-<model>-<key>`: a person tells the folders of several corpora and models apart by name;
    the key (a hash of model, manifest content and settings) keeps different extractions apart."""
    model = Path(source.name).name if Path(source.name).is_dir() else source.name
    slugs = [re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")[:40] for name in (Path(manifest).stem, model)]
    return out_root / "-".join([*(slug for slug in slugs if slug), key])


def part_path(parts: Path, rec_id: str) -> Path:
    return parts / f"{rec_id}.npz"


def _save_part(parts: Path, rec: Recording, done: list, device: str, threads: int, conditions: dict) -> None:
    """One recording's part file: its windows' spans, frame counts and statistics, and how it was made."""
    save_atomic_npz(
        part_path(parts, rec.id),
        start=np.array([r[0] for r in done], np.int64),
        end=np.array([r[1] for r in done], np.int64),
        n_frames=np.array([r[2] for r in done], np.int64),
        device=np.array(device),
        threads=np.array(threads),
        conditions=np.array(json.dumps(conditions, sort_keys=True)),
        **{s: np.stack([r[3][s] for r in done], axis=1).astype(np.float32) for s in STATS},
    )


def failure_path(parts: Path, rec_id: str) -> Path:
    return parts / f"{rec_id}.failed.json"


def _finished(parts: Path, rec_id: str) -> bool:
    """Extracted, or known to be unusable: either way no process needs to touch it again."""
    return part_path(parts, rec_id).is_file() or failure_path(parts, rec_id).is_file()


def _drop_damaged_parts(parts: Path, recordings: Sequence[Recording]) -> list[str]:
    """Remove the parts of `recordings` that cannot be read back (emptied, truncated, edited), so this run
    extracts them again; return one line per part removed. Parts are written atomically, so only something
    outside adsearch (a full disk earlier, a copy cut short, a hand) damages one."""
    import zipfile

    redone = []
    for rec in recordings:
        part = part_path(parts, rec.id)
        if not part.is_file():
            continue
        try:
            with np.load(part) as loaded:
                missing = {"start", "end", "n_frames", *STATS} - set(loaded.files)
                if missing:
                    raise ValueError(f"lacks {', '.join(sorted(missing))}")
                loaded["n_frames"]
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            part.unlink(missing_ok=True)
            redone.append(f"{rec.id} ({rec.path}): its part {part.name} was damaged ({shortened(str(exc), 120)}); "
                          "extracting it again")
    return redone


def recording_windows(rec: Recording, settings: ExtractSettings, conditions: dict | None = None
                      ) -> tuple[list[Window], float]:
    """The recording's windows of participant speech and their seconds; `conditions` as `load_audio`'s."""
    audio = load_audio(rec.path, conditions=conditions)
    spans = plan_windows(rec.segments, len(audio), settings.window_s, settings.min_window_s)
    if not spans:
        raise AudioError(
            rec.path,
            f"too short: no participant speech span of at least {settings.min_window_s} s "
            f"({len(audio) / SAMPLE_RATE:.2f} s of audio)",
        )
    seconds = sum(b - a for a, b in spans) / SAMPLE_RATE
    return [Window(0, a, b, audio[a:b]) for a, b in spans], seconds


def default_loaders() -> int:
    """Threads that decode and resample audio: every core but one for the model, at most 8. libsndfile and
    soxr release the GIL, so threads decode in parallel (measured: 1,600 audio-s/s per thread, 2 threads on
    2 cores twice that); on a 2-core machine this is one thread, as before."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


PREFETCH_GROUPS = 2  # groups decoded ahead of the model: enough to hide decoding, memory still bounded


def _group_recordings(recordings: list[Recording], target_windows: int, settings: ExtractSettings,
                      claim: Callable[[Recording], bool], loaders: int = 1) -> Iterator:
    """Groups of recordings this process claimed (`claim(rec)`), their audio decoded up to PREFETCH_GROUPS
    groups ahead by `loaders` threads, one recording each, while the model works on the current group. The
    groups come out in order and hold the same windows whatever the number of threads. A recording another
    process holds is left to it."""

    def load(rec: Recording):
        conditions: dict = {}
        try:
            return (rec, *recording_windows(rec, settings, conditions), conditions)
        except AudioError as exc:
            return rec, exc, 0.0, conditions

    def groups() -> Iterator[list[Recording]]:
        # Group sizes are estimated from the segment lists; exactness is not needed here.
        current, estimate = [], 0
        for rec in recordings:
            if not claim(rec):
                continue
            current.append(rec)
            span = sum(e - b for b, e in rec.segments) or settings.window_s
            estimate += max(1, math.ceil(span / settings.window_s))
            if estimate >= target_windows:
                yield current
                current, estimate = [], 0
        if current:
            yield current

    with ThreadPoolExecutor(max_workers=max(1, loaders)) as pool:
        upcoming = groups()
        ahead = deque([pool.submit(load, rec) for rec in group]
                      for group in itertools.islice(upcoming, PREFETCH_GROUPS))
        while ahead:
            futures = ahead.popleft()
            following = next(upcoming, None)
            if following:
                ahead.append([pool.submit(load, rec) for rec in following])
            yield [future.result() for future in futures]


def extract(
    manifest: Path | str,
    out_root: Path | str,
    model: str,
    settings: ExtractSettings | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    revision: str | None = None,
    progress: ExtractProgress | None = None,
    encoder: WindowEncoder | None = None,
    shard: tuple[int, int] | None = None,
    poll_seconds: float = 1.0,
    features: str = "model",
    loaders: int | None = None,
    threads: ThreadPlan | None = None,
) -> ExtractResult:
    """Extract (or resume extracting) the cache for `manifest` under `out_root`; return where it is.

    Any number of processes may extract into the same folder at once (a shared file system for several
    machines): each recording is claimed by one of them (`Claim`). `shard=(K, N)` takes only the K-th of N
    shards of the manifest (`shard_of`); whichever process finds every recording done consolidates, so a
    job array needs no final step, and the cache is the same bit for bit as one unsharded run's (on the CPU
    at the default batch size of 1; GPU kernels may round differently with other batch compositions).
    Pass `encoder` to reuse a model already loaded from the same `model` (the benchmarks do). `loaders`:
    threads decoding audio ahead of the model (default: `default_loaders()`); the cache does not depend on it.
    `features="egemaps"` or `"egemaps-functionals"` computes openSMILE eGeMAPS features instead of a speech
    model's layers, in the same format (`adsearch/embed/egemaps.py`; `model` is then ignored). `threads`: the
    model's intra-op threads as the command chose them (default: `choose_threads()`); each part records its
    count and cache.json's "runtime" the counts (they may change the last bits, never the content hash).
    """
    settings = settings or ExtractSettings()
    if batch_size is not None and batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    recordings = read_manifest(manifest)
    if features != "model":
        from adsearch.embed.egemaps import EgemapsEncoder, egemaps_source

        source = egemaps_source(features)
        encoder = encoder or EgemapsEncoder(source.name)
        torch = None
    else:
        import torch

        source = resolve_model(model, revision)
        threads = threads or choose_threads()
    dev = "cpu" if torch is None else resolve_device(device)  # openSMILE runs on the CPU
    batch_size = batch_size or default_batch_size(dev)
    settings = ExtractSettings(settings.window_s, settings.min_window_s, resolve_dtype(settings.dtype, dev))
    manifest_hash = manifest_digest(recordings)
    cache_dir = cache_dir_for(Path(out_root), source, cache_key(source, manifest_hash, settings), manifest)
    if (cache_dir / META_FILE).is_file():
        return finished_result(cache_dir)

    parts = cache_dir / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    write_json_atomic(cache_dir / "settings.json", {
        "model": source.name, "revision": source.revision, "manifest": str(Path(manifest).resolve()),
        "manifest_hash": manifest_hash, **asdict(settings), "threads": threads.to_json() if threads else None,
    })
    mine = shard_of(recordings, shard)
    redone = _drop_damaged_parts(parts, mine)
    todo = [r for r in mine if not _finished(parts, r.id)]
    if progress:
        progress.start(len(mine), sum(speech_seconds(r) for r in todo), len(mine) - len(todo))

    n_computed, n_failed, audio_seconds, started = 0, 0, 0.0, time.perf_counter()
    # Recordings another process holds are waited for; if that process dies, its claim goes and this
    # one takes the recording over.
    while not (cache_dir / META_FILE).is_file() and (pending := [r for r in mine if not _finished(parts, r.id)]):
        if encoder is None:
            encoder = WindowEncoder(source, dev, settings.dtype)
        done = _extract_claimed(pending, parts, encoder, settings, batch_size, progress,
                                loaders or default_loaders(), threads.threads if threads else 0)
        n_computed, n_failed, audio_seconds = n_computed + done[0], n_failed + done[1], audio_seconds + done[2]
        if done[0] + done[1] == 0:
            time.sleep(poll_seconds)
    compute_seconds = time.perf_counter() - started

    if (cache_dir / META_FILE).is_file():  # another process consolidated while this one waited
        shutil.rmtree(parts, ignore_errors=True)  # (lock files only, if this process recreated the folder)
        return finished_result(cache_dir)
    others = [r for r in recordings if not _finished(parts, r.id)]
    if others:  # a shard run whose siblings are still at work: the last of them consolidates
        return ExtractResult(cache_dir, 0, n_computed, [], audio_seconds, compute_seconds,
                             remaining=len(others), redone=redone)
    consolidation = Claim(cache_dir / "consolidate.lock")
    consolidation.wait()
    try:
        if not (cache_dir / META_FILE).is_file():  # another process may have consolidated meanwhile
            write_cache(cache_dir, recordings, source, settings, manifest, manifest_hash, torch,
                        layer_meaning=_layer_meaning(source, features))
    finally:
        consolidation.release()
    result = finished_result(cache_dir)
    result.n_computed, result.audio_seconds, result.compute_seconds = n_computed, audio_seconds, compute_seconds
    result.redone = redone
    return result


def _extract_claimed(pending: list[Recording], parts: Path, encoder: WindowEncoder, settings: ExtractSettings,
                     batch_size: int, progress: ExtractProgress | None, loaders: int = 1, threads: int = 0
                     ) -> tuple[int, int, float]:
    """Extract the recordings of `pending` that this process can claim; (computed, failed, audio seconds).
    `threads`: the intra-op threads computing them (0: none of torch's), recorded in each part."""
    claims: dict[str, Claim] = {}

    def claim(rec: Recording) -> bool:
        lock = Claim(parts / f"{rec.id}.lock")
        try:
            if not lock.take():
                return False
        except FileNotFoundError:  # another process consolidated the cache and removed parts/ meanwhile
            return False
        if _finished(parts, rec.id):  # finished by the process that held it a moment ago
            lock.release()
            return False
        claims[rec.id] = lock
        return True

    computed = failed = 0
    audio_seconds = 0.0
    owner: dict[int, tuple[Recording, float, dict]] = {}  # a running number -> (recording, seconds, conditions)
    rows: dict[int, list] = {}
    left: dict[int, int] = {}  # windows of the recording not collected yet
    numbers = itertools.count()

    def batches() -> Iterator[list[Window]]:
        nonlocal failed
        carried: list[Window] = []
        for group in _group_recordings(pending, 4 * batch_size, settings, claim, loaders):
            windows: list[Window] = []
            for rec, loaded, seconds, conditions in group:
                if isinstance(loaded, AudioError):
                    write_json_atomic(failure_path(parts, rec.id),
                                      asdict(Failure(rec.id, str(rec.path), loaded.reason, rec.split, rec.label)))
                    failed += 1
                    claims.pop(rec.id).release()
                    if progress:
                        progress.advance(1, 0.0)
                    continue
                number = next(numbers)
                owner[number], rows[number], left[number] = (rec, seconds, conditions), [], len(loaded)
                for window in loaded:
                    window.item = number
                windows += loaded
            if encoder.masked:
                full, carried = pack_batches(carried, windows, batch_size)
                yield from full
            else:  # group-norm models batch equal lengths only: each group on its own
                yield from make_batches(windows, batch_size, equal_lengths=True)
        yield from make_batches(carried, batch_size, equal_lengths=False)

    def collect(batch: list[Window], stats_on_their_way) -> None:
        """File a batch's statistics under their recordings; write each recording whose windows are all in."""
        nonlocal computed, audio_seconds
        n_frames, stats = stats_on_their_way.result()
        for j, window in enumerate(batch):
            rows[window.item].append((window.start, window.end, n_frames[j], {s: stats[s][:, j] for s in STATS}))
            left[window.item] -= 1
            if left[window.item]:
                continue
            rec, seconds, conditions = owner.pop(window.item)
            done = sorted(rows.pop(window.item), key=lambda row: row[0])
            try:
                _save_part(parts, rec, done, encoder.device, threads, conditions)
                computed += 1
                audio_seconds += seconds
            except NonFiniteError as exc:  # the model overflowed on it (float16): the recording fails, not the cache
                write_json_atomic(failure_path(parts, rec.id), asdict(Failure(
                    rec.id, str(rec.path), f"the model's hidden states are not finite ({exc})", rec.split,
                    rec.label)))
            claims.pop(rec.id).release()
            if progress:
                progress.advance(1, seconds)

    try:
        # One batch in flight: the next batch is submitted before the last one's statistics are collected, so
        # on a GPU the card never waits for the copy back, the part files or the next group's decoding.
        in_flight = None
        for batch in batches():
            submitted = (batch, encoder.submit([w.audio for w in batch]))
            if in_flight:
                collect(*in_flight)
            in_flight = submitted
        if in_flight:
            collect(*in_flight)
    finally:
        for lock in claims.values():
            lock.release()
    return computed, failed, audio_seconds


def finished_result(cache_dir: Path) -> ExtractResult:
    meta = json.loads((cache_dir / META_FILE).read_text())
    return ExtractResult(cache_dir, len(meta["items"]), 0, [Failure(**f) for f in meta["failures"]])


def write_cache(cache_dir: Path, recordings: list[Recording], source: ModelSource, settings: ExtractSettings,
                manifest: Path | str, manifest_hash: str, torch, extra: dict | None = None,
                layer_meaning: dict | None = None) -> None:
    """Consolidate every part into the cache; cache.json goes last, so its presence means complete.
    `extra` adds metadata and `layer_meaning` says what the layers are (a transcript source's). "runtime" (how
    many intra-op threads computed the parts) is not part of the content hash: like "created", it says how the
    cache was made, not what it holds."""
    parts = cache_dir / "parts"
    done = [r for r in recordings if part_path(parts, r.id).is_file()]
    failures = sorted((json.loads(failure_path(parts, r.id).read_text()) for r in recordings
                       if not part_path(parts, r.id).is_file()), key=lambda f: f["id"])
    if not done:
        listed = "; ".join(f"{f['id']} ({f['path']}): {f['reason']}" for f in failures[:5])
        raise CacheError(f"no recording could be extracted: all {len(failures)} failed, e.g. {listed}. Fix the "
                         "recordings or the manifest, then run the same command again")
    with np.load(part_path(parts, done[0].id)) as part:
        n_layers, dim = part["mean"].shape[0], part["mean"].shape[2]
    meta = _consolidate(cache_dir, done, n_layers, dim)
    if not meta["runtime"]["intra_op_threads"]:
        del meta["runtime"]  # no torch model computed the parts (eGeMAPS, transcript features)
    meta.update({
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": _model_meta(source, meta.pop("devices")),
        "layers": {
            "count": n_layers,
            "meaning": layer_meaning or {
                "0": "input to the first transformer layer (feature projection + positional convolution)",
                "i (1..N)": "output of transformer layer i",
                "N": "last layer output, before the encoder's final LayerNorm for stable-layer-norm models "
                     "(transformers 5 hidden_states[-1])",
            },
        },
        "dim": dim,
        "stats": list(STATS),
        "settings": {**asdict(settings), "sample_rate": SAMPLE_RATE},
        "manifest": {"path": str(Path(manifest).resolve()), "hash": manifest_hash,
                     "segmentation": segmentation_counts(done)},
        "failures": failures,
        "versions": _versions(torch),
        **(extra or {}),
    })
    write_json_atomic(cache_dir / META_FILE, seal(meta))
    shutil.rmtree(parts)


def _consolidate(cache_dir: Path, done: list[Recording], n_layers: int, dim: int) -> dict:
    """Gather the per-recording parts into layer-major memory-mappable arrays; hash their content."""
    parts = cache_dir / "parts"
    window_counts = []
    for rec in done:
        with np.load(part_path(parts, rec.id)) as part:
            window_counts.append(len(part["n_frames"]))
    n_windows = sum(window_counts)
    arrays = {}
    for stat in STATS:
        for layer in range(n_layers):
            target = stat_path(cache_dir, stat, layer)
            target.parent.mkdir(parents=True, exist_ok=True)
            arrays[stat, layer] = np.lib.format.open_memmap(target, "w+", np.float32, (n_windows, dim))
    windows: dict[str, list] = {"item": [], "start_sample": [], "end_sample": [], "n_frames": []}
    items, devices, threads = [], set(), set()
    offset = 0
    for index, (rec, count) in enumerate(zip(done, window_counts, strict=True)):
        with np.load(part_path(parts, rec.id)) as part:
            for stat in STATS:
                values = part[stat]
                for layer in range(n_layers):
                    arrays[stat, layer][offset : offset + count] = values[layer]
            windows["item"] += [index] * count
            windows["start_sample"] += part["start"].tolist()  # at 16 kHz, after resampling
            windows["end_sample"] += part["end"].tolist()
            windows["n_frames"] += part["n_frames"].tolist()
            devices.add(str(part["device"]) if "device" in part.files else "unknown")
            threads.add(int(part["threads"]) if "threads" in part.files else 0)
            item = {"id": rec.id, "label": rec.label, "group": rec.group, "split": rec.split,
                    "mmse": rec.mmse, "path": str(rec.path), "n_windows": count}
            if "conditions" in part.files:  # how the recording was made (`recording_conditions`), and its
                item["conditions"] = {**json.loads(str(part["conditions"])), "segments": len(rec.segments)}
        if rec.covariates:  # the manifest's own nuisance columns (age, sex, site, device ...)
            item["covariates"] = dict(rec.covariates)
        items.append(item)
        offset += count
    for array in arrays.values():
        array.flush()
    del arrays
    return {"items": items, "windows": windows, "n_windows": n_windows, "files": file_hashes(cache_dir, n_layers),
            "devices": sorted(devices), "runtime": {"intra_op_threads": sorted(threads - {0})}}


def _layer_meaning(source: ModelSource, features: str) -> dict | None:
    """What the cache's layers are, where they are not a wav2vec2-family model's (the default meaning)."""
    if features == "egemaps":
        return {"0": "eGeMAPSv02 low-level descriptors (25, every 10 ms)"}
    if features == "egemaps-functionals":
        return {"0": "eGeMAPSv02 functionals (88 per window)"}
    return WHISPER_LAYERS if _model_type(source) == "whisper" else None


def _model_type(source: ModelSource) -> str | None:
    config = source.path / "config.json"
    return json.loads(config.read_text()).get("model_type") if config.is_file() else None


def _model_meta(source: ModelSource, devices: list[str]) -> dict:
    meta = {"name": source.name, "revision": source.revision, "path": str(source.path), "devices": devices}
    config_file = source.path / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        meta.update({k: config.get(k) for k in (
            "model_type", "hidden_size", "num_hidden_layers", "feat_extract_norm", "do_stable_layer_norm")})
        meta["uses_attention_mask"] = config.get("feat_extract_norm", "layer") == "layer"  # see WindowEncoder
    return meta


def _versions(torch) -> dict:
    versions = {"adsearch": __version__, "numpy": np.__version__, "python": platform.python_version()}
    if torch is None:  # eGeMAPS: openSMILE's version is part of the model revision
        return versions
    import transformers

    return {**versions, "torch": torch.__version__, "transformers": transformers.__version__}
