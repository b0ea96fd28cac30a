"""`adsearch dashboard`: optuna-dashboard behind its host and origin guard."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from adsearch.cli.app import STORAGE_HELP, app
from adsearch.cli.console import err, out, user_errors


@app.command()
def dashboard(
    storage: Annotated[str, typer.Option(help=STORAGE_HELP, envvar="ADSEARCH_STORAGE")] = "sqlite:///adsearch.db",
    host: Annotated[str, typer.Option(help="Address to bind. The dashboard has NO authentication: keep 127.0.0.1, "
                                           "or put an authenticating proxy in front.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.", min=1, max=65535)] = 8080,
    artifacts: Annotated[Path | None, typer.Option(
        help="Artifact store of the figures (screen heat map, report). Default: the one the studies recorded, "
             "else ./adsearch-artifacts.", envvar="ADSEARCH_ARTIFACTS")] = None,
    allowed_host: Annotated[list[str] | None, typer.Option(
        help="Another host name the dashboard may be reached by (e.g. behind a proxy); repeatable. Loopback names "
             "and the bound address are always allowed; requests naming any other host are refused.")] = None,
    writable: Annotated[bool | None, typer.Option(
        "--writable/--read-only", help="Allow changes (delete studies, notes, uploads) from the dashboard's own "
                                       "page. Default: writable on loopback, read-only when bound beyond it.",
        show_default=False)] = None,
) -> None:
    """Serve optuna-dashboard for the study storage (history, importances, notes, report figures).

    Only requests naming a loopback host, the bound address or an --allowed-host are answered (other web pages
    in your browser cannot read or change studies), and writes must come from the dashboard's own page.
    """
    from adsearch.dashboard import check_allowed_host, guarded_app, is_loopback, serve
    from adsearch.search.storage import make_storage

    for name in allowed_host or []:
        try:
            check_allowed_host(name)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--allowed-host") from None
    with user_errors():
        store = make_storage(storage, create=False, read_only_where_unwritable=True)
        _check_port_free(host, port)
    if artifacts is None:
        from adsearch.results.report import DEFAULT_ARTIFACTS, recorded_stores

        stores = recorded_stores(store)
        artifacts = Path(stores[0] if stores else DEFAULT_ARTIFACTS)
        if len(stores) > 1:
            err.print(f"[yellow]warning:[/] the studies recorded {len(stores)} artifact stores "
                      f"({escape(', '.join(stores))}); showing figures from {escape(str(artifacts))} only (pass "
                      "--artifacts for another)", highlight=False)
    artifacts.mkdir(parents=True, exist_ok=True)
    loopback = is_loopback(host)
    read_only = (not loopback if writable is None else not writable) or store.read_only
    if store.read_only:
        err.print("[yellow]note:[/] the study database cannot be written by this user or on this mount: serving it "
                  "read-only", highlight=False)
    allowed = list(allowed_host or []) + ([host] if host not in ("0.0.0.0", "::") else [])
    if not loopback:
        err.print(f"[yellow]warning:[/] serving on {escape(host)} without authentication: anyone who reaches it can "
                  + ("read every study" if read_only else "change or delete studies"), highlight=False)
    url_host = f"[{host}]" if ":" in host else host
    out.print(f"dashboard: http://{url_host}:{port}/dashboard ({'read-only' if read_only else 'writable'}; "
              "Ctrl-C stops it)", highlight=False)
    with contextlib.suppress(KeyboardInterrupt):
        serve(guarded_app(store, str(artifacts), allowed, read_only), host, port)


def _check_port_free(host: str, port: int) -> None:
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ValueError(f"--host {host!r}: not an address of this machine ({exc.strerror})") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise ValueError(f"cannot serve on {host}:{port} ({exc.strerror}); another program (another "
                             "dashboard?) uses it: pass --port with a free one") from None
