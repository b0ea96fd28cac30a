"""How many workers can one study database serve? (figures in BENCHMARKS.md)

    python benchmarks/capacity.py                      # PostgreSQL (127.0.0.1, database `test`) and SQLite
    python benchmarks/capacity.py --workers 1 2 4 --trials-per-worker 40 --json benchmarks/results/capacity.json
    python benchmarks/capacity.py --proxy --workers 1 2 4 8   # Optuna's gRPC proxy vs direct PostgreSQL

Every worker is the real `adsearch worker` loop (TPE, budget table, heartbeats, coalesced writes) with every
classifier fit replaced by a constant model, so a trial costs only the search framework and the database.
For 1, 2, 4, 8 and 16 workers the study runs `trials-per-worker x workers` trials; reported are trials per
second across all workers and, per trial, the seconds a worker spends inside storage calls (Optuna's RDB
protocol, measured in the worker's main thread, outermost calls only). Then the default space's median
trial time is measured on an ADReSSo-shaped cache (one worker, real fits), and the number of workers one
database could serve follows: workers x (trial seconds / storage seconds per trial) at the measured
throughput ceiling.

`--proxy` asks whether Optuna's gRPC storage proxy (`run_grpc_proxy_server`) would raise that number: plain
`study.optimize` loops with the same TPE sampler and a constant objective shaped like an adsearch trial
(five parameters, five fold reports and attributes), once against PostgreSQL directly (Optuna's cached RDB
storage) and once through one proxy server in front of the same database. adsearch's own worker loop cannot
run through the proxy (its budget table is SQL), so both arms use Optuna's loop. Needs `pip install grpcio
protobuf` (not an adsearch dependency).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from adsearch.embed import open_cache
from adsearch.embed.synthetic import write_synthetic_cache
from adsearch.search.space import load_spec, parse_spec
from adsearch.search.storage import make_storage
from adsearch.search.study import create_or_resume

POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
SHAPE = dict(n_train=166, n_test=71, n_layers=25, dim=64, windows_per_item=4, signal_layer=12)
LOGREG = {"cv": {"folds": 5}, "pruner": "none",
          "space": {"pooling": ["mean", "std", "mean+std"], "classifiers": {"logreg": {}}}}

# Both worker scripts start with this: `timed(method)` adds the main thread's time in outermost calls to spent[0].
TIMER = """
import threading, time
spent, depth = [0.0], threading.local()
main = threading.main_thread()

def timed(method):
    def wrapper(*args, **kwargs):
        if threading.current_thread() is not main or getattr(depth, "n", 0):
            return method(*args, **kwargs)
        depth.n, started = 1, time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - started
            depth.n = 0
    return wrapper
"""

# One worker process: the real loop, fits replaced by a constant model, time inside storage calls counted.
WORKER = TIMER + """
import json, sys, types
import numpy as np
import optuna
import adsearch.search.objective as objective
from adsearch.search.worker import run_worker

class Constant:
    def predict_proba(self, X):
        return np.full((len(X), 2), 0.5)

objective.fit_pipeline = lambda *args, **kwargs: Constant()

from adsearch.search.storage import AdsearchStorage
for cls in (optuna.storages.RDBStorage, AdsearchStorage):  # every storage call; nested ones count once
    for name, member in list(vars(cls).items()):
        if isinstance(member, types.FunctionType) and not name.startswith("__") and name not in (
                "_init_local_state", "_defers", "_wait"):
            setattr(cls, name, timed(member))
import adsearch.search.budget as budget
for name in ("reserve", "release", "get", "reconcile"):
    setattr(budget.TrialBudget, name, timed(getattr(budget.TrialBudget, name)))
report = run_worker(sys.argv[1], sys.argv[2], worker_index=int(sys.argv[3]))
print(json.dumps({"ran": report.ran, "storage_s": spent[0]}))
"""


# One plain Optuna worker: direct (argv[3] == "direct") or through the gRPC proxy on port argv[3].
PLAIN_WORKER = TIMER + """
import json, sys, types, warnings
import optuna
from optuna.storages import GrpcStorageProxy, get_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)
warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
name, url, via, trials = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
storage = get_storage(url) if via == "direct" else GrpcStorageProxy(host="127.0.0.1", port=int(via))

for name_, member in list(vars(type(storage)).items()):
    if isinstance(member, types.FunctionType) and not name_.startswith("_"):
        setattr(type(storage), name_, timed(member))

def objective(trial):
    trial.suggest_int("layer", 0, 24)
    trial.suggest_categorical("pooling", ["mean", "std", "mean+std"])
    trial.suggest_categorical("scaler", ["standard", "none"])
    trial.suggest_float("C", 1e-4, 1e2, log=True)
    trial.suggest_categorical("class_weight", ["balanced", "none"])
    for fold in range(5):
        trial.report(0.5, fold)
        trial.set_user_attr(f"fold_{fold}", 0.5)
    trial.set_user_attr("cv_std", 0.0)
    return 0.5

study = optuna.load_study(study_name=name, storage=storage, sampler=optuna.samplers.TPESampler())
study.optimize(objective, n_trials=trials)
print(json.dumps({"ran": trials, "storage_s": spent[0]}))
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_plain(url: str, via_proxy: bool, n_workers: int, trials_per_worker: int) -> dict:
    """Trials/s of plain Optuna workers on PostgreSQL, directly or through one gRPC proxy server."""
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    name = f"capacity-plain-{'proxy' if via_proxy else 'direct'}-{n_workers}-{int(time.time())}"
    optuna.create_study(study_name=name, storage=url, direction="maximize")
    server, via = None, "direct"
    if via_proxy:
        port = _free_port()
        server = subprocess.Popen([sys.executable, "-c", (
            "import sys, warnings, optuna; optuna.logging.set_verbosity(optuna.logging.WARNING); "
            "warnings.simplefilter('ignore', optuna.exceptions.ExperimentalWarning); "
            "optuna.storages.run_grpc_proxy_server(optuna.storages.get_storage(sys.argv[1]), "
            "host='127.0.0.1', port=int(sys.argv[2]))"), url, str(port)])
        optuna.storages.GrpcStorageProxy(host="127.0.0.1", port=port).wait_server_ready(timeout=60)
        via = str(port)
    try:
        processes = [subprocess.Popen([sys.executable, "-c", PLAIN_WORKER, name, url, via, str(trials_per_worker)],
                                      stdout=subprocess.PIPE, text=True) for _ in range(n_workers)]
        reports = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in processes]
    finally:
        if server is not None:
            server.terminate()
            server.wait()
    done = [t for t in optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)
            if t.state.is_finished()]
    optuna.delete_study(study_name=name, storage=url)
    span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    arm = "proxy" if via_proxy else "direct"
    row = {"backend": f"postgresql-{arm}", "workers": n_workers, "trials": len(done), "trial_span_s": span,
           "trials_per_s": len(done) / span,
           "storage_ms_per_trial": 1000 * sum(r["storage_s"] for r in reports) / sum(r["ran"] for r in reports)}
    print(f"{arm:>10} {n_workers:>2} workers: {row['trials_per_s']:6.1f} trials/s, "
          f"{row['storage_ms_per_trial']:6.1f} ms in storage calls per trial ({len(done)} trials in {span:.1f} s)",
          flush=True)
    return row


def _url(url: str, work: Path, name: str) -> str:
    return f"sqlite:///{work / (name + '.db')}" if url == "sqlite" else url


def run(backend: str, url: str, n_workers: int, trials_per_worker: int, cache_dir: Path, work: Path) -> dict:
    import optuna

    name = f"capacity-{backend}-{n_workers}-{int(time.time())}"
    url = _url(url, work, name)
    trials = n_workers * trials_per_worker
    create_or_resume(make_storage(url), name, open_cache(cache_dir), parse_spec(LOGREG), "capacity", trials)
    started = time.perf_counter()
    processes = [subprocess.Popen([sys.executable, "-c", WORKER, name, url, str(i)], stdout=subprocess.PIPE,
                                  text=True) for i in range(n_workers)]
    reports = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in processes]
    wall = time.perf_counter() - started
    study = optuna.load_study(study_name=name, storage=url)
    done = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    optuna.delete_study(study_name=name, storage=url)
    # From the first trial's start to the last one's end: the workers' start-up (imports, cache) is left out.
    span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    ran = sum(r["ran"] for r in reports)
    finished = len(done)
    row = {"backend": backend, "workers": n_workers, "trials": finished, "wall_s": wall, "trial_span_s": span,
           "trials_per_s": finished / span, "storage_ms_per_trial": 1000 * sum(r["storage_s"] for r in reports) / ran}
    print(f"{backend:>10} {n_workers:>2} workers: {row['trials_per_s']:6.1f} trials/s, "
          f"{row['storage_ms_per_trial']:6.1f} ms in storage calls per trial ({finished} trials in {span:.1f} s)",
          flush=True)
    return row


def default_space_trial_seconds(work: Path, trials: int) -> dict:
    """Median seconds of a trial of studies/default.yaml on an ADReSSo-shaped cache (1024 dims), one worker."""
    import optuna

    from adsearch.search.worker import run_worker

    cache_dir = write_synthetic_cache(work / "adresso-1024", **{**SHAPE, "dim": 1024})
    url = f"sqlite:///{work / 'default.db'}"
    spec = load_spec(Path(__file__).parents[1] / "studies" / "default.yaml")
    create_or_resume(make_storage(url), "default", open_cache(cache_dir), spec, "studies/default.yaml", trials)
    run_worker("default", url, worker_index=0)
    seconds = [(t.datetime_complete - t.datetime_start).total_seconds()
               for t in optuna.load_study(study_name="default", storage=url).get_trials(deepcopy=False)
               if t.datetime_complete]
    result = {"trials": len(seconds), "median_s": statistics.median(seconds),
              "quartiles_s": statistics.quantiles(seconds, n=4)}
    print(f"default space: median trial {result['median_s']:.2f} s over {len(seconds)} trials "
          f"(quartiles {', '.join(f'{q:.2f}' for q in result['quartiles_s'])} s)", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2, 4, 8, 16])
    parser.add_argument("--trials-per-worker", type=int, default=30)
    parser.add_argument("--default-trials", type=int, default=100,
                        help="trials of the default space to time (the first ones, screen and random start-up, "
                             "are cheaper than a long study's)")
    parser.add_argument("--postgres", default=POSTGRES)
    parser.add_argument("--proxy", action="store_true",
                        help="compare plain Optuna workers on PostgreSQL directly and through the gRPC proxy")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.proxy:
        try:
            import grpc  # noqa: F401
        except ImportError:
            sys.exit("--proxy needs Optuna's gRPC extras: pip install grpcio protobuf")
        rows = [run_plain(args.postgres, via_proxy, n, args.trials_per_worker)
                for n in args.workers for via_proxy in (False, True)]
        if args.json:
            args.json.write_text(json.dumps({"rows": rows}, indent=1))
        return
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        cache_dir = write_synthetic_cache(work / "capacity", **SHAPE)
        rows = [run(backend, url, n, args.trials_per_worker, cache_dir, work)
                for backend, url in (("postgresql", args.postgres), ("sqlite", "sqlite"))
                for n in args.workers]
        trial = default_space_trial_seconds(work, args.default_trials)
    for backend in ("postgresql", "sqlite"):
        mine = [r for r in rows if r["backend"] == backend]
        best = max(mine, key=lambda r: r["trials_per_s"])
        # At the best throughput measured, one trial of the default space occupies a worker trial_s seconds
        # while the database serves best["trials_per_s"] trials a second: that many workers keep it as busy.
        serves = best["trials_per_s"] * trial["median_s"]
        print(f"{backend}: ceiling {best['trials_per_s']:.1f} trials/s (at {best['workers']} workers) -> about "
              f"{serves:.0f} workers of the default space before the measured ceiling is reached")
        for r in mine:
            r["workers_served_at_default_trial_time"] = serves
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "default_space_trial": trial}, indent=1))


if __name__ == "__main__":
    main()
