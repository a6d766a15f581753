"""SQLite helpers shared by every store: connection settings, transactions, migrations."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path


def connect(path: Path, *, synchronous: str = "FULL") -> sqlite3.Connection:
    """Open a database in WAL mode; the connection manages transactions explicitly."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30)
    # Turning a new file to WAL needs it alone, and SQLite answers "locked" at once rather than
    # through the busy timeout while another process does the same (sink workers starting
    # together on one store): wait for it, within the same 30 s.
    deadline = time.monotonic() + 30
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                conn.close()
                raise
            time.sleep(0.01)
    # FULL survives power loss, not only process crashes; commits are batched so it is cheap.
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """Run a block in one transaction (a savepoint when one is already open)."""
    if conn.in_transaction:
        conn.execute("SAVEPOINT nested")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK TO SAVEPOINT nested")
            conn.execute("RELEASE SAVEPOINT nested")
            raise
        conn.execute("RELEASE SAVEPOINT nested")
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def migrate(conn: sqlite3.Connection, component: str, steps: Sequence[str]) -> int:
    """Apply the not-yet-applied steps (SQL scripts) of `component` in order; return its version.

    A step reads the version again inside its own write transaction, so processes that open the
    same database at once (several cloud-sink workers) apply every step exactly once.
    """
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " component TEXT PRIMARY KEY, version INTEGER NOT NULL)"
    )

    def version() -> int:
        row = conn.execute(
            "SELECT version FROM schema_migrations WHERE component = ?", (component,)
        ).fetchone()
        return int(row[0]) if row else 0

    while version() < len(steps):
        with transaction(conn):
            current = version()
            if current >= len(steps):
                break
            for statement in statements(steps[current]):
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_migrations(component, version) VALUES (?, ?)"
                " ON CONFLICT(component) DO UPDATE SET version = excluded.version",
                (component, current + 1),
            )
    return version()


def statements(script: str) -> list[str]:
    """Split an SQL script into complete statements (semicolons inside literals stay put)."""
    out, buf = [], ""
    for part in script.split(";"):
        buf += part + ";"
        if sqlite3.complete_statement(buf):
            if buf.strip(" \n\t;"):
                out.append(buf)
            buf = ""
    if buf.strip(" \n\t;"):
        out.append(buf)
    return out
