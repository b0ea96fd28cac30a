"""Finding, identifying and loading wav2vec2-family speech models (wav2vec2, HuBERT, WavLM).

Both a Hugging Face id and a local `save_pretrained` directory go through `AutoFeatureExtractor` and
`AutoModel.from_pretrained`, so the tiny test model exercises exactly the path a real checkpoint takes.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "jonatasgrosman/wav2vec2-large-xlsr-53-english"
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin")


class ModelError(RuntimeError):
    pass


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are, and which exact weights they are (part of every cache key)."""

    name: str  # what the user asked for: an id or a directory
    path: Path  # local directory holding config, preprocessor config and weights
    revision: str  # commit hash from the HF cache, or a content hash of a local directory


# files_revision results by the files' (path, size, modification time, inode): hashing a large model's 1.26 GB
# takes over a second, and one process resolves the same folder many times (a cross-fitted fine-tune's six
# extractions, the layers of a screen, predict per file). A file rewritten in place changes its size or mtime.
_REVISIONS: dict[tuple, str] = {}


def files_revision(files: Iterable[Path]) -> str:
    """A content hash of `files` (names and bytes, in the order given; missing ones skipped): the revision of
    a model that has no hub commit. Remembered for the process while no file's size or mtime changes."""
    present = [file for file in files if file.is_file()]
    key = tuple((str(file.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)
                for file in present for stat in [file.stat()])
    if key in _REVISIONS:
        return _REVISIONS[key]
    digest = hashlib.sha256()
    for file in present:
        digest.update(file.name.encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    _REVISIONS[key] = "sha256:" + digest.hexdigest()[:16]
    return _REVISIONS[key]


def _directory_revision(path: Path) -> str:
    files = [path / "config.json", path / "preprocessor_config.json"]
    return files_revision(files + sorted(f for pattern in _WEIGHT_PATTERNS for f in path.glob(pattern)))


# A CTC model's tokenizer (`adsearch transcribe --asr ctc`) and a text encoder's (`--features text`).
_TOKENIZER_PATTERNS = ("vocab.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                       "merges.txt", "added_tokens.json", "processor_config.json")


def resolve_model(name: str, revision: str | None = None, with_tokenizer: bool = False) -> ModelSource:
    """A local directory as is; otherwise the HF cache first, then the hub if it can be reached."""
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelError(f"{local}: not a model directory (no config.json); save one with save_pretrained")
        return ModelSource(name, local.resolve(), _directory_revision(local))
    if local.suffix or name.startswith((".", "/")):
        raise ModelError(f"{name}: model directory not found")
    from huggingface_hub import snapshot_download

    patterns = ["config.json", "preprocessor_config.json", *_WEIGHT_PATTERNS]
    if with_tokenizer:
        patterns += _TOKENIZER_PATTERNS
    try:
        path = Path(snapshot_download(name, revision=revision, allow_patterns=patterns, local_files_only=True))
    except Exception:
        try:
            path = Path(snapshot_download(name, revision=revision, allow_patterns=patterns))
        except Exception as exc:
            raise ModelError(
                f"model {name!r} is neither a local directory nor in the Hugging Face cache, and downloading "
                f"it failed ({type(exc).__name__}). Pass a directory written by save_pretrained, or download "
                f"the model on a machine with hub access (`hf download {name}`, then copy the folder)."
            ) from exc
    commit = path.name if re.fullmatch(r"[0-9a-f]{40}", path.name) else _directory_revision(path)
    return ModelSource(name, path, commit)


def load_model(source: ModelSource, device: str, dtype):
    """Return (feature_extractor, model) in eval mode on `device` in `dtype`."""
    from transformers import AutoFeatureExtractor, AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        extractor = AutoFeatureExtractor.from_pretrained(source.path)
        model, report = AutoModel.from_pretrained(source.path, dtype=dtype, output_loading_info=True)
    except Exception as exc:
        raise ModelError(f"{source.name}: cannot load model from {source.path} ({exc})") from exc
    check_loading_report(source, report)
    if not hasattr(model, "_get_feat_extract_output_lengths"):
        raise ModelError(f"{source.name}: {type(model).__name__} is not a wav2vec2-family speech model")
    return extractor, model.to(device).eval()


# Weights a speech encoder's checkpoint may carry beyond the encoder itself: task heads (CTC, classification)
# and pre-training heads (quantizer, projections). Their absence or presence changes no hidden state.
HEAD_PREFIXES = ("lm_head.", "classifier.", "projector.", "quantizer.", "project_q.", "project_hid.",
                 "final_proj.", "label_embs_concat", "dropout_features.")
# Used only to mask frames while training; never in a forward pass without mask_time_indices.
UNUSED_AT_INFERENCE = ("masked_spec_embed",)


def check_loading_report(source: ModelSource, report: dict) -> None:
    """Refuse a checkpoint that does not hold every weight of the encoder: transformers would fill the gaps
    with random values and say so only in a log line, and every layer's statistics would be noise."""
    missing = [k for k in report.get("missing_keys", ()) if not k.startswith(HEAD_PREFIXES + UNUSED_AT_INFERENCE)]
    unexpected = [k for k in report.get("unexpected_keys", ()) if not k.startswith(HEAD_PREFIXES)]
    mismatched = [str(k[0]) if isinstance(k, tuple) else str(k) for k in report.get("mismatched_keys", ())]
    problems = [f"{len(keys)} {what} ({', '.join(sorted(keys)[:3])}{', ...' if len(keys) > 3 else ''})"
                for what, keys in (("weights missing from the checkpoint", missing),
                                   ("weights in the checkpoint that the model has no place for", unexpected),
                                   ("weights of another shape", mismatched)) if keys]
    if problems:
        raise ModelError(f"{source.name}: the checkpoint in {source.path} does not match its config.json: "
                         f"{'; '.join(problems)}. Loading it would run randomly initialised layers; use the "
                         "checkpoint's own config.json, or a complete checkpoint")


def uses_attention_mask(model) -> bool:
    """Layer-norm feature encoders honour attention_mask; group-norm ones (wav2vec2-base) cannot."""
    return getattr(model.config, "feat_extract_norm", "layer") == "layer"


TINY_KINDS = ("wav2vec2", "wav2vec2-ctc", "whisper")


def save_tiny_model(out: Path | str, seed: int = 0, hidden_size: int = 32, num_layers: int = 4,
                    kind: str = "wav2vec2") -> Path:
    """A tiny random wav2vec2 with the large model's structure (stable layer norm, masked preprocessor);
    `wav2vec2-ctc`: with a CTC head over letters and a processor, as the seed's fine-tuned model has;
    `whisper`: a Whisper encoder-decoder with its log-mel feature extractor."""
    import json

    import torch
    from transformers import (
        Wav2Vec2Config,
        Wav2Vec2CTCTokenizer,
        Wav2Vec2FeatureExtractor,
        Wav2Vec2ForCTC,
        Wav2Vec2Model,
        Wav2Vec2Processor,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    if kind not in TINY_KINDS:
        raise ModelError(f"--kind {kind[:40]!r}: choose {', '.join(TINY_KINDS)}")
    out = Path(out)
    if (out / "config.json").exists():
        raise ModelError(f"{out} already holds a model; choose an empty folder")
    torch.manual_seed(seed)
    if kind == "whisper":
        return _save_tiny_whisper(out, hidden_size, num_layers)
    config = Wav2Vec2Config(
        hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=2,
        intermediate_size=2 * hidden_size, conv_dim=(32,) * 7, num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2, feat_extract_norm="layer", do_stable_layer_norm=True,
        vocab_size=32,
    )
    extractor = Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16_000, padding_value=0.0, do_normalize=True, return_attention_mask=True)
    if kind == "wav2vec2":
        Wav2Vec2Model(config).eval().save_pretrained(out)
        extractor.save_pretrained(out)
        return out
    out.mkdir(parents=True, exist_ok=True)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4, "'": 5}
    vocab.update({letter: 6 + i for i, letter in enumerate("abcdefghijklmnopqrstuvwxyz")})
    (out / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = Wav2Vec2CTCTokenizer(str(out / "vocab.json"), word_delimiter_token="|")
    config.vocab_size, config.pad_token_id = len(vocab), 0
    Wav2Vec2ForCTC(config).eval().save_pretrained(out)
    Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(out)
    return out


def _save_tiny_whisper(out: Path, hidden_size: int, num_layers: int) -> Path:
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    config = WhisperConfig(d_model=hidden_size, encoder_layers=num_layers, decoder_layers=1,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=2 * hidden_size,
                           decoder_ffn_dim=2 * hidden_size, vocab_size=64, num_mel_bins=80,
                           max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                           decoder_start_token_id=1)
    WhisperModel(config).eval().save_pretrained(out)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(out)
    return out
