"""Transcripts and the sources read from them: the real Whisper tiny.en on synthetic speech, resume, shards,
silence, CHAT and CSV import, the linguistic features, and a joint study where only the linguistic markers
differ between the groups (export, evaluate and predict from WAV included)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from adsearch.cli import app
from adsearch.corpus import read_manifest
from adsearch.embed import open_cache
from adsearch.embed.linguistic import FEATURE_NAMES, information_units, linguistic_features
from adsearch.transcripts.imports import chat_words, import_transcripts, read_chat
from adsearch.transcripts.run import transcribe
from adsearch.transcripts.store import Transcript, TranscriptError, Word, open_transcripts, tokens
from tests.conftest import speechlike, write_wav

runner = CliRunner()


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict:
    """A corpus whose groups differ only in what they say (fillers, repetitions, empty phrases), transcribed
    once by the real Whisper tiny.en, with the linguistic cache and the tiny acoustic model's cache."""
    root = tmp_path_factory.mktemp("planted")
    assert run("synth", root / "syn", "--n-train", 20, "--n-test", 6, "--effect", 2, "--seed", 5,
               "--markers", "linguistic").exit_code == 0
    assert run("corpus", "adresso", root / "syn", "--test-labels", root / "syn" / "task1.csv",
               "-o", root / "corpus.csv").exit_code == 0
    result = run("transcribe", root / "corpus.csv", "-o", root / "transcripts")
    assert result.exit_code == 0, result.output
    found = open_transcripts(root / "transcripts")
    result = run("extract", root / "corpus.csv", "--features", "linguistic", "--transcripts", found.path,
                 "-o", root / "cache")
    assert result.exit_code == 0, result.output
    linguistic = open_cache(next((root / "cache").glob("corpus-adsearch-linguistic-*")))
    return {"root": root, "manifest": root / "corpus.csv", "transcripts": found, "linguistic": linguistic}


def test_whisper_transcribes_synthetic_speech_with_low_word_error_rate(planted):
    import jiwer

    spoken = {row["id"]: row["spoken"] for row in csv.DictReader((planted["root"] / "syn" / "markers.csv").open())}
    found = planted["transcripts"]
    assert found.source["backend"] == "whisper" and found.source["revision"].startswith("sha256:")
    refs, hyps = [], []
    for rec in read_manifest(planted["manifest"]):
        transcript = found.get(rec.id)
        refs.append(" ".join(tokens(spoken[rec.id])))
        hyps.append(" ".join(tokens(transcript.text)))
        starts = [w.start for w in transcript.words]
        assert starts == sorted(starts) and all(0 <= w.probability <= 1 for w in transcript.words)
        # every word lies in the participant's speech, never in the interviewer's turns
        assert all(any(b - 0.05 <= w.start and w.end <= e + 0.05 for b, e in rec.segments) for w in transcript.words)
    wer = jiwer.wer(refs, hyps)
    assert wer < 0.35, wer


def test_a_recording_gets_the_same_words_alone_as_batched_with_others(planted):
    """The folder was transcribed in batches of several recordings' chunks; decoded alone (as predict decodes a
    new file) or in other groups and batch sizes, every recording gets exactly the same words and times."""
    from adsearch.io.audio import load_audio
    from adsearch.transcripts.asr import load_recogniser, resolve_asr

    found = planted["transcripts"]
    assert found.source["decoding"].startswith("batched beam 5, temperature 0")
    recordings = read_manifest(planted["manifest"])[:4]
    items = []
    for rec in recordings:
        audio = load_audio(rec.path)
        duration = len(audio) / 16_000
        items.append((audio, tuple((b, min(e, duration)) for b, e in rec.segments if b < duration)))
    recogniser = load_recogniser(resolve_asr("whisper", None), "cpu", batch_size=1)
    alone = [recogniser.transcribe(audio, spans) for audio, spans in items]
    recogniser.batch_size = 3
    together = recogniser.transcribe_many(items[::-1])[::-1]
    for rec, one, other in zip(recordings, alone, together, strict=True):
        assert tuple(one) == tuple(other) == found.get(rec.id).words, rec.id


class _Fake:
    """A recogniser that says each recording's id (and can stop after `stop_after` recordings)."""

    def __init__(self, stop_after: int | None = None):
        self.calls, self.stop_after = 0, stop_after

    def transcribe(self, audio, spans):
        if self.stop_after is not None and self.calls == self.stop_after:
            raise KeyboardInterrupt
        self.calls += 1
        begin = spans[0][0]
        return [Word("the", begin, begin + 0.2, 0.9), Word("boy", begin + 0.6, begin + 0.9, 0.4)]

    def transcribe_many(self, recordings):
        return [self.transcribe(audio, spans) for audio, spans in recordings]


def test_transcribe_resumes_and_shards_share_one_folder(synth_manifest, tmp_path):
    n = len(read_manifest(synth_manifest))
    with pytest.raises(KeyboardInterrupt):
        transcribe(synth_manifest, tmp_path / "a", recogniser=_Fake(stop_after=3), batch_size=1)
    (folder,) = (tmp_path / "a").iterdir()
    assert len(list((folder / "recordings").glob("*.json"))) == 3 and not (folder / "transcripts.json").exists()
    again = _Fake()
    result = transcribe(synth_manifest, tmp_path / "a", recogniser=again)
    assert again.calls == n - 3 and result.n_items == n and result.folder == folder
    assert transcribe(synth_manifest, tmp_path / "a", recogniser=_Fake(stop_after=0)).n_items == n  # complete

    first, second = _Fake(), _Fake()
    part = transcribe(synth_manifest, tmp_path / "b", shard=(0, 2), recogniser=first)
    assert part.remaining == n - first.calls and not (part.folder / "transcripts.json").exists()
    done = transcribe(synth_manifest, tmp_path / "b", shard=(1, 2), recogniser=second)
    assert first.calls + second.calls == n and done.n_items == n and done.remaining == 0


def test_silent_and_unreadable_audio_with_the_real_model(tmp_path):
    silent = write_wav(tmp_path / "silent.wav", np.zeros(16_000 * 4, np.float32))
    quiet = write_wav(tmp_path / "quiet.wav", np.random.default_rng(0).normal(0, 1e-3, 16_000 * 4).astype(np.float32))
    speech = write_wav(tmp_path / "noise.wav", speechlike(3.0))
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF....WAVEfmt nonsense")
    manifest = tmp_path / "corpus.csv"
    manifest.write_text(f"id,path,label,group,split\ns1,{silent},0,s1,train\nq1,{quiet},0,q1,train\n"
                        f"n1,{speech},1,n1,train\nb1,{broken},1,b1,train\n")
    result = run("transcribe", manifest, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "2 recording(s) without a transcript" in result.output, result.output
    assert "Malformed" in result.output and "silent: no sample reaches" in result.output  # as extract says
    found = open_transcripts(tmp_path / "out")
    assert found.ids == ["q1", "n1"] and [f["id"] for f in found.meta["failures"]] == ["b1", "s1"]
    assert found.get("q1").spans == ((0.0, 4.0),)  # near-silence: a transcript, whatever words it holds


CHAT = """@UTF8
@Begin
@Languages:	eng
@Participants:	PAR Participant, INV Investigator
*INV:	tell me what you see . \x150_3000\x15
*PAR:	well &uh the boy [/] the boy is taking <a cookie> [//] cookies . \x153500_8000\x15
%mor:	co|well det|the n|boy
*PAR:	and the water is +/.
	overflowing &um xxx . \x159000_12000\x15
*INV:	okay .
*PAR:	the mother's drying (th)e dishes &+fr &=laughs . \x1513000_15000\x15
@End
"""


def test_chat_import_keeps_disfluencies_and_the_participant_only(synth_manifest, tmp_path):
    assert chat_words("well &uh the boy [/] the boy xxx 0is <a cookie> [//] cookies .") == [
        "well", "uh", "the", "boy", "the", "boy", "a", "cookie", "cookies"]
    chat = tmp_path / "chat"
    chat.mkdir()
    (chat / "t.cha").write_text(CHAT)
    transcript = read_chat(chat / "t.cha", "t")
    assert transcript.text == ("well uh the boy the boy is taking a cookie cookies and the water is overflowing um "
                               "the mother's drying the dishes")
    assert transcript.spans == ((3.5, 8.0), (9.0, 12.0), (13.0, 15.0))
    (chat / "nochat.cha").write_text("*PAR:\thello .\n")
    with pytest.raises(TranscriptError, match="not a CHAT file"):
        read_chat(chat / "nochat.cha", "nochat")

    ids = [r.id for r in read_manifest(synth_manifest)]
    for rec_id in ids[:-1]:
        (chat / f"{rec_id}.cha").write_text(CHAT)
    (chat / "nochat.cha").unlink()
    found = import_transcripts(synth_manifest, tmp_path / "out", chat_dir=chat)
    assert found.ids == ids[:-1] and [f["id"] for f in found.meta["failures"]] == ids[-1:]
    assert found.source["backend"] == "chat"
    features = dict(zip(FEATURE_NAMES, linguistic_features(found.get(ids[0])), strict=True))
    assert features["filled_pauses_per_100w"] > 0 and features["repetitions_per_100w"] > 0
    assert features["asr_confidence_mean"] == 0  # CHAT has no ASR probabilities: 0, and said so in the cache


def test_a_hostile_20_mb_chat_file_is_read_in_linear_time(tmp_path):
    """One 20 MB line of unclosed brackets: the bracket regex took minutes on 200 kB (quadratic); the scanner
    reads it like any other line. A generous bound: the linear scan takes about a second, the old one hours."""
    import re
    import time

    for text in ("a [/] b [: x] c", "[a[b]c", "x [ y", "[]]", "<the boy> [/] the boy [* m]", ""):
        assert chat_words(text) == chat_words(re.sub(r"\[[^\]]*\]", " ", text))
    path = tmp_path / "hostile.cha"
    path.write_text("@Begin\n*PAR:\t" + "[" * 20_000_000 + " .\n@End\n")
    started = time.perf_counter()
    read_chat(path, "hostile")
    assert time.perf_counter() - started < 60


def test_csv_import_with_word_times_and_line_numbers_in_errors(synth_manifest, tmp_path):
    ids = [r.id for r in read_manifest(synth_manifest)]
    rows = [{"id": i, "text": "the boy is on the stool", "words": json.dumps([["the", 1.0, 1.2], ["boy", 1.3, 1.6]])}
            for i in ids]
    path = tmp_path / "t.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["id", "text", "words"])
        writer.writeheader()
        writer.writerows(rows)
    found = import_transcripts(synth_manifest, tmp_path / "out", csv_file=path)
    assert found.get(ids[0]).words == (Word("the", 1.0, 1.2), Word("boy", 1.3, 1.6))
    path.write_text(f"id,text,words\n{ids[0]},x,\"[[\"\"the\"\", 2.0, 1.0]]\"\n")
    result = run("transcribe", synth_manifest, "-o", tmp_path / "bad", "--from-csv", path)
    assert result.exit_code == 2 and "line 2" in result.output and "start <= end" in result.output


def test_edited_transcript_is_refused(synth_manifest, tmp_path):
    found = transcribe(synth_manifest, tmp_path, recogniser=_Fake())
    first = next((found.folder / "recordings").glob("*.json"))
    first.write_text(first.read_text().replace('"boy"', '"girl"'))
    with pytest.raises(TranscriptError, match="changed after transcription"):
        open_transcripts(tmp_path).get(first.stem)


def test_linguistic_features_by_definition():
    words = [("uh", 0.0, 0.2), ("the", 0.3, 0.5), ("boy", 0.6, 0.9), ("the", 2.0, 2.2), ("boy", 2.3, 2.6),
             ("is", 2.7, 2.8), ("taking", 2.9, 3.3), ("a", 3.4, 3.5), ("cookie", 3.6, 4.0), ("thing", 7.0, 7.5)]
    transcript = Transcript("x", tuple(Word(w, b, e, 0.3 if w == "thing" else 0.9) for w, b, e in words),
                            spans=((0.0, 4.2), (6.8, 7.6)))
    f = dict(zip(FEATURE_NAMES, linguistic_features(transcript), strict=True))
    assert f["words"] == 10
    assert f["speech_rate_wpm"] == pytest.approx(10 / 7.6 * 60)
    assert f["pauses_per_min"] == pytest.approx(60 / 7.6)  # the 1.1 s gap; 4.0 -> 7.0 crosses to the next span
    assert f["pause_mean_s"] == pytest.approx(1.1) and f["pause_longest_s"] == pytest.approx(1.1)
    assert f["span_gap_mean_s"] == pytest.approx(2.6)
    assert f["filled_pauses_per_100w"] == pytest.approx(10) and f["empty_words_per_100w"] == pytest.approx(10)
    assert f["repetitions_per_100w"] == pytest.approx(10)  # "the boy the boy"
    assert f["type_token_ratio"] == pytest.approx(8 / 10)
    assert f["information_units"] == 3  # boy, cookie, boy taking cookie
    assert f["asr_low_confidence_share"] == pytest.approx(0.1)
    assert information_units("the water is overflowing and the stool is tipping over") == {
        "water", "stool", "water overflowing", "stool falling"}
    empty = dict(zip(FEATURE_NAMES, linguistic_features(Transcript("e", ())), strict=True))
    assert all(v == 0 for v in empty.values())


def test_linguistic_source_wins_the_joint_study_and_predicts_from_wav(planted, tiny_model, tmp_path):
    """Only the linguistic markers differ: the linguistic source should beat the tiny acoustic model, and the
    exported linguistic model must give a WAV file exactly the score its cache row gets."""
    root = planted["root"]
    result = run("extract", planted["manifest"], "--model", tiny_model, "-o", root / "cache")
    assert result.exit_code == 0, result.output
    acoustic = next(p for p in (root / "cache").iterdir() if "linguistic" not in p.name)
    url = f"sqlite:///{tmp_path / 'j.db'}"
    result = run("search", "--cache", f"acoustic={acoustic}", "--cache", f"linguistic={planted['linguistic'].path}",
                 "--space", Path(__file__).parents[1] / "studies" / "default.yaml", "--study", "joint",
                 "--storage", url, "--trials", 40, "--workers", 1)
    assert result.exit_code == 0, result.output
    import optuna

    trials = optuna.load_study(study_name="joint", storage=url).get_trials(deepcopy=False)
    best = {s: max(t.value for t in trials if t.value is not None and t.params.get("source") == s)
            for s in ("acoustic", "linguistic")}
    assert best["linguistic"] > best["acoustic"] + 0.1, best
    # one vector per recording: the linguistic trials choose no pooling or unit (each would give that vector)
    assert planted["linguistic"].one_vector and not open_cache(acoustic).one_vector
    by_source = {s: [t for t in trials if t.params.get("source") == s] for s in ("acoustic", "linguistic")}
    assert not any({"pooling", "unit"} & set(t.params) for t in by_source["linguistic"])
    assert all("pooling" in t.params for t in by_source["acoustic"])

    out = tmp_path / "best"
    result = run("export", "--study", "joint", "--storage", url, "-o", out)
    assert result.exit_code == 0, result.output
    from adsearch.results.schema import load_config

    config = load_config(out)
    assert config.features.source == "linguistic" and config.transcripts.backend == "whisper"
    assert (config.features.pooling, config.features.unit) == ("mean", "recording")
    report = (out / "report.html").read_text()
    assert "Features that separate the groups" in report and "filled_pauses_per_100w" in report
    result = run("evaluate", out, "--cache", planted["linguistic"].path)
    assert result.exit_code == 0 and "reproduced exactly" in result.output, result.output
    test = json.loads((out / "test.json").read_text())
    rec = next(r for r in read_manifest(planted["manifest"]) if r.split == "test")
    result = run("predict", out, rec.path, "--segments", planted["manifest"], "-o", tmp_path / "p.csv")
    assert result.exit_code == 0, result.output
    row = next(csv.DictReader((tmp_path / "p.csv").open()))
    assert not row["error"] and row["n_windows"] == "1"
    expected = next(p for p in test["predictions"] if p["id"] == rec.id)
    score = float(row["prob_ad"] or row["decision"])
    assert score == pytest.approx(expected["score"], abs=1e-6)


def test_ngram_source_weighs_counts_inside_the_folds_and_predicts_from_wav(planted, tmp_path):
    result = run("extract", planted["manifest"], "--features", "ngrams", "--transcripts", planted["transcripts"].path,
                 "-o", tmp_path / "cache")
    assert result.exit_code == 0, result.output
    cache = open_cache(next((tmp_path / "cache").iterdir()))
    vocabulary = cache.meta["feature_names"]
    assert "cookie jar" in vocabulary and cache.dim == len(vocabulary)
    train_words = {t for r in read_manifest(planted["manifest"]) if r.split == "train"
                   for t in tokens(planted["transcripts"].get(r.id).text)}
    assert {g for g in vocabulary if " " not in g} <= train_words  # the test split never chooses a column
    url = f"sqlite:///{tmp_path / 'n.db'}"
    space = tmp_path / "space.yaml"
    space.write_text("space: {scale: [tfidf], pooling: [mean], classifiers: {logreg: {}, linear_svm: {}}}\n"
                     "screen: {enabled: false}\n")
    result = run("search", "--cache", cache.path, "--space", space, "--study", "ngrams", "--storage", url,
                 "--trials", 6)
    assert result.exit_code == 0 and "6/6 finished (6 complete" in result.output, result.output
    out = tmp_path / "best"
    assert run("export", "--study", "ngrams", "--storage", url, "-o", out).exit_code == 0
    from adsearch.results.model_files import load_model
    from adsearch.results.schema import load_config

    config = load_config(out)
    assert config.features.vocabulary == vocabulary and config.pipeline.scale == "tfidf"
    assert type(load_model(out / "model.skops").steps[0][1]).__name__ == "TfidfWeighting"
    rec = next(r for r in read_manifest(planted["manifest"]) if r.split == "test")
    result = run("predict", out, rec.path, "--segments", planted["manifest"], "-o", tmp_path / "p.csv")
    assert result.exit_code == 0, result.output
    row = next(csv.DictReader((tmp_path / "p.csv").open()))
    expected = next(p for p in json.loads((out / "test.json").read_text())["predictions"] if p["id"] == rec.id)
    assert float(row["prob_ad"] or row["decision"]) == pytest.approx(expected["score"], abs=1e-6)


def test_text_encoder_layers_search_like_any_source(planted, tmp_path):
    from adsearch.embed.text import save_tiny_bert

    bert = save_tiny_bert(tmp_path / "bert")
    result = run("extract", planted["manifest"], "--features", "text", "--text-model", bert,
                 "--transcripts", planted["transcripts"].path, "-o", tmp_path / "cache")
    assert result.exit_code == 0, result.output
    cache = open_cache(next((tmp_path / "cache").iterdir()))
    assert cache.n_layers == 3 and cache.dim == 32 and cache.meta["transcripts"]["source"]["backend"] == "whisper"
    url = f"sqlite:///{tmp_path / 't.db'}"
    result = run("search", "--cache", cache.path, "--space", Path(__file__).parents[1] / "studies" / "default.yaml",
                 "--study", "text", "--storage", url, "--trials", 8)
    assert result.exit_code == 0, result.output
    assert "8/8 finished" in result.output


def test_ctc_backend_with_a_tiny_ctc_model(synth_manifest, tmp_path):
    assert run("model", "tiny", tmp_path / "ctc", "--kind", "wav2vec2-ctc").exit_code == 0
    result = run("transcribe", synth_manifest, "-o", tmp_path / "out", "--asr", "ctc", "--model", tmp_path / "ctc")
    assert result.exit_code == 0, result.output
    found = open_transcripts(tmp_path / "out")
    assert found.source["backend"] == "ctc" and len(found.ids) == len(read_manifest(synth_manifest))
    rec = read_manifest(synth_manifest)[0]
    words = found.get(rec.id).words
    assert words and all(b - 0.05 <= w.start <= w.end <= e + 0.05 for w in words
                         for b, e in [next(s for s in rec.segments if s[0] - 0.05 <= w.start <= s[1] + 0.05)])
    assert all("<" not in w.text for w in words)  # special tokens never become words


def test_transcribe_refuses_bad_input(synth_manifest, tmp_path):
    result = run("transcribe", synth_manifest, "-o", tmp_path, "--asr", "kaldi")
    assert result.exit_code == 2 and "choose whisper or ctc" in result.output
    result = run("transcribe", synth_manifest, "-o", tmp_path, "--device", "gpu")
    assert result.exit_code == 2 and "choose auto, cpu, cuda" in result.output
    result = run("transcribe", synth_manifest, "-o", tmp_path, "--model", tmp_path / "nothing")
    assert result.exit_code == 2 and "not found" in result.output
    (tmp_path / "empty").mkdir()
    result = run("transcribe", synth_manifest, "-o", tmp_path, "--model", tmp_path / "empty")
    assert result.exit_code == 2 and "no model.bin" in result.output
    result = run("extract", synth_manifest, "--features", "linguistic", "-o", tmp_path / "c")
    assert result.exit_code == 2 and "--transcripts" in result.output
    result = run("extract", synth_manifest, "--features", "linguistic", "--transcripts", tmp_path / "empty",
                 "-o", tmp_path / "c")
    assert result.exit_code == 2 and "adsearch transcribe" in result.output


def test_whisper_encoder_layers_pool_real_frames_only(tmp_path):
    """A tiny random Whisper: its encoder layers become a cache; the 30 s padding never enters a statistic."""
    import torch

    from adsearch.embed.encoder import WindowEncoder
    from adsearch.embed.extract import ExtractSettings, extract
    from adsearch.embed.model import resolve_model

    assert run("model", "tiny", tmp_path / "whisper", "--kind", "whisper").exit_code == 0
    encoder = WindowEncoder(resolve_model(str(tmp_path / "whisper")), "cpu", "float32")
    audio = speechlike(2.0)
    n_frames, stats = encoder.encode([audio])
    assert n_frames.tolist() == [100]  # 2 s at 50 frames per second, not the 1,500 of 30 s
    features = encoder.extractor([audio], sampling_rate=16_000, return_tensors="pt")["input_features"]
    with torch.inference_mode():
        hidden = encoder.model(features, output_hidden_states=True).hidden_states
    for layer in (0, 2, 4):
        np.testing.assert_allclose(stats["mean"][layer, 0], hidden[layer][0, :100].mean(0).numpy(), rtol=1e-4,
                                   atol=1e-5)
        assert not np.allclose(stats["mean"][layer, 0], hidden[layer][0].mean(0).numpy(), atol=1e-3)
    with pytest.raises(ValueError, match="at most 30 s"):
        encoder.encode([speechlike(31.0)])

    rows = [f"r{i},{write_wav(tmp_path / f'r{i}.wav', speechlike(3.0, seed=i))},{i % 2},r{i},train" for i in range(10)]
    (tmp_path / "c.csv").write_text("id,path,label,group,split\n" + "\n".join(rows) + "\n")
    cache = open_cache(extract(tmp_path / "c.csv", tmp_path / "cache", str(tmp_path / "whisper"),
                               ExtractSettings(window_s=20)).cache_dir)
    assert cache.n_layers == 5 and cache.dim == 32 and "padded frames are never pooled" in str(cache.meta["layers"])
    result = run("search", "--cache", cache.path, "--space", Path(__file__).parents[1] / "studies" / "default.yaml",
                 "--study", "whisper", "--storage", f"sqlite:///{tmp_path / 'w.db'}", "--trials", 6)
    assert result.exit_code == 0 and "6/6 finished" in result.output, result.output


def test_a_one_vector_source_is_screened_in_one_pooling_column(planted):
    """Every pooling of one vector per recording is that vector (or zeros): the screen probes one column,
    leaves the others NaN, never ranks them, and the study attribute keeps them (as null, JSON has no NaN)."""
    from adsearch.search.objective import FeatureSource
    from adsearch.search.protocol import assign_folds
    from adsearch.search.screen import ScreenResult, screen, starting_points
    from adsearch.search.space import parse_spec

    source = FeatureSource(planted["linguistic"])
    folds = assign_folds(source.labels, source.groups, 3, 1, 0)
    poolings = ["std", "mean+std", "mean", "max"]
    result = screen(source, folds, (0,), poolings, "balanced_accuracy", one_vector=True)
    assert np.isfinite(result.linear[0]).tolist() == [False, False, True, False]
    assert [cell["pooling"] for cell in result.top(4)] == ["mean"]
    stored = json.loads(json.dumps(result.to_attr(), allow_nan=False))
    again = ScreenResult.from_attr(stored)
    np.testing.assert_array_equal(again.linear, np.round(result.linear, 4))
    full = screen(source, folds, (0,), poolings, "balanced_accuracy")
    assert full.linear[0, 2] == result.linear[0, 2] and np.isfinite(full.linear).all()
    spec = parse_spec({"space": {"pooling": poolings, "unit": ["recording", "window"]}})
    assert "pooling" in starting_points(result, spec, 1)[0]
    assert not {"pooling", "unit"} & set(starting_points(result, spec, 1, one_vector=frozenset({None}))[0])
