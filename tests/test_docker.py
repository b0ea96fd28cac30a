"""docker/: no Docker engine runs on the build machines, so the deployment is checked statically: the compose
file against the Compose specification's JSON schema, every command it runs through adsearch's own CLI
parser, the security-relevant settings, and each image's install step against docs/distributed.md (containers)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer
import yaml

from adsearch.cli import app

DOCKER = Path(__file__).parents[1] / "docker"


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

    if isinstance(value, str):  # $$ is a literal $ (a shell's, in the prepare service's script)
        return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", one, value).replace("$$", "$")
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
    """As on a worker host, whose docker/.env sets the database host's URL (.env.example leaves it unset)."""
    return _compose("compose.worker.yaml", {**_env_example(),
                                            "ADSEARCH_STORAGE": "postgresql+psycopg://adsearch@dbhost:5432/adsearch"})


@pytest.mark.parametrize("name", ["compose.yaml", "compose.worker.yaml"])
def test_compose_file_follows_the_compose_specification(name):
    checker = Path(sys.executable).with_name("check-jsonschema")
    done = subprocess.run([str(checker), "--builtin-schema", "vendor.compose-spec", str(DOCKER / name)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_adsearch_command_in_compose_parses_with_the_cli(compose, worker_compose, monkeypatch):
    cli = typer.main.get_command(app)
    services = {name: s for name, s in compose["services"].items()
                if "adsearch" in s.get("image", "") and "entrypoint" not in s}  # prepare runs a shell
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
def test_each_image_installs_what_the_containers_guide_says(dockerfile):
    text = (DOCKER / dockerfile).read_text()
    installs = [line for line in re.findall(r"^RUN (.+)$", text, flags=re.M) if "pip install" in line]
    assert installs, f"{dockerfile} installs nothing"
    guide = (DOCKER.parent / "docs" / "distributed.md").read_text()
    for install in installs:
        assert install in guide, f"docs/distributed.md does not show `{install}` ({dockerfile})"
    for source in re.findall(r"^COPY (.+) \S+$", text, flags=re.M):
        for path in shlex.split(source):
            assert (DOCKER.parent / path).exists(), path
    if dockerfile == "Dockerfile":  # search workers never need torch or transformers
        assert not [line for line in re.findall(r"^RUN .+$", text, flags=re.M) if "torch" in line or "extract" in line]
    assert re.search(r"^USER ", text, flags=re.M), "images run as a user, not root"


def test_the_env_example_names_every_variable_compose_uses():
    text = (DOCKER / ".env.example").read_text()
    named = set(_env_example()) | set(re.findall(r"^#(\w+)=", text, flags=re.M))  # #NAME=: shown, left unset
    for name in ("compose.yaml", "compose.worker.yaml"):
        used = set(re.findall(r"\$\{(\w+)", (DOCKER / name).read_text()))
        assert used <= named, (name, used - named)
    assert "ADSEARCH_STORAGE" not in _env_example()  # unset, so a worker host without it is stopped by compose
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


def test_the_services_run_as_one_user_and_root_owned_mount_folders_are_handed_to_it(compose, worker_compose):
    services = compose["services"]
    for name in ("create-study", "worker", "dashboard", "tools", "extract"):
        assert services[name]["user"] == "1000:1000", name
        if name != "worker":  # the worker waits for create-study, which waits for prepare
            assert services[name]["depends_on"]["prepare"]["condition"] == "service_completed_successfully", name
    assert worker_compose["services"]["worker"]["user"] == "1000:1000"
    prepare = services["prepare"]
    assert prepare["user"] == "0:0" and prepare["entrypoint"] == ["sh", "-c"] and prepare["restart"] == "no"
    targets = {volume.split(":")[1] for volume in prepare["volumes"]}
    assert targets == {"/cache", "/artifacts", "/output", "/models/hf"}
    script = prepare["command"][0]
    assert '"$(stat -c %u $d)" = 0' in script and "chown 1000:1000 $d" in script
    other = _compose("compose.yaml", {**_env_example(), "ADSEARCH_UID": "1234", "ADSEARCH_GID": "99"})
    assert other["services"]["worker"]["user"] == "1234:99" and "chown -R 1234:99 /models/hf" in \
        other["services"]["prepare"]["command"][0]
    for name in ("compose.yaml", "compose.worker.yaml"):
        assert "Docker Compose v2" in (DOCKER / name).read_text()  # 1.x rejects the top-level `name:`


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
        self.user = spec.get("user")  # "uid:gid", as the container runs; None: the image's user
        workdir.mkdir(parents=True, exist_ok=True)
        if self.user:  # the image's WORKDIR (/home/adsearch) belongs to its user
            os.chown(workdir, *map(int, self.user.split(":")))

    def _map(self, value: str) -> str:
        for target in sorted(self.mounts, key=len, reverse=True):
            if value == target or value.startswith(target + "/"):
                return self.mounts[target] + value[len(target):]
        return value

    def start(self, *extra: str) -> subprocess.Popen:
        """The image's entry point (`adsearch`) with the service's command, inside the host's namespace, as the
        service's user."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("ADSEARCH_")} | self.env | {
            "HOME": str(self.workdir)}
        as_user = []
        if self.user:
            uid, gid = self.user.split(":")
            as_user = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]
        return subprocess.Popen(["ip", "netns", "exec", self.host.namespace, *as_user, sys.executable, "-m",
                                 "adsearch.cli", *self.argv, *extra], env=env, cwd=self.workdir,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def shell(self) -> subprocess.CompletedProcess:
        """A service whose entry point is `sh -c` (prepare), as root, its mount targets mapped in the script."""
        script = self.argv[0]
        for target in sorted(self.mounts, key=len, reverse=True):
            script = re.sub(rf"{re.escape(target)}\b", self.mounts[target], script)
        return subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=60)


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
    each with its own copy of the cache and only the URL it is given. Every adsearch process runs as the
    compose files' user (uid 1000), against the artifacts and output folders as Docker creates missing bind
    mounts (root's), after the prepare service's script ran as root."""
    import secrets
    import socket
    import tempfile
    import time

    from hosts import Network, why_no_namespaces

    from adsearch.embed.synthetic import write_synthetic_cache

    reason = why_no_namespaces()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the compose stack test: {reason}")
        print(f"skipped: {reason}")
        pytest.skip(reason)
    # pytest's own folders are root's alone (0700): the stack lives where uid 1000 can reach it, as a project
    # folder on a Docker host would be
    tmp_path = Path(tempfile.mkdtemp(prefix="adsearch-stack-"))
    tmp_path.chmod(0o755)
    cache = write_synthetic_cache(tmp_path / "origin", n_train=40, n_test=8, n_layers=3, dim=16, signal_layer=1)
    password = tmp_path / "secrets" / "db_password.txt"
    password.parent.mkdir()
    password.write_text(secrets.token_hex(24) + "\n")
    password.chmod(0o644)  # readable by the containers' user, as .env.example says
    for folder in ("artifacts", "output"):  # what Docker makes of a missing bind-mount source: root's, 0755
        (tmp_path / folder).mkdir()
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
        (tmp_path / "hf").mkdir()  # the named volume hf-cache, as a folder
        main["services"]["prepare"]["volumes"] = [v.replace("hf-cache:", f"{tmp_path / 'hf'}:")
                                                  for v in main["services"]["prepare"]["volumes"]]
        prepared = PlainContainer(main, "prepare", db_host, db_at, tmp_path / "prepare").shell()
        assert prepared.returncode == 0, prepared.stderr
        assert all((tmp_path / name).stat().st_uid == 1000 for name in ("artifacts", "output", "hf"))
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
        assert all(p.stat().st_uid == 1000 for p in (tmp_path / "artifacts").rglob("*"))  # the heat map: uid 1000's
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
        network.close()
        shutil.rmtree(tmp_path, ignore_errors=True)


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
