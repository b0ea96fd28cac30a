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
    """Compose's ${NAME}, ${NAME:-default} and ${NAME:?error}, as `docker compose config` resolves them."""
    def one(match: re.Match) -> str:
        name, operator, argument = match[1], match[2], match[3] or ""
        if env.get(name):
            return env[name]
        if operator == ":?":
            raise KeyError(f"{name}: {argument}")
        return argument

    if isinstance(value, str):
        return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", one, value)
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    return value


def _compose(name: str, env: dict[str, str]) -> dict:
    return _interpolate(yaml.safe_load((DOCKER / name).read_text()), env)


@pytest.fixture(scope="module")
def compose() -> dict:
    return _compose("compose.yaml", _env_example())


@pytest.fixture(scope="module")
def worker_compose() -> dict:
    return _compose("compose.worker.yaml", _env_example())


@pytest.mark.parametrize("name", ["compose.yaml", "compose.worker.yaml"])
def test_compose_file_follows_the_compose_specification(name):
    checker = Path(sys.executable).with_name("check-jsonschema")
    done = subprocess.run([str(checker), "--builtin-schema", "vendor.compose-spec", str(DOCKER / name)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_adsearch_command_in_compose_parses_with_the_cli(compose, worker_compose, monkeypatch):
    cli = typer.main.get_command(app)
    services = {name: s for name, s in compose["services"].items() if "adsearch" in s.get("image", "")}
    assert {"create-study", "worker", "dashboard", "extract", "tools"} <= set(services)
    services["worker-host worker"] = worker_compose["services"]["worker"]
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
    installs = [line for line in re.findall(r"^RUN (.+)$", text, flags=re.M) if "pip install" in line]
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
    for name in ("compose.yaml", "compose.worker.yaml"):
        used = set(re.findall(r"\$\{(\w+)", (DOCKER / name).read_text()))
        assert used <= set(_env_example()), (name, used - set(_env_example()))
    assert os.path.basename(_env_example()["ADSEARCH_DB_PASSWORD_FILE"]) == "db_password.txt"


def test_a_worker_host_starts_workers_only_against_the_database_it_is_given(compose, worker_compose):
    """DBHOST set on each worker host used to start a private PostgreSQL and a separate study per host."""
    assert set(worker_compose["services"]) == {"worker"}
    worker = worker_compose["services"]["worker"]
    assert "depends_on" not in worker and "ports" not in worker
    with pytest.raises(KeyError, match="ADSEARCH_STORAGE: set ADSEARCH_STORAGE to the database host's URL"):
        _compose("compose.worker.yaml", {k: v for k, v in _env_example().items() if k != "ADSEARCH_STORAGE"})
    given = _compose("compose.worker.yaml", {**_env_example(), "ADSEARCH_STORAGE": "postgresql+psycopg://a@h:6/s"})
    assert given["services"]["worker"]["environment"]["ADSEARCH_STORAGE"] == "postgresql+psycopg://a@h:6/s"
    # the database host publishes its port, on loopback unless told otherwise
    assert compose["services"]["db"]["ports"] == ["127.0.0.1:5432:5432"]
    moved = _compose("compose.yaml", {**_env_example(), "ADSEARCH_DB_BIND": "10.0.0.5", "ADSEARCH_DB_PORT": "6543"})
    assert moved["services"]["db"]["ports"] == ["10.0.0.5:6543:5432"]


def test_no_adsearch_container_is_restarted_for_ever(compose, worker_compose):
    """A worker that exits 2 (bad cache, bad space) must not be restarted in a loop."""
    services = {**compose["services"], "worker-host worker": worker_compose["services"]["worker"]}
    for name, service in services.items():
        if "adsearch" in service.get("image", "") and name != "extract":
            policy = service.get("restart", "no")
            assert policy == "no" or re.fullmatch(r"on-failure:[1-5]", policy), (name, policy)


def test_results_and_figures_have_volumes_the_dashboard_and_tools_share(compose):
    services = compose["services"]
    for name in ("create-study", "dashboard", "tools"):
        assert "./artifacts:/artifacts" in services[name]["volumes"], name
        assert services[name]["environment"]["ADSEARCH_ARTIFACTS"] == "/artifacts"
    assert "./output:/output" in services["tools"]["volumes"]
    assert services["tools"]["profiles"] == ["tools"]


class PlainContainer:
    """One compose service as a plain process in a network namespace (a "host"), until a Docker engine is
    available: its command and environment exactly as the compose file gives them, with only what a container
    runtime maps mapped: mount targets to their sources, secrets to their files, the image's /opt/adsearch
    to this checkout, and the `db` service's name and port to the database's address on the host's link."""

    def __init__(self, compose: dict, service: str, host, db_at: str, workdir: Path):
        spec = compose["services"][service]
        self.mounts = {"/opt/adsearch": str(DOCKER.parent)}
        for volume in spec.get("volumes", []):
            source, target = volume.split(":")[:2]
            self.mounts[target] = source
        for secret in spec.get("secrets", []):
            self.mounts[f"/run/secrets/{secret}"] = compose["secrets"][secret]["file"]
        self.env = {key: self._map(str(value)).replace("@db:5432/", f"@{db_at}/")
                    for key, value in spec.get("environment", {}).items()}
        self.argv = [self._map(arg) for arg in spec["command"]]
        self.host, self.workdir = host, workdir
        workdir.mkdir(parents=True, exist_ok=True)

    def _map(self, value: str) -> str:
        for target in sorted(self.mounts, key=len, reverse=True):
            if value == target or value.startswith(target + "/"):
                return self.mounts[target] + value[len(target):]
        return value

    def start(self, *extra: str) -> subprocess.Popen:
        """The image's entry point (`adsearch`) with the service's command, inside the host's namespace."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("ADSEARCH_")} | self.env
        return subprocess.Popen(["ip", "netns", "exec", self.host.namespace, sys.executable, "-m", "adsearch.cli",
                                 *self.argv, *extra], env=env, cwd=self.workdir, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)


def _in_namespace(host, url: str) -> dict:
    """GET a loopback URL from inside a host's namespace (where a container's published port would be)."""
    import json

    code = f"import urllib.request, sys; sys.stdout.write(urllib.request.urlopen({url!r}, timeout=10).read().decode())"
    done = subprocess.run(["ip", "netns", "exec", host.namespace, sys.executable, "-c", code], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


@pytest.mark.slow
def test_the_compose_stack_runs_as_plain_processes_on_a_database_host_and_two_worker_hosts(tmp_path):
    """PostgreSQL as the db service configures it (user, database, password file, SCRAM over the network);
    create-study and the dashboard on the database host; workers on two other hosts from compose.worker.yaml,
    each with its own copy of the cache and only the URL it is given."""
    import secrets
    import socket
    import time

    from hosts import Network, why_no_namespaces

    from adsearch.embed.synthetic import write_synthetic_cache

    reason = why_no_namespaces()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the compose stack test: {reason}")
        print(f"skipped: {reason}")
        pytest.skip(reason)
    cache = write_synthetic_cache(tmp_path / "origin", n_train=40, n_test=8, n_layers=3, dim=16, signal_layer=1)
    password = tmp_path / "secrets" / "db_password.txt"
    password.parent.mkdir()
    password.write_text(secrets.token_hex(24) + "\n")
    base = {**_env_example(), "ADSEARCH_STUDY": "stack", "ADSEARCH_TRIALS": "8",
            "ADSEARCH_DB_PASSWORD_FILE": str(password), "ADSEARCH_ARTIFACTS_DIR": str(tmp_path / "artifacts"),
            "ADSEARCH_OUTPUT_DIR": str(tmp_path / "output")}
    db = _compose("compose.yaml", base)["services"]["db"]["environment"]
    network = Network(tmp_path, cache, user=db["POSTGRES_USER"], password_file=password, database=db["POSTGRES_DB"])
    processes = []
    try:
        db_host, *worker_hosts = network.hosts
        db_at = f"{db_host.db_address}:{network.port}"
        main = _compose("compose.yaml", {**base, "ADSEARCH_CACHE_DIR": str(db_host.cache)})
        create = PlainContainer(main, "create-study", db_host, db_at, tmp_path / "create").start()
        out, _ = create.communicate(timeout=300)
        assert create.returncode == 0, out
        assert "study stack is ready" in out and "screen" in out
        dashboard = PlainContainer(main, "dashboard", db_host, db_at, tmp_path / "dashboard").start()
        processes.append(dashboard)
        workers = []
        for k, host in enumerate(worker_hosts):
            url = f"postgresql+psycopg://{db['POSTGRES_USER']}@{host.db_address}:{network.port}/{db['POSTGRES_DB']}"
            given = _compose("compose.worker.yaml", {**base, "ADSEARCH_CACHE_DIR": str(host.cache),
                                                     "ADSEARCH_STORAGE": url})
            container = PlainContainer(given, "worker", host, "unused", tmp_path / f"worker{k}")
            assert container.env["ADSEARCH_STORAGE"] == url and ":" not in url.split("//")[1].split("@")[0]
            workers += [container.start(), container.start()]  # --scale worker=2
        processes += workers
        for worker in workers:
            out, _ = worker.communicate(timeout=300)
            assert worker.returncode == 0 and "worker done" in out, out
        import optuna

        secret = password.read_text().strip()
        url = f"postgresql+psycopg://{db['POSTGRES_USER']}:{secret}@{db_at}/{db['POSTGRES_DB']}"
        study = optuna.load_study(study_name="stack", storage=url)
        trials = study.get_trials()
        assert len(trials) == 8 and all(t.state.is_finished() for t in trials)
        pids = {int(t.user_attrs["worker"].rsplit(":", 1)[1]) for t in trials}
        assert pids & {w.pid for w in workers[:2]} and pids & {w.pid for w in workers[2:]}, pids  # both hosts
        deadline = time.monotonic() + 60
        while True:  # the dashboard answers on the database host, and shows the screen's heat map
            try:
                studies = _in_namespace(db_host, "http://127.0.0.1:8080/api/studies")
                break
            except AssertionError:
                assert dashboard.poll() is None and time.monotonic() < deadline, dashboard.communicate()[0]
                time.sleep(1)
        assert [s["study_name"] for s in studies["study_summaries"]] == ["stack"]
        study_id = studies["study_summaries"][0]["study_id"]
        detail = _in_namespace(db_host, f"http://127.0.0.1:8080/api/studies/{study_id}")
        assert [a["filename"] for a in detail["artifacts"]] == [p.name for p in (tmp_path / "artifacts").glob("*.png")]
        with pytest.raises(OSError):  # published inside the host only
            socket.create_connection(("127.0.0.1", 8080), timeout=1).close()
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
        network.close()


def test_the_worker_image_installs_xgboost_cpu_instead_of_xgboost():
    """The xgboost wheel pulls a 469 MB NCCL library on Linux that a CPU worker never loads."""
    import tomllib

    script, pyproject = DOCKER / "worker_requirements.py", DOCKER.parent / "pyproject.toml"
    done = subprocess.run([sys.executable, str(script), str(pyproject)], capture_output=True, text=True, check=True)
    project = tomllib.loads((DOCKER.parent / "pyproject.toml").read_text())["project"]
    expected = [r.replace("xgboost", "xgboost-cpu") if r.startswith("xgboost") else r
                for r in project["dependencies"] + project["optional-dependencies"]["postgres"]]
    assert done.stdout.split() == expected
    assert any(r.startswith("xgboost-cpu") for r in expected) and not any(r.startswith("xgboost>") for r in expected)
    assert not [r for r in expected if r.startswith(("torch", "transformers", "nvidia"))]
