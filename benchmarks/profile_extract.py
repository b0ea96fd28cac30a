"""Where `adsearch extract` spends its time, on the ADReSSo-sized corpus of `benchmarks/extract.py`.

Timers wrap extract's own steps in this process (the real `extract()`, nothing replaced): resolving the model
(the weight hash), loading it, audio decoding and resampling (loader threads: summed over threads), the
main thread waiting for audio, the feature extractor's normalisation, the model's forward pass, the
per-layer statistics, waiting for them to come back, writing the parts, and consolidating the cache. The
timers synchronise the GPU after the forward pass and the statistics (else they would time the launch
alone), so on CUDA this run cannot overlap a batch with the next as `extract` does: its wall time is an
upper bound. On CUDA, `--torch-profiler` adds torch.profiler's table of the most expensive operators.

    python benchmarks/profile_extract.py --size large --device cuda --dtype bfloat16
    python benchmarks/profile_extract.py --size tiny --corpus-scale 0.25          # CPU
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

_spec = importlib.util.spec_from_file_location("extract_benchmark", Path(__file__).with_name("extract.py"))
extract_benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(extract_benchmark)


class Timers:
    """Seconds and calls per step, from any thread."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()

    def wrap(self, owner, attribute: str, step: str, synchronize=None) -> None:
        real = getattr(owner, attribute)

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                if synchronize is not None:
                    synchronize()
                with self._lock:
                    self.seconds[step] += time.perf_counter() - started
                    self.calls[step] += 1

        setattr(owner, attribute, timed)

    def wrap_generator(self, owner, attribute: str, step: str) -> None:
        """Time spent inside `next()` of a generator function's generators: what the consumer waits."""
        real = getattr(owner, attribute)
        timers = self

        def timed(*args, **kwargs):
            generator = real(*args, **kwargs)
            while True:
                started = time.perf_counter()
                try:
                    item = next(generator)
                except StopIteration:
                    return
                finally:
                    with timers._lock:
                        timers.seconds[step] += time.perf_counter() - started
                        timers.calls[step] += 1
                yield item

        setattr(owner, attribute, timed)


def profile(args: argparse.Namespace) -> dict:
    import torch

    import adsearch.embed.encoder as encoder_module
    import adsearch.embed.extract as extract_module
    import adsearch.embed.model as model_module

    cuda = args.device.startswith("cuda")
    synchronize = torch.cuda.synchronize if cuda else None
    timers = Timers()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = extract_benchmark.make_model(args.size, work / "model")
        manifest, audio_seconds = extract_benchmark.make_adresso_like(work, args.corpus_scale)
        timers.wrap(extract_module, "resolve_model", "resolve the model (weight hash)")
        timers.wrap(extract_module, "load_audio", "decode + resample audio (loader threads, summed)")
        timers.wrap_generator(extract_module, "_group_recordings", "main thread waiting for audio")
        timers.wrap(encoder_module, "layer_stats", "per-layer statistics (on the device)", synchronize)
        timers.wrap(encoder_module.PendingStats, "result", "main thread waiting for statistics (copy back)")
        timers.wrap(extract_module, "save_atomic_npz", "write parts")
        timers.wrap(extract_module, "write_cache", "consolidate the cache")
        original_load = model_module.load_model

        def load_and_wrap(*load_args, **load_kwargs):
            extractor, net = original_load(*load_args, **load_kwargs)
            timers.wrap(type(extractor), "__call__", "feature extractor (normalise, pad; CPU)")
            timers.wrap(net, "forward", "model forward", synchronize)
            return extractor, net

        encoder_module.load_model = load_and_wrap
        timers.wrap(encoder_module, "load_model", "load the model")
        settings = extract_module.ExtractSettings(window_s=args.window_s, dtype=args.dtype)
        profiler = None
        if args.torch_profiler:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as torch_profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            profiler = torch_profile(activities=activities)
            profiler.__enter__()
        started = time.perf_counter()
        extract_module.extract(manifest, work / "cache", str(model), settings, batch_size=args.batch_size or None,
                               device=args.device)
        wall = time.perf_counter() - started
        if profiler is not None:
            profiler.__exit__(None, None, None)
            key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
            print(profiler.key_averages().table(sort_by=key, row_limit=15))
    rows = sorted(timers.seconds.items(), key=lambda kv: -kv[1])
    print(f"{args.size} model on {args.device} ({args.dtype}), {audio_seconds:,.0f} s of audio, extract() wall "
          f"{wall:.1f} s = {audio_seconds / wall:,.0f} audio-s/s")
    print(f"  {'step':<52} {'calls':>6} {'seconds':>9} {'of wall':>8}")
    for step, seconds in rows:
        print(f"  {step:<52} {timers.calls[step]:>6} {seconds:>9.2f} {100 * seconds / wall:>7.1f} %")
    print("  (steps nest: the forward and the statistics run inside the main loop; loader threads run beside it)")
    return {"size": args.size, "device": args.device, "dtype": args.dtype, "audio_seconds": audio_seconds,
            "wall_seconds": wall, "steps": {step: {"seconds": s, "calls": timers.calls[step]} for step, s in rows}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(extract_benchmark.SIZES), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--window-s", type=float, default=20.0)
    parser.add_argument("--batch-size", type=int, default=0, help="0: the extractor's default for the device")
    parser.add_argument("--corpus-scale", type=float, default=1.0, help="share of the corpus's 237 recordings")
    parser.add_argument("--torch-profiler", action="store_true", help="also print torch.profiler's operator table")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = profile(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
