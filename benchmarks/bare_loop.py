"""The bare Hugging Face loop `benchmarks/extract.py --bare-loop` compares `adsearch extract` with: every recording
of a manifest decoded with soundfile, resampled to 16 kHz with soxr, cut into windows of at most 20 s, one
forward pass per window with `output_hidden_states=True`, the mean of every hidden state. No adsearch code runs.

    python benchmarks/bare_loop.py MANIFEST MODEL_FOLDER [--threads N] [--window-s 20]
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest", type=Path)
    parser.add_argument("model", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--window-s", type=float, default=20.0)
    args = parser.parse_args()

    import soundfile as sf
    import soxr
    import torch
    from transformers import AutoFeatureExtractor, AutoModel

    torch.set_num_threads(args.threads)
    extractor = AutoFeatureExtractor.from_pretrained(args.model)
    model = AutoModel.from_pretrained(args.model).eval()
    means = []
    with args.manifest.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        path = Path(row["path"])
        audio, rate = sf.read(args.manifest.parent / path if not path.is_absolute() else path, dtype="float32")
        if audio.ndim > 1:
            audio = audio.mean(axis=1)
        if rate != 16_000:
            audio = soxr.resample(audio, rate, 16_000)
        pieces = math.ceil(len(audio) / (args.window_s * 16_000))
        bounds = np.linspace(0, len(audio), pieces + 1).round().astype(int)
        for begin, end in zip(bounds[:-1], bounds[1:], strict=True):
            inputs = extractor(audio[begin:end], sampling_rate=16_000, return_tensors="pt")
            with torch.inference_mode():
                hidden = model(inputs["input_values"], output_hidden_states=True).hidden_states
            means.append([h[0].mean(0).numpy() for h in hidden])
    print(f"{len(rows)} recordings, {len(means)} windows")


if __name__ == "__main__":
    main()
