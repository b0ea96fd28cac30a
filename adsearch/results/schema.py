"""config.yaml of an exported model: its schema, and reading a (possibly hand-edited) one by key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from adsearch.embed.cache import POOLINGS
from adsearch.io.safeyaml import YamlError, load_yaml
from adsearch.search.plugins import PluginError, check_digests
from adsearch.search.space import PipelineSettings, TrialConfig, fixed_params_problems

CONFIG_FILE = "config.yaml"
MODEL_FILE = "model.skops"
DIGESTS_FILE = "digests.json"  # SHA-256 of every config and model file of an export, written last


class ExportError(ValueError):
    pass


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelRef(_Strict):
    name: str  # as the study's user typed it (a hub id, or a folder relative to where they were)
    revision: str
    path: str | None = None  # the absolute folder it was loaded from: predict finds it from any directory


class Features(_Strict):
    source: str | None = None  # the feature source a multi-source study picked (its cache and model are below)
    layer: int = Field(ge=0)  # a negative index would silently pick another layer
    pooling: str
    unit: Literal["recording", "window"]
    window_s: float = Field(gt=0, le=600)
    min_window_s: float = Field(ge=0)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    sample_rate: Literal[16_000] = 16_000
    vocabulary: list[str] | None = None  # an n-gram source's columns: predict counts these in a new transcript


class CVRecord(_Strict):
    folds: int
    repeats: int
    metric: Literal["balanced_accuracy", "accuracy", "f1", "roc_auc", "rmse", "mae", "r2", "pearson_r"]
    seed: int
    mean: float
    std: float
    fold_scores: list[float]  # deconfounded where `deconfound` is: the trial's own value
    fresh: FreshCV | None = None
    # P(AD)'s calibration on the trial's out-of-fold predictions (probability classifiers only)
    calibration: dict | None = None
    # a deconfounded study's scheme, the nuisances its predictions are adjusted for (names, and the nuisance
    # model's out-of-fold scores, repeats x train recordings) and the trial's plain CV: `evaluate` reproduces
    # the deconfounded fold scores with them
    deconfound: Deconfounded | None = None
    # how the exported trial was chosen: by fresh folds among the study's best (`candidates`), or --trial
    selection: dict | None = None


class Deconfounded(_Strict):
    scheme: Literal["adjusted"]
    features: list[str]
    scores: list[list[float]]
    plain_mean: float


class FreshCV(_Strict):
    """The exported configuration re-scored on fold assignments the search never saw: the study's best CV
    was selected as a maximum over many trials on one assignment, this one was not."""

    repeats: int
    seed: int
    mean: float
    std: float  # across the repeats' means
    optimism: float  # how much better the study CV is than the fresh mean: what selecting the best trial added


class StudyRef(_Strict):
    name: str
    trial: int
    storage: str


class CacheRef(_Strict):
    path: str
    content_hash: str


class TranscriptsRef(_Strict):
    """The recogniser whose transcripts a linguistic or text source was computed from: predict runs it again
    on new audio (`backend` chat or csv: imported transcripts, which no recording can be turned into)."""

    backend: str
    name: str
    revision: str
    content_hash: str  # of the training transcripts


class ExportedConfig(_Strict):
    """config.yaml: everything needed to rebuild the classifier without the study."""

    adsearch_version: str
    task: Literal["classification", "mmse"] = "classification"  # mmse: the model predicts the MMSE score
    study: StudyRef
    model: ModelRef
    features: Features
    pipeline: PipelineSettings
    cv: CVRecord
    seed: int
    cache: CacheRef
    versions: dict[str, str]
    transcripts: TranscriptsRef | None = None
    plugins: dict[str, str] = {}  # the plugin module of the classifier -> SHA-256 of its source

    def trial_config(self) -> TrialConfig:
        # the exported cache is the chosen source's own: as a one-cache config, its source is None
        return TrialConfig(layer=self.features.layer, pooling=self.features.pooling, unit=self.features.unit,
                           **self.pipeline.model_dump())


def transcripts_ref(meta: dict) -> TranscriptsRef | None:
    if "transcripts" not in meta:
        return None
    source = meta["transcripts"]["source"]
    return TranscriptsRef(backend=source["backend"], name=source["name"], revision=source["revision"],
                          content_hash=meta["transcripts"]["content_hash"])


def validation_details(exc: ValidationError | TypeError) -> str:
    """Each key of a hand-edited config that fails validation, with what is wrong with it."""
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
    return str(exc)


def _defining_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and (p.name == CONFIG_FILE or p.suffix == ".skops"))


def write_digests(folder: Path) -> None:
    """Record the SHA-256 of every config and model file under `folder` (an export being written)."""
    from adsearch.io.digest import file_digest

    digests = {str(p.relative_to(folder)): file_digest(p) for p in _defining_files(folder)}
    (folder / DIGESTS_FILE).write_text(json.dumps(digests, indent=1, sort_keys=True))


def check_export_digests(folder: Path) -> None:
    """Refuse an export whose config or model files changed since it was written (a hand-edited layer gives
    another answer with exit 0), naming the file. Exports older than the digests have none: not checked."""
    from adsearch.io.digest import file_digest

    recorded_path = folder / DIGESTS_FILE
    if not recorded_path.is_file():
        return
    try:
        recorded = json.loads(recorded_path.read_text())
        assert isinstance(recorded, dict)
    except (OSError, ValueError, AssertionError):
        raise ExportError(f"{recorded_path}: cannot be read as the export's digests; export again") from None
    present = {str(p.relative_to(folder)) for p in _defining_files(folder)}
    for name in sorted(present | set(recorded)):
        if name not in recorded:
            raise ExportError(f"{folder / name}: not part of the export as written (no digest recorded); remove it "
                              "or export again")
        if name not in present:
            raise ExportError(f"{folder / name}: missing from the export; copy the whole folder or export again")
        if file_digest(folder / name) != recorded[name]:
            raise ExportError(f"{folder / name} was changed after the export (its SHA-256 differs from "
                              f"{DIGESTS_FILE}); its predictions would not be the exported model's. Export again "
                              "(or, for your own configuration, `adsearch export --trial N`)")


def load_config(path: Path | str) -> ExportedConfig:
    """Read and validate config.yaml; a hand edit that breaks it is reported by key."""
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_FILE
    if not path.is_file():
        raise ExportError(f"{path}: exported config not found (run `adsearch export` first)")
    try:
        data = load_yaml(path, "exported config")
        if not isinstance(data, dict):
            raise ExportError(f"{path}: the top level must be a mapping (an exported config.yaml)")
        config = ExportedConfig(**data)
    except YamlError as exc:
        raise ExportError(str(exc)) from None
    except (ValidationError, TypeError) as exc:
        raise ExportError(f"{path}: invalid config: {validation_details(exc)}") from None
    try:
        check_digests(config.plugins, str(path))  # the classifier's own code, as it was at export
    except PluginError as exc:
        raise ExportError(str(exc)) from None
    pipeline = config.pipeline
    problems = fixed_params_problems(pipeline.classifier, pipeline.params, "pipeline")
    if config.features.pooling not in POOLINGS:
        problems.append(f"features.pooling: {config.features.pooling!r} is not one of {list(POOLINGS)}")
    if pipeline.select == "kbest" and not (pipeline.select_k or 0) >= 1:
        problems.append("pipeline.select_k: needs a positive integer when select is 'kbest'")
    if pipeline.pca == "components" and not (pipeline.pca_components or 0) >= 1:
        problems.append("pipeline.pca_components: needs a positive integer when pca is 'components'")
    if pipeline.pca == "variance" and not 0 < (pipeline.pca_variance or 0) < 1:
        problems.append("pipeline.pca_variance: needs a share in (0, 1) when pca is 'variance'")
    if problems:
        raise ExportError(f"{path}: invalid config: " + "; ".join(problems))
    check_export_digests(path.parent)  # after the checks by key: a broken edit is named by its key
    return config
