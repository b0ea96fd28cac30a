"""A study scripted with adsearch's Python API instead of the CLI: a synthetic cache, a study with the example
classifier plugin beside logistic regression, one worker, the export. Run from anywhere:

    python examples/scripted_study.py OUTPUT_FOLDER
"""

import sys
from pathlib import Path

from adsearch import api
from adsearch.embed.synthetic import write_synthetic_cache

sys.path.insert(0, str(Path(__file__).parent / "plugins"))  # where the example plugin lives
out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
space = out / "space.yaml"
space.write_text("cv: {folds: 3}\nspace:\n  classifiers: {logreg: {}, shrunken_centroid: {}}\n")
cache = write_synthetic_cache(out / "cache", n_train=40, n_test=12, n_layers=3, dim=8, signal_layer=1)
storage = f"sqlite:///{out / 'study.db'}"
study = api.create_study("scripted", cache, space=space, storage=storage, trials=10, plugins=["shrunken_centroid"])
report = api.run_worker("scripted", storage)
result = api.export("scripted", out / "best", storage)
print(f"ran {report.ran} trials; best CV {study.best_value:.3f}; test balanced accuracy "
      f"{result.test['balanced_accuracy']['value']:.3f} ({result.config.pipeline.classifier})")
