"""`adsearch space check` and `studies`: what a space searches, what a storage holds."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from adsearch.cli.app import PLUGINS_HELP, STORAGE_HELP, app, space_app
from adsearch.cli.console import out, user_errors


@space_app.command("check")
def space_check(
    space: Annotated[Path, typer.Argument(help="Search-space YAML file.")],
    cache: Annotated[Path | None, typer.Option(help="Also check the layers against this cache.")] = None,
    plugins: Annotated[list[str] | None, typer.Option(help=PLUGINS_HELP)] = None,
) -> None:
    """Validate a search-space file and print what it searches."""
    import optuna

    from adsearch.embed import open_cache
    from adsearch.search.space import check_layers, classifier_params, load_spec

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with user_errors():
        spec = load_spec(space, plugins)
        layers = check_layers(spec, open_cache(cache).n_layers, str(space)) if cache else None
    out.print(f"{space}: valid (hash {spec.digest()})", highlight=False)
    if spec.plugins:
        out.print(f"plugins {', '.join(spec.plugins)}", highlight=False)
    out.print(f"task {spec.task}; cv {spec.cv.folds} folds x {spec.cv.repeats}, metric {spec.cv.metric}, sampler "
              f"{spec.sampler}, pruner {spec.pruner}, seed {spec.seed}")
    out.print(f"layers {_describe_layers(layers, spec.space.layers)}; pooling {', '.join(spec.space.pooling)}; "
              f"unit {', '.join(spec.space.unit)}; pca {', '.join(spec.space.pca)}", highlight=False)
    for name in spec.space.classifiers:
        params = "; ".join(f"{k} {_describe_param(kind, value)}" for k, (kind, value) in
                           classifier_params(spec, name).items())
        out.print(f"  {name}: {params}", highlight=False)


def _describe_layers(checked, layers) -> str:
    if checked:
        return f"{checked[0]}..{checked[-1]}" if list(checked) == list(range(checked[0], checked[-1] + 1)) else (
            ", ".join(map(str, checked)))
    if isinstance(layers, list):
        return ", ".join(map(str, layers))
    return f"{layers.low}..{'last' if layers.high is None else layers.high}"


def _describe_param(kind: str, value) -> str:
    """`range 0.0001..100 (log)`, `one of uniform, distance`, `= 0.5`: what a person writes in the YAML."""
    if kind == "range":
        return f"range {value.low:g}..{value.high:g}" + (" (log)" if value.log else "")
    if kind == "choice":
        return "one of " + ", ".join(str(option) for option in value)
    return f"= {value}"


@app.command()
def studies(
    storage: Annotated[str, typer.Option(help=STORAGE_HELP, envvar="ADSEARCH_STORAGE")] = "sqlite:///adsearch.db",
) -> None:
    """List the studies in a storage: finished trials of the budget, best CV, and their null studies."""
    import optuna

    from adsearch.search.storage import make_storage, mask_url
    from adsearch.search.study import list_studies

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with user_errors():
        rows = list_studies(make_storage(storage, create=False))
    if not rows:
        out.print(f"no study in {mask_url(storage)}; create one with `adsearch search`", highlight=False)
        return
    width = max(len(row["name"]) for row in rows)
    out.print(f"{'study':<{width}}  {'finished':>13}  {'best CV':>8}", highlight=False)
    for row in rows:
        done = f"{row['finished']}/{row['budget'] if row['budget'] is not None else '?'}"
        best = f"{row['best']:.4f}" if row["best"] is not None else "-"
        out.print(f"{row['name']:<{width}}  {done:>13}  {best:>8}", highlight=False, markup=False)
