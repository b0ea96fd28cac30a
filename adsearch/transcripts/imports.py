"""Transcripts a user already has, into the transcript folder format.

* CHAT (`.cha`, DementiaBank's format), one file per recording named `{id}.cha`: the participant's
  (`*PAR`) main tier only. Disfluencies are kept as spoken, since they are what the linguistic features count:
  filled pauses (`&uh`, `&um`) become "uh"/"um", retraced words (`the boy [/] the boy`) stay twice;
  unintelligible speech (`xxx`), fragments (`&+fr`), omitted words (`0is`), codes in brackets and
  punctuation go. Utterance time marks (`\\x15begin_end\\x15`, ms) become the transcript's spans; the words
  of a CHAT file have no times of their own.
* CSV with columns `id,text` and optionally `words`: a JSON list of `[word, start, end]` (seconds) or
  `[word, start, end, probability]`, so the output of another ASR system keeps its timings.

pylangacq reads CHAT too, but drops filled pauses and retracings, which are the features that matter here.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

from adsearch.corpus import Recording, manifest_digest, read_manifest
from adsearch.io.digest import file_digest
from adsearch.io.outputs import write_json_atomic
from adsearch.transcripts.run import finish_folder, folder_for
from adsearch.transcripts.store import (
    MAX_TRANSCRIPT_BYTES,
    META_FILE,
    Transcript,
    TranscriptError,
    TranscriptSet,
    Word,
    open_transcripts,
    tokens,
    transcript_path,
)

_TIME_MARK = re.compile("\x15(\\d+)_(\\d+)\x15")
_FILLED = {"uh", "um", "er", "ah", "hm", "hmm", "mm", "eh", "uhm"}


def _without_brackets(text: str) -> str:
    """Every `[...]` (from a `[` to the next `]`) replaced by a space, in one pass: the regular expression
    `\\[[^\\]]*\\]` took quadratic time on a line of unclosed brackets (a 200 kB line ran for minutes)."""
    parts, start = [], 0
    while (opening := text.find("[", start)) >= 0 and (closing := text.find("]", opening + 1)) >= 0:
        parts += [text[start:opening], " "]
        start = closing + 1
    parts.append(text[start:])
    return "".join(parts)


def chat_words(main_tier: str) -> list[str]:
    """The words of one CHAT main tier as spoken (see the module docstring for what stays and what goes)."""
    text = _TIME_MARK.sub(" ", main_tier)
    text = _without_brackets(text)  # [/], [//], [: target], [* error], [+ exc] ...
    text = re.sub(r"[<>]", " ", text)  # <the boy> [/] scopes
    words = []
    for token in text.split():
        if token.startswith("&"):
            filler = token.lstrip("&-=").lower()
            if token[1:2] not in "+=" and filler in _FILLED:  # &uh, &-uh; not &+fragments or &=laughs
                words.append(filler)
            continue
        if token.lower().startswith(("xxx", "yyy", "www", "0", "+", "@")):
            continue
        word = token.split("@")[0].replace("(", "").replace(")", "").replace("_", " ")
        words += tokens(word)
    return words


def read_chat(path: Path, rec_id: str, speaker: str = "PAR") -> Transcript:
    """The `speaker` tier of one CHAT file as a transcript."""
    lines = _read_text(path).splitlines()
    if not lines or "@Begin" not in {line.strip() for line in lines[:20]}:
        raise TranscriptError(f"{path}: not a CHAT file (no @Begin header line)")
    tiers, current = [], None
    for line in lines:
        if line.startswith("\t") and current is not None:
            current[1] += " " + line.strip()  # a continuation of the tier above
        elif line.startswith("*"):
            who, _, text = line[1:].partition(":")
            current = [who.strip(), text]
            tiers.append(current)
        else:
            current = None
    if not any(who == speaker for who, _ in tiers):
        raise TranscriptError(f"{path}: no *{speaker} tier; the participant's lines start with *{speaker}:")
    words, spans = [], []
    for who, text in tiers:
        if who != speaker:
            continue
        words += [Word(w) for w in chat_words(text)]
        spans += [(int(b) / 1000, int(e) / 1000) for b, e in _TIME_MARK.findall(text) if int(b) < int(e)]
    return Transcript(rec_id, tuple(words), tuple(spans))


def read_csv_transcripts(path: Path) -> dict[str, Transcript]:
    """`id,text[,words]` rows (see the module docstring); each problem is reported with its line."""
    reader = csv.DictReader(io.StringIO(_read_text(path).removeprefix("\ufeff")))
    if not {"id", "text"} <= set(reader.fieldnames or ()):
        raise TranscriptError(f"{path}: needs the columns id,text (and optionally words); found {reader.fieldnames}")
    found = {}
    for row in reader:
        where = f"{path} line {reader.line_num}"
        rec_id = (row["id"] or "").strip()
        if rec_id in found:
            raise TranscriptError(f"{where}: id {rec_id!r} appears twice")
        if row.get("words"):
            try:
                rows = json.loads(row["words"])
                data = {"id": rec_id, "words": [[*r, None][:4] if len(r) == 3 else r for r in rows]}
            except (json.JSONDecodeError, TypeError) as exc:
                raise TranscriptError(f"{where}: words must be a JSON list of [word, start, end] ({exc})") from None
            transcript = Transcript.from_json(data, where)
        else:
            transcript = Transcript(rec_id, tuple(Word(w) for w in tokens(row["text"] or "")))
        found[rec_id] = transcript
    return found


def import_transcripts(manifest: Path | str, out_root: Path | str, chat_dir: Path | str | None = None,
                       csv_file: Path | str | None = None) -> TranscriptSet:
    """A transcript folder from CHAT files or a CSV, for the manifest's recordings.

    Recordings without a transcript are listed as failures (the linguistic source cannot describe them)."""
    if (chat_dir is None) == (csv_file is None):
        raise TranscriptError("give one of --from-chat FOLDER or --from-csv FILE")
    recordings = read_manifest(manifest)
    if chat_dir is not None:
        chat_dir = Path(chat_dir)
        if not chat_dir.is_dir():
            raise TranscriptError(f"--from-chat {chat_dir}: folder not found")
        files = {p.stem: p for p in chat_dir.rglob("*.cha")}
        found = {r.id: read_chat(files[r.id], r.id) for r in recordings if r.id in files}
        origin, digests = str(chat_dir.resolve()), sorted(file_digest(p) for p in files.values())
    else:
        csv_file = Path(csv_file)
        found = read_csv_transcripts(csv_file)
        origin, digests = str(csv_file.resolve()), [file_digest(csv_file)]
    for rec in recordings:
        if rec.id in found and (problem := _times_outside(found[rec.id], rec)):
            raise TranscriptError(f"{csv_file if chat_dir is None else files[rec.id]}: {rec.id}: {problem}")
    unknown = sorted(set(found) - {r.id for r in recordings})
    if chat_dir is None and unknown:
        raise TranscriptError(f"{csv_file}: ids not in the manifest: {', '.join(unknown[:5])}")
    source = {"backend": "chat" if chat_dir is not None else "csv", "name": origin, "path": None,
              "revision": "sha256:" + hashlib.sha256("".join(digests).encode()).hexdigest()[:16]}
    manifest_hash = manifest_digest(recordings)
    folder = folder_for(Path(out_root), source, manifest_hash)
    if (folder / META_FILE).is_file():
        return open_transcripts(folder)
    (folder / "recordings").mkdir(parents=True, exist_ok=True)
    for rec in recordings:
        if rec.id in found:
            write_json_atomic(transcript_path(folder, rec.id), found[rec.id].to_json())
    missing = _missing(recordings, found)
    return finish_folder(folder, recordings, source, manifest, manifest_hash, missing)


def _times_outside(transcript: Transcript, rec: Recording) -> str | None:
    """Why a transcript's word or span times cannot belong to the recording (not finite, negative, or beyond
    its length as the audio header gives it), or None. Times of 1e300 s put infinity into a float32 cache."""
    from adsearch.io.audio import AudioError, audio_duration

    times = [(w.text, w.start, w.end) for w in transcript.words if w.start is not None or w.end is not None]
    times += [("(a time mark)", begin, end) for begin, end in transcript.spans]
    if not times:
        return None
    try:
        length = audio_duration(rec.path)
    except AudioError:
        length = float("inf")  # extraction reports the audio itself; the times must still be finite
    for text, start, end in times:
        for value in (start, end):
            if value is not None and not (math.isfinite(value) and 0 <= value <= length + 1.0):
                return (f"the time {value!r} s of {text!r} is not within the recording (0 to "
                        f"{length:.1f} s); word times are seconds from the start of the audio file")
    return None


def _read_text(path: Path) -> str:
    """A transcript file's text, its size checked before it is read (undecodable bytes become U+FFFD)."""
    try:
        if not path.is_file():
            raise TranscriptError(f"{path}: not found (or not a file)")
        if path.stat().st_size > MAX_TRANSCRIPT_BYTES:
            raise TranscriptError(f"{path}: {path.stat().st_size:,} bytes; a transcript file is at most "
                                  f"{MAX_TRANSCRIPT_BYTES:,}")
        return path.read_bytes().decode("utf-8", "replace")
    except OSError as exc:
        raise TranscriptError(f"{path}: cannot be read ({exc.strerror})") from None


def _missing(recordings: Sequence[Recording], found: dict) -> list[dict]:
    return [{"id": r.id, "path": str(r.path), "reason": "no transcript for this recording in the import",
             "split": r.split, "label": r.label} for r in recordings if r.id not in found]

