"""adsearch's blockwise estimators vs. their scikit-learn counterparts on a window-level fold.

    python benchmarks/estimators.py --json benchmarks/results/estimators-cpu.json

One fit each on a float32 matrix shaped like a window-level training fold of the memory benchmark
(6,400 windows x 3,072 features = mean+std+max of a 1024-dim layer), one thread, each in its own process:
wall time and peak resident memory above the process's state just before the fit (VmHWM after reset).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CASES = {
    "scaler": ("sklearn.preprocessing:StandardScaler()", "adsearch.search.estimators:BlockwiseStandardScaler()"),
    "lda (shrinkage 0.5)": (
        "sklearn.discriminant_analysis:LinearDiscriminantAnalysis(solver='lsqr', "
        "covariance_estimator=__import__('sklearn.covariance').covariance.ShrunkCovariance(shrinkage=0.5))",
        "adsearch.search.estimators:ShrinkageLDA(shrinkage=0.5)"),
    "pca (64 components)": ("sklearn.decomposition:PCA(64, svd_solver='full')",
                            "adsearch.search.estimators:CovariancePCA(64)"),
    "pca (90 % variance)": ("sklearn.decomposition:PCA(0.9, svd_solver='full')",
                            "adsearch.search.estimators:CovariancePCA(0.9)"),
}

ONE_FIT = """
import importlib, json, sys, time
from pathlib import Path
import numpy as np
from threadpoolctl import threadpool_limits

def kib(key):
    return int(next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key)).split()[1])

module, expression = sys.argv[1].split(":", 1)
estimator = eval(expression, vars(importlib.import_module(module)))
rng = np.random.default_rng(0)
X = (rng.normal(size=(6400, 3072)) * rng.uniform(0.1, 3, 3072)).astype(np.float32)
y = rng.integers(0, 2, 6400)
Path("/proc/self/clear_refs").write_text("5")
before = kib("VmRSS")
with threadpool_limits(1):
    started = time.perf_counter()
    estimator.fit(X, y)
    seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "peak_above_mb": (kib("VmHWM") - before) / 1024}))
"""


def measure(spec: str) -> dict:
    done = subprocess.run([sys.executable, "-c", ONE_FIT, spec], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = {}
    for name, (theirs, ours) in CASES.items():
        reference, blockwise = measure(theirs), measure(ours)
        results[name] = {"scikit-learn": reference, "adsearch": blockwise,
                         "speed_ratio": reference["seconds"] / blockwise["seconds"]}
        print(f"{name:22s} scikit-learn {reference['seconds']:6.2f} s {reference['peak_above_mb']:6.0f} MB | "
              f"adsearch {blockwise['seconds']:6.2f} s {blockwise['peak_above_mb']:6.0f} MB | "
              f"{results[name]['speed_ratio']:.1f}x faster")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
