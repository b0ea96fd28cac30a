"""The `adsearch` command line: thin modules, one per step, each parsing options, calling one library function
and printing. Importing the package registers every command on `app`."""

import importlib

from adsearch.cli.app import app

# The steps in workflow order, which is the order `adsearch --help` lists their commands in.
for _step in ("corpus", "extract", "search", "results", "space", "dashboard"):
    importlib.import_module(f"adsearch.cli.{_step}")

__all__ = ["app"]
