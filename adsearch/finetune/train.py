"""One fine-tune, resumable: the training loop of one model on labelled windows of participant speech.

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
from dataclasses import asdict
from pathlib import Path

import numpy as np

from adsearch.corpus import Recording
from adsearch.embed.extract import ExtractSettings, recording_windows
from adsearch.embed.model import uses_attention_mask
from adsearch.embed.windows import Window
from adsearch.finetune.model import build, window_logits
from adsearch.finetune.passes import PassPlan, plan_passes, set_checkpointing, still_fits
from adsearch.finetune.settings import FinetuneError, FinetuneProgress, FinetuneSettings
from adsearch.io.audio import AudioError

# ----------------------------------------------------------------------------------------------------------
# Data: labelled windows of participant speech


def _windows(recordings: list[Recording], indices: np.ndarray, settings: FinetuneSettings) -> list[Window]:
    """The windows of `recordings[i]` for i in `indices`, cut as `extract` cuts them, each knowing its recording
    (`item`, an index into `recordings`)."""
    cut = ExtractSettings(settings.window_s, settings.min_window_s)
    windows = []
    for index in indices:
        try:
            found, _ = recording_windows(recordings[index], cut)  # (conditions unused)
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
            logits = window_logits(extractor, encoder, head, [w.audio for w in chunk], device).float()
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

    extractor, encoder, head = build(model_path, settings, device)
    masked = uses_attention_mask(encoder)
    checkpoint = out_dir / "checkpoint.pt"
    saved = None
    if checkpoint.is_file():  # weights_only: a checkpoint file cannot run code when loaded
        saved = torch.load(checkpoint, map_location=device, weights_only=True)
        encoder.load_state_dict(saved["encoder"])
        head.load_state_dict(saved["head"])
    state = json.loads(saved["state"]) if saved else {"epoch": 0, "best": -1.0, "stale": 0, "history": []}
    plan = PassPlan(**state["passes"]) if "passes" in state else None  # a resumed run goes on as it began,
    if plan is None or not still_fits(plan, device):  # unless the card it resumes on is too small for that
        plan = plan_passes(settings, device, encoder, head, extractor, max((w.audio for w in train_windows), key=len))
        state["passes"] = asdict(plan)
    set_checkpointing(encoder, plan.checkpointing)
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
                    part = [w.audio for w in chunk[begin:begin + plan.micro_batch]]
                    logits = window_logits(extractor, encoder, head, part, device)
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
