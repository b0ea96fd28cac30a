"""What the CLI does, as Python functions, for scripted experiments (a notebook, a loop over corpora or models).

    from adsearch import api

    cache = api.extract("corpus.csv", "cache/", model="jonatasgrosman/wav2vec2-large-xlsr-53-english")
    study = api.create_study("xlsr", cache, space="studies/default.yaml", trials=200)
    api.run_worker("xlsr")                      # as many as you like, in any process or machine
    result = api.export("xlsr", "best/")        # config.yaml, model.skops, test evaluation, report
    api.predict("best/", ["new.wav"])           # one Prediction per recording

Every function takes the same storage URL as the CLI's `--storage` (default: ./adsearch.db) and raises the
same errors the CLI turns into messages (ValueError and its subclasses: bad input a user can fix). The
modules behind them (`adsearch.search`, `adsearch.results.export`, `adsearch.results.predict`) are the longer API.
"""

from __future__ import annotations

from pathlib import Path

import optuna

from adsearch.embed.cache import EmbeddingCache, open_cache
from adsearch.search.storage import DEFAULT_STORAGE
from adsearch.threads import quiet_openmp

__all__ = ["create_study", "export", "extract", "open_cache", "predict", "run_worker"]


def extract(manifest: Path | str, out_root: Path | str, model: str, device: str = "auto",
            threads: int | None = None) -> EmbeddingCache:
    """Run every recording of a manifest through a speech model once (needs `adsearch[extract]`), or resume;
    return the cache (one folder under `out_root`, as `adsearch extract` writes it). `threads` as `--threads`."""
    quiet_openmp()
    from adsearch.embed.extract import extract as run_extraction
    from adsearch.threads import choose_threads

    return open_cache(run_extraction(manifest, out_root, model, device=device,
                                     threads=choose_threads(threads)).cache_dir)


def create_study(name: str, cache: EmbeddingCache | Path | str | dict[str, EmbeddingCache | Path | str],
                 space: Path | str = "studies/default.yaml", storage: str = DEFAULT_STORAGE, trials: int = 100,
                 plugins: list[str] | None = None) -> optuna.Study:
    """Create the study (layer screen included) or resume it with `trials` as its budget: `adsearch search
    --workers 0`. `cache` may map source names to caches, to search several feature sources jointly."""
    from adsearch.search.space import load_spec
    from adsearch.search.storage import make_storage
    from adsearch.search.study import create_or_resume, name_sources

    caches = cache if isinstance(cache, dict) else {"": cache}
    opened = [(key or None, one if isinstance(one, EmbeddingCache) else open_cache(one)) for key, one in caches.items()]
    return create_or_resume(make_storage(storage), name, name_sources(opened), load_spec(space, plugins), str(space),
                            trials)


def run_worker(name: str, storage: str = DEFAULT_STORAGE, cache: Path | str | None = None):
    """Run trials of an existing study until its budget is met (`adsearch worker`); returns what it ran."""
    from adsearch.search.worker import run_worker as worker

    return worker(name, storage, str(cache) if cache is not None else None)


def export(name: str, out_dir: Path | str, storage: str = DEFAULT_STORAGE, trial: int | None = None, top_k: int = 0):
    """Freeze the best (or the given) trial, evaluate it once on the held-out test split and write the report
    (`adsearch export`); returns the exported config, test metrics and warnings."""
    from adsearch.results.export import export_trial

    return export_trial(name, storage, out_dir, trial, top_k, log=lambda message: None)


def predict(export_dir: Path | str, recordings: list[Path | str], device: str = "auto",
            threads: int | None = None) -> list:
    """P(AD) and the label of new recordings with an exported model (`adsearch predict`, whole recordings)."""
    quiet_openmp()
    from adsearch.results.predict import Predictor
    from adsearch.threads import choose_threads

    predictor = Predictor(export_dir, device, threads=choose_threads(threads).threads)
    return [predictor.predict(path) for path in recordings]
