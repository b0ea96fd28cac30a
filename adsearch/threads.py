"""How many threads a torch-using command runs, and how its OpenMP threads wait: chosen, not inherited.

torch's OpenMP threads spin while they wait for work (libgomp: 300,000 spins at every barrier). On a shared
node (a SLURM job's share, a laptop running a search beside the extraction) other processes hold some of
the cores: the spinning threads then take turns with the threads that have work, and two busy neighbours
made `extract` of the tiny model 3.5x slower than the same command with one thread (issue 27). So:

* OpenMP threads spin briefly, then sleep (`GOMP_SPINCOUNT=10000`, a few microseconds, set before torch is
  first imported by `quiet_openmp`; left alone when the user set `OMP_WAIT_POLICY` or `GOMP_SPINCOUNT`).
  Measured on 2 cores (BENCHMARKS.md): as fast as one thread under load, as fast as spinning when quiet;
  fully passive waiting (`OMP_WAIT_POLICY=PASSIVE`) was as fast under load but 10 % slower when quiet;
* the intra-op threads are torch's own default (one per core) capped by the CPUs the process may use: its
  affinity mask and, inside a container or a SLURM job, its cgroup's CPU quota (`os.cpu_count()` sees
  neither). The audio loader threads are not taken off: they sleep most of the time (one decodes 1,600
  audio-s/s, the tiny model takes 300), and taking one off on 2 cores made quiet extraction 20 % slower;
* `--threads N` (or `OMP_NUM_THREADS`) overrides the choice.

The number of intra-op threads can change the last bits of a cached number (a reduction split otherwise),
so the choice is recorded with a cache (`cache.json` "runtime"), and the default keeps torch's own count
wherever the process may use every core: there a cache is the same bit for bit as before
(tests/test_extract.py).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class ThreadPlan:
    """The intra-op threads of a command and how they were chosen (printed, and recorded with a cache)."""

    threads: int
    how: str

    def to_json(self) -> dict:
        return {"intra_op": self.threads, "how": self.how, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "")}


SPIN_COUNT = "10000"  # libgomp's spins before an idle thread sleeps (its default: 300,000)


def quiet_openmp() -> None:
    """Idle OpenMP threads spin briefly, then sleep, unless the user chose how they wait. Effective only before
    the OpenMP runtime is loaded (torch's first import): the command line calls it first thing."""
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT


def cgroup_cpu_limit(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = CGROUP_ROOT) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (quota / period), the smallest along its path; None when
    there is none. cgroup v2 (`cpu.max`: "max 100000" or "200000 100000") and v1 (`cpu.cfs_quota_us`, -1 for
    none, over `cpu.cfs_period_us`)."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one unified hierarchy
            folders = [root / path.lstrip("/"), root / "unified" / path.lstrip("/")]
            read = _v2_limit
        elif "cpu" in controllers.split(","):
            folders = [root / name / path.lstrip("/") for name in (controllers, "cpu", "cpu,cpuacct")]
            read = _v1_limit
        else:
            continue
        for folder in folders:
            for level in (folder, *folder.parents):
                if level == root.parent or not str(level).startswith(str(root)):
                    break
                limit = read(level)
                if limit is not None:
                    limits.append(limit)
    return min(limits) if limits else None


def _v2_limit(folder: Path) -> float | None:
    try:
        quota, period = (folder / "cpu.max").read_text().split()
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _v1_limit(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period


def usable_cpus() -> tuple[int, str]:
    """(CPUs this process may use, how that was found): its affinity, capped by its cgroup's CPU quota."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_limit()
    if quota is not None and math.ceil(quota) < affinity:
        return max(1, math.ceil(quota)), f"a cgroup CPU quota of {quota:g} CPUs ({affinity} in the affinity mask)"
    return affinity, f"{affinity} CPU(s) in the affinity mask" + ("" if quota is None else f", quota {quota:g}")


_TORCH_DEFAULT: list[int] = []  # torch's own intra-op thread count, read once before adsearch changes it


def choose_threads(requested: int | None = None) -> ThreadPlan:
    """Set torch's intra-op threads: `requested` (--threads), else OMP_NUM_THREADS if the user set it (torch
    took it already), else torch's own default capped by the usable CPUs; return what was chosen and why."""
    import torch

    if not _TORCH_DEFAULT:
        _TORCH_DEFAULT.append(torch.get_num_threads())
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads {requested}: at least 1")
        plan = ThreadPlan(requested, f"--threads {requested}")
    elif (given := os.environ.get("OMP_NUM_THREADS", "").strip()).isdigit() and int(given) >= 1:
        plan = ThreadPlan(int(given), f"OMP_NUM_THREADS={given}")
    else:
        cpus, how = usable_cpus()
        plan = ThreadPlan(min(cpus, _TORCH_DEFAULT[0]), f"{how}; torch's default {_TORCH_DEFAULT[0]}")
    torch.set_num_threads(plan.threads)
    return plan
