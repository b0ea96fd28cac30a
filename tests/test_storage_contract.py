"""Optuna's own storage test suite, run against AdsearchStorage: it must pass every test RDBStorage passes.

The tests come from the Optuna sdist of the installed version (downloaded with pip into pytest's temporary
folder; no copy of Optuna's code lives in this repository): `tests/storages_tests/` test_storages.py,
test_heartbeat.py, test_callbacks.py and test_with_server.py. tests/contract/optuna_storage_plugin.py makes
their RDB storage modes hand out the class under test. Each backend (SQLite; PostgreSQL and MariaDB where
reachable, always in CI) runs twice, all runs at once: AdsearchStorage with coalesced writes off and on. A
failed test is run again, alone, once: Optuna's heartbeat tests allow two seconds between a heartbeat and the
check, which six suites at once on two cores can exceed (seen once in CI: test_fail_stale_trials[2] on
MariaDB). One that passes alone is printed as a timing failure. One that fails again alone is run alone
against Optuna's own RDBStorage, the baseline: if it fails there too (a broken test, a missing service,
MySQL's second-resolution timestamps) it does not count against adsearch; otherwise it is a regression.
(Running the baseline only for those tests, not as three more whole suites beside the others, took a third
of the suites and most of the contention out of CI.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import optuna
import pytest
from conftest import MARIADB, POSTGRES, server_available

OPTUNA_TESTS = ["test_storages.py", "test_heartbeat.py", "test_callbacks.py", "test_with_server.py"]
PLUGIN_DIR = Path(__file__).parent / "contract"
RUNS = {"rdb": ("rdb", 0.0), "adsearch": ("adsearch", 0.0), "adsearch-coalesced": ("adsearch", 1.0)}
SUITES = ("adsearch", "adsearch-coalesced")  # run whole; "rdb" only for the tests that fail alone
pytestmark = pytest.mark.slow


def _fail_or_skip(reason: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run Optuna's storage tests: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def optuna_tests(tmp_path_factory) -> Path:
    """tests/ of the Optuna sdist matching the installed version: the package root and storages_tests."""
    folder = tmp_path_factory.mktemp("optuna-sdist")
    download = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
         f"optuna=={optuna.__version__}", "-d", str(folder)], capture_output=True, text=True, timeout=300)
    archives = list(folder.glob("optuna-*.tar.gz"))
    if download.returncode or not archives:
        _fail_or_skip(f"cannot download the optuna {optuna.__version__} sdist: {download.stderr[-500:]}")
    root = tmp_path_factory.mktemp("optuna-tests")
    with tarfile.open(archives[0]) as archive:
        prefix = f"optuna-{optuna.__version__}/tests/"
        members = [m for m in archive.getmembers() if m.name.startswith(prefix)
                   and (m.name[len(prefix):] in ("__init__.py", "conftest.py")
                        or m.name[len(prefix):].startswith("storages_tests/"))]
        for member in members:
            member.name = member.name[len(f"optuna-{optuna.__version__}/"):]
        archive.extractall(root, members=members, filter="data")
    return root


def _server_database(server: str, name: str) -> str:
    """A database of its own for one run on a server (the plugin wipes it for every storage it hands out)."""
    import sqlalchemy as sa

    if server.startswith("mysql"):
        return server.rsplit("/", 1)[0] + f"/{name}"  # the plugin creates it
    engine = sa.create_engine(server, isolation_level="AUTOCOMMIT")
    with engine.connect() as db:
        if not db.exec_driver_sql(f"SELECT 1 FROM pg_database WHERE datname = '{name}'").first():
            db.exec_driver_sql(f'CREATE DATABASE "{name}"')
    engine.dispose()
    return server.rsplit("/", 1)[0] + f"/{name}"


def _failures(report: Path) -> tuple[set[str], int]:
    """Ids of the failed or erroring tests in a JUnit report, and how many tests ran."""
    cases = ET.parse(report).getroot().iter("testcase")
    failed, ran = set(), 0
    for case in cases:
        ran += 1
        if case.find("failure") is not None or case.find("error") is not None:
            failed.add(f"{case.get('classname')}::{case.get('name')}")
    return failed, ran


@pytest.fixture(scope="module")
def contract_runs(optuna_tests, tmp_path_factory) -> dict[tuple[str, str], tuple[set[str], int, str]]:
    """Every (backend, run) at once: the tests mostly wait on heartbeats, so they overlap well."""
    backends = {"sqlite": "sqlite"}
    for backend, server in (("postgresql", POSTGRES), ("mariadb", MARIADB)):
        reason = server_available(server)
        if reason is None:
            backends[backend] = server
        elif os.environ.get("CI") == "true":
            pytest.fail(f"CI must run Optuna's storage tests on {backend}: {reason}")
        else:
            print(f"Optuna storage tests on {backend} skipped: {reason}")
    out = tmp_path_factory.mktemp("contract")
    processes = {}
    for backend, server in backends.items():
        for run in SUITES:
            report = out / f"{backend}-{run}.xml"
            log = (out / f"{backend}-{run}.log").open("w")
            tests = [str(optuna_tests / "tests" / "storages_tests" / name) for name in OPTUNA_TESTS]
            processes[backend, run] = (subprocess.Popen(
                _pytest(report, tests, optuna_tests), cwd=optuna_tests, env=_run_env(backend, server, run),
                stdout=log, stderr=subprocess.STDOUT), report, log)
    results = {}
    for key, (process, report, log) in processes.items():
        process.wait(timeout=1200)
        log.close()
        tail = Path(log.name).read_text()[-3000:]
        if not report.is_file():
            pytest.fail(f"Optuna's storage tests did not run for {key}:\n{tail}")
        results[key] = (*_failures(report), tail)
    return {key: (*result, backends[key[0]], optuna_tests, out) for key, result in results.items()}


def _run_env(backend: str, server: str, run: str) -> dict[str, str]:
    """The environment that makes Optuna's RDB storage modes hand out the class of one run."""
    cls, coalesce = RUNS[run]
    name = f"adsearch_contract_{run.replace('-', '_')}"
    db = server if backend == "sqlite" else _server_database(server, name)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PLUGIN_DIR), os.environ.get("PYTHONPATH", "")]),
           "ADSEARCH_CONTRACT_CLASS": cls, "ADSEARCH_CONTRACT_COALESCE": str(coalesce), "ADSEARCH_CONTRACT_DB": db}
    env.pop("TEST_DB_URL", None)
    return env


def _pytest(report: Path, tests: list[str], optuna_tests: Path) -> list[str]:
    return [sys.executable, "-m", "pytest", "-p", "optuna_storage_plugin", "-p", "no:cacheprovider", "-q",
            "--color=no", f"--junitxml={report}", "--rootdir", str(optuna_tests), *tests]


def _node_id(failure: str, optuna_tests: Path) -> str:
    """`tests.storages_tests.test_storages.TestStorage::test_get_trial[sqlite]` (a JUnit classname and name)
    as the pytest node id `tests/storages_tests/test_storages.py::TestStorage::test_get_trial[sqlite]`."""
    classname, name = failure.split("::", 1)
    parts = classname.split(".")
    for end in range(len(parts), 0, -1):
        module = Path(*parts[:end]).with_suffix(".py")
        if (optuna_tests / module).is_file():
            return "::".join([module.as_posix(), *parts[end:], name])
    raise AssertionError(f"no test module for {failure}")


def _fails_alone(failures: set[str], backend: str, server: str, run: str, optuna_tests: Path,
                 out: Path) -> tuple[set[str], str]:
    """Which of `failures` fail again when run alone, one suite at a time, and that run's log."""
    report = out / f"{backend}-{run}-again.xml"
    done = subprocess.run(_pytest(report, [_node_id(f, optuna_tests) for f in sorted(failures)], optuna_tests),
                          cwd=optuna_tests, env=_run_env(backend, server, run), capture_output=True, text=True,
                          timeout=600)
    if not report.is_file():
        pytest.fail(f"the rerun of {sorted(failures)} did not run:\n{done.stdout[-3000:]}{done.stderr[-2000:]}")
    again, ran = _failures(report)
    assert ran == len(failures), (ran, sorted(failures))
    return again, done.stdout[-3000:]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql", "mariadb"])
@pytest.mark.parametrize("run", ["adsearch", "adsearch-coalesced"])
def test_adsearch_storage_passes_every_optuna_storage_test_rdbstorage_passes(contract_runs, backend, run):
    if (backend, run) not in contract_runs:
        pytest.skip(f"{backend} not reachable here (see the printed reason)")
    failed, ran, log, server, optuna_tests, out = contract_runs[backend, run]
    assert ran > 150, ran
    print(f"{backend}/{run}: {ran} Optuna storage tests, {len(failed)} failed among the suites at once")
    regressions = failed
    if regressions:
        again, log = _fails_alone(regressions, backend, server, run, optuna_tests, out)
        print(f"passed alone (timing): {sorted(regressions - again)}")
        if again:
            baseline, _ = _fails_alone(again, backend, server, "rdb", optuna_tests, out)
            print(f"fail alone for RDBStorage too (not adsearch's): {sorted(baseline)}")
            again -= baseline
        regressions = again
    assert not regressions, f"fail for AdsearchStorage, pass for RDBStorage: {sorted(regressions)}\n{log}"
