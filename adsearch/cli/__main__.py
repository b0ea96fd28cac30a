"""`python -m adsearch.cli`: the `adsearch` command."""

from adsearch.cli import app

app()
