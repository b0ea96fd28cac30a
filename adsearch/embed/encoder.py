"""The speech model on a device: windows in, every layer's statistics (frame count, mean, M2, max, min) out.

Correctness first: the model's own feature extractor normalises each window (on a GPU the same is done on
the card), layer-norm models get an `attention_mask` (so padding does not change their outputs), group-norm
models only ever see batches of equal-length windows, and frames past a window's true length never enter
a statistic."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from adsearch.embed.cache import STATS
from adsearch.embed.model import ModelSource, load_model, uses_attention_mask
from adsearch.io.audio import SAMPLE_RATE


def layer_stats(hidden_states, n_frames):
    """Per layer and item: mean, M2, max, min over the first n_frames frames, as one float32 tensor
    (stat, L, B, D) on the model's device (one copy back instead of four)."""
    import torch

    out: dict[str, list] = {stat: [] for stat in STATS}
    t = hidden_states[0].shape[1]
    mask = (torch.arange(t, device=n_frames.device)[None, :] < n_frames[:, None])[:, :, None]
    count = n_frames.to(torch.float32)[:, None]
    for h in hidden_states:
        h = h.to(torch.float32)
        mean = torch.where(mask, h, 0).sum(1) / count
        out["mean"].append(mean)
        out["m2"].append(torch.where(mask, h - mean[:, None], 0).square().sum(1))
        out["max"].append(torch.where(mask, h, -torch.inf).amax(1))
        out["min"].append(torch.where(mask, h, torch.inf).amin(1))
    return torch.stack([torch.stack(out[stat]) for stat in STATS])


def masked_layer_stats(hidden_states, n_frames) -> dict[str, np.ndarray]:
    """Per layer and item: mean, M2, max, min over the first n_frames frames, float32 (L, B, D)."""
    return PendingStats(None, layer_stats(hidden_states, n_frames)).result()[1]


class PendingStats:
    """A batch's statistics on their way back from the device: on a GPU they are copied into pinned host
    memory without waiting, so the card starts the next batch while this one's numbers travel; `result()`
    waits for the copy. On the CPU they are ready at once."""

    def __init__(self, n_frames: np.ndarray | None, stats):
        import torch

        self.n_frames = n_frames
        self.ready = None
        if stats.device.type == "cuda":
            self.host = torch.empty(stats.shape, dtype=stats.dtype, pin_memory=True)
            self.host.copy_(stats, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record(torch.cuda.current_stream(stats.device))
        else:
            self.host = stats

    def result(self) -> tuple[np.ndarray | None, dict[str, np.ndarray]]:
        """(n_frames (B,), {stat: (L, B, D)}) as `WindowEncoder.encode` returns them."""
        if self.ready is not None:
            self.ready.synchronize()
        values = self.host.numpy()
        return self.n_frames, {stat: values[i] for i, stat in enumerate(STATS)}


class WindowEncoder:
    """Runs batches of 16 kHz windows through a model and returns per-window, per-layer statistics."""

    def __init__(self, source: ModelSource, device: str = "auto", dtype: str = "auto",
                 normalise_on_device: bool | None = None):
        import torch

        self.device = resolve_device(device)
        self.dtype_name = resolve_dtype(dtype, self.device)
        self.extractor, self.model = load_model(source, self.device, getattr(torch, self.dtype_name))
        self.whisper = self.model.config.model_type == "whisper"
        if self.whisper:  # the encoder alone (the decoder never runs); inputs are log-mel padded to 30 s
            self.model = self.model.get_encoder()
        self.masked = self.whisper or uses_attention_mask(self.model)
        # A wav2vec2 feature extractor only pads and normalises each window: on a GPU that is done there (the
        # CPU would otherwise feed the card one batch at a time), from pinned memory with a non-blocking copy.
        # On the CPU the feature extractor itself runs, so CPU caches stay bit for bit what they were.
        on_gpu = self.device.startswith("cuda")
        self.normalise_on_device = (on_gpu if normalise_on_device is None else normalise_on_device) and (
            not self.whisper and type(self.extractor).__name__ == "Wav2Vec2FeatureExtractor")
        self.n_layers = self.model.config.num_hidden_layers + 1
        self.dim = self.model.config.hidden_size

    def frame_counts(self, n_samples: Sequence[int]) -> np.ndarray:
        import torch

        samples = torch.as_tensor(list(n_samples))
        if self.whisper:  # encoder frames of the real log-mel frames: padding beyond them is never pooled
            samples = samples // self.extractor.hop_length
        lengths = self.model._get_feat_extract_output_lengths(samples)
        return lengths.cpu().numpy().astype(np.int64)

    def keep_layers(self, last: int) -> None:
        """Drop the transformer layers above `last`: a classifier on layer k needs only k layers run.

        One layer always stays: transformers 5 captures hidden states through the layers, so a model with
        none returns no hidden state at all, not even layer 0.
        """
        kept = max(last, 1)
        encoder = self.model if self.whisper else self.model.encoder
        encoder.layers = encoder.layers[:kept]
        self.model.config.num_hidden_layers = kept
        self.n_layers = kept + 1

    def encode(self, windows: Sequence[np.ndarray], layers: Sequence[int] | None = None
               ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(n_frames (B,), stats {stat: (L, B, D)}) for one batch, for all hidden states or `layers`.

        Group-norm models need equal-length windows.
        """
        return self.submit(windows, layers).result()

    def submit(self, windows: Sequence[np.ndarray], layers: Sequence[int] | None = None) -> PendingStats:
        """Start `encode` on one batch; on a GPU this returns before the card has finished, so the caller can
        submit the next batch before collecting this one (`PendingStats.result`)."""
        import torch

        lengths = [len(w) for w in windows]
        if not self.masked and len(set(lengths)) > 1:
            raise ValueError("group-norm models can only batch equal-length windows")
        if self.whisper:
            return self._submit_whisper(windows, layers)
        if self.normalise_on_device:
            values, mask = self.device_inputs(windows)
        else:
            inputs = self.extractor(
                list(windows), sampling_rate=SAMPLE_RATE, padding=True, return_tensors="pt",
                return_attention_mask=self.masked,
            )
            values = inputs["input_values"].to(self.device, getattr(torch, self.dtype_name))
            mask = inputs["attention_mask"].to(self.device) if self.masked else None
        n_frames = self.frame_counts(lengths)
        with torch.inference_mode():
            hidden = self.model(values, attention_mask=mask, output_hidden_states=True).hidden_states
            if layers is not None:
                hidden = [hidden[i] for i in layers]
            return PendingStats(n_frames, layer_stats(hidden, upload(torch.as_tensor(n_frames), self.device)))

    def device_inputs(self, windows: Sequence[np.ndarray]):
        """The model's inputs for `windows`, prepared on its device (`inputs_on_device`), in its dtype."""
        import torch

        values, mask = inputs_on_device(windows, self.device, getattr(self.extractor, "do_normalize", False),
                                        self.masked)
        return values.to(getattr(torch, self.dtype_name)), mask

    def _submit_whisper(self, windows: Sequence[np.ndarray], layers: Sequence[int] | None) -> PendingStats:
        import torch

        longest = max(len(w) for w in windows)
        if longest > self.extractor.n_samples:
            raise ValueError(f"a window of {longest / SAMPLE_RATE:.1f} s: Whisper's encoder takes at most "
                             f"{self.extractor.n_samples / SAMPLE_RATE:.0f} s; extract with --window-s 30 or less")
        features = self.extractor(list(windows), sampling_rate=SAMPLE_RATE, return_tensors="pt")["input_features"]
        n_frames = self.frame_counts([len(w) for w in windows])
        with torch.inference_mode():
            hidden = self.model(features.to(self.device, getattr(torch, self.dtype_name)),
                                output_hidden_states=True).hidden_states
            if layers is not None:
                hidden = [hidden[i] for i in layers]
            return PendingStats(n_frames, layer_stats(hidden, upload(torch.as_tensor(n_frames), self.device)))


def upload(tensor, device: str):
    """`tensor` on `device`; on a GPU through pinned memory without waiting (a copy from ordinary memory waits
    for the card to finish its queue first)."""
    if device.startswith("cuda"):
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def inputs_on_device(windows: Sequence[np.ndarray], device: str, normalise: bool, masked: bool):
    """What a wav2vec2 feature extractor returns (windows padded with zeros to the longest, each normalised
    to zero mean and unit variance over its own samples if `normalise`, i.e. `do_normalize`; the attention
    mask if `masked`), computed on `device` in float32: on a GPU the CPU would otherwise feed the card one
    batch at a time."""
    import torch

    lengths = torch.as_tensor([len(w) for w in windows])
    host = torch.zeros((len(windows), int(lengths.max())), dtype=torch.float32,
                       pin_memory=device.startswith("cuda"))
    for row, window in zip(host, windows, strict=True):
        row[:len(window)] = torch.from_numpy(np.ascontiguousarray(window, np.float32))
    values = host.to(device, non_blocking=True)
    lengths = upload(lengths, device)
    valid = torch.arange(values.shape[1], device=device)[None, :] < lengths[:, None]
    if normalise:
        count = lengths.to(torch.float32)[:, None]
        mean = values.sum(1, keepdim=True) / count  # the padding is zeros: it adds nothing
        var = torch.where(valid, values - mean, 0).square().sum(1, keepdim=True) / count
        values = torch.where(valid, (values - mean) / torch.sqrt(var + 1e-7), 0.0)
    return values, valid.to(torch.long) if masked else None


def resolve_device(device: str) -> str:
    """auto, cpu, cuda or cuda:N, checked against what torch sees (a clear error, not a CUDA traceback)."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d{1,3})?", device):
        raise ValueError(f"--device {device[:40]!r}: choose auto, cpu, cuda or cuda:N")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device} asked for, but torch sees no CUDA device (a CPU build of torch, or "
                             "no driver); use --device cpu")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return device


def default_batch_size(device: str) -> int:
    """Batching pays on a GPU; on a CPU the matrices are already large and bigger batches only cost memory."""
    return 16 if device.startswith("cuda") else 1


def resolve_dtype(dtype: str, device: str) -> str:
    import torch

    if dtype == "auto":
        if device.startswith("cuda"):
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype {dtype!r}: choose auto, float32, bfloat16 or float16")
    return dtype
