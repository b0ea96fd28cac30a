"""Separate hosts on one machine: Linux network namespaces joined to the root namespace by veth pairs, and a
PostgreSQL cluster of the tests' own that listens on the root ends of those links only. A host reaches the
database over its link and nothing else, so cutting a link cuts that host off. Needs root, iproute2 and
PostgreSQL's server binaries; `why_no_namespaces` says what is missing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

PG_BIN = Path("/usr/lib/postgresql")


def run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, text=True)


@dataclass
class Host:
    namespace: str
    link: str  # the root namespace's end of the veth pair
    db_address: str  # the address of the database on this host's link
    cache: Path  # this host's own copy of the cache

    def worker(self, url_of, study: str, *extra: str) -> subprocess.Popen:
        """`adsearch worker` inside the namespace (`ip netns exec` execs it: the pid is the worker's)."""
        command = ["ip", "netns", "exec", self.namespace, sys.executable, "-m", "adsearch.cli", "worker",
                   "--study", study, "--storage", url_of(self), "--cache", str(self.cache), *extra]
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


class Network:
    """Three hosts and a PostgreSQL cluster listening on their links."""

    def __init__(self, root: Path, cache_dir: Path, user: str = "postgres", password_file: Path | None = None,
                 database: str | None = None):
        """`user` is the cluster's superuser. With `password_file`, hosts must log in with that password
        (SCRAM), and `database` is created: what the postgres image does with POSTGRES_USER,
        POSTGRES_PASSWORD_FILE and POSTGRES_DB."""
        tag = os.getpid() % 10_000
        self.subnet = f"10.{200 + tag % 50}"
        self.port = 20_000 + tag
        self.user = user
        self.hosts: list[Host] = []
        self.root = root
        for k in (1, 2, 3):
            namespace, link, peer = f"ads{tag}h{k}", f"av{tag}x{k}", f"ap{tag}x{k}"
            run("ip", "netns", "add", namespace)
            self.hosts.append(Host(namespace, link, f"{self.subnet}.{k}.1", root / f"host{k}" / "cache"))
            run("ip", "link", "add", link, "type", "veth", "peer", "name", peer)
            run("ip", "link", "set", peer, "netns", namespace)
            run("ip", "addr", "add", f"{self.subnet}.{k}.1/24", "dev", link)
            run("ip", "link", "set", link, "up")
            run("ip", "netns", "exec", namespace, "ip", "addr", "add", f"{self.subnet}.{k}.2/24", "dev", peer)
            run("ip", "netns", "exec", namespace, "ip", "link", "set", peer, "up")
            run("ip", "netns", "exec", namespace, "ip", "link", "set", "lo", "up")
            shutil.copytree(cache_dir, self.hosts[-1].cache)  # a copy of its own, at a path of its own
        self.data = Path(tempfile.mkdtemp(prefix="adsearch-pg-"))
        shutil.chown(self.data, "postgres")
        auth = ["--auth=trust"]
        if password_file is not None:
            shutil.copy(password_file, self.data / "pwfile")
            shutil.chown(self.data / "pwfile", "postgres")
            auth = ["--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={self.data / 'pwfile'}"]
        self._postgres(self._bin("initdb"), "-D", str(self.data / "db"), "-U", user, *auth, "-E", "UTF8")
        with (self.data / "db" / "pg_hba.conf").open("a") as hba:
            hba.write(f"host all all {self.subnet}.0.0/16 {'trust' if password_file is None else 'scram-sha-256'}\n")
        self.start()
        if database is not None:
            self._postgres(self._bin("createdb"), "-h", str(self.data), "-p", str(self.port), "-U", user, database)

    @staticmethod
    def _bin(name: str) -> str:
        return str(sorted(PG_BIN.glob(f"*/bin/{name}"))[-1])

    def _postgres(self, *command: str) -> None:
        run("runuser", "-u", "postgres", "--", *command)

    def start(self) -> None:
        listen = ",".join(host.db_address for host in self.hosts)
        self._postgres(self._bin("pg_ctl"), "-D", str(self.data / "db"), "-l", str(self.data / "log"), "-w", "-o",
                       f"-c listen_addresses='{listen}' -c port={self.port} -c unix_socket_directories='{self.data}'",
                       "start")

    def restart(self) -> None:
        # -l: a server started without a log file would hold this test's output pipe open forever
        self._postgres(self._bin("pg_ctl"), "-D", str(self.data / "db"), "-l", str(self.data / "log"), "-m", "fast",
                       "-w", "restart")

    def url(self, host: Host | None = None) -> str:
        return f"postgresql+psycopg://{self.user}@{(host or self.hosts[0]).db_address}:{self.port}/postgres"

    def cut(self, host: Host) -> None:
        run("ip", "link", "set", host.link, "down")

    def reconnect(self, host: Host) -> None:
        run("ip", "link", "set", host.link, "up")
        run("ip", "addr", "replace", f"{host.db_address}/24", "dev", host.link)

    def close(self) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", self._bin("pg_ctl"), "-D", str(self.data / "db"), "-m",
                        "immediate", "stop"], capture_output=True)
        for host in self.hosts:
            subprocess.run(["ip", "netns", "del", host.namespace], capture_output=True)  # takes its veth pair along
            subprocess.run(["ip", "link", "del", host.link], capture_output=True)
        shutil.rmtree(self.data, ignore_errors=True)


def why_no_namespaces() -> str | None:
    if os.geteuid() != 0:
        return "multi-host tests need root (network namespaces)"
    if shutil.which("ip") is None or shutil.which("runuser") is None:
        return "multi-host tests need iproute2's `ip` and `runuser`"
    if not list(PG_BIN.glob("*/bin/initdb")):
        return f"multi-host tests need PostgreSQL's server binaries under {PG_BIN}"
    probe = f"adsprobe{os.getpid() % 10_000}"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if done.returncode:
        return f"cannot create a network namespace here: {done.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None
