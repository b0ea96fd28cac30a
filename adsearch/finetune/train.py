"""Fine-tuning the speech model on the AD labels, cross-fitted so that no train feature comes from a model
that saw its label.

The seed's pipeline fine-tunes XLSR before extracting layers. Done naively (one model trained on every
train recording, then cross-validated on those recordings) the CV scores are inflated. Cross-fitting:

* fix a speaker-grouped fold assignment of the train split (`--folds K`, or a study's own);
* for each fold k, fine-tune on the other folds (early stopping on a speaker-grouped validation part of
  them) and extract the fold-k recordings with that model;
* fine-tune on the whole train split and extract the test recordings with it (it is also the model
  `predict` uses);
* merge everything into one cache in the usual format whose `cache.json` records the fold assignment and
  which model produced each item. A study on it uses exactly those folds.

Training: participant-speech windows of whole recordings (as `extract` cuts them), each labelled with its
recording's label; pooled last hidden state -> linear head; CNN feature encoder frozen, optionally the lower
transformer layers too; AdamW with linear warmup and decay, gradient accumulation, class-balanced loss, the
model's own SpecAugment time masking; bf16 autocast on CUDA. An optimiser step's windows (`--batch-size` x
`--accumulate`) go through the model in as few passes as the card's free memory allows, without gradient
checkpointing when they fit without it (measured on the card itself, recorded with each model: `PassPlan`);
the loss is normalised over the whole step, so the split changes memory and speed, not the optimisation.
A fold's model is
saved with `save_pretrained` (usable by `extract` and `predict`); each epoch leaves a checkpoint, so a killed
run resumes from its last epoch and finished folds are never redone.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from adsearch import __version__
from adsearch.corpus import Recording, read_manifest, write_manifest
from adsearch.embed.extract import (
    ExtractSettings,
    Window,
    extract,
    inputs_on_device,
    recording_windows,
    resolve_device,
    upload,
)
from adsearch.embed.model import uses_attention_mask
from adsearch.io.audio import AudioError


class FinetuneError(ValueError):
    pass


CHECKPOINTING = ("auto", "on", "off")
MEMORY_SHARE = 0.9  # of the card's free memory a fine-tune plans to use (the rest: fragmentation, other work)


@dataclass(frozen=True)
class FinetuneSettings:
    """Everything that changes a fine-tuned model (recorded in finetune.json)."""

    epochs: int = 10
    batch_size: int = 4
    accumulate: int = 2  # optimiser step = batch_size x accumulate windows
    micro_batch: int = 0  # windows per forward/backward pass; 0: from the card's free memory (CPU: batch_size)
    checkpointing: str = "auto"  # gradient checkpointing: auto (only if the passes do not fit without), on, off
    encoder_lr: float = 3e-5
    head_lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: float = 0.1  # share of the optimiser steps with a linear warmup
    freeze_layers: int = 0  # lower transformer layers kept frozen (the CNN feature encoder always is)
    window_s: float = 10.0  # training windows; shorter ones bound memory and add samples
    min_window_s: float = 1.0
    patience: int = 3  # epochs without a better validation score before stopping
    validation_share: float = 0.2  # speakers of each training part held out for early stopping
    seed: int = 0

    @property
    def step_windows(self) -> int:
        """Windows per optimiser step: what the optimisation sees, whatever the passes."""
        return self.batch_size * self.accumulate

    def __post_init__(self) -> None:
        problems = []
        if self.epochs < 1 or self.batch_size < 1 or self.accumulate < 1 or self.patience < 1:
            problems.append("--epochs, --batch-size, --accumulate and --patience must be at least 1")
        if not 0 <= self.micro_batch <= self.batch_size * self.accumulate:
            problems.append(f"--micro-batch {self.micro_batch}: between 1 and --batch-size x --accumulate "
                            f"({self.batch_size * self.accumulate}), or 0 to choose from the free memory")
        if self.checkpointing not in CHECKPOINTING:
            problems.append(f"--checkpointing {str(self.checkpointing)[:20]!r}: choose {', '.join(CHECKPOINTING)}")
        if not (0 < self.encoder_lr < 1 and 0 < self.head_lr < 1):
            problems.append("learning rates must lie in (0, 1)")
        if not 0 <= self.warmup < 1 or not 0 < self.validation_share < 0.5:
            problems.append("--warmup must lie in [0, 1) and --validation-share in (0, 0.5)")
        if self.freeze_layers < 0 or self.weight_decay < 0:
            problems.append("--freeze-layers and --weight-decay must be >= 0")
        if not 0.5 <= self.window_s <= 60 or not 0.025 <= self.min_window_s <= self.window_s:
            problems.append("--window-s must lie in [0.5, 60] and --min-window-s in [0.025, --window-s]")
        if problems:
            raise FinetuneError("; ".join(problems))


class FinetuneProgress:
    """What a fine-tune reports: the CLI draws bars from it, tests record it."""

    def fold(self, name: str, index: int, total: int) -> None: ...
    def epoch(self, name: str, epoch: int, epochs: int, batches: int) -> None: ...
    def step(self, loss: float) -> None: ...
    def validated(self, name: str, epoch: int, loss: float, score: float, best: float) -> None: ...


# ----------------------------------------------------------------------------------------------------------
# Data: labelled windows of participant speech


def _windows(recordings: list[Recording], indices: np.ndarray, settings: FinetuneSettings) -> list[Window]:
    """The windows of `recordings[i]` for i in `indices`, cut as `extract` cuts them, each knowing its recording
    (`item`, an index into `recordings`)."""
    cut = ExtractSettings(settings.window_s, settings.min_window_s)
    windows = []
    for index in indices:
        try:
            found, _ = recording_windows(recordings[index], cut)
        except AudioError:
            continue  # unreadable or no speech span (extraction reports it): one training recording fewer
        for window in found:
            window.item = int(index)
        windows += found
    return windows


def _validation_split(labels: np.ndarray, groups: np.ndarray, share: float, seed: int) -> np.ndarray:
    """A speaker-grouped, stratified validation mask of about `share` of the recordings (for early
    stopping only); all False when a class has too few speakers to hold any out."""
    from adsearch.search.protocol import assign_folds

    speakers = min(len(set(groups[labels == label])) for label in (0, 1))
    folds = min(round(1 / share), speakers)
    if folds < 2:
        return np.zeros(len(labels), bool)
    return assign_folds(labels, groups, folds, 1, seed)[0] == 0


# ----------------------------------------------------------------------------------------------------------
# Model


def _build(model_path: Path, settings: FinetuneSettings, device: str):
    """(feature extractor, encoder, head) with the CNN feature encoder and the lower layers frozen."""
    import torch

    from adsearch.embed.model import ModelSource, load_model

    # extract's loader (and its checks); the revision is not needed here, so the weights are not hashed
    extractor, encoder = load_model(ModelSource(str(model_path), Path(model_path), ""), device, torch.float32)
    encoder.freeze_feature_encoder()
    layers = encoder.encoder.layers
    if settings.freeze_layers > len(layers):
        raise FinetuneError(f"--freeze-layers {settings.freeze_layers}: the model has {len(layers)} layers")
    for layer in layers[: settings.freeze_layers]:
        layer.requires_grad_(False)
    torch.manual_seed(settings.seed)
    head = torch.nn.Linear(encoder.config.hidden_size, 2)
    return extractor, encoder, head.to(device)


def _logits(extractor, encoder, head, windows: list[np.ndarray], device: str):
    import torch

    from adsearch.io.audio import SAMPLE_RATE

    masked = uses_attention_mask(encoder)
    if device.startswith("cuda"):  # padded and normalised on the card, as extraction does
        values, mask = inputs_on_device(windows, device, getattr(extractor, "do_normalize", False), masked)
    else:
        inputs = extractor(windows, sampling_rate=SAMPLE_RATE, padding=True, return_tensors="pt",
                           return_attention_mask=masked)
        values = inputs["input_values"].to(device)
        mask = inputs["attention_mask"].to(device) if masked else None
    with torch.autocast("cuda", torch.bfloat16, enabled=device.startswith("cuda")):
        hidden = encoder(values, attention_mask=mask).last_hidden_state
    frames = upload(encoder._get_feat_extract_output_lengths(torch.as_tensor([len(w) for w in windows])), device)
    keep = (torch.arange(hidden.shape[1], device=device)[None, :] < frames[:, None])[:, :, None]
    pooled = torch.where(keep, hidden.float(), 0).sum(1) / frames[:, None].float()
    return head(pooled)


# ----------------------------------------------------------------------------------------------------------
# Passes: how an optimiser step's windows go through the card


@dataclass(frozen=True)
class PassPlan:
    """Windows per forward/backward pass and gradient checkpointing, and how they were chosen (recorded)."""

    micro_batch: int
    checkpointing: bool
    chosen: str  # one line: given, or what was measured
    free_gb: float | None = None  # the card's free memory with the model loaded
    peak_gb: float | None = None  # measured for the chosen passes, optimiser state included


def choose_passes(sizes: list[int], checkpointing: str, needs: Callable[[int, bool], float | None],
                  budget: float) -> tuple[int, bool, float]:
    """(windows per pass, checkpointing, bytes needed): the largest of `sizes` that fits in `budget` bytes.
    'auto' runs without gradient checkpointing (which recomputes the forward pass: about a third more work)
    unless that needs more than twice as many passes as with it (small passes leave a GPU idle).
    `needs(size, checkpointing)` measures a pass (None: out of memory)."""
    sizes = sorted(sizes, reverse=True)
    tried: dict[bool, float | None] = {}

    def largest(recompute: bool, above: int = 0) -> tuple[int, float] | None:
        for size in (s for s in sizes if s > above):
            tried[recompute] = needs(size, recompute)
            if tried[recompute] is not None and tried[recompute] <= budget:
                return size, tried[recompute]
        return None

    plain = largest(False) if checkpointing in ("auto", "off") else None
    if checkpointing == "on" or (checkpointing == "auto" and (plain is None or plain[0] < sizes[0])):
        recomputed = largest(True, 2 * plain[0] if plain and checkpointing == "auto" else 0)
        if recomputed:
            return recomputed[0], True, recomputed[1]
    if plain:
        return plain[0], False, plain[1]
    measured = "; ".join(f"{'with' if on else 'without'} checkpointing: "
                         + ("out of memory" if b is None else f"{b / 2**30:.1f} GB") for on, b in tried.items())
    raise FinetuneError(f"a training pass of {sizes[-1]} window(s) does not fit in the card's free memory "
                        f"({budget / 2**30:.1f} GB usable; {measured}). Use shorter windows (--window-s), a smaller "
                        "--micro-batch, --freeze-layers, or free the card")


def plan_passes(settings: FinetuneSettings, device: str, encoder, head, extractor, longest: np.ndarray) -> PassPlan:
    """On CUDA, measure passes of the longest training window on the card (forward, backward, gradients, plus
    AdamW's two moments) and choose with `choose_passes`; on the CPU take the settings as they are."""
    import torch

    if not device.startswith("cuda"):
        size = settings.micro_batch or settings.batch_size
        return PassPlan(size, settings.checkpointing == "on", "given (CPU: memory is not measured)")
    trainable = sum(p.numel() for p in [*encoder.parameters(), *head.parameters()] if p.requires_grad)
    optimiser_bytes = 2 * 4 * trainable  # AdamW's exp_avg and exp_avg_sq, float32
    torch.cuda.empty_cache()
    free = torch.cuda.mem_get_info(device)[0]

    def needs(size: int, recompute: bool) -> float | None:
        _set_checkpointing(encoder, recompute)
        encoder.train()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        try:
            _logits(extractor, encoder, head, [longest] * size, device).float().sum().backward()
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_allocated(device) - base + optimiser_bytes
        except torch.cuda.OutOfMemoryError:
            return None
        finally:
            encoder.zero_grad(set_to_none=True)
            head.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()

    # every pass of a step equally full: the divisors of the step (or the size given)
    step = settings.step_windows
    sizes = [settings.micro_batch] if settings.micro_batch else [d for d in range(1, step + 1) if step % d == 0]
    size, recompute, needed = choose_passes(sizes, settings.checkpointing, needs, MEMORY_SHARE * free)
    return PassPlan(size, recompute, f"measured on {torch.cuda.get_device_name(device)}: {size} windows of "
                    f"{len(longest) / 16_000:.1f} s per pass need {needed / 2**30:.1f} GB of "
                    f"{free / 2**30:.1f} GB free", round(free / 2**30, 2), round(needed / 2**30, 2))


def _still_fits(plan: PassPlan, device: str) -> bool:
    """Whether passes measured on a card fit the free memory of the one a fine-tune resumes on (the split
    does not change the optimisation, so a resume may choose another)."""
    import torch

    if not device.startswith("cuda") or plan.peak_gb is None:
        return True
    torch.cuda.empty_cache()
    return plan.peak_gb * 2**30 <= MEMORY_SHARE * torch.cuda.mem_get_info(device)[0]


def _set_checkpointing(encoder, on: bool) -> None:
    # transformers renamed gradient_* to activation_checkpointing_* (5.2x) and deprecated the old names
    enable = getattr(encoder, "activation_checkpointing_enable", None) or encoder.gradient_checkpointing_enable
    disable = getattr(encoder, "activation_checkpointing_disable", None) or encoder.gradient_checkpointing_disable
    enable() if on else disable()


def _batches(windows: list[Window], size: int, equal_lengths: bool, rng: np.random.Generator):
    """Shuffled batches; group-norm models (no attention mask) only batch windows of one length."""
    order = rng.permutation(len(windows))
    if not equal_lengths:
        return [order[i:i + size] for i in range(0, len(order), size)]
    by_length: dict[int, list[int]] = {}
    for i in order:
        by_length.setdefault(len(windows[i].audio), []).append(int(i))
    batches = [group[i:i + size] for group in by_length.values() for i in range(0, len(group), size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def _evaluate(extractor, encoder, head, windows: list[Window], labels: np.ndarray, n: int, device: str,
              batch_size: int) -> tuple[float, float]:
    """(window loss, balanced accuracy of the recordings' mean window probability)."""
    import torch

    from adsearch.search.objective import metrics

    encoder.eval()
    losses, probabilities, owners = [], [], []
    masked = uses_attention_mask(encoder)
    with torch.inference_mode():
        for batch in _batches(windows, batch_size, not masked, np.random.default_rng(0)):
            chunk = [windows[i] for i in batch]
            logits = _logits(extractor, encoder, head, [w.audio for w in chunk], device).float()
            target = torch.as_tensor([labels[w.item] for w in chunk], device=device)
            losses.append(float(torch.nn.functional.cross_entropy(logits, target, reduction="sum")))
            probabilities += torch.softmax(logits, 1)[:, 1].cpu().tolist()
            owners += [w.item for w in chunk]
    score = np.bincount(owners, probabilities, n) / np.maximum(np.bincount(owners, minlength=n), 1)
    seen = np.bincount(owners, minlength=n) > 0
    return sum(losses) / max(len(owners), 1), metrics(labels[seen], score[seen], 0.5)["balanced_accuracy"]


# ----------------------------------------------------------------------------------------------------------
# One fine-tune, resumable


def train_one(model_path: Path, recordings: list[Recording], out_dir: Path, settings: FinetuneSettings,
              device: str, progress: FinetuneProgress | None = None, name: str = "model",
              on_epoch: Callable[[int], None] | None = None) -> dict:
    """Fine-tune on `recordings` (a speaker-grouped validation part of them decides when to stop) and save the
    best epoch's encoder to `out_dir` with save_pretrained. Resumes from `out_dir/checkpoint.pt`; a finished
    fine-tune (`out_dir/done.json`) returns its record at once."""
    import torch
    from transformers import set_seed

    done_file = out_dir / "done.json"
    if done_file.is_file():
        return json.loads(done_file.read_text())
    began = time.perf_counter()
    progress = progress or FinetuneProgress()
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = np.array([r.label for r in recordings])
    groups = np.array([r.group for r in recordings])
    if (labels < 0).any() or len(set(labels.tolist())) < 2:
        raise FinetuneError(f"{name}: fine-tuning needs labelled recordings of both classes")
    valid = _validation_split(labels, groups, settings.validation_share, settings.seed)
    valid_index = np.flatnonzero(valid)
    train_windows = _windows(recordings, np.flatnonzero(~valid), settings)
    valid_windows = _windows(recordings, valid_index, settings)
    if not train_windows:
        raise FinetuneError(f"{name}: no readable training window")

    extractor, encoder, head = _build(model_path, settings, device)
    masked = uses_attention_mask(encoder)
    checkpoint = out_dir / "checkpoint.pt"
    saved = None
    if checkpoint.is_file():  # weights_only: a checkpoint file cannot run code when loaded
        saved = torch.load(checkpoint, map_location=device, weights_only=True)
        encoder.load_state_dict(saved["encoder"])
        head.load_state_dict(saved["head"])
    state = json.loads(saved["state"]) if saved else {"epoch": 0, "best": -1.0, "stale": 0, "history": []}
    plan = PassPlan(**state["passes"]) if "passes" in state else None  # a resumed run goes on as it began,
    if plan is None or not _still_fits(plan, device):  # unless the card it resumes on is too small for that
        plan = plan_passes(settings, device, encoder, head, extractor, max((w.audio for w in train_windows), key=len))
        state["passes"] = asdict(plan)
    _set_checkpointing(encoder, plan.checkpointing)
    trainable = [p for p in encoder.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW([{"params": trainable, "lr": settings.encoder_lr},
                                   {"params": head.parameters(), "lr": settings.head_lr}],
                                  weight_decay=settings.weight_decay,
                                  fused=True)  # one kernel for all parameters: 3x faster than the default on a CPU
    steps_per_epoch = len(_batches(train_windows, settings.step_windows, not masked, np.random.default_rng(0)))
    total = steps_per_epoch * settings.epochs
    warm = max(1, int(settings.warmup * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: min((step + 1) / warm, max(0.0, (total - step) / max(1, total - warm))))
    if saved:
        optimiser.load_state_dict(saved["optimiser"])
        scheduler.load_state_dict(saved["scheduler"])
    del saved
    counts = np.bincount(labels[~valid], minlength=2)
    class_weight = torch.as_tensor(counts.sum() / (2 * np.maximum(counts, 1)), dtype=torch.float32).to(device)

    seconds = {"setup": time.perf_counter() - began, "training": 0.0, "validation": 0.0, "saving": 0.0}
    audio_seconds = 0.0
    writer = CheckpointWriter(checkpoint)
    try:
        for epoch in range(state["epoch"], settings.epochs):
            if state["stale"] >= settings.patience:
                break
            clock = time.perf_counter()
            encoder.train()
            rng = np.random.default_rng([settings.seed, epoch])
            # transformers draws the SpecAugment masks from numpy's global generator: seeding torch alone left an
            # epoch's masks (and so its losses) depending on whatever ran before in the process
            set_seed(settings.seed * 1000 + epoch)
            optimiser.zero_grad(set_to_none=True)
            steps = _batches(train_windows, settings.step_windows, not masked, rng)
            progress.epoch(name, epoch, settings.epochs, len(steps))
            for step in steps:
                chunk = [train_windows[i] for i in step]
                target = torch.as_tensor([labels[w.item] for w in chunk]).to(device)
                # the class-balanced mean over the whole step, summed pass by pass: the same gradient however the
                # step is split into passes
                step_weight = class_weight[target].sum()
                step_loss = torch.zeros((), device=device)
                for begin in range(0, len(chunk), plan.micro_batch):
                    logits = _logits(extractor, encoder, head, [w.audio for w in chunk[begin:begin + plan.micro_batch]],
                                     device)
                    loss = torch.nn.functional.cross_entropy(
                        logits.float(), target[begin:begin + plan.micro_batch], weight=class_weight,
                        reduction="sum") / step_weight
                    loss.backward()
                    step_loss += loss.detach()
                audio_seconds += sum(len(w.audio) for w in chunk) / 16_000
                torch.nn.utils.clip_grad_norm_([*trainable, *head.parameters()], 1.0)
                optimiser.step()
                scheduler.step()
                optimiser.zero_grad(set_to_none=True)
                progress.step(step_loss.item())
                state["history"].append({"epoch": epoch, "loss": step_loss.item()})
            seconds["training"] += time.perf_counter() - clock
            clock = time.perf_counter()
            if valid_windows:
                valid_loss, score = _evaluate(extractor, encoder, head, valid_windows, labels, len(recordings), device,
                                              plan.micro_batch)
            else:  # too few speakers to hold any out: keep the last epoch
                valid_loss, score = float("nan"), float(epoch)
            seconds["validation"] += time.perf_counter() - clock
            clock = time.perf_counter()
            improved = score > state["best"]
            state.update({"epoch": epoch + 1, "stale": 0 if improved else state["stale"] + 1,
                          "best": max(score, state["best"])})
            state.setdefault("validation", []).append({"epoch": epoch, "loss": valid_loss, "score": score})
            if improved:
                encoder.save_pretrained(out_dir / "best")
                extractor.save_pretrained(out_dir / "best")
            progress.validated(name, epoch, valid_loss, score, state["best"])
            if epoch + 1 < settings.epochs and state["stale"] < settings.patience:  # the last epoch ends in
                writer.write(encoder, head, optimiser, scheduler, state)  # done.json, never in a resume
            seconds["saving"] += time.perf_counter() - clock
            if on_epoch is not None:
                on_epoch(epoch)
    finally:
        clock = time.perf_counter()
        writer.wait()  # the last epoch's checkpoint is on disk before anything else happens
        seconds["saving"] += time.perf_counter() - clock
    record = {"name": name, "trained_on": [r.id for r in recordings],
              "validation_ids": [recordings[i].id for i in valid_index], "epochs_run": state["epoch"],
              "best_validation": state["best"], "validation": state.get("validation", []),
              "losses": [h["loss"] for h in state["history"]], "passes": state["passes"],
              "audio_seconds_this_run": audio_seconds, "seconds_this_run": sum(seconds.values()),
              "seconds_by_part_this_run": seconds}
    (out_dir / "done.json").write_text(json.dumps(record))
    checkpoint.unlink(missing_ok=True)
    return record


class CheckpointWriter:
    """Writes each epoch's checkpoint (weights, optimiser, scheduler, progress) in a thread while the next epoch
    trains: a copy is taken at the epoch's end, then written and moved into place atomically, so a kill during
    the write leaves the previous epoch's checkpoint. One write at a time; `wait` raises a write's error."""

    def __init__(self, path: Path):
        self.path = path
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def write(self, encoder, head, optimiser, scheduler, state: dict) -> None:
        self.wait()
        snapshot = _detached({"encoder": encoder.state_dict(), "head": head.state_dict(),
                              "optimiser": optimiser.state_dict(), "scheduler": scheduler.state_dict()})
        snapshot["state"] = json.dumps(state)
        self.thread = threading.Thread(target=self._save, args=(snapshot,), name="checkpoint-writer")
        self.thread.start()

    def _save(self, snapshot: dict) -> None:
        import torch

        try:
            partial = self.path.with_suffix(".partial")
            torch.save(snapshot, partial)
            os.replace(partial, self.path)
        except BaseException as exc:  # handed to the training thread by wait()
            self.error = exc

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise FinetuneError(f"writing the checkpoint {self.path} failed: {error}") from error


def _detached(value):
    """`value` (nested dicts and lists of tensors) with every tensor copied to host memory: the training goes on
    changing the originals while the copy is written."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: _detached(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_detached(item) for item in value)
    return value


# ----------------------------------------------------------------------------------------------------------
# Cross-fitting


def finetune(manifest: Path | str, model: str, out_dir: Path | str, settings: FinetuneSettings | None = None,
             folds: int = 5, assignment: tuple[list[str], np.ndarray] | None = None, crossfit: bool = True,
             device: str = "auto", progress: FinetuneProgress | None = None) -> dict:
    """Fine-tune per fold (cross-fitting) and on the whole train split; return finetune.json's record.

    `assignment` = (train ids, fold per id), e.g. a study's; else `folds` speaker-grouped stratified folds."""
    import torch

    from adsearch.embed.model import resolve_model
    from adsearch.search.protocol import assign_folds

    settings = settings or FinetuneSettings()
    out_dir = Path(out_dir)
    recordings = read_manifest(manifest)
    train = [r for r in recordings if r.split == "train"]
    if not train:
        raise FinetuneError(f"{manifest}: no train recordings")
    ids = [r.id for r in train]
    if assignment is not None:
        given_ids, fold_of = assignment
        if sorted(given_ids) != sorted(ids):
            raise FinetuneError("the study's fold assignment covers other train recordings than this manifest")
        lookup = dict(zip(given_ids, fold_of, strict=True))
        fold_of = np.array([lookup[i] for i in ids])
    else:
        labels = np.array([r.label for r in train])
        fold_of = assign_folds(labels, np.array([r.group for r in train]), folds, 1, settings.seed)[0]
    source = resolve_model(model)
    dev = resolve_device(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    record_file = out_dir / "finetune.json"
    record = {
        "adsearch_version": __version__, "manifest": str(Path(manifest).resolve()),
        "base_model": {"name": source.name, "revision": source.revision, "path": str(source.path)},
        "settings": asdict(settings), "device": dev, "crossfit": crossfit,
        "folds": {"train_ids": ids, "assignment": [[int(f) for f in fold_of]]},
        "versions": {"torch": torch.__version__, "numpy": np.__version__}, "models": {},
    }
    if record_file.is_file():
        previous = json.loads(record_file.read_text())
        # settings added since a fine-tune began take their defaults (what that fine-tune ran with)
        previous["settings"] = {**asdict(FinetuneSettings()), **previous.get("settings", {})}
        if {k: previous.get(k) for k in ("settings", "folds", "crossfit", "base_model")} != {
                k: record[k] for k in ("settings", "folds", "crossfit", "base_model")}:
            raise FinetuneError(f"{out_dir} holds a fine-tune with other settings, folds or model; choose a new -o")
        record["models"] = previous.get("models", {})
    record_file.write_text(json.dumps(record, indent=1))
    names = ([f"fold-{k}" for k in range(int(fold_of.max()) + 1)] if crossfit else []) + ["full"]
    for index, name in enumerate(names):
        if progress:
            progress.fold(name, index, len(names))
        chosen = train if name == "full" else [r for r, f in zip(train, fold_of, strict=True)
                                                 if f != int(name.split("-")[1])]
        done = train_one(source.path, chosen, out_dir / name, settings, dev, progress, name)
        record["models"][name] = {"path": str((out_dir / name / "best").resolve()), **done}
        record_file.write_text(json.dumps(record, indent=1))
    if progress:
        progress.fold("done", len(names), len(names))
    return record


def extract_crossfit(manifest: Path | str, finetuned: Path | str, out_root: Path | str, extract_settings=None,
                     device: str = "auto", batch_size: int | None = None, progress_for=None) -> Path:
    """Extract each fold's train recordings with the model that never saw them and the test recordings with
    the full model; merge into one cache that records the folds and each item's producer.
    `progress_for(model name)` gives each model's extraction its own progress (a labelled bar)."""
    from adsearch.embed.cache import open_cache

    finetuned = Path(finetuned)
    record = json.loads((finetuned / "finetune.json").read_text())
    if "full" not in record["models"]:
        raise FinetuneError(f"{finetuned}: the fine-tune has not finished (no full model); run finetune again")
    recordings = read_manifest(manifest)
    fold_of = dict(zip(record["folds"]["train_ids"], record["folds"]["assignment"][0], strict=True))
    producer = {}
    for rec in recordings:
        if rec.split == "train" and record["crossfit"]:
            if rec.id not in fold_of:
                raise FinetuneError(f"{rec.id}: not in the fine-tune's folds; use the manifest it was trained on")
            producer[rec.id] = f"fold-{fold_of[rec.id]}"
        else:
            producer[rec.id] = "full"
    parts_root = Path(out_root) / ".crossfit-parts"
    caches = {}
    for name in sorted(set(producer.values())):
        subset = [r for r in recordings if producer[r.id] == name]
        sub_manifest = write_manifest(subset, parts_root / f"{name}.csv")
        result = extract(sub_manifest, parts_root, record["models"][name]["path"], extract_settings,
                         batch_size=batch_size, device=device,
                         progress=progress_for(name) if progress_for else None)
        caches[name] = open_cache(result.cache_dir)
    for name, model in record["models"].items() if record["crossfit"] else ():
        seen = set(model["trained_on"])  # the proof: no producer trained on what it extracted
        leaked = [i for i, p in producer.items() if p == name and i in seen]
        if leaked:
            raise FinetuneError(f"{name} trained on {leaked[:5]} and would extract them: refusing")
    from adsearch.embed.merge import merge_caches

    return merge_caches(recordings, caches, producer, Path(out_root), record, finetuned)
