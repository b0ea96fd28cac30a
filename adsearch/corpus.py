"""Recordings, labels, speakers and splits: the corpus manifest and the importers that write it.

A manifest is a CSV with one row per recording:

    id, path, label (1 = AD, 0 = control, empty = unlabelled), group (speaker), split (train|test),
    mmse (optional), segments (participant speech as ``begin-end`` seconds joined by ``;``,
    empty = the whole recording), segmentation (optional: where the segments came from, see SEGMENTATIONS)

Relative paths are relative to the manifest's own folder, so a corpus folder can be moved as a whole.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from adsearch.io.audio import AudioError, audio_duration
from adsearch.io.outputs import file_written_whole, printable

MANIFEST_COLUMNS = ("id", "path", "label", "group", "split", "mmse", "segments", "segmentation")
COVARIATE_PREFIX = "nuisance_"  # columns of the user's own nuisance covariates: nuisance_age, nuisance_site, ...
# Where a recording's segments came from: a speaker segmentation's participant speech (DementiaBank's), the
# parts outside it (shortcut controls), voice activity detection (every speaker), the user's own segments
# of unstated origin, or none at all.
SEGMENTATIONS = ("participant", "non-participant", "non-speech", "vad", "given", "whole")
SPLITS = ("train", "test")

Segment = tuple[float, float]
# Ids become file names in caches (parts/{id}.npz): letters, digits, '.', '_' and '-', no leading dot.
ID_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
MAX_MANIFEST_BYTES = 256 * 2**20


class CorpusError(ValueError):
    """Bad corpus input; the message names the file, the problem and what to do."""


@dataclass(frozen=True)
class Recording:
    id: str
    path: Path
    label: int | None
    group: str
    split: str
    mmse: float | None = None
    segments: tuple[Segment, ...] = ()  # empty: use the whole recording
    segmentation: str = ""  # one of SEGMENTATIONS; empty: "given" when there are segments, else "whole"
    # the manifest's nuisance columns (`nuisance_age`, `nuisance_site`, ...): (name, value as written); what a
    # study treats as possible shortcuts beside the recording conditions it measures itself
    covariates: tuple[tuple[str, str], ...] = ()

    @property
    def segmented_by(self) -> str:
        return self.segmentation or ("given" if self.segments else "whole")


def segmentation_counts(recordings: Iterable[Recording]) -> dict[str, int]:
    """How many recordings got each segmentation: what a report says the model was trained on."""
    counts: dict[str, int] = {}
    for rec in recordings:
        counts[rec.segmented_by] = counts.get(rec.segmented_by, 0) + 1
    return dict(sorted(counts.items()))


@dataclass
class ImportResult:
    recordings: list[Recording]
    warnings: list[str] = field(default_factory=list)


def check_id(rec_id: str) -> str | None:
    """Why `rec_id` cannot name a recording (it becomes a file name), or None if it can."""
    if ID_PATTERN.fullmatch(rec_id):
        return None
    if len(rec_id) > 128:
        return f"id {rec_id[:40]!r}... is {len(rec_id)} characters long; at most 128"
    return (f"id {rec_id[:60]!r} may only hold letters, digits, '.', '_' and '-' and must not start with '.' "
            "(ids become file names in the cache)")


# ----------------------------------------------------------------------------------------------------------
# Segments


def format_segments(segments: Sequence[Segment]) -> str:
    return ";".join(f"{b:.3f}-{e:.3f}" for b, e in segments)


def parse_segments(text: str) -> tuple[Segment, ...]:
    """Parse ``b-e;b-e`` (seconds); raise ValueError with the offending piece."""
    text = text.strip()
    if not text:
        return ()
    segments = []
    for piece in text.split(";"):
        begin_text, sep, end_text = piece.strip().partition("-")
        try:
            if not sep:
                raise ValueError
            begin, end = float(begin_text), float(end_text)
        except ValueError:
            raise ValueError(f"segment {piece!r} is not 'begin-end' in seconds") from None
        if not (math.isfinite(begin) and math.isfinite(end)):
            raise ValueError(f"segment {piece!r} needs finite seconds")
        if not (0 <= begin < end):
            raise ValueError(f"segment {piece!r} needs 0 <= begin < end")
        segments.append((begin, end))
    return tuple(merge_segments(segments))


def merge_segments(segments: Iterable[Segment]) -> list[Segment]:
    """Sort and merge overlapping or touching segments, so no audio is counted twice."""
    merged: list[list[float]] = []
    for begin, end in sorted(segments):
        if merged and begin <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([begin, end])
    return [(b, e) for b, e in merged]


def clip_segments(segments: Iterable[Segment], duration: float) -> list[Segment]:
    return [(b, min(e, duration)) for b, e in segments if b < duration and min(e, duration) > b]


def complement_segments(segments: Iterable[Segment], duration: float) -> list[Segment]:
    """The parts of [0, duration] not covered by `segments`."""
    rest, cursor = [], 0.0
    for begin, end in merge_segments(segments):
        if begin > cursor:
            rest.append((cursor, begin))
        cursor = max(cursor, end)
    if cursor < duration:
        rest.append((cursor, duration))
    return rest


# ----------------------------------------------------------------------------------------------------------
# Manifest files


def _parse_label(text: str) -> int | None:
    text = text.strip()
    if text == "":
        return None
    if text in ("0", "1"):
        return int(text)
    raise ValueError(f"label {text!r} is not 1 (AD), 0 (control) or empty (unlabelled)")


def _read_text(path: Path, what: str, limit: int = MAX_MANIFEST_BYTES) -> str:
    """A CSV's text as UTF-8 (with or without BOM); any other encoding is refused with what to do."""
    if not path.is_file():
        raise CorpusError(f"{path}: {what} not found" + (" (it is a folder)" if path.is_dir() else ""))
    if path.stat().st_size > limit:
        raise CorpusError(f"{path}: {path.stat().st_size:,} bytes; a {what} of over {limit:,} bytes is refused")
    raw = path.read_bytes()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise CorpusError(f"{path}: the {what} is UTF-16; save it as UTF-8 (CSV UTF-8 in a spreadsheet program)")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise CorpusError(f"{path} line {line}: not UTF-8 text (byte {raw[exc.start]:#x}); save the {what} as "
                          "UTF-8") from None


def read_csv(path: Path, what: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """(header, [(line, cells)]) of a CSV, blank lines skipped; a repeated column is refused."""
    reader = csv.reader(io.StringIO(_read_text(path, what), newline=""))
    try:
        header = [name.strip() for name in next(reader, [])]
        rows = [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
    except csv.Error as exc:
        raise CorpusError(f"{path} line {reader.line_num}: not valid CSV ({exc})") from None
    repeated = sorted({name for name in header if name and header.count(name) > 1})
    if repeated:
        raise CorpusError(f"{path} line 1: column(s) {', '.join(repeated)} appear more than once; keep one of each")
    return header, rows


def csv_records(path: Path, header: list[str], rows: list[tuple[int, list[str]]]
                ) -> tuple[list[tuple[int, dict[str, str]]], list[str]]:
    """([(line, {column: stripped value})], problems): a row whose field count is not the header's is a
    problem, not a record (csv would pad or drop the difference silently)."""
    records, problems = [], []
    for line, cells in rows:
        if len(cells) != len(header):
            problems.append(f"{path} line {line}: {len(cells)} fields, the header has {len(header)} (a comma "
                            "inside a value needs quotes)")
        else:
            records.append((line, {name: cell.strip() for name, cell in zip(header, cells, strict=True)}))
    return records, problems


def read_manifest(path: Path | str, check_files: bool = True) -> list[Recording]:
    """Read and validate a manifest; every problem is reported at once, with its line number."""
    path = Path(path)
    header, raw_rows = read_csv(path, "manifest")
    missing = [c for c in ("id", "path", "label", "group", "split") if c not in header]
    if missing:
        raise CorpusError(
            f"{path}: missing column(s) {', '.join(missing)}; a manifest needs the columns "
            f"{', '.join(MANIFEST_COLUMNS)} (mmse and segments may be left out)"
        )
    rows, problems = csv_records(path, header, raw_rows)
    nuisance = [column for column in header if column.startswith(COVARIATE_PREFIX)]
    problems += [f"{path}: column {printable(column)[:60]!r}: a nuisance column is {COVARIATE_PREFIX}NAME, NAME "
                 "1-40 letters, digits or _" for column in nuisance
                 if not re.fullmatch(r"[A-Za-z0-9_]{1,40}", column[len(COVARIATE_PREFIX):])]
    recordings: list[Recording] = []
    seen: dict[str, int] = {}
    for line, row in rows:
        where = f"{path} line {line}"
        rec_id = row["id"]
        if not rec_id:
            problems.append(f"{where}: empty id")
            continue
        if (bad_id := check_id(rec_id)) is not None:
            problems.append(f"{where}: {bad_id}")
            continue
        if rec_id in seen:
            problems.append(f"{where}: id {rec_id!r} already used on line {seen[rec_id]}")
        seen[rec_id] = line
        try:
            label = _parse_label(row["label"])
            split = row["split"]
            if split not in SPLITS:
                raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
            if split == "train" and label is None:
                raise ValueError("a train recording needs a label (0 or 1)")
            mmse = _parse_mmse(row.get("mmse", ""))
            segments = parse_segments(row.get("segments", ""))
            segmentation = row.get("segmentation", "")
            if segmentation and segmentation not in SEGMENTATIONS:
                raise ValueError(f"segmentation {printable(segmentation)[:40]!r} is not one of "
                                 f"{', '.join(SEGMENTATIONS)} (or empty)")
            if segmentation == "whole" and segments:
                raise ValueError("segmentation 'whole' with segments: leave one of them empty")
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
            continue
        if not row["path"]:
            problems.append(f"{where}: empty path")
            continue
        audio_path = Path(row["path"])
        if not audio_path.is_absolute():
            audio_path = (path.parent / audio_path).resolve()
        if check_files and not audio_path.is_file():
            problems.append(f"{where}: audio file {audio_path} does not exist")
        covariates = tuple(sorted((column[len(COVARIATE_PREFIX):], row[column]) for column in nuisance))
        recordings.append(
            Recording(rec_id, audio_path, label, row["group"] or rec_id, split, mmse, segments, segmentation,
                      covariates)
        )
    problems += speakers_in_both_splits(recordings, path)
    if problems:
        shown = "\n  ".join(problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        raise CorpusError(f"{len(problems)} problem(s) in the manifest:\n  {shown}{more}")
    if not recordings:
        raise CorpusError(f"{path}: the manifest has no recordings")
    return recordings


def label_conflicts(recordings: list[Recording]) -> list[str]:
    """Labels that contradict each other, as warnings naming the rows: a speaker with both an AD and a control
    recording (a diagnosis belongs to the person), one audio file under ids with different labels."""
    warnings = []
    by_speaker: dict[str, list[Recording]] = defaultdict(list)
    by_file: dict[Path, list[Recording]] = defaultdict(list)
    for rec in recordings:
        if rec.label is not None:
            by_speaker[rec.group].append(rec)
            by_file[rec.path].append(rec)
    for speaker, recs in by_speaker.items():
        if len({r.label for r in recs}) > 1:
            warnings.append(f"speaker {speaker!r} has AD and control recordings ("
                            + ", ".join(f"{r.id}: {r.label}" for r in recs[:6]) + "); check the labels")
    for audio, recs in by_file.items():
        if len({r.label for r in recs}) > 1:
            warnings.append(f"{audio} is listed under ids with different labels ("
                            + ", ".join(f"{r.id}: {r.label}" for r in recs[:6]) + "); one of them is wrong")
    return warnings


def _parse_mmse(text: str) -> float | None:
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"mmse {text!r} is not a number") from None
    if not 0 <= value <= 30:
        raise ValueError(f"mmse {text!r} is outside 0..30")
    return value


def speakers_in_both_splits(recordings: Sequence[Recording], source: Path | str) -> list[str]:
    """A speaker (group) with recordings in train and test would leak into the held-out evaluation."""
    splits: dict[str, set[str]] = {}
    for rec in recordings:
        splits.setdefault(rec.group, set()).add(rec.split)
    both = sorted(group for group, found in splits.items() if len(found) > 1)
    if not both:
        return []
    return [f"{source}: speaker(s) {', '.join(map(repr, both[:10]))}{' ...' if len(both) > 10 else ''} have "
            "recordings in both train and test: the test split would not be held out. Put each speaker's "
            "recordings in one split"]


def write_manifest(recordings: Sequence[Recording], path: Path | str) -> Path:
    """Write atomically (a full disk leaves no half manifest); paths inside the manifest's folder are stored
    relative to it."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    nuisance = sorted({name for rec in recordings for name, _ in rec.covariates})
    with file_written_whole(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow([*MANIFEST_COLUMNS, *(COVARIATE_PREFIX + name for name in nuisance)])
        for rec in recordings:
            audio = Path(rec.path).resolve()
            try:
                shown = audio.relative_to(path.parent).as_posix()
            except ValueError:
                shown = str(audio)
            try:
                shown.encode("utf-8")
            except UnicodeEncodeError:
                raise CorpusError(f"{printable(audio)}: the file name is not UTF-8 text, which a manifest (UTF-8) "
                                  "cannot hold; rename the file") from None
            writer.writerow([
                rec.id, shown, "" if rec.label is None else rec.label, rec.group, rec.split,
                "" if rec.mmse is None else f"{rec.mmse:g}", format_segments(rec.segments), rec.segmented_by,
                *(dict(rec.covariates).get(name, "") for name in nuisance),
            ])
    return path


def manifest_digest(recordings: Sequence[Recording]) -> str:
    """Content hash of what extraction depends on: ids, labels, splits, segments, nuisance columns (a cache
    records them) and audio file sizes."""
    digest = hashlib.sha256()
    for rec in sorted(recordings, key=lambda r: r.id):
        try:
            size = Path(rec.path).stat().st_size
        except OSError:
            size = -1
        covariates = "".join(f"\t{name}={value}" for name, value in rec.covariates)  # (none: the digest as before)
        digest.update(
            f"{rec.id}\t{rec.label}\t{rec.group}\t{rec.split}\t{format_segments(rec.segments)}\t{size}{covariates}\n"
            .encode()
        )
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------
# ADReSSo 2021 diagnosis layout


def find_diagnosis_dir(root: Path) -> Path:
    """Accept the unpacked archive root, `ADReSSo21/`, or `ADReSSo21/diagnosis/` itself."""
    for candidate in (root, root / "diagnosis", root / "ADReSSo21" / "diagnosis"):
        if (candidate / "train" / "audio").is_dir():
            return candidate
    raise CorpusError(
        f"{root}: no ADReSSo diagnosis data found; expected train/audio/{{ad,cn}}/*.wav under {root}, "
        f"{root}/diagnosis or {root}/ADReSSo21/diagnosis (unpack ADReSSo21-diagnosis-train.tgz and "
        f"ADReSSo21-diagnosis-test.tgz into the same folder)"
    )


def read_segmentation(path: Path) -> list[tuple[str, float, float]]:
    """Rows of (speaker, begin_s, end_s) from an ADReSSo segmentation CSV (times in ms there)."""
    with io.StringIO(_read_text(path, "segmentation file"), newline="") as handle:
        reader = csv.reader(handle)
        header = [h.strip().lower() for h in next(reader, [])]
        try:
            i_spk, i_beg, i_end = header.index("speaker"), header.index("begin"), header.index("end")
        except ValueError:
            raise CorpusError(
                f"{path}: segmentation file needs the columns speaker, begin, end (found {header})"
            ) from None
        rows = []
        for line, row in enumerate(reader, start=2):
            if not any(cell.strip() for cell in row):
                continue
            try:
                rows.append((row[i_spk].strip(), float(row[i_beg]) / 1000, float(row[i_end]) / 1000))
            except (IndexError, ValueError):
                raise CorpusError(f"{path} line {line}: cannot read speaker/begin/end from {row}") from None
    return rows


def participant_segments(path: Path, duration: float | None) -> tuple[list[Segment], str | None]:
    """PAR speech; for INV-only files, the rest of the recording. Returns (segments, warning)."""
    rows = read_segmentation(path)
    par = [(b, e) for spk, b, e in rows if spk == "PAR" and e > b]
    if par:
        segments = merge_segments(par)
        return (clip_segments(segments, duration) if duration else segments), None
    inv = [(b, e) for spk, b, e in rows if spk == "INV" and e > b]
    if inv and duration:
        return complement_segments(inv, duration), f"{path}: no PAR rows, using everything outside INV speech"
    return [], f"{path}: no usable PAR segments, using the whole recording"


KEEP = ("participant", "non-participant", "non-speech")


def control_segments(path: Path, duration: float | None, keep: str) -> tuple[list[Segment], str | None]:
    """The parts of a recording a shortcut control keeps: `non-participant` = everything outside the
    participant's speech (interviewer speech and pauses), `non-speech` = outside every speaker's segments.
    A recording whose participant speech cannot be located is dropped (segments None-like: empty list with
    a warning), never kept whole: a control must contain no participant time at all."""
    rows = read_segmentation(path)
    par = [(b, e) for spk, b, e in rows if spk == "PAR" and e > b]
    inv = [(b, e) for spk, b, e in rows if spk == "INV" and e > b]
    if duration is None:
        return [], f"{path}: audio duration unknown; dropped from the {keep} control"
    if not par and not inv:
        return [], f"{path}: no PAR or INV rows; dropped from the {keep} control"
    if keep == "non-participant":
        participant = par or complement_segments(inv, duration)  # as participant_segments decides
        kept = complement_segments(participant, duration)
    elif not par:  # the participant import takes everything outside INV as PAR: no non-speech is known
        return [], f"{path}: no PAR rows, so no non-speech time is known; dropped from the {keep} control"
    else:
        kept = complement_segments(par + inv, duration)
    kept = [(b, e) for b, e in kept if e - b > 1e-3]
    if not kept:
        return [], f"{path}: nothing outside the {'participant' if keep == 'non-participant' else 'speech'}; dropped"
    return kept, None


def _read_mmse(path: Path) -> dict[str, tuple[float | None, str]]:
    scores: dict[str, tuple[float | None, str]] = {}
    with io.StringIO(_read_text(path, "MMSE file"), newline="") as handle:
        for line, row in enumerate(csv.DictReader(handle), start=2):
            row = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
            name = row.get("adressfname") or row.get("id")
            if not name:
                continue
            mmse = row.get("mmse", "")
            try:  # a missing score ("", "nan", "NA") stays missing; anything else must be a score of 0-30
                score = None if mmse.lower() in ("", "nan", "na") else _parse_mmse(mmse)
            except ValueError as exc:
                raise CorpusError(f"{path} line {line} ({name}): {exc}; fix or empty that cell") from None
            scores[name] = (score, row.get("dx", ""))
    return scores


_DX = {"probablead": 1, "ad": 1, "1": 1, "control": 0, "cn": 0, "hc": 0, "0": 0}


def _read_id_table(path: Path, what: str, column: str, parse) -> dict[str, object]:
    """An `ID, <column>` CSV released beside the test audio: id -> parse(value), errors by line."""
    values = {}
    with io.StringIO(_read_text(path, what), newline="") as handle:
        reader = csv.DictReader(handle)
        fields = {(f or "").strip().lower(): f for f in reader.fieldnames or []}
        if "id" not in fields or column.lower() not in fields:
            raise CorpusError(f"{path}: {what} needs the columns ID and {column} (found {reader.fieldnames})")
        for line, row in enumerate(reader, start=2):
            try:
                value = parse((row[fields[column.lower()]] or "").strip())
            except ValueError as exc:
                raise CorpusError(f"{path} line {line}: {exc}") from None
            if value is not None:
                values[row[fields["id"]].strip()] = value
    return values


def _diagnosis(text: str) -> int:
    if text.lower() not in _DX:
        raise ValueError(f"Dx {text.lower()!r} is not ProbableAD or Control")
    return _DX[text.lower()]


def read_test_labels(path: Path) -> dict[str, int]:
    """The separately released `ID, Dx` file (ProbableAD | Control)."""
    return _read_id_table(path, "test label file", "Dx", _diagnosis)


def read_test_mmse(path: Path) -> dict[str, float]:
    """The separately released `ID, MMSE` file of the test split (ADReSSo's task2.csv)."""
    return _read_id_table(path, "test MMSE file", "MMSE", _parse_mmse)


TEST_MMSE_FILE = "task2.csv"  # released beside task1.csv (test labels)


def _import_folder(
    audio_dir: Path, seg_dir: Path, split: str, label: int | None, mmse: dict, warnings: list[str],
    keep: str = "participant",
) -> list[Recording]:
    recordings = []
    for wav in sorted(audio_dir.glob("*.wav")):
        rec_id = wav.stem
        if (bad_id := check_id(rec_id)) is not None:
            raise CorpusError(f"{wav}: {bad_id}; rename the file")
        try:
            duration: float | None = audio_duration(wav)
        except AudioError as exc:
            duration = None
            warnings.append(f"{exc} (kept; extraction will report it)")
        seg_file = seg_dir / f"{rec_id}.csv"
        if keep != "participant":  # a shortcut control: only recordings whose PAR time is known
            try:
                segments, warning = control_segments(seg_file, duration, keep) if seg_file.is_file() else (
                    [], f"{seg_file}: segmentation file missing; dropped from the {keep} control")
            except CorpusError as exc:
                segments, warning = [], f"{exc}; dropped from the {keep} control"
            if warning:
                warnings.append(warning)
            if segments:
                score = mmse.get(rec_id, (None, ""))[0]
                recordings.append(Recording(rec_id, wav.resolve(), label, rec_id, split, score, tuple(segments),
                                            keep))
            continue
        if seg_file.is_file():
            try:
                segments, warning = participant_segments(seg_file, duration)
            except CorpusError as exc:
                segments, warning = [], f"{exc}; using the whole recording"
            if warning:
                warnings.append(warning)
        else:
            segments = []
            warnings.append(f"{seg_file}: segmentation file missing, using the whole recording")
        score = mmse.get(rec_id, (None, ""))[0]
        recordings.append(Recording(rec_id, wav.resolve(), label, rec_id, split, score, tuple(segments),
                                    "participant" if segments else "whole"))
    return recordings


def import_adresso(root: Path | str, test_labels: Path | str | None = None, keep: str = "participant",
                   test_mmse: Path | str | None = None) -> ImportResult:
    """Read the ADReSSo 2021 diagnosis layout into recordings: participant speech only, or for a shortcut
    control (`keep`: non-participant, non-speech) only the parts outside it. The test split's MMSE scores
    come from `test_mmse`, else from task2.csv beside the test labels when it is there."""
    if keep not in KEEP:
        raise CorpusError(f"--keep {keep!r}: choose one of {', '.join(KEEP)}")
    base = find_diagnosis_dir(Path(root))
    warnings: list[str] = []
    mmse_file = base / "train" / "adresso-train-mmse-scores.csv"
    mmse = _read_mmse(mmse_file) if mmse_file.is_file() else {}
    if not mmse:
        warnings.append(f"{mmse_file}: not found or empty, MMSE left empty")
    recordings = []
    for folder, label in (("ad", 1), ("cn", 0)):
        audio_dir = base / "train" / "audio" / folder
        if not audio_dir.is_dir():
            raise CorpusError(f"{audio_dir}: folder missing; the train split needs audio/ad and audio/cn")
        found = _import_folder(audio_dir, base / "train" / "segmentation" / folder, "train", label, mmse, warnings,
                               keep)
        for rec in found:
            dx = mmse.get(rec.id, (None, ""))[1].lower()
            if dx and _DX.get(dx, label) != label:
                warnings.append(f"{rec.id}: mmse file says dx={dx} but the audio is in {folder}/; using {folder}")
        recordings += found

    test_dir = base / "test-dist"
    if test_dir.is_dir():
        labels = read_test_labels(Path(test_labels)) if test_labels else {}
        if test_mmse is None and test_labels and (Path(test_labels).parent / TEST_MMSE_FILE).is_file():
            test_mmse = Path(test_labels).parent / TEST_MMSE_FILE
        scores = read_test_mmse(Path(test_mmse)) if test_mmse else {}
        test = _import_folder(test_dir / "audio", test_dir / "segmentation", "test", None, {}, warnings, keep)
        test = [replace(r, label=labels.get(r.id), mmse=scores.get(r.id)) for r in test]
        if test_mmse:
            unscored = [r.id for r in test if r.mmse is None]
            if unscored:
                warnings.append(f"{test_mmse}: no MMSE for {len(unscored)} test recording(s): {unscored[:5]}")
        if test_labels:
            unlabelled = [r.id for r in test if r.label is None]
            unknown = sorted(set(labels) - {r.id for r in test})
            if unlabelled:
                warnings.append(f"{test_labels}: no label for {len(unlabelled)} test recording(s): {unlabelled[:5]}")
            if unknown:
                warnings.append(f"{test_labels}: {len(unknown)} id(s) not in test-dist: {unknown[:5]}")
        recordings += test
    else:
        warnings.append(f"{test_dir}: not found, the corpus has no test split")
    if not any(r.split == "train" for r in recordings):
        raise CorpusError(f"{base}/train/audio: no .wav recordings found")
    return ImportResult(recordings, warnings)
