"""Every layer of a Hugging Face text encoder (the BERT family) over a transcript, pooled like a speech layer.

A transcript longer than the model's positions is cut into chunks of whole tokens, each a "window"; per window
and layer the statistics over its tokens (special tokens included, padding never) are those of a speech
model's frames, so the layer search, the poolings and window-level training apply unchanged.
"""

from __future__ import annotations

import numpy as np

from adsearch.embed.model import ModelError, ModelSource

MAX_CHUNK_TOKENS = 512


class TextEncoder:
    def __init__(self, source: ModelSource, device: str = "cpu"):
        import torch
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        from adsearch.embed.model import check_loading_report

        hf_logging.disable_progress_bar()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source.path)
            self.model, report = AutoModel.from_pretrained(source.path, output_loading_info=True)
        except Exception as exc:
            raise ModelError(f"--text-model {source.name}: cannot load a tokenizer and encoder from {source.path} "
                             f"({exc})") from None
        check_loading_report(source, report)
        if getattr(self.model.config, "is_encoder_decoder", False) or not hasattr(self.model.config, "hidden_size"):
            raise ModelError(f"--text-model {source.name}: {type(self.model).__name__} is not a text encoder")
        self.device = device
        self.model = self.model.to(device).eval()
        self.n_layers = self.model.config.num_hidden_layers + 1
        self.dim = self.model.config.hidden_size
        positions = getattr(self.model.config, "max_position_embeddings", MAX_CHUNK_TOKENS)
        tok = self.tokenizer  # [CLS] ... [SEP] for BERT, <s> ... </s> for RoBERTa
        first = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
        last = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
        self.opening, self.closing = [t for t in (first,) if t is not None], [t for t in (last,) if t is not None]
        self.chunk = min(MAX_CHUNK_TOKENS, positions) - len(self.opening) - len(self.closing)
        self.torch = torch

    def encode_text(self, text: str, layers: list[int] | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(tokens per chunk (W,), {stat: (L, W, dim)}) for one transcript."""
        from adsearch.embed.encoder import masked_layer_stats

        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        chunks = [ids[i:i + self.chunk] for i in range(0, len(ids), self.chunk)] or [[]]
        frames, stats = [], []
        for chunk in chunks:
            inputs = self.opening + chunk + self.closing
            tensor = self.torch.tensor([inputs], device=self.device)
            with self.torch.inference_mode():
                hidden = self.model(input_ids=tensor, output_hidden_states=True).hidden_states
            if layers is not None:
                hidden = [hidden[i] for i in layers]
            n = self.torch.tensor([len(inputs)], device=self.device)
            stats.append(masked_layer_stats(hidden, n))
            frames.append(len(inputs))
        return np.asarray(frames, np.int64), {s: np.concatenate([c[s] for c in stats], axis=1) for s in stats[0]}


def save_tiny_bert(out, seed: int = 0, hidden_size: int = 32, num_layers: int = 2):
    """A tiny random BERT with a word-piece vocabulary of common English words, saved like a real one."""
    from pathlib import Path

    import torch
    from transformers import BertConfig, BertModel, BertTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    words = sorted({w for line in _VOCAB_TEXT.split() for w in [line]})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *[f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"],
             *"abcdefghijklmnopqrstuvwxyz"]
    (out / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    BertTokenizer(str(out / "vocab.txt")).save_pretrained(out)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(dict.fromkeys(vocab)), hidden_size=hidden_size, num_hidden_layers=num_layers,
                        num_attention_heads=2, intermediate_size=2 * hidden_size, max_position_embeddings=128)
    BertModel(config).eval().save_pretrained(out)
    return out


_VOCAB_TEXT = """the a and is are of to in on with for it that this there he she they his her boy girl mother woman
cookie cookies jar stool sink water dish dishes plate cup cups counter cupboard window curtains garden floor
kitchen falling fall over reaching taking drying wiping running overflowing spilling standing open thing
something stuff uh um er well okay so see i you know what doing don't little going get out up"""
