"""Serving optuna-dashboard so that only the user can reach it, not the web pages they visit.

optuna-dashboard has no authentication and write routes (delete a study, upload an artifact, tell a trial).
Bound to 127.0.0.1 it is still reachable from any web page in the user's browser: through DNS rebinding
(a page's own host name made to resolve to 127.0.0.1, so its scripts read the answers) and through
cross-origin form posts and fetches (writes need no answer to do harm). `HostGuard` wraps the dashboard's WSGI
application and answers 403 to:

* a request whose Host header is not a loopback name, the bound address or a name given with
  `--allowed-host` (DNS rebinding);
* a write (anything but GET, HEAD, OPTIONS) whose Origin is another site's, or which a browser marks
  as cross-site (Sec-Fetch-Site);
* any write at all in read-only mode (the default when bound beyond loopback).

Artifacts are served with `Content-Security-Policy: sandbox` and `nosniff`, so an uploaded HTML file can
never run scripts with the dashboard's origin.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_name(netloc: str) -> str:
    """'example.org:8080' -> 'example.org', '[::1]:80' -> '::1' (lower case)."""
    try:
        parsed = urlsplit(f"//{netloc}")
        return (parsed.hostname or "").lower()
    except ValueError:
        return ""


_HOST_NAME = re.compile(r"(?=.{1,253}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*\.?")


def check_allowed_host(name: str) -> str:
    """An --allowed-host value as the guard compares it (lower case, no brackets), or ValueError saying why:
    a host name or an IP address, without a port or a scheme (a Host header's port is not compared)."""
    plain = name.strip().lower()
    if plain.startswith("[") and plain.endswith("]"):
        plain = plain[1:-1]
    try:
        ipaddress.ip_address(plain)
        return plain
    except ValueError:
        pass
    if not plain:
        raise ValueError("--allowed-host '': give a host name (dashboard.example.org) or an address")
    if "://" in plain or "/" in plain or ":" in plain:
        raise ValueError(f"--allowed-host {name!r}: give the host name alone, without scheme, port or path "
                         "(the port of a request's Host header is not compared)")
    if not _HOST_NAME.fullmatch(plain):
        raise ValueError(f"--allowed-host {name!r} is not a host name or an IP address")
    return plain


class HostGuard:
    """WSGI middleware: see the module's docstring."""

    def __init__(self, app: Callable, allowed_hosts: Iterable[str], read_only: bool):
        self.app = app
        self.allowed = {check_allowed_host(name) for name in allowed_hosts} | LOOPBACK_NAMES
        self.read_only = read_only

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        host_header = environ.get("HTTP_HOST", "")
        if _host_name(host_header) not in self.allowed:
            return _refuse(start_response, f"Host {host_header!r} is not allowed: open the dashboard through "
                           "127.0.0.1 or localhost, or start it with --allowed-host NAME")
        method = environ.get("REQUEST_METHOD", "GET").upper()
        if method not in SAFE_METHODS:
            if self.read_only:
                return _refuse(start_response, "this dashboard is read-only (start it with --writable to change "
                               "studies)")
            origin = environ.get("HTTP_ORIGIN")
            if origin is not None and (origin == "null" or urlsplit(origin).netloc.lower() != host_header.lower()):
                return _refuse(start_response, f"a write from another site ({origin}) is refused")
            if environ.get("HTTP_SEC_FETCH_SITE", "same-origin") not in ("same-origin", "none"):
                return _refuse(start_response, "a cross-site write is refused")
        environ.setdefault("HTTP_ACCEPT_ENCODING", "")  # optuna-dashboard's static files read it unguarded
        if environ.get("PATH_INFO", "").startswith("/artifacts/"):
            def sandboxed(status: str, headers: list, exc_info=None):
                headers = [h for h in headers if h[0].lower() not in ("content-security-policy",
                                                                     "x-content-type-options")]
                headers += [("Content-Security-Policy", "sandbox"), ("X-Content-Type-Options", "nosniff")]
                return start_response(status, headers, exc_info)

            return self.app(environ, sandboxed)
        return self.app(environ, start_response)


def _refuse(start_response: Callable, reason: str) -> list[bytes]:
    body = f"403 Forbidden: {reason}\n".encode()
    start_response("403 Forbidden", [("Content-Type", "text/plain; charset=utf-8"),
                                     ("Content-Length", str(len(body)))])
    return [body]


def guarded_app(storage, artifacts_dir: str, allowed_hosts: Iterable[str], read_only: bool) -> HostGuard:
    """optuna-dashboard's WSGI application over `storage`, behind `HostGuard`."""
    import optuna_dashboard
    from optuna.artifacts import FileSystemArtifactStore

    app = optuna_dashboard.wsgi(storage, artifact_store=FileSystemArtifactStore(artifacts_dir))
    return HostGuard(app, allowed_hosts, read_only)


def serve(app: Callable, host: str, port: int) -> None:
    """Serve a WSGI application on host:port with one thread per request, until interrupted."""
    import socket
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, *args) -> None:  # one line per request would bury the terminal
            pass

    with make_server(host, port, app, server_class=Server, handler_class=QuietHandler) as server:
        server.serve_forever()
