"""Models and per-file steps shared by the predictors of one ensemble: each loaded or done once."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import TypeVar

from adsearch.results.schema import ExportError

T = TypeVar("T")


class SharedModels:
    """Models loaded once, and each file's steps done once, for every Predictor that shares this: an
    ensemble's members often run one speech model (at different layers), one recogniser or one VAD on the
    same file. Keys say what a thing is (model folder, revision, device, dtype; the file and the span), so
    sharing never changes a member's numbers. `forget()` between files."""

    def __init__(self) -> None:
        self._models: dict[tuple, object] = {}
        self._layers: dict[tuple, set[int]] = defaultdict(set)
        self._trimmed = False
        self._steps: dict[tuple, object] = {}

    def model(self, key: tuple, load: Callable[[], T]) -> T:
        if key not in self._models:
            self._models[key] = load()
        return self._models[key]

    def speech_encoder(self, source, device: str, dtype: str, layer: int):
        """The speech model of `source`, to be cut down (`trim`) to the highest layer any sharer needs."""
        from adsearch.embed.encoder import WindowEncoder

        key = ("speech", str(source.path), source.revision, device, dtype)
        encoder = self.model(key, lambda: WindowEncoder(source, device, dtype))
        if layer >= encoder.n_layers:
            raise ExportError(f"features.layer {layer} does not exist: {source.name} has layers "
                              f"0..{encoder.n_layers - 1}")
        if self._trimmed:
            raise ExportError("a speech model was shared after it was cut down to its layers; build every "
                              "predictor before the first prediction")
        self._layers[key].add(layer)
        return encoder

    def trim(self) -> None:
        """Drop the layers above what the sharers need (a classifier on layer k needs only k layers run)."""
        for key, layers in self._layers.items():
            self._models[key].keep_layers(max(layers))
        self._trimmed = True

    def layers_of(self, encoder, layer: int) -> list[int]:
        """Every layer the sharers of `encoder` need (one forward pass serves them all); [layer] for a model
        that has no layers to choose from (eGeMAPS)."""
        return sorted(next((found for key, found in self._layers.items() if self._models[key] is encoder), {layer}))

    def once(self, key: tuple, compute: Callable[[], T]) -> T:
        """A step of the current file (decoding, VAD, a window's statistics, a transcription), done once."""
        if key not in self._steps:
            self._steps[key] = compute()
        return self._steps[key]

    def forget(self) -> None:
        self._steps.clear()
