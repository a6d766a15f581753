"""A private PostgreSQL cluster in a temporary folder, on a free loopback port.

For tests and benchmarks of the PostgreSQL cloud store: `initdb` a fresh cluster, start it with
`pg_ctl`, hand out one database per user, stop it and delete the folder. PostgreSQL refuses to
run as root: under root the cluster runs as an unprivileged system user (`postgres`, else
`nobody`) that owns the folder.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

from fogline.broker import find_free_port
from fogline.errors import FoglineError

__all__ = ["PostgresCluster", "PostgresError", "find_pg_bin"]

_BIN_GLOB = "/usr/lib/postgresql/*/bin"
_USER = "fogline"
_PORT_RETRIES = 5
_RUN_AS = ("postgres", "nobody")
# Started clusters, stopped at interpreter exit if their owner forgot (a crashed test run).
_live: set[PostgresCluster] = set()


class PostgresError(FoglineError):
    """A PostgreSQL cluster could not be found, created, started or stopped."""


def find_pg_bin() -> Path | None:
    """The folder holding `initdb`, `pg_ctl`, `psql` and `postgres` (`pg_ctl` on PATH first,
    then the newest /usr/lib/postgresql/N/bin), or None when PostgreSQL is not installed."""
    found = shutil.which("pg_ctl")
    if found:  # often a symlink into the versioned folder, which also has psql and postgres
        folder = Path(found).resolve().parent
        if all((folder / name).is_file() for name in ("initdb", "psql", "postgres")):
            return folder

    def version(p: Path) -> int:
        m = re.search(r"/(\d+)/bin$", str(p))
        return int(m.group(1)) if m else 0

    for folder in sorted(Path("/").glob(_BIN_GLOB.lstrip("/")), key=version, reverse=True):
        if all((folder / name).is_file() for name in ("initdb", "pg_ctl", "psql", "postgres")):
            return folder
    return None


def _run_as() -> str | None:
    """The user to run PostgreSQL as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in _RUN_AS:
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise PostgresError("running as root and no unprivileged user (postgres, nobody) to run as")


class PostgresCluster:
    """A throwaway PostgreSQL cluster: `start()`, `create_database()`, `stop()` (or `with`).

    `durable=False` (tests) turns fsync and synchronous commit off; `durable=True`
    (benchmarks) keeps PostgreSQL's defaults, so it is compared with SQLite like for like.
    """

    def __init__(self, *, durable: bool = False, bin_dir: Path | None = None) -> None:
        found = bin_dir or find_pg_bin()
        if found is None:
            raise PostgresError(
                "PostgreSQL is not installed (no initdb/pg_ctl on PATH or in "
                f"{_BIN_GLOB}); install it with `apt-get install postgresql`"
            )
        self.bin = found
        self.durable = durable
        self.host = "127.0.0.1"
        self.port = 0
        self.user = _USER
        self.folder: Path | None = None
        self._owner = _run_as()

    # ------------------------------------------------------------------ commands

    def _cmd(self, *argv: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        full = [str(self.bin / argv[0]), *argv[1:]]
        if self._owner is not None:
            full = ["runuser", "-u", self._owner, "--", *full]
        proc = subprocess.run(full, capture_output=True, text=True, timeout=timeout, cwd="/")
        if proc.returncode != 0:
            raise PostgresError(
                f"{argv[0]} failed ({proc.returncode}): {(proc.stderr or proc.stdout)[-2000:]}"
            )
        return proc

    @property
    def data(self) -> Path:
        """The cluster's data folder."""
        assert self.folder is not None, "the cluster is not started"
        return self.folder / "data"

    def url(self, database: str = "postgres") -> str:
        """The connection URL of `database` (trust authentication on loopback, no password)."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    def start(self) -> PostgresCluster:
        """Create the cluster and start it on a free loopback port; returns self."""
        self.folder = Path(tempfile.mkdtemp(prefix="fogline-pg-"))
        _live.add(self)
        if self._owner is not None:
            entry = pwd.getpwnam(self._owner)
            os.chown(self.folder, entry.pw_uid, entry.pw_gid)
        self._cmd(
            "initdb", "-D", str(self.data), "-U", self.user, "--auth=trust", "-E", "UTF8",
            "--locale=C", "--no-sync", "--no-instructions",
        )  # fmt: skip
        options = [
            f"-c listen_addresses={self.host}",
            f"-c unix_socket_directories={self.folder}",
            "-c max_connections=50",
        ]
        if not self.durable:
            options += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        for attempt in range(_PORT_RETRIES):
            self.port = find_free_port(self.host)
            try:
                self._cmd(
                    "pg_ctl", "-D", str(self.data), "-l", str(self.folder / "postgres.log"),
                    "-w", "-t", "30", "-o", " ".join([f"-p {self.port}", *options]), "start",
                )  # fmt: skip
                return self
            except PostgresError:
                if attempt == _PORT_RETRIES - 1 or "already in use" not in self.log_tail():
                    self.stop()
                    raise
        raise AssertionError("unreachable")

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the server log."""
        try:
            assert self.folder is not None
            return "\n".join((self.folder / "postgres.log").read_text().splitlines()[-lines:])
        except (OSError, AssertionError):
            return ""

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL through `psql` (no client library needed); returns its output."""
        return self._cmd(
            "psql", "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-d", self.url(database),
            "-c", sql,
        ).stdout  # fmt: skip

    def create_database(self, name: str) -> str:
        """Create an empty database; returns its URL."""
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
            raise PostgresError(f"{name!r} is not a plain database name")
        self.psql(f"CREATE DATABASE {name}")
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, ending its connections."""
        self.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def stop(self) -> None:
        """Stop the server (fast shutdown) and delete its folder."""
        folder, self.folder = self.folder, None
        _live.discard(self)
        if folder is None:
            return
        try:
            if (folder / "data" / "postmaster.pid").exists():
                self.folder = folder
                with contextlib.suppress(PostgresError, subprocess.TimeoutExpired):
                    self._cmd("pg_ctl", "-D", str(folder / "data"), "-m", "fast", "-w", "stop")
        finally:
            self.folder = None
            shutil.rmtree(folder, ignore_errors=True)

    def __enter__(self) -> PostgresCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@atexit.register
def _stop_leftovers() -> None:
    for cluster in list(_live):
        cluster.stop()
