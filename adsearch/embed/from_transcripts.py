"""Feature sources read from transcripts, written as caches a search takes like any other source.

* `linguistic`: the interpretable features of `adsearch/embed/linguistic.py`, one "layer" (0), one window per
  recording; the cache names each feature (`feature_names`) and says which its transcripts could measure.
* `ngrams`: word 1- and 2-gram counts (`adsearch/embed/ngrams.py`), for TF-IDF inside the search's folds.
* `text`: every layer of a text encoder (`adsearch/embed/text.py`) over each transcript.

The cache key covers the transcripts' content hash, so new transcripts make a new cache. A recording without
a transcript (its audio failed, or the import had none) is a failure of the cache, as unreadable audio is.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from adsearch.corpus import manifest_digest, read_manifest
from adsearch.embed.cache import META_FILE, CacheError
from adsearch.embed.extract import (
    ExtractResult,
    ExtractSettings,
    Failure,
    cache_dir_for,
    cache_key,
    failure_path,
    finished_result,
    part_path,
    write_cache,
)
from adsearch.embed.linguistic import linguistic_features
from adsearch.embed.model import ModelSource
from adsearch.io.audio import SAMPLE_RATE
from adsearch.io.outputs import NonFiniteError, save_atomic_npz, write_json_atomic
from adsearch.transcripts.store import Transcript, mismatched_recordings, open_transcripts
from adsearch.work import Claim

TRANSCRIPT_FEATURES = ("linguistic", "ngrams", "text")
# One window per recording (or per text chunk): the window settings of these caches say so.
WHOLE_RECORDING = ExtractSettings(window_s=600.0, min_window_s=0.0, dtype="float32")


def linguistic_source(transcripts_hash: str, path: Path) -> ModelSource:
    from adsearch.embed.linguistic import FEATURES_VERSION

    return ModelSource("adsearch/linguistic", path, f"features-v{FEATURES_VERSION}+transcripts-{transcripts_hash[:16]}")


def ngrams_source(transcripts_hash: str, path: Path) -> ModelSource:
    from adsearch.embed.ngrams import NGRAMS_VERSION

    return ModelSource("adsearch/ngrams", path, f"ngrams-v{NGRAMS_VERSION}+transcripts-{transcripts_hash[:16]}")


def extract_from_transcripts(manifest: Path | str, out_root: Path | str, features: str, transcripts: Path | str | None,
                             text_model: str | None = None, device: str = "auto", progress=None) -> ExtractResult:
    """Write (or resume) the `features` cache of `manifest` from the transcript folder `transcripts`."""
    if features not in TRANSCRIPT_FEATURES:
        raise ValueError(f"--features {features!r}: choose {' or '.join(TRANSCRIPT_FEATURES)}")
    if transcripts is None:
        raise CacheError(f"--features {features} reads transcripts: pass --transcripts FOLDER (from `adsearch "
                         "transcribe`)")
    if (features == "text") != (text_model is not None):
        raise CacheError("--text-model goes with --features text (a Hugging Face text encoder: id or folder)")
    recordings = read_manifest(manifest)
    found = open_transcripts(transcripts)
    if mismatched := mismatched_recordings(found, recordings):
        raise CacheError(f"--transcripts {found.path}: {len(mismatched)} transcript(s) belong to other audio than "
                         f"the manifest's: " + "; ".join(mismatched[:5]) + ("; ..." if len(mismatched) > 5 else "")
                         + ". Transcribe this manifest (`adsearch transcribe`), or fix the manifest")
    transcripts_hash = found.meta["content_hash"]
    torch = None
    encoder, vocabulary = None, None
    if features == "linguistic":
        source = linguistic_source(transcripts_hash, found.path)
    elif features == "ngrams":
        from adsearch.embed.ngrams import build_vocabulary, ngram_counts

        source = ngrams_source(transcripts_hash, found.path)
        vocabulary = build_vocabulary(t for r in recordings if r.split == "train" and (t := found.get(r.id)))
        if not vocabulary:
            raise CacheError(f"{found.path}: no word n-gram occurs in two train transcripts; an n-gram source needs "
                             "transcripts with words")
    else:
        import torch

        from adsearch.embed.encoder import resolve_device
        from adsearch.embed.model import resolve_model
        from adsearch.embed.text import TextEncoder

        source = resolve_model(text_model, with_tokenizer=True)
    key = cache_key(source, f"{manifest_digest(recordings)}+{transcripts_hash}", WHOLE_RECORDING)
    cache_dir = cache_dir_for(Path(out_root), source, key, manifest)
    if (cache_dir / META_FILE).is_file():
        for rec in recordings:  # an edited transcript file is refused, not silently ignored by a finished cache
            found.get(rec.id)
        return finished_result(cache_dir)
    parts = cache_dir / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    if progress:
        progress.start(len(recordings), 0.0, sum(part_path(parts, r.id).is_file() for r in recordings))
    computed, started = 0, time.perf_counter()
    for rec in recordings:
        if part_path(parts, rec.id).is_file() or failure_path(parts, rec.id).is_file():
            continue
        claim = Claim(parts / f"{rec.id}.lock")
        if not claim.take():
            continue
        try:
            transcript = found.get(rec.id)
            if transcript is None:
                reason = next((f["reason"] for f in found.meta["failures"] if f["id"] == rec.id),
                              f"no transcript in {found.path}")
                write_json_atomic(failure_path(parts, rec.id),
                                  asdict(Failure(rec.id, str(rec.path), f"no transcript: {reason}", rec.split,
                                                 rec.label)))
                continue
            if features == "linguistic":
                n_frames, stats = one_vector_stats(linguistic_features(transcript))
            elif features == "ngrams":
                n_frames, stats = one_vector_stats(ngram_counts(transcript, vocabulary))
            else:
                if encoder is None:
                    encoder = TextEncoder(source, resolve_device(device))
                n_frames, stats = encoder.encode_text(transcript.text)
            begin, end = _extent(transcript)
            try:
                save_atomic_npz(part_path(parts, rec.id), start=np.full(len(n_frames), begin, np.int64),
                                end=np.full(len(n_frames), end, np.int64), n_frames=n_frames,
                                device=np.array(getattr(encoder, "device", "cpu")), **stats)
            except NonFiniteError as exc:  # e.g. word times beyond float32: the recording fails, not the cache
                write_json_atomic(failure_path(parts, rec.id),
                                  asdict(Failure(rec.id, str(rec.path), f"features not finite ({exc}): check its "
                                                 "transcript's word times", rec.split, rec.label)))
                continue
            computed += 1
        finally:
            claim.release()
        if progress:
            progress.advance(1, 0.0)
    extra = {"transcripts": {"path": str(found.path), "content_hash": transcripts_hash, "source": found.source}}
    if features == "linguistic":
        extra.update(_linguistic_meta(found, recordings))
        meaning = {"0": "interpretable linguistic features of the transcript (feature_names)"}
    elif features == "ngrams":
        extra["feature_names"] = vocabulary
        meaning = {"0": "counts of the word 1- and 2-grams in feature_names (weigh them with scale: tfidf)"}
    else:
        meaning = {"0": "token embeddings", "i (1..N)": "output of text encoder layer i (statistics over tokens)"}
    consolidation = Claim(cache_dir / "consolidate.lock")
    consolidation.wait()
    try:
        if not (cache_dir / META_FILE).is_file():
            write_cache(cache_dir, recordings, source, WHOLE_RECORDING, manifest, manifest_digest(recordings),
                        torch, extra, meaning)
    finally:
        consolidation.release()
    result = finished_result(cache_dir)
    result.n_computed, result.compute_seconds = computed, time.perf_counter() - started
    return result


def one_vector_stats(values: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One recording as one window of one "frame": every pooling of it is the vector itself (std: 0).
    (n_frames (1,), {stat: (1 layer, 1 window, dim)}); `predict` builds a new recording's the same way."""
    values = values.astype(np.float32)[None, None]  # (1 layer, 1 window, dim)
    return np.ones(1, np.int64), {"mean": values, "m2": np.zeros_like(values), "max": values, "min": values}


def _linguistic_meta(found, recordings) -> dict:
    from adsearch.embed.linguistic import FEATURES, available

    measured = {name: 0 for name, _ in FEATURES}
    for rec in recordings:
        transcript = found.get(rec.id)
        if transcript is not None:
            for name, ok in available(transcript).items():
                measured[name] += ok
    return {
        "feature_names": [name for name, _ in FEATURES],
        "feature_meaning": dict(FEATURES),
        "feature_measured": measured,  # recordings whose transcript could measure each feature (else it is 0)
    }


def _extent(transcript: Transcript) -> tuple[int, int]:
    if transcript.spans:
        return round(transcript.spans[0][0] * SAMPLE_RATE), round(transcript.spans[-1][1] * SAMPLE_RATE)
    return 0, round((transcript.duration_s or 0) * SAMPLE_RATE)
