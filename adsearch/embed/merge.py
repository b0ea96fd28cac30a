"""One cache from several: the items of each source cache, in manifest order, as one ordinary cache.

Cross-fitted fine-tuning extracts each fold's recordings with a different model; a search needs them in
one cache. The merged cache has the usual layout and a `crossfit` section in `cache.json`: the fold
assignment, which model produced each item, and what each model was trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from adsearch.corpus import Recording
from adsearch.embed.cache import FORMAT_VERSION, META_FILE, STATS, EmbeddingCache, file_hashes, seal, stat_path


def merge_caches(recordings: list[Recording], caches: dict[str, EmbeddingCache], producer: dict[str, str],
                 out_root: Path, record: dict, finetuned: Path) -> Path:
    """Write (or find) the merged cache under `out_root` and return its folder."""
    first = next(iter(caches.values()))
    for name, cache in caches.items():
        if (cache.n_layers, cache.dim) != (first.n_layers, first.dim):
            raise ValueError(f"{name}: {cache.n_layers} layers x {cache.dim} dims, others have "
                             f"{first.n_layers} x {first.dim}: not the same model architecture")
    key = hashlib.sha256(json.dumps([record["folds"], record["crossfit"], sorted(
        (name, cache.content_hash) for name, cache in caches.items())]).encode()).hexdigest()[:16]
    cache_dir = Path(out_root) / f"finetuned-{'crossfit' if record['crossfit'] else 'naive'}-{key}"
    if (cache_dir / META_FILE).is_file():
        return cache_dir
    position = {name: {rec_id: i for i, rec_id in enumerate(cache.ids)} for name, cache in caches.items()}
    order = [rec for rec in recordings if rec.id in position[producer[rec.id]]]  # failed recordings drop out
    rows = [caches[producer[rec.id]].windows_of(np.array([position[producer[rec.id]][rec.id]])) for rec in order]
    partial = cache_dir.with_name(f".{cache_dir.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    for stat in STATS:
        for layer in range(first.n_layers):
            blocks = [caches[producer[rec.id]].window_stat(layer, stat)[index] for rec, index in zip(order, rows,
                                                                                                    strict=True)]
            target = stat_path(partial, stat, layer)
            target.parent.mkdir(parents=True, exist_ok=True)
            np.save(target, np.concatenate(blocks).astype(np.float32, copy=False))
    windows: dict[str, list] = {"item": [], "start_sample": [], "end_sample": [], "n_frames": []}
    items = []
    for index, (rec, picked) in enumerate(zip(order, rows, strict=True)):
        source = caches[producer[rec.id]].meta["windows"]
        windows["item"] += [index] * len(picked)
        for field in ("start_sample", "end_sample", "n_frames"):
            windows[field] += [source[field][i] for i in picked]
        items.append({"id": rec.id, "label": rec.label, "group": rec.group, "split": rec.split, "mmse": rec.mmse,
                      "path": str(rec.path), "n_windows": len(picked), "producer": producer[rec.id]})
    full = caches.get("full", first)
    failures = [f for cache in caches.values() for f in cache.meta.get("failures", [])]
    meta = {
        "format_version": FORMAT_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "items": items, "windows": windows, "n_windows": len(windows["item"]),
        "files": file_hashes(partial, first.n_layers), "dim": first.dim, "stats": list(STATS),
        "layers": first.meta["layers"],
        # export and predict use the model trained on the whole train split (it produced the test items)
        "model": {**full.meta["model"], "finetuned_from": record["base_model"]},
        "settings": first.meta["settings"], "failures": failures, "versions": first.meta.get("versions", {}),
        "manifest": {"path": record["manifest"], "hash": hashlib.sha256(
            "".join(c.meta["manifest"]["hash"] for c in caches.values()).encode()).hexdigest()},
        "crossfit": {
            "enabled": record["crossfit"],
            "folds": record["folds"],
            "finetuned": str(Path(finetuned).resolve()),
            "models": {name: {"path": model["path"], "revision": caches[name].meta["model"]["revision"],
                              "trained_on": model["trained_on"]}
                       for name, model in record["models"].items() if name in caches},
        },
    }
    (partial / META_FILE).write_text(json.dumps(seal(meta)))
    os.replace(partial, cache_dir)
    return cache_dir
