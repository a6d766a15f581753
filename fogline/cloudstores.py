"""Read-only access to cloud stores for `fogline report` and `fogline query`.

A data dir's SQLite stores (`cloud-*/cloud.db`) and PostgreSQL stores named by URL (a cloud
sink with `store = "postgresql://..."`) are read through one small interface, `Reader`: SQL with
`?` placeholders that both databases understand, rows as dicts.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from fogline.errors import FoglineError

STORE_GLOB = "cloud-*/cloud.db"


class StoreReadError(FoglineError):
    """A cloud store cannot be opened or read; `location` names it (a path or a URL)."""

    def __init__(self, message: str, location: str) -> None:
        super().__init__(message)
        self.location = location


class Reader(Protocol):
    """One open cloud store, read-only."""

    location: str

    def select(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Rows of `sql` (placeholders `?`) as dicts."""
        ...

    def has_table(self, name: str) -> bool:
        """Whether the store has table `name` (older stores lack newer tables)."""
        ...


def is_url(location: str | Path) -> bool:
    """Whether a store location is a PostgreSQL URL (else it is an SQLite file)."""
    return isinstance(location, str) and location.startswith(("postgresql://", "postgres://"))


def redact(url: str) -> str:
    """A connection URL without its password (for messages and reports)."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, host = netloc.rpartition("@")
        netloc = f"{userinfo.partition(':')[0]}:***@{host}"
    query = [(k, "***" if k == "password" else v) for k, v in parse_qsl(parts.query)]
    return urlunsplit(parts._replace(netloc=netloc, query=urlencode(query, safe="*")))


def sqlite_stores(data_dir: Path) -> list[Path]:
    """The SQLite cloud stores of a data dir, sorted."""
    return sorted(data_dir.glob(STORE_GLOB))


def label(location: str | Path) -> str:
    """How a store is named in messages and reports: its path, or its URL without password."""
    return redact(str(location)) if is_url(location) else str(location)


class _Sqlite:
    def __init__(self, path: Path) -> None:
        self.location = str(path)
        self.conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        self.conn.row_factory = sqlite3.Row

    def select(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        return [dict(r) for r in self.conn.execute(sql, tuple(params))]

    def has_table(self, name: str) -> bool:
        sql = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
        return self.conn.execute(sql, (name,)).fetchone() is not None


class _Postgres:
    def __init__(self, url: str) -> None:
        import psycopg  # the optional `postgres` extra: needed only for a PostgreSQL store
        from psycopg.rows import dict_row

        self.location = redact(url)
        self.conn = psycopg.connect(
            url, autocommit=True, connect_timeout=10, row_factory=dict_row,
            application_name="fogline-read",
        )  # fmt: skip
        self.conn.read_only = True

    def select(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        # The queries are written for both databases with `?`; psycopg takes `%s`.
        pg = sql.replace("%", "%%").replace("?", "%s")
        return list(self.conn.execute(pg, tuple(params)))

    def has_table(self, name: str) -> bool:
        row = self.conn.execute("SELECT to_regclass(%s) IS NOT NULL AS known", (name,)).fetchone()
        return bool(row and row["known"])


def _errors(location: str | Path) -> tuple[type[Exception], ...]:
    """The exceptions reading `location` may raise (psycopg is imported for a URL only)."""
    if not is_url(location):
        return (sqlite3.Error,)
    try:
        import psycopg
    except ImportError as exc:
        name = label(location)
        raise StoreReadError(
            f"cannot read {name}: PostgreSQL needs psycopg (pip install 'fogline[postgres]')",
            name,
        ) from exc
    return (psycopg.Error,)


@contextmanager
def open_reader(location: str | Path) -> Iterator[Reader]:
    """Open a store read-only for the block; errors become `StoreReadError`."""
    name = label(location)
    errors = _errors(location)
    try:
        reader = _Postgres(str(location)) if is_url(location) else _Sqlite(Path(location))
    except errors as exc:
        raise StoreReadError(f"cannot open {name}: {exc}", name) from exc
    try:
        yield reader
    except errors as exc:
        raise StoreReadError(f"{name} is not a readable cloud store: {exc}", name) from exc
    finally:
        reader.conn.close()
