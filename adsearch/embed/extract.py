"""Every recording through the speech model once; every layer's pooled statistics to the cache.

Correctness first: the model's own feature extractor normalises each window, layer-norm models get an
`attention_mask` (so padding does not change their outputs), group-norm models only ever see batches of
equal-length windows, and frames past a window's true length never enter a statistic.

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
from adsearch.embed.model import ModelSource, load_model, resolve_model, uses_attention_mask
from adsearch.io.audio import SAMPLE_RATE, AudioError, load_audio
from adsearch.work import Claim, ExtractProgress, shard_of, speech_seconds, write_json_atomic

WHISPER_LAYERS = {"0": "input to the first encoder layer (log-mel convolutions + positions)",
                  "i (1..N)": "output of encoder layer i, over the window's real frames only (Whisper pads every "
                              "window to 30 s; padded frames are never pooled)"}
MIN_WINDOW_SAMPLES = 400  # the CNN front end needs 400 samples for its first frame


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
# Windows


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


# ----------------------------------------------------------------------------------------------------------
# Statistics


def layer_stats(hidden_states, n_frames):
    """Per layer and item: mean, M2, max, min over the first n_frames frames, as one float32 tensor
    (stat, L, B, D) on the model's device (one copy back instead of four)."""
    import torch

    out: dict[str, list] = {stat: [] for stat in STATS}
    t = hidden_states[0].shape[1]
    mask = (torch.arange(t, device=n_frames.device)[None, :] < n_frames[:, None])[:, :, None]
    count = n_frames.to(torch.float32)[:, None]
    for h in hidden_states:
        h = h.to(torch.float32)
        mean = torch.where(mask, h, 0).sum(1) / count
        out["mean"].append(mean)
        out["m2"].append(torch.where(mask, h - mean[:, None], 0).square().sum(1))
        out["max"].append(torch.where(mask, h, -torch.inf).amax(1))
        out["min"].append(torch.where(mask, h, torch.inf).amin(1))
    return torch.stack([torch.stack(out[stat]) for stat in STATS])


def masked_layer_stats(hidden_states, n_frames) -> dict[str, np.ndarray]:
    """Per layer and item: mean, M2, max, min over the first n_frames frames, float32 (L, B, D)."""
    return PendingStats(None, layer_stats(hidden_states, n_frames)).result()[1]


class PendingStats:
    """A batch's statistics on their way back from the device: on a GPU they are copied into pinned host
    memory without waiting, so the card starts the next batch while this one's numbers travel; `result()`
    waits for the copy. On the CPU they are ready at once."""

    def __init__(self, n_frames: np.ndarray | None, stats):
        import torch

        self.n_frames = n_frames
        self.ready = None
        if stats.device.type == "cuda":
            self.host = torch.empty(stats.shape, dtype=stats.dtype, pin_memory=True)
            self.host.copy_(stats, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record(torch.cuda.current_stream(stats.device))
        else:
            self.host = stats

    def result(self) -> tuple[np.ndarray | None, dict[str, np.ndarray]]:
        """(n_frames (B,), {stat: (L, B, D)}) as `WindowEncoder.encode` returns them."""
        if self.ready is not None:
            self.ready.synchronize()
        values = self.host.numpy()
        return self.n_frames, {stat: values[i] for i, stat in enumerate(STATS)}


class WindowEncoder:
    """Runs batches of 16 kHz windows through a model and returns per-window, per-layer statistics."""

    def __init__(self, source: ModelSource, device: str = "auto", dtype: str = "auto",
                 normalise_on_device: bool | None = None):
        import torch

        self.device = resolve_device(device)
        self.dtype_name = resolve_dtype(dtype, self.device)
        self.extractor, self.model = load_model(source, self.device, getattr(torch, self.dtype_name))
        self.whisper = self.model.config.model_type == "whisper"
        if self.whisper:  # the encoder alone (the decoder never runs); inputs are log-mel padded to 30 s
            self.model = self.model.get_encoder()
        self.masked = self.whisper or uses_attention_mask(self.model)
        # A wav2vec2 feature extractor only pads and normalises each window: on a GPU that is done there (the
        # CPU would otherwise feed the card one batch at a time), from pinned memory with a non-blocking copy.
        # On the CPU the feature extractor itself runs, so CPU caches stay bit for bit what they were.
        on_gpu = self.device.startswith("cuda")
        self.normalise_on_device = (on_gpu if normalise_on_device is None else normalise_on_device) and (
            not self.whisper and type(self.extractor).__name__ == "Wav2Vec2FeatureExtractor")
        self.n_layers = self.model.config.num_hidden_layers + 1
        self.dim = self.model.config.hidden_size

    def frame_counts(self, n_samples: Sequence[int]) -> np.ndarray:
        import torch

        samples = torch.as_tensor(list(n_samples))
        if self.whisper:  # encoder frames of the real log-mel frames: padding beyond them is never pooled
            samples = samples // self.extractor.hop_length
        lengths = self.model._get_feat_extract_output_lengths(samples)
        return lengths.cpu().numpy().astype(np.int64)

    def keep_layers(self, last: int) -> None:
        """Drop the transformer layers above `last`: a classifier on layer k needs only k layers run.

        One layer always stays: transformers 5 captures hidden states through the layers, so a model with
        none returns no hidden state at all, not even layer 0.
        """
        kept = max(last, 1)
        encoder = self.model if self.whisper else self.model.encoder
        encoder.layers = encoder.layers[:kept]
        self.model.config.num_hidden_layers = kept
        self.n_layers = kept + 1

    def encode(self, windows: Sequence[np.ndarray], layers: Sequence[int] | None = None
               ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(n_frames (B,), stats {stat: (L, B, D)}) for one batch, for all hidden states or `layers`.

        Group-norm models need equal-length windows.
        """
        return self.submit(windows, layers).result()

    def submit(self, windows: Sequence[np.ndarray], layers: Sequence[int] | None = None) -> PendingStats:
        """Start `encode` on one batch; on a GPU this returns before the card has finished, so the caller can
        submit the next batch before collecting this one (`PendingStats.result`)."""
        import torch

        lengths = [len(w) for w in windows]
        if not self.masked and len(set(lengths)) > 1:
            raise ValueError("group-norm models can only batch equal-length windows")
        if self.whisper:
            return self._submit_whisper(windows, layers)
        if self.normalise_on_device:
            values, mask = self.device_inputs(windows)
        else:
            inputs = self.extractor(
                list(windows), sampling_rate=SAMPLE_RATE, padding=True, return_tensors="pt",
                return_attention_mask=self.masked,
            )
            values = inputs["input_values"].to(self.device, getattr(torch, self.dtype_name))
            mask = inputs["attention_mask"].to(self.device) if self.masked else None
        n_frames = self.frame_counts(lengths)
        with torch.inference_mode():
            hidden = self.model(values, attention_mask=mask, output_hidden_states=True).hidden_states
            if layers is not None:
                hidden = [hidden[i] for i in layers]
            return PendingStats(n_frames, layer_stats(hidden, upload(torch.as_tensor(n_frames), self.device)))

    def device_inputs(self, windows: Sequence[np.ndarray]):
        """The model's inputs for `windows`, prepared on its device (`inputs_on_device`), in its dtype."""
        import torch

        values, mask = inputs_on_device(windows, self.device, getattr(self.extractor, "do_normalize", False),
                                        self.masked)
        return values.to(getattr(torch, self.dtype_name)), mask

    def _submit_whisper(self, windows: Sequence[np.ndarray], layers: Sequence[int] | None) -> PendingStats:
        import torch

        longest = max(len(w) for w in windows)
        if longest > self.extractor.n_samples:
            raise ValueError(f"a window of {longest / SAMPLE_RATE:.1f} s: Whisper's encoder takes at most "
                             f"{self.extractor.n_samples / SAMPLE_RATE:.0f} s; extract with --window-s 30 or less")
        features = self.extractor(list(windows), sampling_rate=SAMPLE_RATE, return_tensors="pt")["input_features"]
        n_frames = self.frame_counts([len(w) for w in windows])
        with torch.inference_mode():
            hidden = self.model(features.to(self.device, getattr(torch, self.dtype_name)),
                                output_hidden_states=True).hidden_states
            if layers is not None:
                hidden = [hidden[i] for i in layers]
            return PendingStats(n_frames, layer_stats(hidden, upload(torch.as_tensor(n_frames), self.device)))


def upload(tensor, device: str):
    """`tensor` on `device`; on a GPU through pinned memory without waiting (a copy from ordinary memory waits
    for the card to finish its queue first)."""
    if device.startswith("cuda"):
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def inputs_on_device(windows: Sequence[np.ndarray], device: str, normalise: bool, masked: bool):
    """What a wav2vec2 feature extractor returns (windows padded with zeros to the longest, each normalised
    to zero mean and unit variance over its own samples if `normalise`, i.e. `do_normalize`; the attention
    mask if `masked`), computed on `device` in float32: on a GPU the CPU would otherwise feed the card one
    batch at a time."""
    import torch

    lengths = torch.as_tensor([len(w) for w in windows])
    host = torch.zeros((len(windows), int(lengths.max())), dtype=torch.float32,
                       pin_memory=device.startswith("cuda"))
    for row, window in zip(host, windows, strict=True):
        row[:len(window)] = torch.from_numpy(np.ascontiguousarray(window, np.float32))
    values = host.to(device, non_blocking=True)
    lengths = upload(lengths, device)
    valid = torch.arange(values.shape[1], device=device)[None, :] < lengths[:, None]
    if normalise:
        count = lengths.to(torch.float32)[:, None]
        mean = values.sum(1, keepdim=True) / count  # the padding is zeros: it adds nothing
        var = torch.where(valid, values - mean, 0).square().sum(1, keepdim=True) / count
        values = torch.where(valid, (values - mean) / torch.sqrt(var + 1e-7), 0.0)
    return values, valid.to(torch.long) if masked else None


def resolve_device(device: str) -> str:
    """auto, cpu, cuda or cuda:N, checked against what torch sees (a clear error, not a CUDA traceback)."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d{1,3})?", device):
        raise ValueError(f"--device {device[:40]!r}: choose auto, cpu, cuda or cuda:N")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device} asked for, but torch sees no CUDA device (a CPU build of torch, or "
                             "no driver); use --device cpu")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return device


def default_batch_size(device: str) -> int:
    """Batching pays on a GPU; on a CPU the matrices are already large and bigger batches only cost memory."""
    return 16 if device.startswith("cuda") else 1


def resolve_dtype(dtype: str, device: str) -> str:
    import torch

    if dtype == "auto":
        if device.startswith("cuda"):
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype {dtype!r}: choose auto, float32, bfloat16 or float16")
    return dtype


# ----------------------------------------------------------------------------------------------------------
# Batching


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


def save_atomic_npz(path: Path, **arrays: np.ndarray) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npz")  # one writer per name, whatever the race
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def part_path(parts: Path, rec_id: str) -> Path:
    return parts / f"{rec_id}.npz"


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
            redone.append(f"{rec.id} ({rec.path}): its part {part.name} was damaged ({str(exc)[:120]}); extracting "
                          "it again")
    return redone


def recording_windows(rec: Recording, settings: ExtractSettings) -> tuple[list[Window], float]:
    audio = load_audio(rec.path)
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
        try:
            return (rec, *recording_windows(rec, settings))
        except AudioError as exc:
            return rec, exc, 0.0

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
    model's layers, in the same format (`adsearch/embed/egemaps.py`; `model` is then ignored).
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
        "manifest_hash": manifest_hash, **asdict(settings),
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
                                loaders or default_loaders())
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
                     batch_size: int, progress: ExtractProgress | None, loaders: int = 1) -> tuple[int, int, float]:
    """Extract the recordings of `pending` that this process can claim; (computed, failed, audio seconds)."""
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
    owner: dict[int, tuple[Recording, float]] = {}  # a running number per recording -> (recording, seconds)
    rows: dict[int, list] = {}
    left: dict[int, int] = {}  # windows of the recording not collected yet
    numbers = itertools.count()

    def batches() -> Iterator[list[Window]]:
        nonlocal failed
        carried: list[Window] = []
        for group in _group_recordings(pending, 4 * batch_size, settings, claim, loaders):
            windows: list[Window] = []
            for rec, loaded, seconds in group:
                if isinstance(loaded, AudioError):
                    write_json_atomic(failure_path(parts, rec.id),
                                      asdict(Failure(rec.id, str(rec.path), loaded.reason, rec.split, rec.label)))
                    failed += 1
                    claims.pop(rec.id).release()
                    if progress:
                        progress.advance(1, 0.0)
                    continue
                number = next(numbers)
                owner[number], rows[number], left[number] = (rec, seconds), [], len(loaded)
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
            rec, seconds = owner.pop(window.item)
            done = sorted(rows.pop(window.item), key=lambda row: row[0])
            save_atomic_npz(
                part_path(parts, rec.id),
                start=np.array([r[0] for r in done], np.int64),
                end=np.array([r[1] for r in done], np.int64),
                n_frames=np.array([r[2] for r in done], np.int64),
                device=np.array(encoder.device),
                **{s: np.stack([r[3][s] for r in done], axis=1).astype(np.float32) for s in STATS},
            )
            computed += 1
            audio_seconds += seconds
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
    `extra` adds metadata and `layer_meaning` says what the layers are (a transcript source's)."""
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
    items, devices = [], set()
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
        items.append({"id": rec.id, "label": rec.label, "group": rec.group, "split": rec.split,
                      "mmse": rec.mmse, "path": str(rec.path), "n_windows": count})
        offset += count
    for array in arrays.values():
        array.flush()
    del arrays
    return {"items": items, "windows": windows, "n_windows": n_windows, "files": file_hashes(cache_dir, n_layers),
            "devices": sorted(devices)}


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
