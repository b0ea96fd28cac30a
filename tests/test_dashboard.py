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
