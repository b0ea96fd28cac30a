"""Extraction speed and memory: adsearch's windowed, batched extractor vs. a naive loop.

The naive loop is what most notebooks do: one whole recording at a time through the model with
`output_hidden_states=True`, then a mean per layer. Both run the same randomly initialised model (base
shape by default, layer-norm feature encoder) on the same speech-like audio, each case in a fresh
subprocess so peak memory is that case's alone. Reported: audio seconds per second of compute (model load
excluded), the ratio ours/naive, and peak RSS growth after the model is loaded.

    python benchmarks/extract.py                         # CPU: 8 x 10 s, then 1, 3 and 6 minutes
    python benchmarks/extract.py --durations 60 --short-n 4   # quicker
    python benchmarks/extract.py --size large --device cuda --dtype bfloat16   # GPU: large XLSR shape

On CUDA it also reports the fraction of the GPU's dense bf16 peak reached (FLOPs counted with torch's
FLOP counter on one window; give the peak with --peak-tflops, H100 SXM: 989).

An ADReSSo-sized corpus (237 recordings of 40-90 s at 22.05 kHz, 15,745 s of speech-like audio), the
measurement issue 18 starts from: `adsearch extract` end to end through the CLI (model loading included,
GPU busy share from nvidia-smi), the model's forward pass alone on 20 s windows with the data already on the
device (the ceiling), and forward plus the per-layer statistics:

    python benchmarks/extract.py --corpus-like adresso --size large --device cuda --dtype bfloat16
    python benchmarks/extract.py --corpus-like adresso --size tiny --corpus-scale 0.25   # CPU: a quarter

A shared CPU node (issue 27): `adsearch extract` end to end, quiet and with K busy processes on the machine,
with its default threads, with OMP_NUM_THREADS=1, and (--before TREE, a checkout of the older code put first
on PYTHONPATH) the older code's default, alternated in one run; and single-threaded and quiet, `adsearch
extract --threads 1` against a bare Hugging Face loop on the same windows (`benchmarks/bare_loop.py`), whole
processes both:

    git archive HEAD~ adsearch | (mkdir -p /tmp/before && tar -x -C /tmp/before)   # the code to compare with
    python benchmarks/extract.py --background-load 2 --before /tmp/before --sizes tiny,base
    python benchmarks/extract.py --bare-loop --sizes tiny,base
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

SIZES = {
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "tiny": {},  # adsearch's own tiny model (`adsearch model tiny`): what the demo and the tests extract with
}


def make_model(size: str, out: Path) -> Path:
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    if size == "tiny":
        from adsearch.embed.model import save_tiny_model

        return save_tiny_model(out)
    torch.manual_seed(0)
    config = Wav2Vec2Config(**SIZES[size], feat_extract_norm="layer", do_stable_layer_norm=True)
    Wav2Vec2Model(config).save_pretrained(out)
    Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True).save_pretrained(out)
    return out


def make_audio(seconds: float, path: Path, seed: int) -> Path:
    """Speech-like: harmonic source with a moving pitch, syllable-rate envelope, noise; 22.05 kHz."""
    rate = 22_050
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 110 + 40 * np.sin(2 * np.pi * 0.3 * t + seed)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = np.clip(np.sin(2 * np.pi * 4 * t + rng.uniform(0, 6)), 0, None)
    audio = 0.2 * envelope * voiced + 0.02 * rng.standard_normal(len(t))
    sf.write(path, audio.astype(np.float32), rate, subtype="PCM_16")
    return path


def make_adresso_like(work: Path, scale: float = 1.0, seed: int = 0) -> tuple[Path, float]:
    """237 x `scale` recordings of 40-90 s (ADReSSo's 166 train + 71 test), one speaker each, with a manifest;
    (manifest, audio seconds). The same seed gives the same corpus."""
    from adsearch.corpus import Recording, write_manifest

    rng = np.random.default_rng(seed)
    n = max(1, round(237 * scale))
    lengths = rng.uniform(40, 90, n)
    recordings = []
    for i, seconds in enumerate(lengths):
        path = make_audio(float(seconds), work / f"rec{i:03d}.wav", seed * 1000 + i)
        recordings.append(Recording(f"rec{i:03d}", path, i % 2, f"spk{i:03d}", "train" if i < 0.7 * n else "test"))
    return write_manifest(recordings, work / "adresso-like.csv"), float(lengths.sum())


class GpuBusy:
    """The GPU's utilisation (nvidia-smi, 1 s samples) while a block runs: the share of time a kernel ran."""

    def __init__(self, device: str):
        self.samples: list[float] = []
        self.active = device.startswith("cuda")

    def __enter__(self):
        import threading

        self._stop = threading.Event()
        if self.active:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(1.0):
            done = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                   "-i", "0"], capture_output=True, text=True)
            if done.returncode == 0 and done.stdout.strip():
                self.samples.append(float(done.stdout.split()[0]))

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.active:
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.samples)) if self.samples else None


def forward_ceiling(model: Path, args: argparse.Namespace, seconds: float = 60.0) -> dict:
    """audio-s/s of the forward pass alone, and of forward plus the per-layer statistics, on `--corpus-batch`
    windows of `--window-s` already on the device, for about `seconds` of wall time each."""
    import torch

    from adsearch.embed.encoder import masked_layer_stats
    from adsearch.embed.model import load_model, resolve_model

    cuda = args.device.startswith("cuda")
    extractor, net = load_model(resolve_model(str(model)), args.device, getattr(torch, args.dtype))
    audio = np.random.default_rng(0).standard_normal((args.corpus_batch, int(args.window_s * 16_000)))
    values = extractor(list(audio.astype(np.float32)), sampling_rate=16_000, return_tensors="pt")["input_values"]
    values = values.to(args.device, getattr(torch, args.dtype))
    n_frames = torch.full((args.corpus_batch,), net._get_feat_extract_output_lengths(values.shape[1]),
                          device=args.device)
    out = {}
    for name, with_stats in (("forward", False), ("forward + statistics", True)):
        done, start = 0, None
        with torch.inference_mode():
            while True:
                hidden = net(values, output_hidden_states=True).hidden_states
                if with_stats:
                    masked_layer_stats(hidden, n_frames)
                if cuda:
                    torch.cuda.synchronize()
                if start is None:  # the first batch warms up (kernel selection), untimed
                    start = time.perf_counter()
                    continue
                done += 1
                if time.perf_counter() - start > seconds / 2 or done >= 200:
                    break
        out[name] = done * args.corpus_batch * args.window_s / (time.perf_counter() - start)
    return out


def corpus_like(args: argparse.Namespace) -> dict:
    """The table of issue 18 for one machine and model size."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = make_model(args.size, work / f"{args.size}-model")
        manifest, audio_seconds = make_adresso_like(work, args.corpus_scale)
        command = [sys.executable, "-m", "adsearch.cli", "extract", str(manifest), "--model", str(model),
                   "-o", str(work / "cache"), "--device", args.device, "--dtype", args.dtype,
                   "--window-s", str(args.window_s)]
        if args.batch_size:
            command += ["--batch-size", str(args.batch_size)]
        with GpuBusy(args.device) as busy:
            started = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True)
            wall = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(done.stderr[-2000:])
        printed = next((line for line in done.stdout.splitlines() if "real time" in line), "")
        ceiling = forward_ceiling(model, args, args.ceiling_seconds) if args.ceiling_seconds else {}
    rows = {"end to end (adsearch extract, loading included)": audio_seconds / wall, **ceiling}
    result = {"size": args.size, "device": args.device, "dtype": args.dtype,
              "recordings": max(1, round(237 * args.corpus_scale)), "audio_seconds": round(audio_seconds, 1),
              "wall_seconds": round(wall, 1), "printed": printed,
              "gpu_busy_percent": busy.mean, "audio_s_per_s": {k: round(v, 1) for k, v in rows.items()}}
    print(f"{result['recordings']} recordings, {audio_seconds:,.0f} s of audio; {args.size} model on {args.device} "
          f"({args.dtype}); extract printed: {printed.strip()}")
    for name, value in rows.items():
        print(f"  {name:<50} {value:10,.0f} audio-s/s")
    if busy.mean is not None:
        print(f"  GPU busy during extract: {busy.mean:.0f} % (nvidia-smi, mean of 1 s samples)")
    return result


CORPUS_SCALE = {"tiny": 0.25, "base": 0.02, "large": 0.01}  # about 15 s of extraction each on 2 quiet cores
ROOT = Path(__file__).resolve().parents[1]


def timed_extract(manifest: Path, model: Path, out: Path, tree: Path, env: dict, extra: list[str],
                  clean: bool = False) -> float:
    """Wall seconds of one `adsearch extract` process (imports and model loading included), with the adsearch
    package of `tree` first on PYTHONPATH; `clean`: `env` is the whole environment, not additions to this one's."""
    import os
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "adsearch.cli", "extract", str(manifest), "--model", str(model), "-o", str(out),
               "--device", "cpu", *extra]
    started = time.perf_counter()
    base = {} if clean else dict(os.environ)
    done = subprocess.run(command, env={**base, **env, "PYTHONPATH": str(tree)}, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    return time.perf_counter() - started


def busy_processes(k: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(k)]


def under_load(args: argparse.Namespace) -> dict:
    """Per size: wall time of `adsearch extract` quiet and with --background-load busy processes, per variant,
    variants alternated within each repeat (the machine's other load drifts; ratios in one run hold)."""
    import os
    import statistics

    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    variants = {"default": (ROOT, {}), "OMP_NUM_THREADS=1": (ROOT, {"OMP_NUM_THREADS": "1"})}
    if args.before:
        variants["before (its default)"] = (args.before.resolve(), {})
    result = {"cpus": os.cpu_count(), "background_load": args.background_load, "repeats": args.repeats, "sizes": {}}
    for size in args.sizes.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            model = make_model(size, work / "model")
            manifest, audio_seconds = make_adresso_like(work, CORPUS_SCALE[size])
            walls: dict = {load: {name: [] for name in variants} for load in (0, args.background_load)}
            for repeat in range(args.repeats):
                for load in walls:
                    spinners = busy_processes(load)
                    try:
                        order = list(variants) if repeat % 2 == 0 else list(reversed(variants))
                        for name in order:
                            tree, env = variants[name]
                            walls[load][name].append(timed_extract(manifest, model, work / "cache", tree,
                                                                   {**clean, **env}, [], clean=True))
                            print(f"{size} load {load} {name:<22} {walls[load][name][-1]:6.1f} s", flush=True)
                    finally:
                        for spinner in spinners:
                            spinner.kill()
            rows = {f"load {load}": {name: {"median_s": round(statistics.median(w), 1),
                                            "runs_s": [round(x, 1) for x in w],
                                            "audio_s_per_s": round(audio_seconds / statistics.median(w), 1)}
                                     for name, w in by_variant.items()} for load, by_variant in walls.items()}
            result["sizes"][size] = {"audio_seconds": round(audio_seconds, 1), **rows}
            for load, by_variant in rows.items():
                line = ", ".join(f"{name} {row['median_s']} s" for name, row in by_variant.items())
                print(f"{size}, {load} busy process(es): {line}", flush=True)
    return result


def against_bare_loop(args: argparse.Namespace) -> dict:
    """Single-threaded and quiet: `adsearch extract --threads 1` and the bare loop, whole processes, alternated."""
    import os
    import statistics

    result = {"repeats": args.repeats, "sizes": {}}
    for size in args.sizes.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            model = make_model(size, work / "model")
            manifest, audio_seconds = make_adresso_like(work, CORPUS_SCALE[size])
            ours, bare = [], []
            for repeat in range(args.repeats):
                for name in (("ours", "bare") if repeat % 2 == 0 else ("bare", "ours")):
                    if name == "ours":
                        ours.append(timed_extract(manifest, model, work / "cache", ROOT, {}, ["--threads", "1"]))
                    else:
                        started = time.perf_counter()
                        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bare_loop.py"), str(manifest),
                                        str(model), "--threads", "1"], check=True, capture_output=True,
                                       env={**os.environ, "PYTHONPATH": ""})
                        bare.append(time.perf_counter() - started)
            ratio = statistics.median(ours) / statistics.median(bare)
            result["sizes"][size] = {"audio_seconds": round(audio_seconds, 1),
                                     "adsearch_s": [round(x, 2) for x in ours], "bare_s": [round(x, 2) for x in bare],
                                     "ratio_of_medians": round(ratio, 3)}
            print(f"{size}: adsearch extract --threads 1 {statistics.median(ours):.1f} s, bare loop "
                  f"{statistics.median(bare):.1f} s: {ratio:.2f}x of the bare loop's wall time", flush=True)
    return result


def rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM, so the peak measured is the run's, not the load's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def child(args: argparse.Namespace) -> None:
    """One measured case in this process; prints one JSON line."""
    import torch

    from adsearch.corpus import Recording, write_manifest
    from adsearch.embed.encoder import WindowEncoder
    from adsearch.embed.extract import ExtractSettings, extract
    from adsearch.embed.model import resolve_model
    from adsearch.io.audio import load_audio

    wavs = [Path(p) for p in args.wavs]
    cuda = args.device.startswith("cuda")
    dtype = getattr(torch, args.dtype)
    encoder = WindowEncoder(resolve_model(args.model), args.device, args.dtype)
    encoder.encode([np.zeros(32_000, np.float32)])  # warm-up (kernel selection), untimed for both loops
    if args.mode == "naive":
        extractor, model = encoder.extractor, encoder.model
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        reset_peak()
        base = rss_mb("VmRSS")
        start = time.perf_counter()
        audio_seconds = 0.0
        for wav in wavs:
            audio = load_audio(wav)
            audio_seconds += len(audio) / 16_000
            inputs = extractor(audio, sampling_rate=16_000, return_tensors="pt")
            with torch.inference_mode():
                out = model(inputs["input_values"].to(args.device, dtype), output_hidden_states=True)
                _ = [h[0].float().mean(0).cpu() for h in out.hidden_states]
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    else:
        manifest = write_manifest(
            [Recording(w.stem, w, 0, w.stem, "train") for w in wavs], Path(args.workdir) / f"m-{args.tag}.csv"
        )
        # The model is loaded outside the timed region and the memory baseline, as for the naive loop.
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        reset_peak()
        base = rss_mb("VmRSS")
        result = extract(manifest, Path(args.workdir) / f"cache-{args.tag}", args.model,
                         ExtractSettings(window_s=args.window_s, dtype=args.dtype), batch_size=args.batch_size or None,
                         device=args.device, encoder=encoder)
        seconds, audio_seconds = result.compute_seconds, result.audio_seconds
    report = {"mode": args.mode, "tag": args.tag, "seconds": seconds, "audio_seconds": audio_seconds,
              "peak_growth_mb": rss_mb("VmHWM") - base}
    if cuda:
        report["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(report))


def flops_per_audio_second(model_dir: str, window_s: float, device: str, dtype_name: str) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from adsearch.embed.model import load_model, resolve_model

    extractor, model = load_model(resolve_model(model_dir), device, getattr(torch, dtype_name))
    # The positional convolution's weight norm is a parametrization that FlopCounterMode cannot trace on
    # some torch builds ("ParametrizedConv1d has no attribute weight"): fold it into a plain weight first.
    for module in model.modules():
        if torch.nn.utils.parametrize.is_parametrized(module):
            for name in list(module.parametrizations):
                torch.nn.utils.parametrize.remove_parametrizations(module, name)
    audio = np.random.default_rng(0).standard_normal(int(window_s * 16_000)).astype(np.float32)
    values = extractor(audio, sampling_rate=16_000, return_tensors="pt")["input_values"].to(device, model.dtype)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(values, output_hidden_states=True)
    return counter.get_total_flops() / window_s


def run_case(mode: str, tag: str, wavs: list[Path], args: argparse.Namespace, model: Path, work: Path) -> dict:
    command = [sys.executable, __file__, "--child", "--mode", mode, "--tag", tag, "--model", str(model),
               "--workdir", str(work), "--device", args.device, "--dtype", args.dtype,
               "--window-s", str(args.window_s), "--batch-size", str(args.batch_size), "--wavs", *map(str, wavs)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"mode": mode, "tag": tag, "error": done.stderr.strip().splitlines()[-1][:200]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="base")
    parser.add_argument("--durations", type=float, nargs="*", default=[60, 180, 360],
                        help="single long recordings, seconds")
    parser.add_argument("--short-n", type=int, default=8, help="number of short recordings")
    parser.add_argument("--short-s", type=float, default=10, help="length of a short recording, seconds")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--window-s", type=float, default=20.0)
    parser.add_argument("--batch-size", type=int, default=0, help="0: the extractor's default for the device")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU")
    parser.add_argument("--skip-naive-above", type=float, default=float("inf"),
                        help="skip the naive loop for recordings longer than this (it may not fit)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--corpus-like", choices=["adresso"], help="an ADReSSo-sized corpus: end to end, forward "
                                                                   "ceiling, forward + statistics, GPU busy share")
    parser.add_argument("--corpus-scale", type=float, default=1.0, help="--corpus-like: share of its 237 recordings")
    parser.add_argument("--corpus-batch", type=int, default=16, help="--corpus-like: windows per forward batch")
    parser.add_argument("--ceiling-seconds", type=float, default=60.0,
                        help="--corpus-like: wall time of the forward ceiling's two measurements; 0 skips them (the "
                             "ceiling is the model's own code: measure it once in a before/after comparison)")
    parser.add_argument("--background-load", type=int, help="busy processes beside `adsearch extract` (and none): "
                                                            "default vs OMP_NUM_THREADS=1 vs --before")
    parser.add_argument("--before", type=Path, help="--background-load: a checkout of older adsearch code to compare")
    parser.add_argument("--bare-loop", action="store_true", help="single-threaded and quiet: adsearch extract vs a "
                                                                 "bare Hugging Face loop on the same windows")
    parser.add_argument("--sizes", default="tiny,base", help="--background-load / --bare-loop: model shapes")
    parser.add_argument("--repeats", type=int, default=3, help="--background-load / --bare-loop: runs per variant")
    # child-process arguments
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--tag", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--wavs", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.background_load is not None or args.bare_loop:
        result = under_load(args) if args.background_load is not None else against_bare_loop(args)
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
        return
    if args.corpus_like:
        result = corpus_like(args)
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
        return

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = make_model(args.size, work / f"{args.size}-model")
        cases = []
        if args.short_n:
            short = [make_audio(args.short_s, work / f"short{i}.wav", i) for i in range(args.short_n)]
            cases.append((f"{args.short_n} x {args.short_s:g} s", short))
        for seconds in args.durations:
            cases.append((f"1 x {seconds / 60:g} min", [make_audio(seconds, work / f"long{seconds:g}.wav", 99)]))
        rows = []
        for tag, wavs in cases:
            long_seconds = max(sf.info(w).duration for w in wavs)
            ours = run_case("ours", tag, wavs, args, model, work)
            naive = (run_case("naive", tag, wavs, args, model, work) if long_seconds <= args.skip_naive_above
                     else {"mode": "naive", "tag": tag, "error": "skipped"})
            rows.append({"case": tag, "ours": ours, "naive": naive})
            print(format_row(rows[-1]), flush=True)
        extra = {}
        if args.device.startswith("cuda"):
            flops = flops_per_audio_second(str(model), args.window_s, args.device, args.dtype)
            best = max(r["ours"]["audio_seconds"] / r["ours"]["seconds"] for r in rows if "seconds" in r["ours"])
            extra = {"gflop_per_audio_s": flops / 1e9, "best_audio_s_per_s": best,
                     "fraction_of_peak": best * flops / (args.peak_tflops * 1e12)}
            print(f"{flops / 1e9:.1f} GFLOP per audio second; {best:,.0f} audio-s/s = "
                  f"{100 * extra['fraction_of_peak']:.1f} % of {args.peak_tflops:g} TFLOP/s")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "json"},
                                         "rows": rows, **extra}, indent=1, default=str))


def format_row(row: dict) -> str:
    def speed(r: dict) -> str:
        return f"{r['audio_seconds'] / r['seconds']:8.1f} audio-s/s, +{r['peak_growth_mb']:7.0f} MB" if "seconds" in r \
            else f"{r.get('error', '?')[:60]:>30}"

    ours, naive = row["ours"], row["naive"]
    ratio = (ours["audio_seconds"] / ours["seconds"]) / (naive["audio_seconds"] / naive["seconds"]) \
        if "seconds" in ours and "seconds" in naive else float("nan")
    return f"{row['case']:>12} | ours {speed(ours)} | naive {speed(naive)} | speed ratio {ratio:5.2f}x"


if __name__ == "__main__":
    main()
