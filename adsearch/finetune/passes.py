"""Passes: how an optimiser step's windows go through the card (windows per pass, gradient checkpointing),
chosen from the card's free memory, measured on it. The loss is normalised over the whole step, so the
choice changes memory and speed, not the optimisation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from adsearch.finetune.model import window_logits
from adsearch.finetune.settings import FinetuneError, FinetuneSettings

MEMORY_SHARE = 0.9  # of the card's free memory a fine-tune plans to use (the rest: fragmentation, other work)


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
        set_checkpointing(encoder, recompute)
        encoder.train()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        try:
            window_logits(extractor, encoder, head, [longest] * size, device).float().sum().backward()
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


def still_fits(plan: PassPlan, device: str) -> bool:
    """Whether passes measured on a card fit the free memory of the one a fine-tune resumes on (the split
    does not change the optimisation, so a resume may choose another)."""
    import torch

    if not device.startswith("cuda") or plan.peak_gb is None:
        return True
    torch.cuda.empty_cache()
    return plan.peak_gb * 2**30 <= MEMORY_SHARE * torch.cuda.mem_get_info(device)[0]


def set_checkpointing(encoder, on: bool) -> None:
    # transformers renamed gradient_* to activation_checkpointing_* (5.2x) and deprecated the old names
    enable = getattr(encoder, "activation_checkpointing_enable", None) or encoder.gradient_checkpointing_enable
    disable = getattr(encoder, "activation_checkpointing_disable", None) or encoder.gradient_checkpointing_disable
    enable() if on else disable()
