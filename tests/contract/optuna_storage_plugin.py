"""A pytest plugin that runs Optuna's own storage tests against a chosen RDB storage class.

Loaded with `-p tests.contract.optuna_storage_plugin` into a run of `tests/storages_tests/` from the Optuna
sdist of the installed version (see tests/test_storage_contract.py). It changes which storage the tests
get, nothing in the tests themselves:

* Optuna's `StorageSupplier` hands out the chosen class for its "sqlite" and "cached_sqlite" modes (the
  other modes, in-memory, journal and gRPC, are not RDB storages and are left out);
* `tests/storages_tests/test_with_server.py`, which runs against a real server named by TEST_DB_URL,
  gets the chosen class too.

Environment: ADSEARCH_CONTRACT_CLASS = rdb (Optuna's RDBStorage, the baseline) | adsearch
(AdsearchStorage); ADSEARCH_CONTRACT_COALESCE = seconds (adsearch only); ADSEARCH_CONTRACT_DB = sqlite | a
PostgreSQL URL of a database the run may wipe (its public schema is reset for each storage handed out) | a
MySQL/MariaDB URL of a database the run may drop and create again for each storage.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager

import optuna
import pytest
from optuna.testing import storages as optuna_storages

CLASS = os.environ.get("ADSEARCH_CONTRACT_CLASS", "adsearch")
COALESCE = float(os.environ.get("ADSEARCH_CONTRACT_COALESCE", "0"))
DB = os.environ.get("ADSEARCH_CONTRACT_DB", "sqlite")
RDB_MODES = ["sqlite", "cached_sqlite"]


def make(url: str, **kwargs) -> optuna.storages.RDBStorage:
    from adsearch.search.database import engine_kwargs
    from adsearch.search.storage import AdsearchStorage

    if CLASS == "rdb":
        return optuna.storages.RDBStorage(url, **{"engine_kwargs": engine_kwargs(url), **kwargs})
    return AdsearchStorage(url, **{"engine_kwargs": engine_kwargs(url), **kwargs}, coalesce_seconds=COALESCE)


def fresh_url(tempfile_name: str | None) -> str:
    """A database with no tables: the supplier's temporary SQLite file, or a reset PostgreSQL schema."""
    if DB == "sqlite":
        return f"sqlite:///{tempfile_name}"
    import sqlalchemy as sa

    url = sa.engine.make_url(DB)
    if url.get_backend_name() == "mysql":  # a database is MySQL's schema: drop and create it
        engine = sa.create_engine(url.set(database=""))
        with engine.begin() as db:
            db.exec_driver_sql(f"DROP DATABASE IF EXISTS `{url.database}`")
            db.exec_driver_sql(f"CREATE DATABASE `{url.database}`")
    else:
        engine = sa.create_engine(DB)
        with engine.begin() as db:
            db.exec_driver_sql("DROP SCHEMA IF EXISTS public CASCADE")
            db.exec_driver_sql("CREATE SCHEMA public")
    engine.dispose()
    return DB


_original_enter = optuna_storages.StorageSupplier.__enter__


def _enter(self):
    if self.storage_specifier not in RDB_MODES:
        return _original_enter(self)
    from optuna.testing.tempfile_pool import NamedTemporaryFilePool

    self.tempfile = NamedTemporaryFilePool().tempfile() if DB == "sqlite" else None
    rdb = make(fresh_url(self.tempfile.name if self.tempfile else None), **self.extra_args)
    self.storage = optuna.storages._CachedStorage(rdb) if "cached" in self.storage_specifier else rdb
    return self.storage


@contextmanager
def _server_storage():
    storage = make(os.environ["TEST_DB_URL"])
    try:
        yield storage
    finally:
        storage.engine.dispose()


def pytest_configure(config: pytest.Config) -> None:
    # Test modules read these lists when they are collected, after plugins are configured.
    optuna_storages.STORAGE_MODES[:] = RDB_MODES
    optuna_storages.STORAGE_MODES_HEARTBEAT[:] = RDB_MODES
    optuna_storages.StorageSupplier.__enter__ = _enter
    if "TEST_DB_URL" not in os.environ:
        os.environ["TEST_DB_URL"] = (fresh_url(os.path.join(tempfile.mkdtemp(), "server-tests.db"))
                                     if DB == "sqlite" else fresh_url(None))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        module = item.module
        if module is not None and module.__name__.endswith("test_with_server"):
            module.get_storage = _server_storage


def pytest_report_header(config: pytest.Config) -> str:
    return f"adsearch contract run: class={CLASS} coalesce={COALESCE} db={DB.split('@')[-1]}"
