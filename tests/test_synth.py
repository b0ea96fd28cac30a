import csv

import numpy as np
import soundfile as sf

from adsearch.corpus import read_segmentation


def test_synthetic_corpus_has_the_exact_adresso_layout(synth_root):
    base = synth_root / "ADReSSo21" / "diagnosis"
    ad = sorted(p.stem for p in (base / "train/audio/ad").glob("*.wav"))
    cn = sorted(p.stem for p in (base / "train/audio/cn").glob("*.wav"))
    assert len(ad) + len(cn) == 12 and len(ad) == round(12 * 87 / 166)
    assert sorted(p.stem for p in (base / "train/segmentation/ad").glob("*.csv")) == ad
    assert len(list((base / "test-dist/audio").glob("adrsdt*.wav"))) == 4
    assert (base / "test-dist/segmentation/adrsdt1.csv").is_file()
    with (base / "train/adresso-train-mmse-scores.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {r["adressfname"] for r in rows} == set(ad + cn)
    assert {r["dx"] for r in rows if r["adressfname"] in ad} == {"ad"}
    with (synth_root / "task1.csv").open() as handle:
        labels = list(csv.DictReader(handle))
    assert {r["Dx"] for r in labels} == {"ProbableAD", "Control"} and len(labels) == 4


def test_recordings_are_speech_at_a_rate_other_than_16k_with_both_speakers(synth_root):
    wav = next((synth_root / "ADReSSo21/diagnosis/train/audio/ad").glob("*.wav"))
    info = sf.info(wav)
    assert info.samplerate == 22_050 and info.channels == 1 and info.duration > 10
    audio, rate = sf.read(wav)
    rows = read_segmentation(wav.parent.parent.parent / "segmentation" / "ad" / f"{wav.stem}.csv")
    assert {speaker for speaker, _, _ in rows} == {"INV", "PAR"}
    par = [(b, e) for s, b, e in rows if s == "PAR"]
    speech = np.concatenate([audio[int(b * rate):int(e * rate)] for b, e in par])
    gap = audio[: int(rows[0][1] * rate) - 10] if rows[0][1] > 0.05 else np.zeros(1)
    assert np.sqrt(np.mean(speech**2)) > 5 * np.sqrt(np.mean(gap**2))  # segments hold the speech


def test_markers_differ_by_group_and_vanish_at_zero_effect(tmp_path):
    from adsearch.synth import synthesize_corpus

    strong = synthesize_corpus(tmp_path / "strong", n_train=40, n_test=0, effect=1.0, seed=1)
    none = synthesize_corpus(tmp_path / "none", n_train=40, n_test=0, effect=0.0, seed=1)

    def gap(speakers, attr):
        ad = np.mean([getattr(s, attr) for s in speakers if s.label == 1])
        cn = np.mean([getattr(s, attr) for s in speakers if s.label == 0])
        return ad - cn

    assert gap(strong, "rate_wpm") < -20 and gap(strong, "pause_prob") > 0.15 and gap(strong, "filler_prob") > 0.2
    assert abs(gap(none, "pause_prob")) < 0.05 and abs(gap(none, "rate_wpm")) < 15
    # the target talking time is drawn independently of the label
    assert abs(gap(strong, "target_s")) < 8
