"""The `adsearch` command line."""

from adsearch.cli.search import app

__all__ = ["app"]
