"""The worker loop: run trials of a study until its global budget of finished trials is met.

Any number of workers, on one machine or many, join a study through its database. Each reserves a budget
slot before a trial, fails stale trials of killed workers (their parameters are retried), and gives back
slots that a worker killed between reserving and starting a trial leaked.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from adsearch.io.outputs import sigterm_as_interrupt
from adsearch.search.budget import TrialBudget
from adsearch.search.database import unreachable_errors
from adsearch.search.errors import StudyError
from adsearch.search.objective import WORKER_ID, Objective
from adsearch.search.protocol import ProtocolError
from adsearch.search.samplers import make_pruner, make_sampler
from adsearch.search.storage import DEFAULT_STORAGE, make_storage, mask_url
from adsearch.search.study import StudySetup, chosen_optimiser, load_caches_for, missing_study, trial_counts


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
    override_optimiser: bool = False,
    worker_index: int | None = None,
    heartbeat_interval: int = 10,
    grace_period: int = 30,
    poll_seconds: float = 0.5,
    max_consecutive_failures: int = 5,
    coalesce_seconds: float = 1.0,
    max_outage_seconds: float = 300.0,
) -> WorkerReport:
    """Run trials of `study_name` until the study's global budget of finished trials is met.

    When the database cannot be reached (a restart, a network cut) the worker retries with exponential
    backoff for up to `max_outage_seconds`, then stops with a message. A trial it could not finish meanwhile
    stays RUNNING only until its heartbeat goes stale: then a worker fails it and re-runs its parameters."""
    # Optuna logs each failed trial with its traceback; the worker says it in one line instead (below), and the
    # reason stays on the trial as its `error` attribute.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    _return_freed_memory_to_the_system()
    storage = make_storage(storage_url, heartbeat_interval, grace_period, coalesce_seconds=coalesce_seconds,
                           create=False)
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        raise missing_study(storage, study_name, mask_url(storage_url)) from None
    setup = StudySetup.from_study(study)
    cache = load_caches_for(setup, study_name, cache_path)
    sampler, pruner, notes = chosen_optimiser(setup, study_name, sampler, pruner, override_optimiser)
    for note in notes:
        print(f"worker {WORKER_ID}: warning: {note}", file=sys.stderr, flush=True)
    # who runs it, visible at once; with an override each trial also says which sampler proposed it
    objective = Objective(setup, cache, on_sampled=storage.flush, sampler_label=sampler if notes else None)
    index = worker_index if worker_index is not None else random.SystemRandom().randrange(1 << 30)
    # QMC points are numbered by the study, so every worker needs the same sequence (the same seed).
    seed = setup.sampler_seed if sampler == "qmc" else _worker_seed(
        setup.sampler_seed, index, len(study.get_trials(deepcopy=False)))
    study.sampler = make_sampler(sampler, setup.spec, objective.layers, seed)
    study.pruner = make_pruner(pruner)
    budget = TrialBudget(storage.url, study_name)  # the URL with any password from a secret file
    report = WorkerReport()
    streak: list[str] = []

    def after_trial(_study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state == TrialState.FAIL:
            budget.release()
            report.failed += 1
            streak.append(trial.user_attrs.get("error", "unknown error"))
            print(f"worker {WORKER_ID}: trial {trial.number} failed: {streak[-1][:300]}", file=sys.stderr, flush=True)
        else:
            streak.clear()

    suspect: tuple[int, int, float] | None = None  # (reserved, holders, since) while they disagree
    outage = _Outage(mask_url(storage_url), max_outage_seconds)
    # SIGTERM (the parent stopping its workers, a scheduler, `kill`) unwinds like Ctrl-C: Optuna then fails the
    # running trial on the way out instead of leaving it RUNNING until another worker's grace expires.
    with trial_conditions(), sigterm_as_interrupt():
        while True:
            try:
                if budget.reserve():
                    report.ran += 1
                    try:
                        study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=[after_trial])
                    except Exception as exc:
                        if not _finished_under_us(exc):
                            raise
                        report.failed += 1
                        print(f"worker {WORKER_ID}: a trial was failed by another worker while it ran (its heartbeat "
                              "came later than --grace allows); its parameters are retried, this worker goes on",
                              file=sys.stderr, flush=True)
                    outage.over()
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
                outage.over()
            except Exception as exc:
                lost = _database_lost(exc)
                if lost is None:
                    raise
                outage.wait(lost)
                continue
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


def _in_chain(exc: BaseException | None, matches) -> BaseException | None:
    """The first error in `exc`'s chain (its cause or the error it was raised while handling) that `matches`:
    Optuna's optimize can cover an error with one of its own."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if matches(exc):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _finished_under_us(exc: BaseException) -> bool:
    """True when this worker's trial was finished by someone else while it ran: another worker found its
    heartbeat stale and failed it (Optuna then refuses the result: 'Cannot tell a FAIL trial', which its
    clean-up code covers with an AssertionError)."""
    from optuna.exceptions import UpdateFinishedTrialError

    return _in_chain(exc, lambda e: isinstance(e, UpdateFinishedTrialError) or (
        isinstance(e, ValueError) and str(e).startswith("Cannot tell a "))) is not None


def _database_lost(exc: BaseException) -> BaseException | None:
    """The error saying the database is out of reach, if `exc` is one or was raised while handling one."""
    return _in_chain(exc, lambda e: isinstance(e, unreachable_errors()))


class _Outage:
    """Backoff while the database is out of reach: 1, 2, 4 ... 30 s between attempts, then give up."""

    def __init__(self, where: str, max_seconds: float):
        self.where, self.max_seconds = where, max_seconds
        self.since: float | None = None
        self.delay = 1.0

    def wait(self, exc: Exception) -> None:
        now = time.monotonic()
        self.since = self.since or now
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        if now - self.since + self.delay > self.max_seconds:
            raise StudyError(f"lost the database {self.where} for {now - self.since:.0f} s ({reason}); this worker "
                             "stops. Its unfinished trial is retried by any worker once its heartbeat is stale; "
                             "start this worker again when the database is back") from None
        print(f"worker {WORKER_ID}: database {self.where} unreachable ({reason}); retrying in {self.delay:.0f} s",
              file=sys.stderr, flush=True)
        time.sleep(self.delay)
        self.delay = min(self.delay * 2, 30.0)

    def over(self) -> None:
        if self.since is not None:
            print(f"worker {WORKER_ID}: database {self.where} reachable again", file=sys.stderr, flush=True)
        self.since, self.delay = None, 1.0


def _worker_seed(seed: int, worker_index: int, n_existing: int) -> int:
    """Different per worker and per resume, reproducible for a fresh single-worker study."""
    if worker_index == 0 and n_existing == 0:
        return seed
    blob = json.dumps([seed, worker_index, n_existing]).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:4], "little")



def _die_with_parent() -> None:
    """Ask Linux to send this process SIGTERM when the process that started it dies, however it dies (a
    SIGKILLed `search` would otherwise leave its workers running until the budget is met)."""
    import ctypes
    import ctypes.util
    import os
    import signal

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before the request was made
        raise SystemExit(1)


def _worker_main(**kwargs) -> None:
    _die_with_parent()
    try:
        run_worker(**kwargs)
    except (StudyError, ProtocolError) as exc:
        print(f"worker {kwargs.get('worker_index')}: error: {exc}", flush=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:  # Ctrl-C reaches every process of the terminal; the parent says it once
        raise SystemExit(130) from None


def spawn_workers(n: int, kwargs: dict) -> list:
    """Start n worker processes (spawned: fresh interpreters, no forked database connections)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_worker_main, kwargs={**kwargs, "worker_index": i}) for i in range(n)]
    for process in processes:
        process.start()
    return processes
