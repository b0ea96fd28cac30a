"""Fine-tuning the speech model on the AD labels, cross-fitted so that no train feature comes from a model
that saw its label.

The seed's pipeline fine-tunes XLSR before extracting layers. Done naively (one model trained on every
train recording, then cross-validated on those recordings) the CV scores are inflated. Cross-fitting:

* fix a speaker-grouped fold assignment of the train split (`--folds K`, or a study's own);
* for each fold k, fine-tune on the other folds (early stopping on a speaker-grouped validation part of
  them) and extract the fold-k recordings with that model;
* fine-tune on the whole train split and extract the test recordings with it (it is also the model
  `predict` uses);
* merge everything into one cache in the usual format whose `cache.json` records the fold assignment and
  which model produced each item. A study on it uses exactly those folds.

The training loop is `train.py`; `passes.py` chooses how a step goes through the card.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from adsearch import __version__
from adsearch.corpus import read_manifest, write_manifest
from adsearch.embed.encoder import resolve_device
from adsearch.embed.extract import extract
from adsearch.finetune.settings import FinetuneError, FinetuneProgress, FinetuneSettings
from adsearch.finetune.train import train_one
from adsearch.threads import ThreadPlan


def finetune(manifest: Path | str, model: str, out_dir: Path | str, settings: FinetuneSettings | None = None,
             folds: int = 5, assignment: tuple[list[str], np.ndarray] | None = None, crossfit: bool = True,
             device: str = "auto", progress: FinetuneProgress | None = None) -> dict:
    """Fine-tune per fold (cross-fitting) and on the whole train split; return finetune.json's record.

    `assignment` = (train ids, fold per id), e.g. a study's; else `folds` speaker-grouped stratified folds."""
    import torch

    from adsearch.embed.model import resolve_model
    from adsearch.search.protocol import assign_folds

    settings = settings or FinetuneSettings()
    out_dir = Path(out_dir)
    recordings = read_manifest(manifest)
    train = [r for r in recordings if r.split == "train"]
    if not train:
        raise FinetuneError(f"{manifest}: no train recordings")
    ids = [r.id for r in train]
    if assignment is not None:
        given_ids, fold_of = assignment
        if sorted(given_ids) != sorted(ids):
            raise FinetuneError("the study's fold assignment covers other train recordings than this manifest")
        lookup = dict(zip(given_ids, fold_of, strict=True))
        fold_of = np.array([lookup[i] for i in ids])
    else:
        labels = np.array([r.label for r in train])
        fold_of = assign_folds(labels, np.array([r.group for r in train]), folds, 1, settings.seed)[0]
    source = resolve_model(model)
    dev = resolve_device(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    record_file = out_dir / "finetune.json"
    record = {
        "adsearch_version": __version__, "manifest": str(Path(manifest).resolve()),
        "base_model": {"name": source.name, "revision": source.revision, "path": str(source.path)},
        "settings": asdict(settings), "device": dev, "crossfit": crossfit,
        "folds": {"train_ids": ids, "assignment": [[int(f) for f in fold_of]]},
        "versions": {"torch": torch.__version__, "numpy": np.__version__}, "models": {},
    }
    if record_file.is_file():
        previous = json.loads(record_file.read_text())
        # settings added since a fine-tune began take their defaults (what that fine-tune ran with)
        previous["settings"] = {**asdict(FinetuneSettings()), **previous.get("settings", {})}
        if {k: previous.get(k) for k in ("settings", "folds", "crossfit", "base_model")} != {
                k: record[k] for k in ("settings", "folds", "crossfit", "base_model")}:
            raise FinetuneError(f"{out_dir} holds a fine-tune with other settings, folds or model; choose a new -o")
        record["models"] = previous.get("models", {})
    record_file.write_text(json.dumps(record, indent=1))
    names = ([f"fold-{k}" for k in range(int(fold_of.max()) + 1)] if crossfit else []) + ["full"]
    for index, name in enumerate(names):
        if progress:
            progress.fold(name, index, len(names))
        chosen = train if name == "full" else [r for r, f in zip(train, fold_of, strict=True)
                                                 if f != int(name.split("-")[1])]
        done = train_one(source.path, chosen, out_dir / name, settings, dev, progress, name)
        record["models"][name] = {"path": str((out_dir / name / "best").resolve()), **done}
        record_file.write_text(json.dumps(record, indent=1))
    if progress:
        progress.fold("done", len(names), len(names))
    return record


def extract_crossfit(manifest: Path | str, finetuned: Path | str, out_root: Path | str, extract_settings=None,
                     device: str = "auto", batch_size: int | None = None, progress_for=None,
                     threads: ThreadPlan | None = None) -> Path:
    """Extract each fold's train recordings with the model that never saw them and the test recordings with
    the full model; merge into one cache that records the folds and each item's producer.
    `progress_for(model name)` gives each model's extraction its own progress (a labelled bar)."""
    from adsearch.embed.cache import open_cache

    finetuned = Path(finetuned)
    record = json.loads((finetuned / "finetune.json").read_text())
    if "full" not in record["models"]:
        raise FinetuneError(f"{finetuned}: the fine-tune has not finished (no full model); run finetune again")
    recordings = read_manifest(manifest)
    fold_of = dict(zip(record["folds"]["train_ids"], record["folds"]["assignment"][0], strict=True))
    producer = {}
    for rec in recordings:
        if rec.split == "train" and record["crossfit"]:
            if rec.id not in fold_of:
                raise FinetuneError(f"{rec.id}: not in the fine-tune's folds; use the manifest it was trained on")
            producer[rec.id] = f"fold-{fold_of[rec.id]}"
        else:
            producer[rec.id] = "full"
    parts_root = Path(out_root) / ".crossfit-parts"
    caches = {}
    for name in sorted(set(producer.values())):
        subset = [r for r in recordings if producer[r.id] == name]
        sub_manifest = write_manifest(subset, parts_root / f"{name}.csv")
        result = extract(sub_manifest, parts_root, record["models"][name]["path"], extract_settings,
                         batch_size=batch_size, device=device, threads=threads,
                         progress=progress_for(name) if progress_for else None)
        caches[name] = open_cache(result.cache_dir)
    for name, model in record["models"].items() if record["crossfit"] else ():
        seen = set(model["trained_on"])  # the proof: no producer trained on what it extracted
        leaked = [i for i, p in producer.items() if p == name and i in seen]
        if leaked:
            raise FinetuneError(f"{name} trained on {leaked[:5]} and would extract them: refusing")
    from adsearch.embed.merge import merge_caches

    return merge_caches(recordings, caches, producer, Path(out_root), record, finetuned)
