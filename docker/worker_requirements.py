"""Print the worker image's requirements: adsearch's own and its postgres extra, with `xgboost-cpu` for
`xgboost` (the same `xgboost` module without the NCCL GPU library, about 469 MB, that a CPU worker never
loads). The image installs these, then adsearch itself with --no-deps.

    python docker/worker_requirements.py [pyproject.toml] > requirements.txt
"""

import sys
import tomllib

with open(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml", "rb") as handle:
    project = tomllib.load(handle)["project"]
for requirement in project["dependencies"] + project["optional-dependencies"]["postgres"]:
    print("xgboost-cpu" + requirement[len("xgboost"):] if requirement.startswith("xgboost") else requirement)
