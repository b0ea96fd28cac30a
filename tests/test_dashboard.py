"""The dashboard in a real browser: Debian's Chromium driven by Playwright, on a loopback port."""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adsearch.embed import open_cache
from adsearch.embed.synthetic import write_synthetic_cache
from adsearch.search.space import parse_spec
from adsearch.search.storage import make_storage
from adsearch.search.study import create_or_resume
from adsearch.search.worker import run_worker

ARTIFACTS = Path(__file__).parent.parent / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic"]


def browser_missing() -> str | None:
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright)"
    if not Path(CHROMIUM).exists():
        return "Debian chromium is not installed (apt-get install -y chromium)"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_dashboard_shows_the_study_and_its_trials(tmp_path):
    reason = browser_missing()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the browser test: {reason}")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    cache = open_cache(write_synthetic_cache(tmp_path / "c", n_train=30, n_test=0, n_layers=3, dim=8, signal_layer=1))
    url = f"sqlite:///{tmp_path / 'study.db'}"
    create_or_resume(make_storage(url), "browser-study", cache, parse_spec({"cv": {"folds": 3}}), "space.yaml", 6)
    run_worker("browser-study", url, worker_index=0)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "adsearch.cli", "dashboard", "--storage", url, "--port",
                               str(port), "--artifacts", str(tmp_path / "artifacts")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.2)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS,
                                        chromium_sandbox=False)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/dashboard", wait_until="networkidle")
            page.get_by_text("browser-study").first.wait_for(timeout=30_000)
            page.goto(f"http://127.0.0.1:{port}/dashboard/studies/1/trials", wait_until="networkidle")
            page.get_by_text("Trial 5").first.wait_for(timeout=30_000)
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "dashboard-trials.png"), full_page=True)
            page.goto(f"http://127.0.0.1:{port}/dashboard/studies/1", wait_until="networkidle")
            page.get_by_text("Intermediate values").first.wait_for(timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "dashboard-study.png"), full_page=True)
            page.goto(f"http://127.0.0.1:{port}/dashboard/studies/1/note", wait_until="networkidle")
            page.get_by_text("grouped by speaker").first.wait_for(timeout=30_000)  # the study note
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert (ARTIFACTS / "dashboard-trials.png").stat().st_size > 10_000


def _start_dashboard(url: str, artifacts: Path, *options: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "adsearch.cli", "dashboard", "--storage", url, "--port",
                               str(port), "--artifacts", str(artifacts), *options],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return server, port
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise AssertionError(server.communicate()[0])


def _request(port: int, method: str, path: str, headers: dict, body: bytes | None = None) -> tuple[int, bytes]:
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_foreign_hosts_and_origins_can_neither_read_nor_write(tmp_path):
    """DNS rebinding and cross-origin writes: a web page the user visits must not reach the studies."""
    import json

    import optuna

    cache = open_cache(write_synthetic_cache(tmp_path / "c", n_train=30, n_test=0, n_layers=3, dim=8, signal_layer=1))
    url = f"sqlite:///{tmp_path / 'study.db'}"
    create_or_resume(make_storage(url), "guarded", cache, parse_spec({"cv": {"folds": 3}}), "space.yaml", 2)
    artifacts = tmp_path / "artifacts"
    server, port = _start_dashboard(url, artifacts)
    own = f"127.0.0.1:{port}"
    upload = json.dumps({"file": "data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==",
                         "filename": "x.html"}).encode()
    try:
        for host in ("attacker.example", f"attacker.example:{port}", "127.0.0.1.attacker.example"):
            assert _request(port, "GET", "/api/studies", {"Host": host})[0] == 403
            assert _request(port, "DELETE", "/api/studies/1", {"Host": host})[0] == 403
        status, body = _request(port, "GET", "/api/studies", {"Host": own})
        assert status == 200 and b"guarded" in body
        assert _request(port, "GET", "/api/studies", {"Host": f"localhost:{port}"})[0] == 200
        foreign = {"Host": own, "Origin": "http://attacker.example", "Content-Type": "application/json"}
        assert _request(port, "POST", "/api/artifacts/1", foreign, upload)[0] == 403
        assert _request(port, "DELETE", "/api/studies/1", foreign)[0] == 403
        assert _request(port, "DELETE", "/api/studies/1", {"Host": own, "Sec-Fetch-Site": "cross-site"})[0] == 403
        assert not artifacts.exists() or not any(artifacts.rglob("*"))
        assert [s.study_name for s in optuna.get_all_study_summaries(url)] == ["guarded"]
        # the dashboard's own page may still write; what it uploads is served sandboxed (no script runs)
        mine = {"Host": own, "Origin": f"http://{own}", "Content-Type": "application/json"}
        status, body = _request(port, "POST", "/api/artifacts/1", mine, upload)
        assert status == 201 and len(list(artifacts.rglob("*"))) == 1, body
        import http.client

        artifact_id = json.loads(body)["artifact_id"]
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("GET", f"/artifacts/1/{artifact_id}", headers={"Host": own})
        response = connection.getresponse()
        assert response.status == 200 and response.getheader("Content-Security-Policy") == "sandbox"
        assert response.getheader("X-Content-Type-Options") == "nosniff"
        connection.close()
    finally:
        server.terminate()
        server.wait(timeout=10)
    server, port = _start_dashboard(url, artifacts, "--read-only")
    own = f"127.0.0.1:{port}"
    try:
        assert _request(port, "GET", "/api/studies", {"Host": own})[0] == 200
        status, body = _request(port, "DELETE", "/api/studies/1", {"Host": own, "Origin": f"http://{own}"})
        assert status == 403 and b"read-only" in body
        assert [s.study_name for s in optuna.get_all_study_summaries(url)] == ["guarded"]
    finally:
        server.terminate()
        server.wait(timeout=10)
