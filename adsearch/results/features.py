"""Per-file features of an exported model: the speech model (or openSMILE, or the recogniser and the text
encoder) its cache came from, loaded once, and the rows of one new recording computed exactly as
extraction computed the cache's: windowing, statistics and pooling are the extraction's own code."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from adsearch.embed.cache import pool_recordings, pool_windows
from adsearch.io.audio import SAMPLE_RATE, AudioError
from adsearch.results.schema import ExportedConfig, ExportError
from adsearch.results.shared import SharedModels


class FileFeatures:
    """The features an exported model was fitted on, for new audio."""

    def __init__(self, config: ExportedConfig, where: Path, device: str, shared: SharedModels,
                 threads: int | None = None):
        """`where`: the config file, named in errors; `shared`: models shared with other predictors; `threads`:
        a recogniser's CPU threads (torch's models take what the command set)."""
        from adsearch.embed.egemaps import EgemapsEncoder, egemaps_source, is_egemaps
        from adsearch.embed.model import resolve_model

        self.config, self.where, self.shared = config, where, shared
        self.recogniser = None
        if self.config.transcripts is not None:  # a linguistic or text source: words first
            self._load_transcript_source(device, threads)
            return
        layer = config.features.layer
        if is_egemaps(self.config.model.name):  # an eGeMAPS source: openSMILE, not a speech model
            source = egemaps_source(self.config.model.name.removeprefix("opensmile/"))
            if source.revision != self.config.model.revision:
                raise ExportError(f"the classifier was trained on {self.config.model.revision}; this machine has "
                                  f"{source.revision}: install that opensmile version")
            if layer != 0:
                raise ExportError(f"{self.where}: features.layer {layer} does not exist: eGeMAPS "
                                  "caches have one layer (0)")
            self.encoder = self.shared.model(("egemaps", source.name), lambda: EgemapsEncoder(source.name))
        else:
            source = resolve_model(self._model_location())
            if source.revision != self.config.model.revision:
                raise ExportError(
                    f"speech model {self.config.model.name!r} is revision {source.revision}, but the classifier was "
                    f"trained on features of revision {self.config.model.revision}; point the config's model.name "
                    "at that exact model")
            try:
                self.encoder = self.shared.speech_encoder(source, device, self.config.features.dtype, layer)
            except ExportError as exc:
                raise ExportError(f"{self.where}: {exc}") from None

    def _model_location(self) -> str:
        """The model as the study's user named it where that still finds it (a hub id, a folder relative to
        here), else the absolute folder recorded at export: an exported folder works from any directory."""
        name, path = self.config.model.name, self.config.model.path
        if Path(name).expanduser().is_dir() or path is None or not Path(path).is_dir():
            return name
        return path

    def _load_transcript_source(self, device: str, threads: int | None) -> None:
        """The recogniser the training transcripts came from (the same revision), and the text encoder of a
        text source: a WAV file goes through exactly the steps its training recordings went through."""
        from adsearch.embed.linguistic import FEATURES_VERSION
        from adsearch.embed.ngrams import NGRAMS_VERSION
        from adsearch.transcripts.asr import BACKENDS, load_recogniser, resolve_asr

        ref = self.config.transcripts
        if ref.backend not in BACKENDS:
            raise ExportError(f"this classifier was trained on transcripts imported from {ref.backend.upper()} "
                              f"({ref.name}); audio cannot be turned into those. Train on `adsearch transcribe` "
                              "output to predict from audio")
        asr = resolve_asr(ref.backend, ref.name)
        if asr.revision != ref.revision:
            raise ExportError(f"recogniser {ref.name!r} is revision {asr.revision}, but the classifier was trained on "
                              f"transcripts of revision {ref.revision}; install that exact model")
        self.recogniser = self.shared.model(("asr", ref.backend, asr.name, asr.revision, device),
                                            lambda: load_recogniser(asr, device, threads))
        self.encoder = None
        computes = {"adsearch/linguistic": f"features-v{FEATURES_VERSION}+",
                    "adsearch/ngrams": f"ngrams-v{NGRAMS_VERSION}+"}
        if self.config.model.name in computes:
            if not self.config.model.revision.startswith(computes[self.config.model.name]):
                raise ExportError(f"the classifier was trained on {self.config.model.revision}; this adsearch computes "
                                  f"{computes[self.config.model.name].rstrip('+')}")
            if self.config.model.name == "adsearch/ngrams" and not self.config.features.vocabulary:
                raise ExportError("an n-gram classifier's config.yaml needs features.vocabulary; export it again")
            return
        from adsearch.embed.encoder import resolve_device
        from adsearch.embed.model import resolve_model
        from adsearch.embed.text import TextEncoder

        source = resolve_model(self.config.model.name, with_tokenizer=True)
        if source.revision != self.config.model.revision:
            raise ExportError(f"text model {self.config.model.name!r} is revision {source.revision}, but the "
                              f"classifier was trained on revision {self.config.model.revision}")
        self.encoder = self.shared.model(("text", str(source.path), source.revision, device),
                                         lambda: TextEncoder(source, resolve_device(device)))

    def _transcript_stats(self, audio: np.ndarray, segments) -> tuple[np.ndarray, dict, list]:
        from adsearch.embed.from_transcripts import one_vector_stats
        from adsearch.embed.linguistic import linguistic_features
        from adsearch.embed.ngrams import ngram_counts
        from adsearch.transcripts.store import Transcript

        duration = len(audio) / SAMPLE_RATE
        spans = tuple((b, min(e, duration)) for b, e in segments if b < duration) or ((0.0, duration),)
        words = self.shared.once(("transcribe", id(self.recogniser), spans),
                                 lambda: tuple(self.recogniser.transcribe(audio, spans)))
        transcript = Transcript("new", words, spans, duration)
        if self.encoder is None:
            vocabulary = self.config.features.vocabulary
            n_frames, stats = one_vector_stats(ngram_counts(transcript, vocabulary) if vocabulary is not None
                                               else linguistic_features(transcript))
        else:
            n_frames, stats = self.encoder.encode_text(transcript.text, layers=[self.config.features.layer])
        return n_frames, {name: values[0] for name, values in stats.items()}, [spans] * len(n_frames)

    def of(self, audio: np.ndarray, segments) -> tuple[np.ndarray, int, float]:
        """(X, n_windows, speech seconds): one pooled row, or one row per window for window-level configs."""
        from adsearch.embed.windows import plan_windows

        feats = self.config.features
        if self.recogniser is not None:
            n_frames, arrays, spans = self._transcript_stats(audio, segments)
            return self._pool(n_frames, arrays), len(n_frames), sum(e - b for b, e in spans[0])
        spans = plan_windows(segments, len(audio), feats.window_s, feats.min_window_s)
        if not spans:
            raise AudioError("", f"too short: no speech span of at least {feats.min_window_s} s")
        layers = self.shared.layers_of(self.encoder, feats.layer)
        mine = layers.index(feats.layer)
        n_frames, stats = [], defaultdict(list)
        for begin, end in spans:  # one window at a time: the CPU default, and memory stays flat
            frames, window_stats = self.shared.once(
                ("window", id(self.encoder), begin, end),  # every sharer's layers from one forward pass
                lambda begin=begin, end=end: self.encoder.encode([audio[begin:end]], layers=layers))
            n_frames.append(frames[0])
            for name, values in window_stats.items():
                stats[name].append(values[mine, 0])
        arrays = {name: np.stack(values) for name, values in stats.items()}
        return self._pool(np.asarray(n_frames), arrays), len(spans), sum(e - b for b, e in spans) / SAMPLE_RATE

    def _pool(self, n_frames: np.ndarray, arrays: dict) -> np.ndarray:
        feats = self.config.features
        if feats.unit == "window":
            return pool_windows(arrays.__getitem__, n_frames, feats.pooling)
        return pool_recordings(arrays.__getitem__, n_frames, np.zeros(len(n_frames), np.int64), feats.pooling)
