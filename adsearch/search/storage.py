"""The study database: Optuna's RDBStorage behind any SQLAlchemy URL, with what many workers need.

* SQLite (the embedded default) runs in WAL mode with a long lock timeout, so several local workers wait
  for the write lock instead of failing with "database is locked", and trial state changes take the write
  lock before they read (see `AdsearchStorage`).
* Heartbeats: a killed worker's RUNNING trial goes stale; whoever notices fails it, re-enqueues the same
  parameters (Optuna's RetryHeartbeatStaleTrialCallback) and only then gives its budget slot back.
* `AdsearchStorage` keeps Optuna's storage contract: CI runs Optuna's own storage test suite against it
  (tests/test_storage_contract.py), on SQLite, PostgreSQL and MariaDB, with coalesced writes on and off.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from adsearch.search.budget import TrialBudget
from adsearch.search.database import (
    SQLITE_LOCK_TIMEOUT_S,
    configure_sqlite,
    created_concurrently,
    engine_kwargs,
    is_deadlock,
    state_change,
    unreachable_errors,
)
from adsearch.search.errors import StudyError

DEFAULT_STORAGE = "sqlite:///adsearch.db"
MAX_PASSWORD_BYTES = 4096
_log = logging.getLogger(__name__)


class StorageError(StudyError):
    pass


def mask_url(url: str) -> str:
    """The URL with its password replaced by ***, for messages and logs."""
    try:
        import sqlalchemy as sa

        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1] if "@" in url else url


def with_password(url: str) -> str:
    """The URL with the password from the file ADSEARCH_STORAGE_PASSWORD_FILE (a Docker or Kubernetes secret)
    filled in, when the URL carries none. PostgreSQL's own PGPASSWORD and ~/.pgpass work without this."""
    import os

    import sqlalchemy as sa

    secret = os.environ.get("ADSEARCH_STORAGE_PASSWORD_FILE")
    if not secret:
        return url
    parsed = sa.engine.make_url(url)
    if parsed.password:
        return url
    import stat

    try:
        if not stat.S_ISREG(os.stat(secret).st_mode):  # /dev/zero would never end
            raise StorageError(f"ADSEARCH_STORAGE_PASSWORD_FILE={secret}: not a regular file; name the file that "
                               "holds the password")
        with open(secret, "rb") as handle:
            data = handle.read(MAX_PASSWORD_BYTES + 1)
    except OSError as exc:
        raise StorageError(f"ADSEARCH_STORAGE_PASSWORD_FILE={secret}: cannot read it ({exc.strerror})") from None
    if len(data) > MAX_PASSWORD_BYTES:
        raise StorageError(f"ADSEARCH_STORAGE_PASSWORD_FILE={secret}: over {MAX_PASSWORD_BYTES} bytes; it must hold "
                           "the password alone")
    try:
        password = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise StorageError(f"ADSEARCH_STORAGE_PASSWORD_FILE={secret}: not UTF-8 text") from None
    return parsed.set(password=password).render_as_string(hide_password=False)


def check_url(url: str) -> str:
    """Refuse what cannot be a study database before anything is created; return the URL."""
    import sqlalchemy as sa

    try:
        parsed = sa.engine.make_url(url)
    except Exception:
        raise StorageError(f"--storage {mask_url(url)!r} is not a database URL; give e.g. sqlite:///adsearch.db "
                           "or postgresql+psycopg://user@host/db") from None
    if parsed.get_backend_name() == "grpc":
        # Optuna's proxy client keeps no heartbeats: a killed worker's trial would stay RUNNING for ever.
        raise StorageError(f"--storage {mask_url(url)!r}: adsearch workers do not go through Optuna's gRPC storage "
                           "proxy (it has no heartbeats, so a killed worker's trial would never be retried, and "
                           "it did not raise throughput, see BENCHMARKS.md); give the database URL itself, e.g. "
                           "postgresql+psycopg://user@host/db")
    try:
        parsed.get_dialect()
    except Exception:
        raise StorageError(f"--storage {mask_url(url)!r}: {parsed.get_backend_name()!r} is not a database "
                           "SQLAlchemy knows; use sqlite:///FILE, postgresql+psycopg://... or "
                           "mysql+pymysql://...") from None
    if parsed.get_backend_name() != "sqlite":
        return url
    database = parsed.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        return url
    path = Path(database)
    if path.is_dir():
        raise StorageError(f"--storage {url}: {path} is a folder; name a database file in it, "
                           f"e.g. sqlite:///{path / 'adsearch.db'}")
    folder = path.parent if str(path.parent) else Path(".")
    if folder.exists() and not folder.is_dir():
        raise StorageError(f"--storage {url}: {folder} is a file, not a folder")
    return url


def check_heartbeat(heartbeat_interval: int, grace_period: int) -> None:
    """A trial counts as dead after `grace_period` seconds without a heartbeat; with a grace shorter than
    two heartbeats, one late heartbeat (a slow commit, a busy core) fails a trial that is still running."""
    if heartbeat_interval < 1 or grace_period < 2 * heartbeat_interval:
        raise StorageError(f"--heartbeat {heartbeat_interval} / --grace {grace_period}: the heartbeat must be at least "
                           "1 s and the grace at least twice the heartbeat (defaults: 10 and 30)")


def make_storage(
    url: str = DEFAULT_STORAGE, heartbeat_interval: int = 10, grace_period: int = 30, max_retry: int = 3,
    coalesce_seconds: float = 0.0, create: bool = True, read_only_where_unwritable: bool = False,
) -> AdsearchStorage:
    """The storage of a study: heartbeats, stale-trial retry, SQLite set up for many local workers.
    `coalesce_seconds > 0` (workers) groups a running trial's reports and attributes, see `AdsearchStorage`.
    `create=False` (commands that only use existing studies) refuses an SQLite file that does not exist
    instead of leaving an empty database behind. An SQLite file of another application is never touched.
    `read_only_where_unwritable` (the dashboard): an SQLite file this process may not write is opened read-only
    (the storage's `read_only` is then True)."""
    import sqlalchemy as sa

    check_url(url)
    check_heartbeat(heartbeat_interval, grace_period)
    url = with_password(url)
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        path = Path(parsed.database)
        if not create and not path.exists():
            raise StorageError(f"--storage {url}: no study database at {path}; pass the --storage that "
                               "`adsearch search` used")
        _check_not_foreign(path, url)
        if read_only_where_unwritable and path.is_file() and not (
                os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)):
            # a study database on a read-only mount or owned by someone else: read it as it is, never write
            url = f"sqlite:///file:{path.resolve()}?mode=ro&immutable=1&uri=true"
        else:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                _enable_wal(path)
            except Exception as exc:
                raise StorageError(f"--storage {url}: cannot open or create the database file ({exc}); check the "
                                   "folder exists and is writable") from None
    attempts = 3
    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = AdsearchStorage(
                    url, engine_kwargs=engine_kwargs(url), heartbeat_interval=heartbeat_interval,
                    grace_period=grace_period, heartbeat_stale_trial_callback=StaleTrialHandler(url, max_retry),
                    coalesce_seconds=coalesce_seconds,
                )
                storage.read_only = "mode=ro" in url
                return storage
        except Exception as exc:
            # Two processes that create Optuna's tables in a new database at once: the loser finds them there.
            if attempt + 1 < attempts and isinstance(exc, sa.exc.SQLAlchemyError) and created_concurrently(exc):
                time.sleep(0.2)
                continue
            raise StorageError(f"cannot open storage {mask_url(url)!r}: {type(exc).__name__}: "
                               f"{str(exc).splitlines()[0][:300]}") from None
    raise AssertionError("every attempt above returns or raises")


def _check_not_foreign(path: Path, url: str) -> None:
    """Refuse an existing SQLite file that holds tables but not Optuna's (another application's database),
    reading it without a write: Optuna would add its tables and adsearch would switch it to WAL mode."""
    import sqlite3

    if not path.is_file() or path.stat().st_size == 0:
        return
    try:
        # immutable where it cannot be written: a WAL database on a read-only mount opens no other way
        flags = "mode=ro" if os.access(path.parent, os.W_OK) else "mode=ro&immutable=1"
        connection = sqlite3.connect(f"{path.resolve().as_uri()}?{flags}", uri=True, timeout=SQLITE_LOCK_TIMEOUT_S)
        try:
            tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            connection.close()
    except sqlite3.DatabaseError as exc:
        raise StorageError(f"--storage {url}: {path} is not an SQLite database ({exc}); name a study database "
                           "or a new file") from None
    if tables and not {"studies", "version_info"} <= tables:  # Optuna's schema has both
        raise StorageError(f"--storage {url}: {path} is another application's database (tables "
                           f"{', '.join(sorted(tables)[:5])}{', ...' if len(tables) > 5 else ''}); it was not "
                           "changed. Name a study database or a new file")


def _enable_wal(path: Path) -> None:
    import sqlite3

    connection = sqlite3.connect(path, timeout=SQLITE_LOCK_TIMEOUT_S)
    try:
        connection.execute("PRAGMA journal_mode=WAL")  # persists in the file
    finally:
        connection.close()


class AdsearchStorage(optuna.storages.RDBStorage):
    """Optuna's RDBStorage with two changes, both about what a worker sends to the database.

    **Coalesced reports and attributes** (`coalesce_seconds > 0`, used by workers). Optuna writes every
    per-fold report and user attribute of a running trial in a transaction of its own (a read of the trial,
    a check, a write, a commit). Here those of a trial that *this object* started or claimed (and so knows
    to be RUNNING) wait and go out together: when the trial changes state, before anything is read back
    (so every reader in this process sees them, and a pruner sees every fold), on `flush()`, and at the
    latest `coalesce_seconds` after the first of them (a timer; a slow trial's folds still reach the
    dashboard as they finish). Everything else is written at once, as Optuna does: parameters (a killed
    worker's retry re-runs exactly the parameters it had sampled), system attributes, and any write to a
    trial this object does not know to be running, so a missing or finished trial raises where Optuna
    raises. Waiting values are validated when they are given (a value that cannot be stored raises at once).
    If another worker failed the trial meanwhile (its heartbeat went stale), the waiting writes are dropped
    and the trial's own state change raises, as Optuna's next write would.

    **SQLite: trial state changes begin IMMEDIATE.** Optuna changes a state by reading the trial, checking
    its state and writing the new one, relying on SELECT ... FOR UPDATE, which SQLite ignores. Two workers
    could then both claim one waiting (retried or enqueued) trial and both run it (measured: 16 to 25 double
    claims in 300 pops by 3 processes). BEGIN IMMEDIATE takes the write lock before the read. Only state
    changes do so: making every transaction immediate serialised the workers' reads too (2 workers 1.17x
    instead of 1.7x).

    **MySQL / MariaDB: a transaction that InnoDB aborts as a deadlock is run again** (up to 5 times), as the
    server asks: concurrent workers' parameter and trial writes take gap locks on the same index ranges, and
    Optuna would fail the trial instead (seen: 1 trial in 12 with two workers).

    Pickling keeps the contract too: waiting writes are sent first, and the copy sets up its own engine.
    """

    read_only = False  # opened read-only (`make_storage(read_only_where_unwritable=True)`)

    def __init__(self, *args: Any, coalesce_seconds: float = 0.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if not (math.isfinite(coalesce_seconds) and coalesce_seconds >= 0):
            raise ValueError(f"coalesce_seconds must be a finite number >= 0, not {coalesce_seconds}")
        self.coalesce_seconds = coalesce_seconds
        self._init_local_state()

    def _init_local_state(self) -> None:
        self._running: set[int] = set()  # trials this object started or claimed and has not finished
        self._pending: dict[int, dict[str, dict]] = {}  # trial id -> {"steps": {...}, "attrs": {...}}
        self._timers: dict[int, threading.Timer] = {}
        self._lock = threading.RLock()  # the heartbeat thread and optimize's threads share this object
        if self.engine.name == "sqlite":
            configure_sqlite(self.engine)

    def __getstate__(self) -> dict[Any, Any]:
        self.flush()
        state = super().__getstate__()
        for local in ("_running", "_pending", "_timers", "_lock"):
            state.pop(local, None)
        return state

    def __setstate__(self, state: dict[Any, Any]) -> None:
        super().__setstate__(state)
        self._init_local_state()

    def _again_on_deadlock(self, write, *args: Any, **kwargs: Any):
        for attempt in range(5):
            try:
                return write(*args, **kwargs)
            except Exception as exc:
                if attempt == 4 or self.engine.name != "mysql" or not is_deadlock(exc):
                    raise
                time.sleep(random.uniform(0.01, 0.05) * (attempt + 1))
        raise AssertionError("every attempt above returns or raises")

    def _set_trial_param(self, *args: Any) -> None:
        self._again_on_deadlock(super()._set_trial_param, *args)

    # -- which trials are ours and running --------------------------------------------------------------
    def _create_new_trial(self, study_id: int, template_trial=None):
        frozen = self._again_on_deadlock(super()._create_new_trial, study_id, template_trial)
        if frozen.state == TrialState.RUNNING:
            with self._lock:
                self._running.add(frozen._trial_id)
        return frozen

    def set_trial_state_values(self, trial_id: int, state: TrialState, values=None) -> bool:
        with self._lock:
            self._cancel_timer(trial_id)
            self._send(trial_id)  # raises if the trial was finished meanwhile, as Optuna's check would
            if state.is_finished():
                self._running.discard(trial_id)
        with state_change(self.engine):
            changed = self._again_on_deadlock(super().set_trial_state_values, trial_id, state, values)
        if changed and state == TrialState.RUNNING:
            with self._lock:
                self._running.add(trial_id)
        return changed

    def record_heartbeat(self, trial_id: int) -> None:
        """A heartbeat lost to an outage is skipped with a one-line warning: Optuna's heartbeat thread would
        die with a traceback on the first one, and the trial would go stale even once the database is back."""
        try:
            super().record_heartbeat(trial_id)
        except unreachable_errors() as exc:
            cause = exc.__cause__ or exc
            _log.warning("trial %s: heartbeat not recorded (%s); the next one follows in %s s", trial_id,
                         str(cause).splitlines()[0][:200], self.heartbeat_interval)

    def get_study_id_from_name(self, study_name: str) -> int:
        """Names compare exactly, whatever the database's collation: MySQL's and MariaDB's default ignores
        case and trailing spaces, so `CASETEST` would silently find the study `casetest`."""
        study_id = super().get_study_id_from_name(study_name)
        stored = self.get_study_name_from_id(study_id)
        if stored != study_name:
            raise StudyError(f"study {study_name!r}: this database cannot tell it from the existing study "
                             f"{stored!r} (its collation ignores case and trailing spaces); use --study {stored} "
                             "for that study, or a name that differs in more than case and spaces")
        return study_id

    def delete_study(self, study_id: int) -> None:
        with self._lock:
            self.flush()
            self._running.clear()  # only makes later writes immediate: always safe
        super().delete_study(study_id)

    # -- writes that may wait ---------------------------------------------------------------------------
    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        from optuna.storages._rdb import models

        if not self._defers(trial_id):
            return self._again_on_deadlock(super().set_trial_intermediate_value, trial_id, step, intermediate_value)
        stored = models.TrialIntermediateValueModel.intermediate_value_to_stored_repr(intermediate_value)
        self._wait(trial_id, "steps", int(step), stored)

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        if not self._defers(trial_id):
            return self._again_on_deadlock(super().set_trial_user_attr, trial_id, key, value)
        self._wait(trial_id, "attrs", key, json.dumps(value))  # unserialisable values raise here

    def _defers(self, trial_id: int) -> bool:
        return self.coalesce_seconds > 0 and trial_id in self._running

    def _wait(self, trial_id: int, kind: str, key: Any, value: Any) -> None:
        with self._lock:
            writes = self._pending.setdefault(trial_id, {"steps": {}, "attrs": {}})
            writes[kind][key] = value  # a repeated step or key: the last value wins, as in Optuna
            if trial_id not in self._timers:
                timer = threading.Timer(self.coalesce_seconds, self._send_due, (trial_id,))
                timer.daemon = True
                self._timers[trial_id] = timer
                timer.start()

    def _send_due(self, trial_id: int) -> None:
        with self._lock:
            self._timers.pop(trial_id, None)
            try:
                self._send(trial_id)
            except Exception as exc:  # a background thread has nobody to raise to
                _log.warning("trial %s: waiting writes not sent (%s); they go with its state change", trial_id, exc)

    def _cancel_timer(self, trial_id: int) -> None:
        timer = self._timers.pop(trial_id, None)
        if timer is not None:
            timer.cancel()

    def flush(self) -> None:
        """Send every waiting write now, one transaction per trial. A trial that another worker finished
        meanwhile loses its waiting writes (its own state change will raise); reads go on."""
        from optuna.exceptions import UpdateFinishedTrialError

        with self._lock:
            for trial_id in list(self._pending):
                self._cancel_timer(trial_id)
                try:
                    self._send(trial_id)
                except (UpdateFinishedTrialError, KeyError) as exc:
                    _log.warning("trial %s: waiting writes dropped: %s", trial_id, exc)

    def _send(self, trial_id: int) -> None:
        """Send one trial's waiting writes. A failed send keeps them waiting, except when the trial can no
        longer take them."""
        from optuna.exceptions import UpdateFinishedTrialError

        writes = self._pending.pop(trial_id, None)
        if not writes:
            return
        try:
            self._again_on_deadlock(self._write_waiting, trial_id, writes["steps"], writes["attrs"])
        except (UpdateFinishedTrialError, KeyError):
            self._running.discard(trial_id)
            raise
        except Exception:
            self._pending[trial_id] = self._merge(writes, self._pending.get(trial_id))
            raise

    def _write_waiting(self, trial_id: int, steps: dict, attrs: dict) -> None:
        """One transaction: one read of the trial (is it still running?), then its reports and attributes as
        bulk statements (Optuna's own helpers would read the trial again per write)."""
        import sqlalchemy as sa
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session

        with _create_scoped_session(self.scoped_session) as session:
            trial = models.TrialModel.find_or_raise_by_id(trial_id, session)
            self.check_trial_is_updatable(trial_id, trial.state)
            if steps:
                table = models.TrialIntermediateValueModel
                session.execute(sa.delete(table).where(table.trial_id == trial_id, table.step.in_(list(steps))))
                session.execute(sa.insert(table), [
                    {"trial_id": trial_id, "step": step, "intermediate_value": value,
                     "intermediate_value_type": kind} for step, (value, kind) in steps.items()])
            if attrs:
                table = models.TrialUserAttributeModel
                session.execute(sa.delete(table).where(table.trial_id == trial_id, table.key.in_(list(attrs))))
                session.execute(sa.insert(table), [{"trial_id": trial_id, "key": key, "value_json": value}
                                                   for key, value in attrs.items()])

    @staticmethod
    def _merge(older: dict, newer: dict | None) -> dict:
        if newer is None:
            return older
        return {kind: {**older[kind], **newer[kind]} for kind in ("steps", "attrs")}

    # -- reads see every write first --------------------------------------------------------------------
    def get_trial(self, trial_id: int):
        self.flush()
        return super().get_trial(trial_id)

    def _get_trials(self, *args: Any, **kwargs: Any):
        self.flush()
        return super()._get_trials(*args, **kwargs)

    def get_trial_user_attrs(self, trial_id: int):
        self.flush()
        return super().get_trial_user_attrs(trial_id)

    def _get_best_trial_id(self, *args: Any, **kwargs: Any) -> int:
        self.flush()
        return super()._get_best_trial_id(*args, **kwargs)


class StaleTrialHandler:
    """Re-enqueue a stale trial's parameters, then give its budget slot back. In this order a worker that
    takes the freed slot finds the retry waiting and runs it; the other way round it could start a new trial
    with the slot and leave the retry WAITING once the budget is full."""

    def __init__(self, url: str, max_retry: int):
        self.url = url
        self.retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.retry(study, trial)
        TrialBudget(self.url, study.study_name).release()
