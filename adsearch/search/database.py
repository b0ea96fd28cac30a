"""How adsearch connects to a study database (engine settings per backend, SQLite's write locking), and
which errors mean the database is out of reach: shared by the storage, the budget table and the workers."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

SQLITE_LOCK_TIMEOUT_S = 120
_STATE_CHANGE = threading.local()


def engine_kwargs(url: str) -> dict:
    """SQLite connections wait up to SQLITE_LOCK_TIMEOUT_S for the write lock instead of failing; pooled
    connections to a server are tested before use, so a database restart costs one reconnect, not an error."""
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": SQLITE_LOCK_TIMEOUT_S}}
    if url.startswith("postgresql"):
        # A cut network drops packets silently: without these a query would hang for the kernel's TCP
        # timeout (about 15 minutes) instead of failing within seconds so the worker can back off and retry.
        return {"pool_pre_ping": True, "connect_args": {
            "connect_timeout": 10, "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 3,
            "keepalives_count": 3, "tcp_user_timeout": 20_000}}
    return {"pool_pre_ping": True}


def is_deadlock(exc: BaseException) -> bool:
    """MySQL / MariaDB abort one of two transactions that lock each other (InnoDB's 1213 deadlock, 1205 lock
    wait timeout) and expect it to be run again; Optuna wraps the error in StorageInternalError."""
    while exc is not None:
        code = getattr(getattr(exc, "orig", None), "args", (None,))[0]
        if code in (1213, 1205):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def unreachable_errors() -> tuple[type[Exception], ...]:
    """Errors that say the database cannot be reached right now (restart, network cut), as opposed to a
    mistake: Optuna wraps SQLAlchemy's in StorageInternalError."""
    import optuna
    import sqlalchemy as sa

    return (optuna.exceptions.StorageInternalError, sa.exc.OperationalError, sa.exc.InterfaceError)


def created_concurrently(exc: Exception) -> bool:
    """True for the errors a process gets when another one created the same tables a moment before."""
    text = str(exc).lower()
    return "already exists" in text or "unique constraint" in text or "duplicate" in text


@contextmanager
def state_change(engine) -> Iterator[None]:
    """Transactions begun inside take SQLite's write lock before their first read (BEGIN IMMEDIATE)."""
    _STATE_CHANGE.active = engine.name == "sqlite"
    try:
        yield
    finally:
        _STATE_CHANGE.active = False


def configure_sqlite(engine) -> None:
    """Transactions inside `state_change` begin IMMEDIATE; WAL runs with synchronous=NORMAL: no fsync per
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
    if engine.url.database not in (None, "", ":memory:"):
        # Connections opened before the listeners existed are dropped. An in-memory database lives in its
        # one connection: dropping that would drop the tables.
        engine.dispose()
