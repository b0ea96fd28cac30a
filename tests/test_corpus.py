import numpy as np
import pytest
from conftest import speechlike, write_rows, write_wav

from adsearch.corpus import (
    CorpusError,
    Recording,
    complement_segments,
    import_adresso,
    manifest_digest,
    parse_segments,
    read_manifest,
    write_manifest,
)


def make_adresso(root, *, index_column=True):
    """A hand-made ADReSSo tree: 2 AD, 2 CN, 2 test recordings, 44.1 kHz stereo for one file."""
    base = root / "ADReSSo21" / "diagnosis"
    header = ["", "speaker", "begin", "end"] if index_column else ["speaker", "begin", "end"]
    for folder, ids in (("ad", ["adrso001", "adrso002"]), ("cn", ["adrso003", "adrso004"])):
        for i, rec_id in enumerate(ids):
            write_wav(base / "train" / "audio" / folder / f"{rec_id}.wav", speechlike(6.0, seed=i))
            rows = [["INV", 0, 1000], ["PAR", 1500, 3000], ["PAR", 3500, 5500]]
            write_rows(base / "train" / "segmentation" / folder / f"{rec_id}.csv", header,
                       [([j] if index_column else []) + r for j, r in enumerate(rows)])
    write_rows(base / "train" / "adresso-train-mmse-scores.csv", ["", "adressfname", "mmse", "dx"],
               [[0, "adrso001", 20, "ad"], [1, "adrso002", 18, "ad"], [2, "adrso003", 29, "cn"],
                [3, "adrso004", 30, "cn"]])
    stereo = np.stack([speechlike(5.0, 44_100, 1), speechlike(5.0, 44_100, 2)], axis=1)
    write_wav(base / "test-dist" / "audio" / "adrsdt1.wav", stereo, 44_100)
    write_rows(base / "test-dist" / "segmentation" / "adrsdt1.csv", ["speaker", "begin", "end"],
               [["PAR", 0, 4000]])
    write_wav(base / "test-dist" / "audio" / "adrsdt2.wav", speechlike(4.0))
    write_rows(base / "test-dist" / "segmentation" / "adrsdt2.csv", ["speaker", "begin", "end"],
               [["PAR", 500, 3500]])
    labels = write_rows(root / "task1.csv", ["ID", " Dx"], [["adrsdt1", "ProbableAD"], ["adrsdt2", "Control"]])
    return base, labels


def by_id(result):
    return {r.id: r for r in result.recordings}


@pytest.mark.parametrize("index_column", [True, False])
def test_importer_reads_layout_labels_mmse_and_participant_speech(tmp_path, index_column):
    _, labels = make_adresso(tmp_path, index_column=index_column)
    result = import_adresso(tmp_path, labels)
    recs = by_id(result)
    assert sorted(recs) == ["adrsdt1", "adrsdt2", "adrso001", "adrso002", "adrso003", "adrso004"]
    assert [recs[i].label for i in ("adrso001", "adrso002", "adrso003", "adrso004")] == [1, 1, 0, 0]
    assert recs["adrso002"].mmse == 18 and recs["adrso003"].split == "train"
    assert recs["adrso001"].segments == ((1.5, 3.0), (3.5, 5.5))  # INV row dropped, ms -> s
    assert (recs["adrsdt1"].label, recs["adrsdt2"].label) == (1, 0)
    assert recs["adrsdt1"].split == "test" and recs["adrsdt1"].group == "adrsdt1"
    assert result.warnings == []


def test_importer_accepts_the_diagnosis_folder_itself_and_no_test_labels(tmp_path):
    base, _ = make_adresso(tmp_path)
    recs = by_id(import_adresso(base))
    assert recs["adrsdt1"].label is None and recs["adrso001"].label == 1


def test_inv_only_file_takes_the_rest_of_the_recording(tmp_path):
    base, labels = make_adresso(tmp_path)
    write_rows(base / "train" / "segmentation" / "ad" / "adrso002.csv", ["", "speaker", "begin", "end"],
               [[0, "INV", 0, 1000], [1, "INV", 2500, 3000]])
    result = import_adresso(tmp_path, labels)
    assert by_id(result)["adrso002"].segments == ((1.0, 2.5), (3.0, 6.0))
    assert any("adrso002.csv: no PAR rows" in w for w in result.warnings)


def test_missing_segmentation_uses_whole_recording_with_warning(tmp_path):
    base, labels = make_adresso(tmp_path)
    (base / "train" / "segmentation" / "cn" / "adrso004.csv").unlink()
    result = import_adresso(tmp_path, labels)
    assert by_id(result)["adrso004"].segments == ()
    assert any("adrso004.csv: segmentation file missing" in w for w in result.warnings)


def test_segments_past_the_end_are_clipped_and_overlaps_merged(tmp_path):
    base, labels = make_adresso(tmp_path)
    write_rows(base / "train" / "segmentation" / "ad" / "adrso001.csv", ["speaker", "begin", "end"],
               [["PAR", 1000, 3000], ["PAR", 2000, 4000], ["PAR", 5000, 9000]])
    assert by_id(import_adresso(tmp_path, labels))["adrso001"].segments == ((1.0, 4.0), (5.0, 6.0))


def test_corrupt_audio_is_kept_with_a_warning_for_extraction_to_report(tmp_path):
    base, labels = make_adresso(tmp_path)
    (base / "train" / "audio" / "cn" / "adrso003.wav").write_bytes(b"not audio at all")
    result = import_adresso(tmp_path, labels)
    assert "adrso003" in by_id(result)
    assert any("adrso003.wav" in w and "cannot read audio header" in w for w in result.warnings)


def test_missing_root_and_bad_label_file_explain_what_is_expected(tmp_path):
    with pytest.raises(CorpusError, match="expected train/audio"):
        import_adresso(tmp_path)
    make_adresso(tmp_path)
    bad = write_rows(tmp_path / "bad.csv", ["ID", "Dx"], [["adrsdt1", "maybe"]])
    with pytest.raises(CorpusError, match="bad.csv line 2: Dx 'maybe'"):
        import_adresso(tmp_path, bad)


def test_importer_on_synthetic_corpus(synth_root):
    result = import_adresso(synth_root, synth_root / "task1.csv")
    recs = result.recordings
    train, test = [r for r in recs if r.split == "train"], [r for r in recs if r.split == "test"]
    assert (len(train), len(test)) == (12, 4)
    assert {r.label for r in train} == {0, 1} and all(r.label is not None for r in test)
    assert all(r.segments and r.mmse is not None for r in train)
    assert result.warnings == []


def test_manifest_round_trip_with_relative_paths(tmp_path):
    base, labels = make_adresso(tmp_path)
    recordings = import_adresso(tmp_path, labels).recordings
    manifest = write_manifest(recordings, tmp_path / "corpus.csv")
    assert "ADReSSo21/diagnosis/train/audio/ad/adrso001.wav" in manifest.read_text()
    again = read_manifest(manifest)
    assert [(r.id, r.label, r.segments, r.path) for r in again] == [
        (r.id, r.label, r.segments, r.path) for r in recordings
    ]
    assert manifest_digest(again) == manifest_digest(recordings)


def test_manifest_validation_reports_every_problem_with_its_line(tmp_path):
    write_wav(tmp_path / "a.wav", speechlike(1.0))
    manifest = write_rows(tmp_path / "m.csv", ["id", "path", "label", "group", "split", "segments"], [
        ["a", "a.wav", "1", "s1", "train", ""],
        ["a", "a.wav", "0", "s2", "train", ""],
        ["b", "missing.wav", "0", "s3", "train", ""],
        ["c", "a.wav", "yes", "s4", "train", ""],
        ["d", "a.wav", "", "s5", "train", ""],
        ["e", "a.wav", "1", "s6", "dev", ""],
        ["f", "a.wav", "1", "s7", "test", "2-1"],
    ])
    with pytest.raises(CorpusError) as info:
        read_manifest(manifest)
    text = str(info.value)
    assert "6 problem(s)" in text
    for expected in ("line 3: id 'a' already used on line 2", "line 4: audio file", "line 5: label 'yes'",
                     "line 6: a train recording needs a label", "line 7: split 'dev'", "line 8: segment '2-1'"):
        assert expected in text


def test_manifest_missing_columns_named(tmp_path):
    manifest = write_rows(tmp_path / "m.csv", ["id", "path"], [["a", "a.wav"]])
    with pytest.raises(CorpusError, match="missing column\\(s\\) label, group, split"):
        read_manifest(manifest)


def test_digest_changes_with_segments_and_labels(tmp_path):
    path = write_wav(tmp_path / "a.wav", speechlike(1.0))
    rec = Recording("a", path, 1, "a", "train", None, ((0.0, 1.0),))
    assert manifest_digest([rec]) != manifest_digest([Recording("a", path, 0, "a", "train", None, ((0.0, 1.0),))])
    assert manifest_digest([rec]) != manifest_digest([Recording("a", path, 1, "a", "train", None, ((0.0, 0.5),))])


def test_segment_helpers():
    assert parse_segments("1-2; 0.5-1.5 ;3-4") == ((0.5, 2.0), (3.0, 4.0))
    assert complement_segments([(1, 2), (1.5, 3)], 5) == [(0.0, 1), (3, 5)]
    with pytest.raises(ValueError, match="not 'begin-end'"):
        parse_segments("1to2")


def _overlap(a, b) -> float:
    return sum(max(0.0, min(e1, e2) - max(b1, b2)) for b1, e1 in a for b2, e2 in b)


@pytest.mark.parametrize("keep", ["non-participant", "non-speech"])
def test_control_manifests_contain_no_participant_time(tmp_path, keep):
    base, labels = make_adresso(tmp_path)
    write_rows(base / "train" / "segmentation" / "ad" / "adrso002.csv", ["speaker", "begin", "end"],
               [["INV", 0, 1000], ["INV", 2500, 3000]])  # INV only: PAR is the rest (as the participant import)
    (base / "train" / "segmentation" / "cn" / "adrso004.csv").unlink()  # PAR time unknown: must be dropped
    participant = by_id(import_adresso(tmp_path, labels))
    control = import_adresso(tmp_path, labels, keep=keep)
    recs = by_id(control)
    assert "adrso004" not in recs and any("adrso004.csv" in w and "dropped" in w for w in control.warnings)
    assert recs["adrsdt1"].segments == ((4.0, 5.0),)  # its PAR covers 0-4 s of 5 s
    for rec_id, rec in recs.items():
        assert rec.segments, rec_id
        assert _overlap(rec.segments, participant[rec_id].segments) < 1e-9, rec_id
    assert recs["adrso001"].segments == (((0.0, 1.5), (3.0, 3.5), (5.5, 6.0)) if keep == "non-participant"
                                         else ((1.0, 1.5), (3.0, 3.5), (5.5, 6.0)))
    manifest = write_manifest(control.recordings, tmp_path / "control.csv")
    assert {r.id: r.segments for r in read_manifest(manifest)} == {r.id: r.segments for r in control.recordings}


def test_an_unknown_keep_is_refused(tmp_path):
    make_adresso(tmp_path)
    with pytest.raises(CorpusError, match="--keep 'silence': choose one of participant, non-participant"):
        import_adresso(tmp_path, keep="silence")


def test_corpus_csv_segments_unsegmented_recordings_by_voice_activity_detection(synth_root, synth_manifest, tmp_path):
    """New recordings without a segmentation: silero-vad finds the speech (the real model, shipped in its
    package); it covers the participant's planted speech, drops pauses, and the manifest says where the
    segments came from."""
    from typer.testing import CliRunner

    from adsearch.cli import app
    from adsearch.corpus import read_manifest, read_segmentation

    planted = [r for r in read_manifest(synth_manifest) if r.segments][:3]
    write_wav(tmp_path / "silent.wav", np.random.default_rng(0).normal(0, 1e-3, 16_000 * 3).astype(np.float32))
    rows = [[r.id, str(r.path), str(r.label if r.label is not None else ""), r.group, r.split, ""] for r in planted]
    rows.append(["quiet", str(tmp_path / "silent.wav"), "", "q", "test", ""])
    mine = write_rows(tmp_path / "mine.csv", ["id", "path", "label", "group", "split", "segments"], rows)
    result = CliRunner().invoke(app, ["corpus", "csv", str(mine), "-o", str(tmp_path / "out.csv"), "--vad"])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "3 of 4 recording(s) without segments segmented by voice activity detection" in said
    assert "quiet: no speech found by voice activity detection; kept whole" in said and "interviewer" in said
    found = {r.id: r for r in read_manifest(tmp_path / "out.csv")}
    assert found["quiet"].segmented_by == "whole" and not found["quiet"].segments
    def overlap(a, b) -> float:
        return sum(max(0.0, min(e, e2) - max(b1, b2)) for b1, e in a for b2, e2 in b)

    for truth in planted:
        vad = found[truth.id]
        assert vad.segmentation == "vad" and vad.segments
        rows = read_segmentation(next(synth_root.glob(f"**/segmentation/**/{truth.id}.csv")))
        interviewer = [(b, e) for speaker, b, e in rows if speaker == "INV"]
        # what the caveat says: the interviewer's speech is found as well as the participant's ...
        assert overlap(vad.segments, interviewer) > 0.9 * sum(e - b for b, e in interviewer), truth.id
        # ... and most of the participant's (their segments hold their pauses, some planted over 1 s long)
        assert overlap(vad.segments, truth.segments) > 0.6 * sum(e - b for b, e in truth.segments), truth.id
    assert "segmentation" in (tmp_path / "out.csv").read_text().splitlines()[0]
