import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import speechlike, write_rows, write_wav

from adsearch.corpus import read_manifest
from adsearch.embed import open_cache
from adsearch.embed.cache import CacheError, stat_path
from adsearch.embed.encoder import WindowEncoder
from adsearch.embed.extract import ExtractSettings, extract
from adsearch.embed.model import ModelError, resolve_model
from adsearch.embed.windows import Window, make_batches, plan_windows
from adsearch.io.audio import SAMPLE_RATE, load_audio


@pytest.fixture(scope="module")
def cache(synth_manifest, tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    extract(synth_manifest, root, str(tiny_model), ExtractSettings(window_s=3.0), batch_size=4)
    return open_cache(root)


def direct_hidden_states(model_dir, windows):
    """Reference: each window alone through the model (no padding, no batching)."""
    encoder = WindowEncoder(resolve_model(str(model_dir)), "cpu", "float32")
    states = []
    for w in windows:
        inputs = encoder.extractor(w, sampling_rate=SAMPLE_RATE, return_tensors="pt")
        with torch.inference_mode():
            out = encoder.model(inputs["input_values"], attention_mask=inputs.get("attention_mask"),
                                output_hidden_states=True)
        states.append(torch.stack(out.hidden_states)[:, 0].numpy())  # (L, T, D)
    return states


def test_plan_windows_splits_evenly_inside_segments_and_drops_short_spans():
    windows = plan_windows([(0.0, 5.0), (6.0, 6.3), (7.0, 8.0)], 10 * SAMPLE_RATE, window_s=2.0, min_window_s=0.5)
    lengths = [(b - a) / SAMPLE_RATE for a, b in windows]
    assert lengths == pytest.approx([5 / 3] * 3 + [1.0], abs=1 / SAMPLE_RATE)  # 5 s -> 3 even; 0.3 s dropped
    assert windows[0][0] == 0 and windows[2][1] == 5 * SAMPLE_RATE and windows[3] == (7 * SAMPLE_RATE, 8 * SAMPLE_RATE)
    assert plan_windows([], 3 * SAMPLE_RATE, 20.0, 0.5) == [(0, 3 * SAMPLE_RATE)]
    assert plan_windows([(0.0, 9.0)], 4 * SAMPLE_RATE, 20.0, 0.5) == [(0, 4 * SAMPLE_RATE)]  # clipped to audio


def test_cache_holds_every_hidden_state_and_describes_them(cache, tiny_model):
    config = resolve_model(str(tiny_model))
    assert cache.n_layers == 4 + 1 and cache.dim == 32
    assert "input to the first transformer layer" in cache.meta["layers"]["meaning"]["0"]
    assert cache.meta["model"]["revision"] == config.revision
    assert len(cache.ids) == 16 and set(cache.splits) == {"train", "test"}
    assert cache.meta["versions"]["transformers"].startswith("5.")
    assert len(cache.window_item) == cache.meta["n_windows"] == np.load(stat_path(cache.path, "mean", 0)).shape[0]


@pytest.mark.parametrize("layer", [0, 2, 4])
def test_recording_pooling_equals_pooling_all_frames_directly(cache, tiny_model, layer):
    item = 1
    rec_path = cache.meta["items"][item]["path"]
    audio = load_audio(rec_path)
    rows = np.flatnonzero(cache.window_item == item)
    assert len(rows) > 1, "the test needs a recording that spans several windows"
    starts = np.asarray(cache.meta["windows"]["start_sample"])[rows]
    ends = np.asarray(cache.meta["windows"]["end_sample"])[rows]
    states = direct_hidden_states(tiny_model, [audio[a:b] for a, b in zip(starts, ends, strict=True)])
    frames = np.concatenate([s[layer] for s in states]).astype(np.float64)  # all frames of the recording
    expected = {
        "mean": frames.mean(0), "std": frames.std(0), "max": frames.max(0), "min": frames.min(0),
    }
    for pooling, names in [("mean", ["mean"]), ("std", ["std"]), ("mean+std+max", ["mean", "std", "max"]),
                           ("min+max", ["min", "max"])]:
        got = cache.recording_features(layer, pooling)[item]
        np.testing.assert_allclose(got, np.concatenate([expected[n] for n in names]), rtol=1e-5, atol=1e-5)
    window = cache.window_features(layer, "mean+std")[rows[0]]
    np.testing.assert_allclose(window, np.concatenate([states[0][layer].mean(0), states[0][layer].std(0)]),
                               rtol=1e-5, atol=1e-5)


def test_padded_batch_equals_unpadded_items_for_layer_norm_model(tiny_model):
    encoder = WindowEncoder(resolve_model(str(tiny_model)), "cpu", "float32")
    assert encoder.masked
    windows = [speechlike(2.3, seed=1), speechlike(0.7, seed=2), speechlike(1.6, seed=3)]
    n_frames, batched = encoder.encode(windows)
    assert list(n_frames) == [int((len(w) - 400) // 320 + 1) for w in windows]
    for j, window in enumerate(windows):
        _, alone = encoder.encode([window])
        for stat in ("mean", "m2", "max", "min"):
            np.testing.assert_allclose(batched[stat][:, j], alone[stat][:, 0], rtol=1e-4, atol=1e-4)


def test_stable_layer_norm_last_hidden_state_is_pre_final_norm(tiny_model):
    """Pins the transformers 5 behaviour the cache metadata documents for layer N."""
    encoder = WindowEncoder(resolve_model(str(tiny_model)), "cpu", "float32")
    inputs = encoder.extractor(speechlike(1.0), sampling_rate=SAMPLE_RATE, return_tensors="pt")
    with torch.inference_mode():
        out = encoder.model(inputs["input_values"], output_hidden_states=True)
        normed = encoder.model.encoder.layer_norm(out.hidden_states[-1])
    assert len(out.hidden_states) == encoder.model.config.num_hidden_layers + 1
    torch.testing.assert_close(out.last_hidden_state, normed)


@pytest.fixture(scope="module")
def group_norm_model(tmp_path_factory):
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("models") / "groupnorm"
    config = Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                            conv_dim=(32,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
                            feat_extract_norm="group", do_stable_layer_norm=False)
    Wav2Vec2Model(config).save_pretrained(out)
    Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=False).save_pretrained(out)
    return out


def test_group_norm_model_only_batches_equal_lengths(group_norm_model, tmp_path):
    encoder = WindowEncoder(resolve_model(str(group_norm_model)), "cpu", "float32")
    assert not encoder.masked
    with pytest.raises(ValueError, match="equal-length"):
        encoder.encode([speechlike(1.0), speechlike(1.5)])
    windows = [Window(i, 0, n, np.zeros(n, np.float32)) for i, n in enumerate([800, 1600, 800, 1600, 1200])]
    batches = list(make_batches(windows, batch_size=8, equal_lengths=True))
    assert sorted(len(b) for b in batches) == [1, 2, 2]
    assert all(len({len(w.audio) for w in b}) == 1 for b in batches)
    # Extraction through the group-norm path gives the same numbers as one window at a time.
    write_wav(tmp_path / "a.wav", speechlike(4.0, seed=5))
    manifest = write_rows(tmp_path / "m.csv", ["id", "path", "label", "group", "split", "segments"],
                          [["a", "a.wav", 1, "a", "train", "0-2;2.5-4"]])
    got = open_cache(extract(manifest, tmp_path / "c", str(group_norm_model), ExtractSettings(window_s=1.0)).cache_dir)
    audio = load_audio(tmp_path / "a.wav")
    _, alone = encoder.encode([audio[:16000]])
    np.testing.assert_allclose(got.window_stat(1, "mean")[0], alone["mean"][1, 0], rtol=1e-5, atol=1e-5)


def test_bad_files_are_reported_and_skipped(tmp_path, tiny_model):
    write_wav(tmp_path / "good1.wav", speechlike(3.0, seed=1))
    write_wav(tmp_path / "good2.wav", speechlike(2.0, seed=2), 44_100)
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunk")
    write_wav(tmp_path / "empty.wav", np.zeros(0, np.float32))
    write_wav(tmp_path / "short.wav", speechlike(0.2))
    rows = [[name, f"{name}.wav", i % 2, name, "train", ""] for i, name in
            enumerate(["good1", "corrupt", "empty", "short", "good2"])]
    manifest = write_rows(tmp_path / "m.csv", ["id", "path", "label", "group", "split", "segments"], rows)
    result = extract(manifest, tmp_path / "cache", str(tiny_model))
    reasons = {f.id: f.reason for f in result.failures}
    assert set(reasons) == {"corrupt", "empty", "short"}
    assert "cannot decode" in reasons["corrupt"] and "no audio samples" in reasons["empty"]
    assert "too short" in reasons["short"]
    cache = open_cache(result.cache_dir)
    assert cache.ids == ["good1", "good2"]
    assert {f["id"] for f in cache.meta["failures"]} == {"corrupt", "empty", "short"}


def test_other_settings_or_models_never_overwrite_a_cache(synth_manifest, tiny_model, tmp_path):
    from adsearch.embed.model import save_tiny_model

    other_model = save_tiny_model(tmp_path / "other", seed=1)
    a = extract(synth_manifest, tmp_path / "c", str(tiny_model), ExtractSettings(window_s=20))
    hash_a = open_cache(a.cache_dir).content_hash
    b = extract(synth_manifest, tmp_path / "c", str(tiny_model), ExtractSettings(window_s=5))
    c = extract(synth_manifest, tmp_path / "c", str(other_model), ExtractSettings(window_s=20))
    assert len({a.cache_dir, b.cache_dir, c.cache_dir}) == 3
    assert open_cache(a.cache_dir).content_hash == hash_a
    again = extract(synth_manifest, tmp_path / "c", str(tiny_model), ExtractSettings(window_s=20))
    assert again.cache_dir == a.cache_dir and again.n_computed == 0
    with pytest.raises(CacheError, match="holds 3 caches"):
        open_cache(tmp_path / "c")


class Recorder:
    def __init__(self):
        self.started = None

    def start(self, n_recordings, audio_seconds, n_done):
        self.started = (n_recordings, n_done)

    def advance(self, n_recordings, audio_seconds):
        pass


@pytest.mark.slow
def test_killed_extraction_resumes_without_recomputing(synth_manifest, tiny_model, tmp_path):
    root = tmp_path / "cache"
    command = [sys.executable, "-m", "adsearch.cli", "extract", str(synth_manifest), "--model", str(tiny_model),
               "-o", str(root), "--window-s", "0.5", "--min-window-s", "0.1", "--batch-size", "1"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def finished_parts() -> set[str]:  # a part being written is `{id}.npz.tmp.npz` until its rename
        return {p.stem for p in root.glob("*/parts/*.npz") if not p.name.endswith(".tmp.npz")}

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(finished_parts()) < 3 and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "extraction finished before it could be killed"
    done_before = finished_parts()
    assert 3 <= len(done_before) < 16
    assert not list(root.glob("*/cache.json"))
    with pytest.raises(CacheError, match="has not finished"):
        open_cache(root)

    recorder = Recorder()
    settings = ExtractSettings(window_s=0.5, min_window_s=0.1)
    result = extract(synth_manifest, root, str(tiny_model), settings, batch_size=1, progress=recorder)
    assert recorder.started == (16, len(done_before))
    assert result.n_computed == 16 - len(done_before)
    resumed = open_cache(result.cache_dir)
    clean = open_cache(extract(synth_manifest, tmp_path / "clean", str(tiny_model), settings, batch_size=1).cache_dir)
    assert resumed.ids == clean.ids == [r.id for r in read_manifest(synth_manifest)]
    for layer in (0, 4):
        np.testing.assert_allclose(resumed.recording_features(layer, "mean+std+max"),
                                   clean.recording_features(layer, "mean+std+max"), rtol=1e-5, atol=1e-5)
    assert not (result.cache_dir / "parts").exists()


def test_reader_touches_only_the_requested_layer_and_statistic(cache, monkeypatch, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(cache.path, copy)
    expected = cache.recording_features(2, "mean")
    for path in (copy / "stats").rglob("*.npy"):
        if path != stat_path(copy, "mean", 2):
            path.write_bytes(b"garbage")  # any read of another layer or statistic would fail
    opened = []
    real_load = np.load
    monkeypatch.setattr(np, "load", lambda p, *a, **k: opened.append(p) or real_load(p, *a, **k))
    reopened = open_cache(copy)
    np.testing.assert_array_equal(reopened.recording_features(2, "mean"), expected)
    assert isinstance(reopened.window_stat(2, "mean"), np.memmap)
    assert opened == [stat_path(copy, "mean", 2)] * 2


def test_reader_rejects_unknown_pooling_and_layer(cache):
    with pytest.raises(CacheError, match="unknown pooling 'median'"):
        cache.recording_features(0, "median")
    with pytest.raises(CacheError, match="outside this cache's layers 0..4"):
        cache.window_stat(5, "mean")


def test_missing_model_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="model directory not found"):
        resolve_model(str(tmp_path / "nope/"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))


@pytest.mark.parametrize("pooling", ["mean+std+max", "min+max", "std"])
def test_features_of_item_subsets_equal_slices_of_all(cache, pooling):
    items = np.array([7, 2, 11, 3])  # unsorted on purpose
    np.testing.assert_array_equal(cache.recording_features(3, pooling, items),
                                  cache.recording_features(3, pooling)[items])
    rows = cache.windows_of(items)
    np.testing.assert_array_equal(cache.window_features(3, pooling, items), cache.window_features(3, pooling)[rows])
    assert set(cache.window_item[rows]) == set(items.tolist())


@pytest.mark.parametrize("pooling", ["mean+std+max", "min+max"])
def test_features_read_in_small_chunks_equal_one_read(cache, pooling, monkeypatch):
    import adsearch.embed.cache as cache_module

    whole = cache.recording_features(2, pooling), cache.window_features(2, pooling)
    items = np.arange(1, len(cache.ids), 2)
    subset = cache.recording_features(2, pooling, items), cache.window_features(2, pooling, items)
    monkeypatch.setattr(cache_module, "CHUNK_WINDOWS", 2)  # many chunks, cut at recording boundaries
    assert len(cache._chunks(cache.windows_of(None))) > 3
    np.testing.assert_array_equal(cache.recording_features(2, pooling), whole[0])
    np.testing.assert_array_equal(cache.window_features(2, pooling), whole[1])
    np.testing.assert_array_equal(cache.recording_features(2, pooling, items), subset[0])
    np.testing.assert_array_equal(cache.window_features(2, pooling, items), subset[1])


@pytest.mark.parametrize("family", ["hubert", "wavlm"])
def test_other_wav2vec2_family_models_extract_the_same_way(family, tmp_path):
    from transformers import (
        HubertConfig,
        HubertModel,
        Wav2Vec2FeatureExtractor,
        WavLMConfig,
        WavLMModel,
    )

    config_class, model_class = {"hubert": (HubertConfig, HubertModel), "wavlm": (WavLMConfig, WavLMModel)}[family]
    torch.manual_seed(0)
    config = config_class(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                          conv_dim=(32,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
                          feat_extract_norm="layer", do_stable_layer_norm=True)
    model_class(config).eval().save_pretrained(tmp_path / "model")
    Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True).save_pretrained(tmp_path / "model")
    write_wav(tmp_path / "a.wav", speechlike(3.0, seed=1))
    manifest = write_rows(tmp_path / "m.csv", ["id", "path", "label", "group", "split"],
                          [["a", "a.wav", 1, "a", "train"]])
    result = extract(manifest, tmp_path / "c", str(tmp_path / "model"), ExtractSettings(window_s=1.0))
    cache = open_cache(result.cache_dir)
    assert cache.n_layers == 4 and cache.meta["model"]["model_type"] == family
    assert cache.recording_features(3, "mean+std").shape == (1, 64)
    encoder = WindowEncoder(resolve_model(str(tmp_path / "model")), "cpu", "float32")
    _, batched = encoder.encode([speechlike(1.3, seed=2), speechlike(0.6, seed=3)])
    _, alone = encoder.encode([speechlike(0.6, seed=3)])
    np.testing.assert_allclose(batched["mean"][:, 1], alone["mean"][:, 0], rtol=1e-4, atol=1e-4)


def test_hub_id_loads_from_the_local_hugging_face_cache(tiny_model, tmp_path, monkeypatch):
    """A model id resolves offline to its snapshot in the HF cache; the commit hash becomes the revision."""
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-w2v"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(tiny_model, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    source = resolve_model("someone/tiny-w2v")
    assert source.revision == commit and source.path == snapshot
    encoder = WindowEncoder(source, "cpu", "float32")
    assert encoder.n_layers == 5
    with pytest.raises(ModelError, match="neither a local directory nor in the Hugging Face cache"):
        resolve_model("someone/not-there")


def _same_cache(a: Path, b: Path) -> None:
    """Bit for bit: every array file, and cache.json but for its creation time."""
    meta_a, meta_b = (json.loads((d / "cache.json").read_text()) for d in (a, b))
    assert meta_a.pop("created") and meta_b.pop("created")
    assert meta_a == meta_b
    for name in meta_a["files"]:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def _extract_command(manifest, model, out, *extra) -> list[str]:
    return [sys.executable, "-m", "adsearch.cli", "extract", str(manifest), "--model", str(model), "-o", str(out),
            "--window-s", "1", "--min-window-s", "0.1", *extra]


@pytest.mark.slow
def test_shards_extracted_concurrently_equal_one_run_bit_for_bit(synth_manifest, tiny_model, tmp_path):
    shards = [subprocess.Popen(_extract_command(synth_manifest, tiny_model, tmp_path / "sharded", "--shard", f"{k}/2"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(2)]
    outputs = [p.communicate(timeout=300) for p in shards]
    assert all(p.returncode == 0 for p in shards), outputs
    # no final step: whichever shard finished last consolidated
    assert sum("still to go" in out for out, _ in outputs) <= 1
    sharded = open_cache(tmp_path / "sharded")
    assert not (sharded.path / "parts").exists()
    whole = subprocess.run(_extract_command(synth_manifest, tiny_model, tmp_path / "whole"), capture_output=True,
                           text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr
    _same_cache(sharded.path, open_cache(tmp_path / "whole").path)


@pytest.mark.slow
def test_two_unsharded_extractions_into_one_folder_both_succeed(synth_manifest, tiny_model, tmp_path):
    runs = [subprocess.Popen(_extract_command(synth_manifest, tiny_model, tmp_path / "shared"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in runs]
    assert all(p.returncode == 0 for p in runs), outputs
    assert all("(16 recordings)" in out for out, _ in outputs)
    clean = subprocess.run(_extract_command(synth_manifest, tiny_model, tmp_path / "clean"), capture_output=True,
                           text=True, timeout=300)
    assert clean.returncode == 0, clean.stderr
    _same_cache(open_cache(tmp_path / "shared").path, open_cache(tmp_path / "clean").path)


def test_shards_cover_the_manifest_once(synth_manifest):
    from adsearch.work import parse_shard, shard_of

    recordings = read_manifest(synth_manifest)
    pieces = [shard_of(recordings, (k, 3)) for k in range(3)]
    ids = [r.id for piece in pieces for r in piece]
    assert sorted(ids) == sorted(r.id for r in recordings) and len(set(ids)) == len(ids)
    assert parse_shard(" 2/3") == (2, 3)
    for bad in ("3/3", "-1/3", "1", "a/b", "1/0"):
        with pytest.raises(ValueError, match="K/N"):
            parse_shard(bad)


def test_a_claim_is_exclusive_between_processes_and_dies_with_its_process(tmp_path):
    from adsearch.work import Claim

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from adsearch.work import Claim\n"
        f"assert Claim(Path({str(tmp_path / 'x.lock')!r})).take(); print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    assert not Claim(tmp_path / "x.lock").take()
    holder.kill()
    holder.wait()
    assert Claim(tmp_path / "x.lock").take()  # the kernel dropped the killed process's lock


def test_a_model_folder_is_hashed_once_until_a_weight_file_changes(tmp_path, monkeypatch):
    """resolve_model remembers the weights' content hash by the files' size and mtime: a second resolve of the
    same folder reads no weight byte; rewriting a file (same name) is noticed and hashed again."""
    import os

    from adsearch.embed.model import resolve_model, save_tiny_model

    folder = save_tiny_model(tmp_path / "tiny")
    first = resolve_model(str(folder)).revision
    opened = []
    real_open = Path.open

    def spy(self, *args, **kwargs):
        opened.append(self.name)
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", spy)
    assert resolve_model(str(folder)).revision == first and not opened
    weights = next(folder.glob("*.safetensors"))
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit flipped, same size
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1_000_000))
    changed = resolve_model(str(folder)).revision
    assert changed != first and weights.name in opened


def test_parallel_loaders_give_the_cache_of_one_loader_bit_for_bit(synth_manifest, tiny_model, tmp_path):
    """Audio decoded by four threads, several groups ahead, gives exactly the cache one thread gives (the
    groups and their windows come out in order), with a decoding failure reported as before."""
    from adsearch.corpus import read_manifest, write_manifest

    recordings = read_manifest(synth_manifest)
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunk")
    from dataclasses import replace

    manifest = write_manifest([*recordings[:6], replace(recordings[6], path=broken), *recordings[7:]],
                              tmp_path / "corpus.csv")
    settings = ExtractSettings(window_s=2.0)
    one = extract(manifest, tmp_path / "one", str(tiny_model), settings, batch_size=2, loaders=1)
    four = extract(manifest, tmp_path / "four", str(tiny_model), settings, batch_size=2, loaders=4)
    assert [f.id for f in one.failures] == [f.id for f in four.failures] == [recordings[6].id]
    assert "cannot decode" in four.failures[0].reason
    _same_cache(one.cache_dir, four.cache_dir)


def test_one_recording_and_hundreds_of_short_ones_extract_with_parallel_loaders(tiny_model, tmp_path,
                                                                               monkeypatch):
    from adsearch.embed.encoder import WindowEncoder

    rows = []
    for i in range(200):
        write_wav(tmp_path / f"r{i}.wav", speechlike(0.6 + (i % 5) * 0.1, seed=i))
        rows.append([f"r{i}", f"r{i}.wav", i % 2, f"s{i}", "train", ""])
    many = write_rows(tmp_path / "many.csv", ["id", "path", "label", "group", "split", "segments"], rows)
    single = write_rows(tmp_path / "single.csv", ["id", "path", "label", "group", "split", "segments"], rows[:1])
    settings = ExtractSettings(window_s=1.0, min_window_s=0.5)
    sizes = []
    real_submit = WindowEncoder.submit
    monkeypatch.setattr(WindowEncoder, "submit", lambda self, windows, *a: sizes.append(len(windows)) or
                        real_submit(self, windows, *a))
    cache = open_cache(extract(many, tmp_path / "c", str(tiny_model), settings, batch_size=8, loaders=3).cache_dir)
    # windows of several groups packed together: every batch full but the run's last
    assert sum(sizes) == len(cache.window_item) and set(sizes[:-1]) == {8} and 1 <= sizes[-1] <= 8
    assert cache.ids == [f"r{i}" for i in range(200)]
    assert (cache.window_item[1:] >= cache.window_item[:-1]).all()  # windows in recording order
    alone = open_cache(extract(single, tmp_path / "c1", str(tiny_model), settings, loaders=3).cache_dir)
    # alone it is a batch of one, among the others a padded batch of eight: equal up to float rounding
    np.testing.assert_allclose(alone.recording_features(2, "mean"), cache.recording_features(2, "mean")[:1],
                               rtol=1e-4, atol=1e-5)


def test_packed_batches_are_full_and_no_window_waits_twice():
    from adsearch.embed.windows import Window, pack_batches

    rng = np.random.default_rng(0)
    for batch_size in (1, 3, 16):
        carried, seen, batches = [], [], []
        for group in range(40):
            count = rng.integers(batch_size - 1, 4 * batch_size + 20)
            new = [Window(group, 0, int(n), np.zeros(0)) for n in rng.integers(400, 32_000, count)]
            full, carried = pack_batches(carried, new, batch_size)
            assert len(carried) < batch_size and all(w.item == group for w in carried)  # only this group's wait
            assert all(w.item >= group - 1 for batch in full for w in batch)  # a window waits one group at most
            batches += full
            seen += new
        batches.append(carried)
        # groups hold at least batch_size - 1 windows (extract's hold about four batches): all full but the last
        assert all(len(b) == batch_size for b in batches[:-1])
        assert sorted(map(id, (w for b in batches for w in b))) == sorted(map(id, seen))  # each window once
        # inside a batch, similar lengths (longest first within each group's windows): padding stays small
        assert np.mean([max(w.end for w in b) - min(w.end for w in b) for b in batches if b]) < 16_000


def test_inputs_normalised_on_the_device_equal_the_feature_extractors(tiny_model):
    """The GPU path pads and normalises windows on the device; run on the CPU here, it gives what the
    wav2vec2 feature extractor gives (values and attention mask), and the same statistics up to rounding."""
    from adsearch.embed.encoder import WindowEncoder
    from adsearch.embed.model import resolve_model

    rng = np.random.default_rng(0)
    windows = [speechlike(2.0, seed=1), 3 * speechlike(1.3, seed=2) + 0.1, rng.normal(0, 0.01, 8000).astype(np.float32)]
    source = resolve_model(str(tiny_model))
    on_device = WindowEncoder(source, "cpu", "float32", normalise_on_device=True)
    assert on_device.normalise_on_device and not WindowEncoder(source, "cpu", "float32").normalise_on_device
    values, mask = on_device.device_inputs(windows)
    expected = on_device.extractor(windows, sampling_rate=16_000, padding=True, return_tensors="pt",
                                   return_attention_mask=True)
    np.testing.assert_allclose(values.numpy(), expected["input_values"].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(mask.numpy(), expected["attention_mask"].numpy())
    frames, stats = on_device.encode(windows)
    frames_cpu, stats_cpu = WindowEncoder(source, "cpu", "float32").encode(windows)
    np.testing.assert_array_equal(frames, frames_cpu)
    for name in stats:
        np.testing.assert_allclose(stats[name], stats_cpu[name], rtol=1e-4, atol=1e-4)


def test_the_gpu_path_run_on_the_cpu_gives_the_default_cache(synth_manifest, tiny_model, tmp_path):
    """What extraction does on CUDA (inputs normalised on the device, batches of several recordings'
    windows packed full, one batch in flight, statistics collected later), run on the CPU: the cache of
    the default path, up to float rounding."""
    from adsearch.embed.encoder import WindowEncoder
    from adsearch.embed.model import resolve_model

    settings = ExtractSettings(window_s=2.0)
    default = open_cache(extract(synth_manifest, tmp_path / "a", str(tiny_model), settings).cache_dir)
    gpu_like = WindowEncoder(resolve_model(str(tiny_model)), "cpu", "float32", normalise_on_device=True)
    packed = open_cache(extract(synth_manifest, tmp_path / "b", str(tiny_model), settings, batch_size=5,
                                encoder=gpu_like, loaders=2).cache_dir)
    assert packed.ids == default.ids and (packed.window_item == default.window_item).all()
    for layer in (0, default.n_layers - 1):
        for pooling in ("mean+std", "min+max"):
            np.testing.assert_allclose(packed.recording_features(layer, pooling),
                                       default.recording_features(layer, pooling), rtol=1e-4, atol=1e-4)


def test_the_cgroup_quota_and_the_affinity_mask_cap_the_threads(tmp_path, monkeypatch):
    from adsearch import threads

    # cgroup v2: a quota of 1.5 CPUs on the process's own group, none above it
    (tmp_path / "v2" / "job").mkdir(parents=True)
    (tmp_path / "v2" / "cpu.max").write_text("max 100000\n")
    (tmp_path / "v2" / "job" / "cpu.max").write_text("150000 100000\n")
    (tmp_path / "self-v2").write_text("0::/job\n")
    assert threads.cgroup_cpu_limit(tmp_path / "self-v2", tmp_path / "v2") == 1.5
    # cgroup v1: the cpu controller's quota, -1 (none) on the root
    (tmp_path / "v1" / "cpu,cpuacct" / "slurm").mkdir(parents=True)
    for folder, quota in (("", -1), ("slurm", 300000)):
        (tmp_path / "v1" / "cpu,cpuacct" / folder / "cpu.cfs_quota_us").write_text(f"{quota}\n")
        (tmp_path / "v1" / "cpu,cpuacct" / folder / "cpu.cfs_period_us").write_text("100000\n")
    (tmp_path / "self-v1").write_text("4:memory:/x\n3:cpu,cpuacct:/slurm\n")
    assert threads.cgroup_cpu_limit(tmp_path / "self-v1", tmp_path / "v1") == 3.0
    (tmp_path / "self-none").write_text("0::/\n")
    assert threads.cgroup_cpu_limit(tmp_path / "self-none", tmp_path / "v2") is None

    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: 1.5)
    assert threads.usable_cpus()[0] == min(2, len(os.sched_getaffinity(0)))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert threads.choose_threads(3).threads == 3 == torch.get_num_threads()
    with pytest.raises(ValueError, match="--threads 0"):
        threads.choose_threads(0)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads.choose_threads().how == "OMP_NUM_THREADS=1"
    monkeypatch.delenv("OMP_NUM_THREADS")
    threads.choose_threads()  # back to the default for the tests after this one


def test_openmp_waits_briefly_unless_the_user_chose_how(monkeypatch):
    from adsearch.threads import SPIN_COUNT, quiet_openmp

    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(name, raising=False)
    quiet_openmp()
    assert os.environ["GOMP_SPINCOUNT"] == SPIN_COUNT
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    quiet_openmp()
    assert "GOMP_SPINCOUNT" not in os.environ


@pytest.mark.slow
def test_the_default_threads_keep_the_cache_and_are_printed_and_recorded(synth_manifest, tiny_model,
                                                                          synth_cache_root, tmp_path):
    """On a process that may use every core, the default is torch's own thread count: the cache is the same
    bit for bit as before threads were chosen; one CPU in the affinity mask gives one thread."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    probe = "import torch; print(torch.get_num_threads())"
    torch_default = int(subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                                       check=True).stdout)
    done = subprocess.run([sys.executable, "-m", "adsearch.cli", "extract", str(synth_manifest), "--model",
                           str(tiny_model), "-o", str(tmp_path / "given"), "--threads", str(torch_default)],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0 and f"threads: {torch_default} (--threads" in done.stderr, done.stderr
    default = open_cache(synth_cache_root)
    _same_cache(default.path, open_cache(tmp_path / "given").path)
    assert default.meta["runtime"] == {"intra_op_threads": [torch_default]}

    one_cpu = subprocess.run(["taskset", "-c", "0", sys.executable, "-m", "adsearch.cli", "extract",
                              str(synth_manifest), "--model", str(tiny_model), "-o", str(tmp_path / "one")],
                             env=env, capture_output=True, text=True)
    assert one_cpu.returncode == 0 and "threads: 1 (1 CPU(s) in the affinity mask" in one_cpu.stderr, one_cpu.stderr
    assert open_cache(tmp_path / "one").meta["runtime"] == {"intra_op_threads": [1]}
