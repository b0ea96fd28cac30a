"""The model being fine-tuned: the speech model (frozen below what trains) with a linear head on its pooled
last hidden state, and its logits for a list of windows."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from adsearch.embed.encoder import inputs_on_device, upload
from adsearch.embed.model import uses_attention_mask
from adsearch.finetune.settings import FinetuneError, FinetuneSettings


def build(model_path: Path, settings: FinetuneSettings, device: str):
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


def window_logits(extractor, encoder, head, windows: list[np.ndarray], device: str):
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
