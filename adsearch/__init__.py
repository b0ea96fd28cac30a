"""adsearch: AutoML hyperparameter search over layer-wise speech-model embeddings for dementia detection."""

__version__ = "0.1.0"
