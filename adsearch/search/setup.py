"""What a study records about itself (cache, space, CV protocol, folds, optimiser) so that any worker can
join it: read by the search, its workers, export and the report alike."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import optuna

from adsearch import __version__
from adsearch.search.errors import StudyError
from adsearch.search.plugins import PluginError, check_digests, module_digest
from adsearch.search.space import StudySpec, parse_spec, source_layers

ATTR = "adsearch"  # study system attribute holding the study's setup


@dataclass
class StudySetup:
    """What a study records about itself so that any worker can join it."""

    cache_path: str
    cache_hash: str
    n_layers: int
    spec: StudySpec
    space_file: str
    train_ids: list[str]
    folds: np.ndarray  # (repeats, n_train)
    sampler: str = ""  # the optimiser every worker uses (recorded at creation; "" = the space's own)
    pruner: str = ""
    sampler_seed: int | None = None  # None = the space's seed
    null_seed: int | None = None  # a null study: train labels permuted across speakers with this seed
    # Several feature sources (caches over the same recordings): name -> {"path", "content_hash", "n_layers"};
    # empty for a study over one cache (cache_path and cache_hash are then its only source).
    sources: dict[str, dict] = field(default_factory=dict)
    left_out: int = 0  # an MMSE study: train recordings without an MMSE score, not in its folds
    one_vector: bool = False  # the only cache holds one vector per recording (`EmbeddingCache.one_vector`)
    # deconfounded CV (`deconfound.plan`): {"scheme": "adjusted" | "none", "why", "features", "scores":
    # (repeats, n_train) nuisance-model scores}; its trials score each fold on predictions adjusted for them.
    deconfound: dict = field(default_factory=lambda: {"scheme": "none", "why": "a study made before deconfounding"})
    baseline: dict | None = None  # a new study's nuisance-only baseline, until it is recorded (NUISANCE_ATTR)

    def __post_init__(self) -> None:
        self.sampler = self.sampler or self.spec.sampler
        self.pruner = self.pruner or self.spec.pruner
        self.sampler_seed = self.spec.seed if self.sampler_seed is None else self.sampler_seed

    def to_attr(self) -> dict:
        return {"version": __version__,
                "optimiser": {"sampler": self.sampler, "pruner": self.pruner, "sampler_seed": self.sampler_seed},
                "null_seed": self.null_seed, "sources": self.sources, "left_out": self.left_out,
                "cache": {"path": self.cache_path, "content_hash": self.cache_hash, "n_layers": self.n_layers,
                          "one_vector": self.one_vector},
                "space": {"file": self.space_file, "hash": self.spec.digest(),
                          "spec": self.spec.model_dump(mode="json")},
                "plugins": {module: module_digest(module) for module in self.spec.plugins},
                "protocol": {**self.spec.cv.model_dump(), "seed": self.spec.seed},
                "folds": {"train_ids": self.train_ids, "assignment": self.folds.tolist()},
                "deconfound": self.deconfound}

    @classmethod
    def from_study(cls, study: optuna.Study) -> StudySetup:
        storage = study._storage  # Study exposes no system attributes; the storage API does
        attr = storage.get_study_system_attrs(storage.get_study_id_from_name(study.study_name)).get(ATTR)
        if attr is None:
            raise StudyError(f"study {study.study_name!r} was not created by adsearch (no '{ATTR}' attribute), or "
                             "its creation was interrupted; choose another --study name, or delete it with "
                             f"`optuna delete-study --study-name {study.study_name} --storage URL`")
        optimiser = attr.get("optimiser", {})
        spec = parse_spec(attr["space"]["spec"])
        try:
            check_digests(attr.get("plugins") or {}, f"study {study.study_name!r}")
        except PluginError as exc:
            raise StudyError(str(exc)) from None
        return cls(attr["cache"]["path"], attr["cache"]["content_hash"], attr["cache"]["n_layers"],
                   spec, attr["space"]["file"], attr["folds"]["train_ids"],
                   np.asarray(attr["folds"]["assignment"]), optimiser.get("sampler", ""),
                   optimiser.get("pruner", ""), optimiser.get("sampler_seed"), attr.get("null_seed"),
                   attr.get("sources") or {}, attr.get("left_out", 0), attr["cache"].get("one_vector", False),
                   attr.get("deconfound") or {"scheme": "none", "why": "a study made before deconfounding"})

    @property
    def nuisances(self) -> np.ndarray | None:
        """The out-of-fold nuisance-model scores (repeats, n_train) a deconfounded study adjusts its
        predictions for, or None: plain CV."""
        if self.deconfound.get("scheme") != "adjusted":
            return None
        return np.asarray(self.deconfound["scores"], np.float64)

    @property
    def layers(self) -> tuple[int, ...]:
        return source_layers(self.spec, self.n_layers)

    @property
    def source_layers(self) -> dict[str, tuple[int, ...]] | None:
        """Each feature source's layers, for a study over several caches (else None)."""
        if not self.sources:
            return None
        return {name: source_layers(self.spec, source["n_layers"], name) for name, source in self.sources.items()}

    @property
    def one_vector_sources(self) -> frozenset[str | None]:
        """The sources (None: the study's only cache) with one vector per recording, whose trials do not choose
        pooling or unit. Studies created before adsearch recorded this choose them everywhere, as they did."""
        if self.sources:
            return frozenset(name for name, source in self.sources.items() if source.get("one_vector"))
        return frozenset({None}) if self.one_vector else frozenset()
