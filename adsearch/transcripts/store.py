"""The transcript folder: one per (ASR model + revision, manifest, settings) or per imported source.

    settings.json              what produced it (written first)
    recordings/{id}.json       one transcript per recording, written atomically (the resume state too)
    recordings/{id}.failed.json  a recording whose audio could not be used, and why
    transcripts.json           written last: items, failures, versions, SHA-256 of every transcript file

A transcript holds the text, the words with start, end (seconds in the recording) and the ASR's probability
where known, and the speech spans that were transcribed. An empty transcript (silence) is a valid result.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from adsearch.corpus import Recording, format_segments
from adsearch.io.digest import file_digest

FORMAT_VERSION = 1
META_FILE = "transcripts.json"
MAX_TRANSCRIPT_BYTES = 20 << 20  # about 3 million words: far beyond any recording


class TranscriptError(ValueError):
    pass


@dataclass(frozen=True)
class Word:
    text: str
    start: float | None = None  # seconds from the start of the recording; None where the source has no times
    end: float | None = None
    probability: float | None = None  # the ASR's confidence in the word, where it gives one


@dataclass(frozen=True)
class Transcript:
    id: str
    words: tuple[Word, ...]
    spans: tuple[tuple[float, float], ...] = ()  # the participant speech transcribed (seconds)
    duration_s: float | None = None  # length of the recording, where known

    @property
    def text(self) -> str:
        return " ".join(w.text for w in self.words)

    def to_json(self) -> dict:
        return {"id": self.id, "text": self.text, "spans": [list(s) for s in self.spans],
                "duration_s": self.duration_s,
                "words": [[w.text, w.start, w.end, w.probability] for w in self.words]}

    @classmethod
    def from_json(cls, data: dict, where: str) -> Transcript:
        """Validated: a hand-edited or foreign file is refused with what is wrong, not half-read."""
        try:
            words = []
            for i, row in enumerate(data["words"]):
                text, start, end, prob = row
                if not isinstance(text, str) or not text.strip():
                    raise ValueError(f"word {i}: empty or not text")
                times = [t for t in (start, end, prob) if t is not None]
                if not all(isinstance(t, int | float) and t == t and abs(t) != float("inf") for t in times):
                    raise ValueError(f"word {i}: start, end and probability must be finite numbers or null")
                if start is not None and end is not None and not 0 <= start <= end:
                    raise ValueError(f"word {i}: needs 0 <= start <= end")
                words.append(Word(text, start, end, prob))
            spans = tuple((float(b), float(e)) for b, e in data.get("spans", []))
            duration = data.get("duration_s")
            return cls(str(data["id"]), tuple(words), spans, None if duration is None else float(duration))
        except (KeyError, TypeError, ValueError) as exc:
            raise TranscriptError(f"{where}: not a valid transcript ({exc})") from None


def tokens(text: str) -> list[str]:
    """Lower-case words without punctuation ("Well, I see" -> well, i, see); apostrophes stay (don't)."""
    return re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower())


def content_hash_of(meta: dict) -> str:
    defining = {key: meta.get(key) for key in ("format_version", "source", "settings", "items")}
    return hashlib.sha256(json.dumps(defining, sort_keys=True).encode()).hexdigest()


def transcript_path(folder: Path, rec_id: str) -> Path:
    return folder / "recordings" / f"{rec_id}.json"


def failure_path(folder: Path, rec_id: str) -> Path:
    return folder / "recordings" / f"{rec_id}.failed.json"


def item_meta(rec: Recording, folder: Path) -> dict:
    """What a transcript belongs to: the recording's id, labels, audio (path and SHA-256) and segments, and the
    transcript file's own SHA-256."""
    return {"id": rec.id, "label": rec.label, "group": rec.group, "split": rec.split, "mmse": rec.mmse,
            "path": str(rec.path), "sha256": file_digest(transcript_path(folder, rec.id)),
            "audio_sha256": file_digest(rec.path) if rec.path.is_file() else None,
            "segments": format_segments(rec.segments)}


@dataclass(frozen=True)
class TranscriptSet:
    """A finished transcript folder, read-only; every transcript is checked against its recorded SHA-256."""

    path: Path
    meta: dict
    _loaded: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def source(self) -> dict:
        return self.meta["source"]

    @property
    def ids(self) -> list[str]:
        return [item["id"] for item in self.meta["items"]]

    @cached_property
    def _items(self) -> dict[str, dict]:
        return {item["id"]: item for item in self.meta["items"]}

    def get(self, rec_id: str) -> Transcript | None:
        """The transcript of `rec_id`, or None when this folder has none (never transcribed, or failed)."""
        if rec_id in self._loaded:
            return self._loaded[rec_id]
        item = self._items.get(rec_id)
        if item is None:
            return None
        path = transcript_path(self.path, rec_id)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise TranscriptError(f"{path}: cannot be read ({exc.strerror}); transcribe again") from None
        if hashlib.sha256(raw).hexdigest() != item["sha256"]:
            raise TranscriptError(f"{path} was changed after transcription (its SHA-256 differs from the one in "
                                  f"{META_FILE}); transcribe again or import the edited text with --from-csv")
        transcript = Transcript.from_json(json.loads(raw), str(path))
        self._loaded[rec_id] = transcript
        return transcript


def mismatched_recordings(found: TranscriptSet, recordings: Sequence[Recording]) -> list[str]:
    """Recordings of a manifest whose transcript in `found` was made of other audio or other segments (a
    manifest with its paths rotated, a file replaced), one sentence each naming the recording."""
    problems = []
    for rec in recordings:
        item = found._items.get(rec.id)
        if item is None:
            continue
        if item.get("audio_sha256") and rec.path.is_file():
            if file_digest(rec.path) != item["audio_sha256"]:
                problems.append(f"{rec.id}: its audio {rec.path} is not the audio that was transcribed "
                                f"({item['path']}; SHA-256 differs)")
        elif item["path"] != str(rec.path):
            problems.append(f"{rec.id}: transcribed from {item['path']}, the manifest says {rec.path}")
        if "segments" in item and item["segments"] != format_segments(rec.segments):
            problems.append(f"{rec.id}: transcribed with segments {item['segments'] or '(whole recording)'}, the "
                            f"manifest says {format_segments(rec.segments) or '(whole recording)'}")
    return problems


def open_transcripts(path: Path | str) -> TranscriptSet:
    """A finished transcript folder, or the one folder below `path` that holds one."""
    path = Path(path)
    if not (path / META_FILE).is_file():
        found = sorted(p.parent for p in path.glob(f"*/{META_FILE}")) if path.is_dir() else []
        if len(found) != 1:
            what = (f"holds {len(found)} transcript folders; pass one of them: "
                    + ", ".join(map(str, found)) if found else f"no {META_FILE} here or one level below; "
                    "is this an `adsearch transcribe` output? (an unfinished one resumes when run again)")
            raise TranscriptError(f"--transcripts {path}: {what}")
        path = found[0]
    try:
        meta = json.loads((path / META_FILE).read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise TranscriptError(f"{path}: transcript format {meta.get('format_version')} (this adsearch reads "
                                  f"{FORMAT_VERSION}); transcribe again")
        if meta.get("content_hash") != content_hash_of(meta):
            raise TranscriptError(f"{path / META_FILE} was edited (its content hash does not match); transcribe "
                                  "again")
    except (OSError, json.JSONDecodeError) as exc:
        raise TranscriptError(f"{path / META_FILE}: cannot be read ({exc})") from None
    return TranscriptSet(path, meta)
