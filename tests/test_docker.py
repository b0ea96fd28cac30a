"""docker/: no Docker engine runs on the build machines, so the deployment is checked statically: the compose
file against the Compose specification's JSON schema, every command it runs through adsearch's own CLI
parser, the security-relevant settings, and each image's install step against the README's."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer
import yaml

from adsearch.cli import app

DOCKER = Path(__file__).parents[1] / "docker"
README = Path(__file__).parents[1] / "README.md"


def _env_example() -> dict[str, str]:
    pairs = (line.split("=", 1) for line in (DOCKER / ".env.example").read_text().splitlines()
             if line.strip() and not line.startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def _interpolate(value, env: dict[str, str]):
    """Compose's ${NAME} and ${NAME:-default}, as `docker compose config` would resolve them."""
    if isinstance(value, str):
        return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", lambda m: env.get(m[1], m[2] or ""), value)
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def compose() -> dict:
    return _interpolate(yaml.safe_load((DOCKER / "compose.yaml").read_text()), _env_example())


def test_compose_file_follows_the_compose_specification():
    checker = Path(sys.executable).with_name("check-jsonschema")
    done = subprocess.run([str(checker), "--builtin-schema", "vendor.compose-spec", str(DOCKER / "compose.yaml")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_adsearch_command_in_compose_parses_with_the_cli(compose, monkeypatch):
    cli = typer.main.get_command(app)
    services = {name: s for name, s in compose["services"].items() if "adsearch" in s.get("image", "")}
    assert {"create-study", "worker", "dashboard", "extract"} <= set(services)
    for service in services.values():
        for key, value in service.get("environment", {}).items():
            monkeypatch.setenv(key, value)  # the options compose passes through ADSEARCH_* variables
        args = service["command"]
        with cli.make_context("adsearch", list(args), resilient_parsing=False) as context:
            sub_name, sub, rest = cli.resolve_command(context, list(args))
            sub.make_context(sub_name, rest, parent=context)  # raises on an unknown option or a bad value
        for key in service.get("environment", {}):
            monkeypatch.delenv(key)


def test_compose_keeps_the_dashboard_local_the_cache_read_only_and_passwords_out(compose):
    services = compose["services"]
    assert services["dashboard"]["ports"] == ["127.0.0.1:8080:8080"]
    for name in ("worker", "create-study", "dashboard"):
        assert any(v.endswith(":/cache:ro") for v in services[name]["volumes"]), name
        env = services[name]["environment"]
        assert "@db:" in env["ADSEARCH_STORAGE"] and ":" not in env["ADSEARCH_STORAGE"].split("//")[1].split("@")[0]
        assert env["ADSEARCH_STORAGE_PASSWORD_FILE"] == "/run/secrets/db_password"
    assert services["db"]["healthcheck"]["test"][0] == "CMD-SHELL"
    assert "db-data" in compose["volumes"]
    assert services["worker"]["depends_on"]["create-study"]["condition"] == "service_completed_successfully"
    gpu = services["extract"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    for name, service in services.items():  # passwords only as secret files, never as values
        assert not [key for key in service.get("environment", {}) if key.endswith("PASSWORD")], name


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.extract"])
def test_each_image_installs_what_the_readme_says(dockerfile):
    text = (DOCKER / dockerfile).read_text()
    installs = re.findall(r"^RUN (pip install .+)$", text, flags=re.M)
    assert installs, f"{dockerfile} installs nothing"
    readme = README.read_text()
    for install in installs:
        assert install in readme, f"README.md does not show `{install}` ({dockerfile})"
    for source in re.findall(r"^COPY (.+) \S+$", text, flags=re.M):
        for path in shlex.split(source):
            assert (DOCKER.parent / path).exists(), path
    if dockerfile == "Dockerfile":  # search workers never need torch or transformers
        assert not [line for line in re.findall(r"^RUN .+$", text, flags=re.M) if "torch" in line or "extract" in line]
    assert re.search(r"^USER ", text, flags=re.M), "images run as a user, not root"


def test_the_env_example_names_every_variable_compose_uses():
    used = set(re.findall(r"\$\{(\w+)", (DOCKER / "compose.yaml").read_text()))
    assert used <= set(_env_example()), used - set(_env_example())
    assert os.path.basename(_env_example()["ADSEARCH_DB_PASSWORD_FILE"]) == "db_password.txt"
