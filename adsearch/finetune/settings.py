"""What a fine-tune is given (`FinetuneSettings`, recorded in finetune.json) and what it reports."""

from __future__ import annotations

from dataclasses import dataclass


class FinetuneError(ValueError):
    pass


CHECKPOINTING = ("auto", "on", "off")


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
