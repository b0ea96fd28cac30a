"""Fine-tuning speed and memory: audio seconds per second and peak memory of one fine-tuning epoch.

    python benchmarks/finetune.py cpu  --json benchmarks/results/finetune-cpu.json   # wav2vec2-base shape
    python benchmarks/finetune.py cuda --json benchmarks/results/finetune-cuda.json  # XLSR-large shape, bf16

The models are randomly initialised with the real architectures (no weights can be downloaded here); speed
and memory depend on the shape, not on the weights. The corpus is synthetic harmonic noise: `cpu` one
minute of audio in 12 recordings, `cuda` an ADReSSo-sized train split (166 recordings, about a minute each,
2.8 h). One epoch of `adsearch.finetune.train.train_one` (training windows, backward passes, the validation pass,
checkpointing) is timed; audio seconds counted are those trained on.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPES = {
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 feat_extract_norm="group", do_stable_layer_norm=False),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                  feat_extract_norm="layer", do_stable_layer_norm=True),
}


def _model(folder: Path, shape: str) -> Path:
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    torch.manual_seed(0)
    Wav2Vec2Model(Wav2Vec2Config(**SHAPES[shape])).save_pretrained(folder)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16_000, padding_value=0.0, do_normalize=True,
                             return_attention_mask=SHAPES[shape]["feat_extract_norm"] == "layer"
                             ).save_pretrained(folder)
    return folder


def _corpus(folder: Path, n: int, seconds: float, seed: int = 0):
    import soundfile as sf

    from adsearch.corpus import Recording

    rng = np.random.default_rng(seed)
    recordings = []
    for i in range(n):
        length = seconds * rng.uniform(0.7, 1.3)
        t = np.arange(int(length * 16_000)) / 16_000
        f0 = 110 + 40 * np.sin(2 * np.pi * 0.3 * t + i)
        audio = sum(np.sin(2 * np.pi * k * np.cumsum(f0) / 16_000) / k for k in range(1, 5))
        audio = 0.1 * audio * (0.5 + 0.5 * np.sin(2 * np.pi * 2.5 * t)) + 0.01 * rng.standard_normal(len(t))
        path = folder / f"r{i:03d}.wav"
        sf.write(path, audio.astype(np.float32), 16_000)
        recordings.append(Recording(f"r{i:03d}", path, i % 2, f"s{i:03d}", "train", None, ()))
    return recordings


def _peak_rss_mb() -> float:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM"))
    return int(line.split()[1]) / 1024


def run(kind: str, micro_batch: int | None = None, checkpointing: str | None = None,
        recordings: int | None = None, torch_profiler: bool = False) -> dict:
    import torch

    from adsearch.finetune.settings import FinetuneSettings
    from adsearch.finetune.train import train_one

    cuda = kind == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run `cpu` here")
    shape, n, seconds = ("large", 166, 60.0) if cuda else ("base", 12, 5.0)
    n = recordings or n
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = _model(work / "model", shape)
        recordings = _corpus(work, n, seconds)
        passes = {k: v for k, v in (("micro_batch", micro_batch), ("checkpointing", checkpointing)) if v is not None}
        settings = FinetuneSettings(epochs=1, batch_size=8 if cuda else 2, accumulate=1, window_s=10.0, **passes)
        Path("/proc/self/clear_refs").write_text("5")
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        profiler = None
        if torch_profiler:  # where the GPU's time goes inside the steps (the profile slows the epoch itself)
            from torch.profiler import ProfilerActivity, profile

            profiler = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))
            profiler.__enter__()
        started = time.perf_counter()
        record = train_one(model, recordings, work / "out", settings, "cuda" if cuda else "cpu")
        wall = time.perf_counter() - started
        if profiler is not None:
            profiler.__exit__(None, None, None)
            key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
            print(profiler.key_averages().table(sort_by=key, row_limit=20))
        result = {
            "kind": kind, "shape": shape, "recordings": n, "train_audio_s": record["audio_seconds_this_run"],
            "epoch_wall_s": wall, "audio_s_per_s": record["audio_seconds_this_run"] / wall,
            "peak_rss_mb": _peak_rss_mb(), "settings": {"batch_size": settings.batch_size, "window_s": 10.0,
                                                        "dtype": "bf16 autocast" if cuda else "float32"},
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            # what this adsearch chose and where the epoch went (absent from code older than issue 18)
            "passes": record.get("passes"), "seconds_by_part": record.get("seconds_by_part_this_run"),
        }
        if cuda:
            result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
            result["device"] = torch.cuda.get_device_name()
    print(json.dumps(result, indent=1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["cpu", "cuda"])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--recordings", type=int, help="default: 166 (cuda), 12 (cpu)")
    parser.add_argument("--micro-batch", type=int, help="windows per pass (default: adsearch's choice)")
    parser.add_argument("--checkpointing", choices=["auto", "on", "off"], help="default: adsearch's choice")
    parser.add_argument("--torch-profiler", action="store_true", help="print torch.profiler's operator table (use "
                                                                     "few --recordings: the profile holds every op)")
    args = parser.parse_args()
    result = run(args.kind, args.micro_batch, args.checkpointing, args.recordings, args.torch_profiler)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
