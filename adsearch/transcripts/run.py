"""`adsearch transcribe`: every recording through a recogniser once, with `extract`'s habits.

One folder per (recogniser + revision, manifest, settings); each finished recording is written atomically,
so a rerun resumes; any number of processes (`--shard K/N`, or simply twice) share the folder through
claims; whichever finds every recording done writes `transcripts.json`, which means "complete".
Unreadable or digitally silent audio is listed as a failure (as `extract` lists it); a recording in which
the recogniser hears no word gets an empty transcript, which is a result.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from adsearch import __version__
from adsearch.corpus import Recording, manifest_digest, read_manifest
from adsearch.io.audio import SAMPLE_RATE, AudioError, load_audio
from adsearch.io.outputs import write_json_atomic
from adsearch.transcripts.asr import (
    CHUNK_S,
    DEFAULT_BATCH,
    FALLBACK_NGRAM,
    WHISPER_BEAM,
    AsrError,
    AsrSource,
    load_recogniser,
    resolve_asr,
)
from adsearch.transcripts.store import (
    FORMAT_VERSION,
    META_FILE,
    Transcript,
    TranscriptSet,
    content_hash_of,
    failure_path,
    item_meta,
    open_transcripts,
    transcript_path,
)
from adsearch.work import Claim, ExtractProgress, shard_of, speech_seconds


@dataclass
class TranscribeResult:
    folder: Path
    n_items: int
    n_done_here: int = 0
    failures: list[dict] = field(default_factory=list)
    audio_seconds: float = 0.0
    compute_seconds: float = 0.0
    remaining: int = 0  # recordings of other shards not transcribed yet


def folder_for(out_root: Path, source: dict, manifest_hash: str) -> Path:
    key = hashlib.sha256(json.dumps({"source": source, "manifest": manifest_hash, "format": FORMAT_VERSION},
                                    sort_keys=True).encode()).hexdigest()[:12]
    name = Path(source["name"]).name if source.get("path") else source["name"]
    slug = re.sub(r"[^A-Za-z0-9]+", "-", f"{source['backend']}-{name}").strip("-")[:60]
    return out_root / f"{slug}-{key}"


def transcribe(manifest: Path | str, out_root: Path | str, backend: str = "whisper", model: str | None = None,
               device: str = "auto", shard: tuple[int, int] | None = None,
               progress: ExtractProgress | None = None, poll_seconds: float = 1.0,
               recogniser=None, threads: int | None = None, batch_size: int = DEFAULT_BATCH) -> TranscribeResult:
    """Transcribe (or resume) `manifest` into a folder under `out_root`; return where it is.
    `progress` is told recordings and seconds of speech, as `extract`'s; `threads`: the recogniser's CPU
    threads (`load_recogniser`); `batch_size`: Whisper chunks decoded at once, and the recordings this process
    claims at a time (their chunks are batched together; a recording's words do not depend on it)."""
    if batch_size < 1:
        raise AsrError(f"--batch-size {batch_size}: at least 1")
    recordings = read_manifest(manifest)
    asr = resolve_asr(backend, model)
    source = source_of(asr)
    manifest_hash = manifest_digest(recordings)
    folder = folder_for(Path(out_root), source, manifest_hash)
    if (folder / META_FILE).is_file():
        return _finished(open_transcripts(folder))
    (folder / "recordings").mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / "settings.json", {"source": source, "manifest": str(Path(manifest).resolve()),
                                                 "manifest_hash": manifest_hash})
    mine = shard_of(recordings, shard)
    if progress:
        todo = [r for r in mine if not _done(folder, r.id)]
        progress.start(len(mine), sum(speech_seconds(r) for r in todo), len(mine) - len(todo))
    done_here, audio_seconds, started = 0, 0.0, time.perf_counter()
    while not (folder / META_FILE).is_file() and (pending := [r for r in mine if not _done(folder, r.id)]):
        claimed: list[tuple[Recording, Claim]] = []
        try:
            for rec in pending:
                claim = Claim(folder / "recordings" / f"{rec.id}.lock")
                if not claim.take():
                    continue
                if _done(folder, rec.id):
                    claim.release()
                    continue
                claimed.append((rec, claim))
                if len(claimed) == batch_size:
                    break
            if claimed:
                recogniser = recogniser or load_recogniser(asr, device, threads, batch_size)
                seconds = _transcribe_group(recogniser, [rec for rec, _ in claimed], folder)
                audio_seconds += seconds
                done_here += len(claimed)
                if progress:
                    progress.advance(len(claimed), seconds)
        finally:
            for _, claim in claimed:
                claim.release()
        if not claimed:
            time.sleep(poll_seconds)
    compute_seconds = time.perf_counter() - started
    others = [r for r in recordings if not _done(folder, r.id)]
    if others and not (folder / META_FILE).is_file():
        return TranscribeResult(folder, 0, done_here, [], audio_seconds, compute_seconds, remaining=len(others))
    result = _finished(finish_folder(folder, recordings, source, manifest, manifest_hash))
    result.n_done_here, result.audio_seconds, result.compute_seconds = done_here, audio_seconds, compute_seconds
    return result


def _done(folder: Path, rec_id: str) -> bool:
    return transcript_path(folder, rec_id).is_file() or failure_path(folder, rec_id).is_file()


def _transcribe_group(recogniser, recordings: list[Recording], folder: Path) -> float:
    """Transcribe recordings together into their files (or failure files); the seconds of speech decoded."""
    readable = []
    for rec in recordings:
        try:
            audio = load_audio(rec.path)
        except AudioError as exc:
            write_json_atomic(failure_path(folder, rec.id), {"id": rec.id, "path": str(rec.path),
                                                             "reason": exc.reason, "split": rec.split,
                                                             "label": rec.label})
            continue
        duration = len(audio) / SAMPLE_RATE
        spans = tuple((b, min(e, duration)) for b, e in rec.segments if b < duration) or ((0.0, duration),)
        readable.append((rec, audio, spans, duration))
    found = recogniser.transcribe_many([(audio, spans) for _, audio, spans, _ in readable])
    for (rec, _, spans, duration), words in zip(readable, found, strict=True):
        write_json_atomic(transcript_path(folder, rec.id),
                          Transcript(rec.id, tuple(words), spans, round(duration, 3)).to_json())
    return sum(e - b for _, _, spans, _ in readable for b, e in spans)


def finish_folder(folder: Path, recordings: Sequence[Recording], source: dict, manifest: Path | str | None,
                  manifest_hash: str | None, extra_failures: Iterable[dict] = ()) -> TranscriptSet:
    """Write transcripts.json (last, under a lock: the folder is complete once it exists)."""
    lock = Claim(folder / "finish.lock")
    lock.wait()
    try:
        if not (folder / META_FILE).is_file():
            items = [item_meta(r, folder) for r in recordings if transcript_path(folder, r.id).is_file()]
            failures = [json.loads(failure_path(folder, r.id).read_text()) for r in recordings
                        if failure_path(folder, r.id).is_file()] + list(extra_failures)
            meta = {"format_version": FORMAT_VERSION, "source": source, "settings": {"sample_rate": SAMPLE_RATE},
                    "items": items, "failures": sorted(failures, key=lambda f: f["id"]),
                    "manifest": {"path": str(Path(manifest).resolve()) if manifest else None, "hash": manifest_hash},
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": _versions(source)}
            meta["content_hash"] = content_hash_of(meta)
            write_json_atomic(folder / META_FILE, meta)
    finally:
        lock.release()
    for stale in (folder / "recordings").glob("*.lock"):
        stale.unlink(missing_ok=True)
    return open_transcripts(folder)


def _finished(transcripts: TranscriptSet) -> TranscribeResult:
    return TranscribeResult(transcripts.path, len(transcripts.meta["items"]), failures=transcripts.meta["failures"])


def _versions(source: dict) -> dict:
    versions = {"adsearch": __version__, "python": platform.python_version()}
    for package in ("faster_whisper", "ctranslate2", "transformers", "torch") if source.get("path") else ():
        try:
            versions[package] = __import__(package).__version__
        except ImportError:
            pass
    return versions


def source_of(asr: AsrSource) -> dict:
    """What made the transcripts, recorded in the folder (and part of its key)."""
    decoding = (f"batched beam {WHISPER_BEAM}, temperature 0, chunks of at most {CHUNK_S:g} s at span boundaries, "
                f"failed chunks again without repeated {FALLBACK_NGRAM}-grams, early ends decoded on"
                if asr.backend == "whisper" else "greedy")
    return {**asdict(asr), "language": "en", "decoding": decoding}
