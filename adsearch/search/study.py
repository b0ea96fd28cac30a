"""Studies, storage and workers: one Optuna study, many processes, an exact global trial budget.

* Storage is any SQLAlchemy URL. The embedded default is SQLite in WAL mode with a long lock timeout, so
  several local workers wait for the write lock instead of failing with "database is locked".
* The study records its cache (path and content hash), its space (validated content and hash), the CV
  protocol and the fold assignment. A worker loads all of it from the study and refuses a different cache
  or space.
* Exact budget: before a trial starts, its worker reserves a slot with one conditional UPDATE
  (`reserved < budget`) on a small table beside Optuna's. A trial that ends FAIL gives its slot back, so
  exactly `budget` trials finish (COMPLETE or PRUNED), however many workers race.
* Heartbeats: a killed worker's RUNNING trial goes stale; whoever notices fails it, gives its slot back and
  re-enqueues the same parameters (Optuna's RetryHeartbeatStaleTrialCallback), so nothing stays RUNNING.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import sqlite3
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import TrialState

from adsearch import __version__
from adsearch.embed.cache import EmbeddingCache, open_cache
from adsearch.search.objective import FeatureSource, assign_folds, cross_validate
from adsearch.search.space import StudySpec, TrialConfig, check_layers, parse_spec, suggest

DEFAULT_STORAGE = "sqlite:///adsearch.db"
ATTR = "adsearch"  # study user attribute holding the study's setup
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
SQLITE_LOCK_TIMEOUT_S = 120
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"  # recorded on each trial: who ran it


class StudyError(ValueError):
    pass


# ----------------------------------------------------------------------------------------------------------
# Storage


def _sqlite_path(url: str) -> Path | None:
    if not url.startswith("sqlite:///"):
        return None
    path = url[len("sqlite:///"):]
    return None if path in ("", ":memory:") else Path(path)


def _engine_kwargs(url: str) -> dict:
    """SQLite connections wait up to SQLITE_LOCK_TIMEOUT_S for the write lock instead of failing."""
    return {"connect_args": {"timeout": SQLITE_LOCK_TIMEOUT_S}} if url.startswith("sqlite") else {}


def make_storage(
    url: str = DEFAULT_STORAGE, heartbeat_interval: int = 10, grace_period: int = 30, max_retry: int = 3,
    coalesce_seconds: float = 0.0,
) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats and stale-trial retry; SQLite gets WAL and a 120 s lock timeout.
    `coalesce_seconds > 0` (workers) groups a running trial's writes, see `AdsearchStorage`."""
    sqlite_file = _sqlite_path(url)
    if sqlite_file is not None:
        sqlite_file.parent.mkdir(parents=True, exist_ok=True)
        with sqlite3.connect(sqlite_file, timeout=SQLITE_LOCK_TIMEOUT_S) as connection:  # WAL persists
            connection.execute("PRAGMA journal_mode=WAL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            storage = AdsearchStorage(
                url, engine_kwargs=_engine_kwargs(url), heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                heartbeat_stale_trial_callback=_StaleTrialHandler(url, max_retry),
                coalesce_seconds=coalesce_seconds,
            )
        except Exception as exc:
            raise StudyError(f"cannot open storage {url!r}: {exc}") from exc
    return storage


_STATE_CHANGE = threading.local()


class AdsearchStorage(optuna.storages.RDBStorage):
    """Optuna's RDBStorage with two changes, both about what a worker sends to the database.

    **Coalesced trial writes** (`coalesce_seconds > 0`, used by workers). Optuna writes every parameter,
    per-fold report and attribute of a running trial in a transaction of its own (a read of the trial, a
    check, a write, a commit): 17 in a 3-fold trial, which cost more than its logistic-regression fits. Here
    those writes wait in the worker and go out together in one transaction: when the trial changes state,
    when anything is read back (so this process always reads what it wrote, and a pruner sees every fold),
    on `flush()` (the worker calls it once the parameters are sampled, so other workers' constant-liar
    sampling sees them), and whenever `coalesce_seconds` have passed since the trial's last write went out
    (a slow trial's folds still reach the dashboard as they finish). A killed worker loses at most that
    much of its running trial, which is failed as stale and retried with its parameters anyway.

    **SQLite: trial state changes begin IMMEDIATE.** Optuna changes a state by reading the trial, checking
    its state and writing the new one, relying on SELECT ... FOR UPDATE, which SQLite ignores. Two workers
    could then both claim one waiting (retried or enqueued) trial and both run it, the slower one dying on
    "Cannot tell a COMPLETE trial" (measured: 16 to 25 double claims in 300 pops by 3 processes), or both
    fail one stale trial and retry it twice. BEGIN IMMEDIATE takes the write lock before the read. Only
    state changes do so: making every transaction immediate serialised the workers' reads too (2 workers
    1.17x instead of 1.7x).
    """

    def __init__(self, *args, coalesce_seconds: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.coalesce_seconds = coalesce_seconds
        self._pending: dict[int, list[tuple]] = {}  # trial id -> writes not sent yet, in order
        self._sent_at: dict[int, float] = {}  # trial id -> when its writes last went out
        self._lock = threading.RLock()  # the heartbeat thread shares this object
        if self.engine.name == "sqlite":
            _configure_sqlite(self.engine)

    # -- writes that wait --------------------------------------------------------------------------------
    def _set_trial_param(self, trial_id, param_name, param_value_internal, distribution,
                         previous_distribution) -> None:
        self._write(trial_id, ("param", param_name, param_value_internal, distribution, previous_distribution))

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        self._write(trial_id, ("step", step, intermediate_value))

    def set_trial_user_attr(self, trial_id: int, key: str, value) -> None:
        self._write(trial_id, ("user_attr", key, value))

    def _write(self, trial_id: int, write: tuple) -> None:
        with self._lock:
            self._pending.setdefault(trial_id, []).append(write)
            now = time.monotonic()
            if now - self._sent_at.setdefault(trial_id, now) >= self.coalesce_seconds:
                self._send(trial_id)

    def flush(self) -> None:
        """Send every waiting write now, one transaction per trial."""
        with self._lock:
            for trial_id in list(self._pending):
                self._send(trial_id)

    def _send(self, trial_id: int) -> None:
        """One transaction: one read of the trial (is it still running?), then every waiting write, reports
        and attributes as bulk statements (Optuna's own helpers would read the trial again per write)."""
        import sqlalchemy as sa
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session

        writes = self._pending.pop(trial_id, [])
        self._sent_at[trial_id] = time.monotonic()
        if not writes:
            return
        steps = {w[1]: w[2] for w in writes if w[0] == "step"}  # Optuna refuses to report a step twice
        attrs = {w[1]: w[2] for w in writes if w[0] == "user_attr"}  # the last value of a key wins
        with _create_scoped_session(self.scoped_session) as session:
            trial = models.TrialModel.find_or_raise_by_id(trial_id, session)
            self.check_trial_is_updatable(trial_id, trial.state)
            for _, *param in (w for w in writes if w[0] == "param"):  # a few per trial, with their checks
                self._set_trial_param_without_commit(session, trial_id, *param)
            if steps:
                stored = models.TrialIntermediateValueModel.intermediate_value_to_stored_repr
                session.execute(sa.insert(models.TrialIntermediateValueModel), [
                    dict(zip(("intermediate_value", "intermediate_value_type"), stored(value), strict=True),
                         trial_id=trial_id, step=step) for step, value in steps.items()])
            if attrs:
                table = models.TrialUserAttributeModel
                session.execute(sa.delete(table).where(table.trial_id == trial_id, table.key.in_(list(attrs))))
                session.execute(sa.insert(table), [{"trial_id": trial_id, "key": key, "value_json": json.dumps(value)}
                                                   for key, value in attrs.items()])

    def set_trial_state_values(self, trial_id, state, values=None) -> bool:
        with self._lock:
            self._send(trial_id)
            self._sent_at.pop(trial_id, None)
        _STATE_CHANGE.active = self.engine.name == "sqlite"
        try:
            return super().set_trial_state_values(trial_id, state, values)
        finally:
            _STATE_CHANGE.active = False

    # -- reads see every write first ---------------------------------------------------------------------
    def get_trial(self, trial_id: int):
        self.flush()
        return super().get_trial(trial_id)

    def _get_trials(self, *args, **kwargs):
        self.flush()
        return super()._get_trials(*args, **kwargs)

    def get_trial_user_attrs(self, trial_id: int):
        self.flush()
        return super().get_trial_user_attrs(trial_id)

    def get_trial_param(self, trial_id: int, param_name: str) -> float:
        self.flush()
        return super().get_trial_param(trial_id, param_name)

    def _get_best_trial_id(self, *args, **kwargs) -> int:
        self.flush()
        return super()._get_best_trial_id(*args, **kwargs)


def _configure_sqlite(engine) -> None:
    """State changes begin IMMEDIATE (see `AdsearchStorage`); WAL runs with synchronous=NORMAL: no fsync per
    commit, still safe when a process is killed (only an OS crash or power loss can drop the last commits)."""
    import sqlalchemy as sa

    def on_connect(connection, _record) -> None:
        connection.execute("PRAGMA synchronous=NORMAL")

    def on_begin(connection) -> None:
        # Other transactions keep the driver's default: it begins right before the first write.
        if getattr(_STATE_CHANGE, "active", False):
            connection.exec_driver_sql("BEGIN IMMEDIATE")

    sa.event.listen(engine, "connect", on_connect)
    sa.event.listen(engine, "begin", on_begin)
    engine.dispose()  # connections opened before the listeners existed are dropped


class _StaleTrialHandler:
    """Give a stale trial's budget slot back, then re-enqueue its parameters."""

    def __init__(self, url: str, max_retry: int):
        self.url = url
        self.retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        TrialBudget(self.url, study.study_name).release()
        self.retry(study, trial)


class TrialBudget:
    """The global budget: `reserved` slots out of `budget`, kept in one row per study."""

    def __init__(self, url: str, study_name: str):
        import sqlalchemy as sa

        self.study_name = study_name
        self.engine = sa.create_engine(url, **_engine_kwargs(url))
        if self.engine.name == "sqlite":
            _configure_sqlite(self.engine)
        self.table = sa.Table(
            "adsearch_budget", sa.MetaData(),
            sa.Column("study_name", sa.String(512), primary_key=True),
            sa.Column("budget", sa.Integer, nullable=False),
            sa.Column("reserved", sa.Integer, nullable=False),
        )
        self.table.create(self.engine, checkfirst=True)

    def set(self, budget: int, reserved: int) -> None:
        import sqlalchemy as sa

        with self.engine.begin() as db:
            updated = db.execute(sa.update(self.table).where(self.table.c.study_name == self.study_name)
                                 .values(budget=budget, reserved=reserved)).rowcount
            if not updated:
                db.execute(sa.insert(self.table).values(study_name=self.study_name, budget=budget,
                                                        reserved=reserved))

    def get(self) -> tuple[int, int]:
        import sqlalchemy as sa

        with self.engine.connect() as db:
            row = db.execute(sa.select(self.table.c.budget, self.table.c.reserved)
                             .where(self.table.c.study_name == self.study_name)).first()
        if row is None:
            raise StudyError(f"study {self.study_name!r} has no budget; start it with `adsearch search`")
        return int(row[0]), int(row[1])

    def reserve(self) -> bool:
        import sqlalchemy as sa

        t = self.table
        with self.engine.begin() as db:
            return db.execute(sa.update(t).where(t.c.study_name == self.study_name, t.c.reserved < t.c.budget)
                              .values(reserved=t.c.reserved + 1)).rowcount == 1

    def release(self) -> None:
        import sqlalchemy as sa

        t = self.table
        with self.engine.begin() as db:
            db.execute(sa.update(t).where(t.c.study_name == self.study_name, t.c.reserved > 0)
                       .values(reserved=t.c.reserved - 1))

    def reconcile(self, expected_reserved: int, holders: int) -> bool:
        """Reset `reserved` to the trials that hold a slot, if nobody changed it meanwhile."""
        import sqlalchemy as sa

        t = self.table
        with self.engine.begin() as db:
            return db.execute(sa.update(t).where(t.c.study_name == self.study_name,
                                                 t.c.reserved == expected_reserved)
                              .values(reserved=holders)).rowcount == 1


# ----------------------------------------------------------------------------------------------------------
# Study setup


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

    def to_attr(self) -> dict:
        return {"version": __version__,
                "cache": {"path": self.cache_path, "content_hash": self.cache_hash, "n_layers": self.n_layers},
                "space": {"file": self.space_file, "hash": self.spec.digest(),
                          "spec": self.spec.model_dump(mode="json")},
                "protocol": {**self.spec.cv.model_dump(), "seed": self.spec.seed},
                "folds": {"train_ids": self.train_ids, "assignment": self.folds.tolist()}}

    @classmethod
    def from_study(cls, study: optuna.Study) -> StudySetup:
        storage = study._storage  # Study exposes no system attributes; the storage API does
        attr = storage.get_study_system_attrs(storage.get_study_id_from_name(study.study_name)).get(ATTR)
        if attr is None:
            raise StudyError(f"study {study.study_name!r} was not created by adsearch (no '{ATTR}' attribute)")
        return cls(attr["cache"]["path"], attr["cache"]["content_hash"], attr["cache"]["n_layers"],
                   parse_spec(attr["space"]["spec"]), attr["space"]["file"], attr["folds"]["train_ids"],
                   np.asarray(attr["folds"]["assignment"]))

    @property
    def layers(self) -> tuple[int, ...]:
        return check_layers(self.spec, self.n_layers)


def new_setup(cache: EmbeddingCache, spec: StudySpec, space_file: str) -> StudySetup:
    check_layers(spec, cache.n_layers, space_file)
    source = FeatureSource(cache)
    folds = assign_folds(source.labels, source.groups, spec.cv.folds, spec.cv.repeats, spec.seed)
    return StudySetup(str(cache.path.resolve()), cache.content_hash, cache.n_layers, spec, space_file, source.ids,
                      folds)


def check_compatible(setup: StudySetup, study_name: str, cache: EmbeddingCache | None = None,
                     spec: StudySpec | None = None) -> None:
    """Refuse to mix caches or spaces within one study."""
    if cache is not None and cache.content_hash != setup.cache_hash:
        raise StudyError(
            f"study {study_name!r} was created with the cache {setup.cache_path} (content hash "
            f"{setup.cache_hash[:12]}); {cache.path} has hash {cache.content_hash[:12]}. Use that cache, "
            "or start a new study with another --study name."
        )
    if spec is not None and spec.digest() != setup.spec.digest():
        raise StudyError(
            f"study {study_name!r} was created with a different search space ({setup.space_file}, hash "
            f"{setup.spec.digest()}; given: {spec.digest()}). Leave --space out to use the study's own, "
            "or start a new study with another --study name."
        )


def load_cache_for(setup: StudySetup, study_name: str, cache_path: str | Path | None = None) -> EmbeddingCache:
    try:
        cache = open_cache(cache_path or setup.cache_path)
    except Exception as exc:
        raise StudyError(f"study {study_name!r}: cannot open its cache ({exc}); pass --cache with a copy of it"
                         ) from exc
    check_compatible(setup, study_name, cache=cache)
    return cache


def create_or_resume(storage, study_name: str, cache: EmbeddingCache, spec: StudySpec, space_file: str,
                     budget: int) -> optuna.Study:
    """Create the study (recording its setup) or resume it after checking cache and space; set the budget."""
    url = storage.url
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
        check_compatible(StudySetup.from_study(study), study_name, cache, spec)
    except KeyError:
        setup = new_setup(cache, spec, space_file)
        study = optuna.create_study(study_name=study_name, storage=storage, direction="maximize")
        # A system attribute: workers need it, the dashboard's user-attribute table does not.
        storage.set_study_system_attr(storage.get_study_id_from_name(study_name), ATTR, setup.to_attr())
        import optuna_dashboard

        optuna_dashboard.save_note(study, study_note(cache, setup))
    counts = trial_counts(study)
    TrialBudget(url, study_name).set(budget, counts["finished"] + counts["running"])
    return study


def study_note(cache: EmbeddingCache, setup: StudySetup) -> str:
    """The markdown the dashboard shows on the study page: what data, which model, which protocol."""
    meta, spec = cache.meta, setup.spec
    train = cache.labels[cache.splits == "train"]
    n_test = int((cache.splits == "test").sum())
    model = meta.get("model", {})
    return "\n".join([
        "## adsearch study",
        f"**Corpus**: `{meta.get('manifest', {}).get('path', '?')}`: {len(train)} train recordings "
        f"(AD {(train == 1).sum()}, control {(train == 0).sum()}), {n_test} test recordings (never read here).",
        f"**Cache**: `{setup.cache_path}` (content {setup.cache_hash[:12]}); model `{model.get('name')}` @ "
        f"`{model.get('revision')}`, {cache.n_layers} hidden states x {cache.dim} dims, windows of "
        f"{meta.get('settings', {}).get('window_s')} s.",
        f"**Space**: `{setup.space_file}` (hash {spec.digest()}); sampler {spec.sampler}, pruner {spec.pruner}, "
        f"seed {spec.seed}; classifiers {', '.join(spec.space.classifiers)}.",
        f"**CV**: {spec.cv.folds} folds x {spec.cv.repeats} repeat(s), stratified by label, grouped by speaker; "
        f"metric {spec.cv.metric}. Intermediate values are the per-fold scores.",
        "Trial columns: `cv_*` are fold means of each metric, `cv_std` the spread of the study metric, "
        "`fit_seconds` the time in fit/predict, `worker` the host:pid that ran it.",
    ])


def trial_counts(study: optuna.Study) -> dict[str, int]:
    states = [t.state for t in study.get_trials(deepcopy=False)]
    finished = sum(s in FINISHED for s in states)
    return {"finished": finished, "complete": states.count(TrialState.COMPLETE),
            "pruned": states.count(TrialState.PRUNED), "running": states.count(TrialState.RUNNING),
            "waiting": states.count(TrialState.WAITING), "failed": states.count(TrialState.FAIL)}


# ----------------------------------------------------------------------------------------------------------
# Samplers and pruners by name


class LayerGridSampler(optuna.samplers.BaseSampler):
    """The seed's baseline: score every layer with one reference setting, then tune on the best layer.

    Trials 0..L-1 walk the layers with the reference pooling, preprocessing and classifier; later trials
    keep the best grid layer (and its pooling) and let TPE tune everything else.
    """

    def __init__(self, spec: StudySpec, layers: tuple[int, ...], seed: int | None):
        self.layers = layers
        reference = spec.layer_grid
        self.reference = {"pooling": reference.pooling, "unit": reference.unit, "scale": reference.scale,
                          "pca": reference.pca, "l2_normalize": reference.l2_normalize,
                          "classifier": reference.classifier,
                          **{f"{reference.classifier}.{k}": v for k, v in reference.params.items()}}
        self.tuner = optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)
        self._fixed: dict = {}  # best grid layer and pooling, looked up once per tuning trial

    def _grid_phase(self, trial) -> bool:
        return trial.number < len(self.layers)

    def _best_grid(self, study) -> dict:
        grid = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.number < len(self.layers)]
        best = max(grid, key=lambda t: t.value) if grid else None
        return {"layer": best.params["layer"], "pooling": best.params["pooling"]} if best else {}

    def infer_relative_search_space(self, study, trial):
        if self._grid_phase(trial):
            return {}
        space = self.tuner.infer_relative_search_space(study, trial)
        return {k: v for k, v in space.items() if k not in ("layer", "pooling")}

    def sample_relative(self, study, trial, search_space):
        if not search_space:
            return {}
        return self.tuner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        if self._grid_phase(trial):
            if param_name == "layer":
                return self.layers[trial.number]
            if param_name in self.reference and param_distribution._contains(
                    param_distribution.to_internal_repr(self.reference[param_name])):
                return self.reference[param_name]
            return self.tuner.sample_independent(study, trial, param_name, param_distribution)
        if param_name in self._fixed:
            return self._fixed[param_name]
        return self.tuner.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial):
        self._fixed = {} if self._grid_phase(trial) else self._best_grid(study)
        self.tuner.before_trial(study, trial)

    def after_trial(self, study, trial, state, values):
        self.tuner.after_trial(study, trial, state, values)


def make_sampler(name: str, spec: StudySpec, layers: tuple[int, ...], seed: int | None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "tpe":
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True)
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if name == "layer-grid":
            return LayerGridSampler(spec, layers, seed)
    raise StudyError(f"unknown sampler {name!r}; choose tpe, random or layer-grid")


def make_pruner(name: str):
    if name == "wilcoxon":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.pruners.WilcoxonPruner(p_threshold=0.1)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise StudyError(f"unknown pruner {name!r}; choose wilcoxon, median or none")


# ----------------------------------------------------------------------------------------------------------
# The objective and the worker loop


class Objective:
    """Callable for `study.optimize`: suggest a config, cross-validate it, report each fold."""

    def __init__(self, setup: StudySetup, cache: EmbeddingCache, publish: Callable[[], None] | None = None):
        self.setup = setup
        self.publish = publish  # sends the sampled parameters to the storage before the folds run
        self.source = FeatureSource(cache)
        if self.source.ids != setup.train_ids:
            raise StudyError("the cache's train items differ from the study's fold assignment")
        self.layers = setup.layers

    def __call__(self, trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", WORKER_ID)
        try:
            return self._evaluate(trial)
        except optuna.TrialPruned:
            raise
        except Exception as exc:  # kept on the trial: Optuna 5 records no reason for a failure
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:1000])
            raise

    def _evaluate(self, trial: optuna.Trial) -> float:
        config = suggest(trial, self.setup.spec, self.layers)
        if self.publish is not None:
            self.publish()
        spec = self.setup.spec

        scores: list[float] = []
        prunes = not isinstance(trial.study.pruner, optuna.pruners.NopPruner)

        def report(step: int, score: float) -> None:
            scores.append(score)
            trial.report(score, step)
            if prunes and trial.should_prune():
                raise optuna.TrialPruned(f"pruned after fold {step + 1}")

        pruned = None
        try:
            result = cross_validate(config, self.source, self.setup.folds, spec.cv.metric, spec.seed, report)
        except optuna.TrialPruned as exc:
            pruned, result = exc, None
        # Flat attributes read well as dashboard columns; per-fold scores are the intermediate values and
        # the trial's duration is the dashboard's own column (each attribute is one storage write).
        attrs = {"cv_std": round(float(np.std(scores)), 6)}
        if result is not None:
            attrs.update({f"cv_{name}": round(value, 6) for name, value in result.summary().items()})
            attrs["fit_seconds"] = round(result.fit_seconds, 4)
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        if pruned is not None:
            raise pruned
        return result.mean


def _return_freed_memory_to_the_system() -> None:
    """Fix glibc's mmap threshold at 8 MiB. By default glibc raises it (up to 32 MiB) each time a large array
    is freed, after which fold-sized arrays come from the heap and their pages stay with the process when
    freed: on the 10,000-window memory benchmark the peak was 502 MB with the default and 465 MB with this
    (446 MB at 1 MiB, but then the small arrays of an ADReSSo-sized fold page-fault on every allocation and
    fits got about 20 % slower; at 8 MiB they did not). Setting the threshold also turns that adjustment off.
    Nothing happens where the C library is not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 8 << 20)
    mallopt(m_trim_threshold, 8 << 20)


@contextmanager
def trial_conditions() -> Iterator[None]:
    """What a worker runs its trials under. One core per worker (also keeps BLAS results identical across
    workers); convergence and similar warnings of thousands of fits would bury the progress display, and a
    failing fit fails its trial. Features come from the cache, finite by construction: scikit-learn's
    finiteness checks are skipped."""
    import sklearn
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1), warnings.catch_warnings(), sklearn.config_context(assume_finite=True):
        warnings.simplefilter("ignore")
        yield


@dataclass
class WorkerReport:
    ran: int = 0
    failed: int = 0


def run_worker(
    study_name: str,
    storage_url: str = DEFAULT_STORAGE,
    cache_path: str | None = None,
    sampler: str | None = None,
    pruner: str | None = None,
    worker_index: int | None = None,
    heartbeat_interval: int = 10,
    grace_period: int = 30,
    poll_seconds: float = 0.5,
    max_consecutive_failures: int = 5,
    coalesce_seconds: float = 1.0,
) -> WorkerReport:
    """Run trials of `study_name` until the study's global budget of finished trials is met."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _return_freed_memory_to_the_system()
    storage = make_storage(storage_url, heartbeat_interval, grace_period, coalesce_seconds=coalesce_seconds)
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        raise StudyError(f"no study {study_name!r} in {storage_url}; create it with `adsearch search`") from None
    setup = StudySetup.from_study(study)
    cache = load_cache_for(setup, study_name, cache_path)
    objective = Objective(setup, cache, publish=storage.flush)
    index = worker_index if worker_index is not None else random.SystemRandom().randrange(1 << 30)
    seed = _worker_seed(setup.spec.seed, index, len(study.get_trials(deepcopy=False)))
    study.sampler = make_sampler(sampler or setup.spec.sampler, setup.spec, objective.layers, seed)
    study.pruner = make_pruner(pruner or setup.spec.pruner)
    budget = TrialBudget(storage_url, study_name)
    report = WorkerReport()
    streak: list[str] = []

    def after_trial(_study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state == TrialState.FAIL:
            budget.release()
            report.failed += 1
            streak.append(trial.user_attrs.get("error", "unknown error (see the worker's log)"))
        else:
            streak.clear()

    suspect: tuple[int, int, float] | None = None  # (reserved, holders, since) while they disagree
    with trial_conditions():
        while True:
            if budget.reserve():
                report.ran += 1
                study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=[after_trial])
                if len(streak) >= max_consecutive_failures:
                    raise StudyError(f"{len(streak)} trials failed in a row; last error: {streak[-1]}")
                continue
            total, reserved = budget.get()
            counts = trial_counts(study)
            if counts["finished"] >= total:
                return report
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
            holders = counts["finished"] + counts["running"]
            # A worker killed between reserving and creating its trial leaks a slot; take it back once the
            # mismatch has outlived a grace period (reserving and creating take milliseconds).
            if reserved > holders:
                if suspect is None or suspect[:2] != (reserved, holders):
                    suspect = (reserved, holders, time.monotonic())
                elif time.monotonic() - suspect[2] > grace_period:
                    budget.reconcile(reserved, holders)
                    suspect = None
            else:
                suspect = None
            time.sleep(poll_seconds)


def _worker_seed(seed: int, worker_index: int, n_existing: int) -> int:
    """Different per worker and per resume, reproducible for a fresh single-worker study."""
    if worker_index == 0 and n_existing == 0:
        return seed
    blob = json.dumps([seed, worker_index, n_existing]).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:4], "little")


def trial_config(setup: StudySetup, params: dict) -> TrialConfig:
    """Rebuild a trial's full configuration (fixed values included) by replaying the space on its params."""
    return suggest(optuna.trial.FixedTrial(params), setup.spec, setup.layers)


def best_summary(study: optuna.Study, setup: StudySetup) -> dict | None:
    try:
        best = study.best_trial
    except ValueError:
        return None
    return {"number": best.number, "value": best.value,
            "config": trial_config(setup, best.params).model_dump(mode="json")}


def describe_config(config: dict) -> str:
    parts = [f"layer {config.get('layer')}", str(config.get("pooling")), str(config.get("unit"))]
    if config.get("pca") == "components":
        parts.append(f"pca {config.get('pca_components')}")
    elif config.get("pca") == "variance":
        parts.append(f"pca {config.get('pca_variance'):.0%} var")
    if config.get("l2_normalize"):
        parts.append("l2")
    params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in (config.get("params") or {}).items())
    parts.append(f"{config.get('classifier')}({params})")
    return ", ".join(parts)


def _worker_main(**kwargs) -> None:
    try:
        run_worker(**kwargs)
    except StudyError as exc:
        print(f"worker {kwargs.get('worker_index')}: error: {exc}", flush=True)
        raise SystemExit(2) from None


def spawn_workers(n: int, kwargs: dict) -> list:
    """Start n worker processes (spawned: fresh interpreters, no forked database connections)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_worker_main, kwargs={**kwargs, "worker_index": i}) for i in range(n)]
    for process in processes:
        process.start()
    return processes
