"""A throwaway PostgreSQL server from the machine's packages, for the tests and the replica benchmark:
``initdb`` in a temporary folder, ``pg_ctl start`` on a loopback port (never a network interface),
trust authentication, stopped and removed on exit. PostgreSQL refuses to run as root: as root the
server runs as the unprivileged ``nobody`` (``runuser``), otherwise as the current user.

    with PostgresServer() as pg:
        store = TaskStore(pg.url)
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from fewshot.errors import FewShotError
from fewshot.tools.process import free_port

#: Where Debian's packages put the server binaries (``postgresql-NN``); ``$FEWSHOT_PG_BIN`` overrides.
BIN_GLOB = "/usr/lib/postgresql/*/bin"


class PostgresUnavailable(FewShotError, RuntimeError):
    """No PostgreSQL server binaries here, or the server would not start (the message says which)."""


def pg_bin() -> Path:
    """The folder of ``initdb`` and ``pg_ctl``."""
    if os.environ.get("FEWSHOT_PG_BIN"):
        return Path(os.environ["FEWSHOT_PG_BIN"])
    found = sorted(glob.glob(BIN_GLOB), key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0)
    if found:
        return Path(found[-1])
    on_path = shutil.which("pg_ctl")
    if on_path:
        return Path(on_path).parent
    raise PostgresUnavailable("no PostgreSQL server binaries (initdb, pg_ctl): install the postgresql package "
                              "(Debian: apt-get install postgresql) or set FEWSHOT_PG_BIN")


class PostgresServer:
    """One PostgreSQL cluster in a temporary folder on ``127.0.0.1:port``; ``url`` for clients.
    :meth:`stop` and :meth:`start` restart it on the same data and port (the tests' database outage)."""

    def __init__(self, port: int | None = None) -> None:
        self.bin, self.port = pg_bin(), port or free_port()
        self.root = Path(tempfile.mkdtemp(prefix="fewshot-pg-"))
        self.root.chmod(0o755)
        self.data, self.logfile = self.root / "pg" / "data", self.root / "pg" / "log"
        self.user = "nobody" if os.geteuid() == 0 else None
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        prefix = ["runuser", "-u", self.user, "--"] if self.user else []
        result = subprocess.run([*prefix, *cmd], capture_output=True, text=True)
        if check and result.returncode:
            log = self.logfile.read_text()[-2000:] if self.logfile.exists() else ""
            raise PostgresUnavailable(f"{Path(cmd[0]).name} failed ({result.returncode}): {result.stderr.strip()[-1500:]}\n{log}")
        return result

    def init(self) -> "PostgresServer":
        (self.root / "pg").mkdir()
        if self.user:
            shutil.chown(self.root / "pg", self.user)
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        return self

    def start(self, timeout: float = 30.0) -> "PostgresServer":
        # fsync stays on: "acknowledged means committed" is what the tests check, as in production
        options = f"-p {self.port} -k {self.root / 'pg'} -c listen_addresses=127.0.0.1 -c max_connections=200"
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.logfile), "-o", options, "-w",
                  "-t", str(int(timeout)), "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def create_database(self, name: str) -> str:
        """A fresh database ``name`` in this cluster; returns its URL."""
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def wait_ready(self, timeout: float = 30.0) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg.connect(self.url, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def __enter__(self) -> "PostgresServer":
        self.init().start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
