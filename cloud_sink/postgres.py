"""The cloud store on PostgreSQL (psycopg 3): the SQLite schema translated, the same applies.

Several cloud-sink workers may write one database at once, and batches of one fog stream may
reach different workers, in any order. Each apply locks the inbox rows of the streams it
touches (in sorted order, so two workers never wait on each other in a cycle), reads their
state, admits the batches with `fogline.custody.admit` and writes the new state and the new
rows in that one transaction. A redelivered batch, to any worker, changes nothing; an ack read
after the commit is the cumulative committed state of the stream.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import psycopg

from cloud_sink.store import MIGRATIONS, TABLES, CloudStore
from fogline.cloudstores import redact
from fogline.codec import Ack, Batch, Record
from fogline.custody import INBOX_MIGRATIONS, admit
from fogline.db import statements

log = logging.getLogger(__name__)

#: SQLite column types as PostgreSQL spells them (SQLite's INTEGER and REAL are 64-bit).
PG_TYPES = {"INTEGER": "BIGINT", "REAL": "DOUBLE PRECISION", "BLOB": "BYTEA"}
_TYPE_WORD = re.compile(r"\b(" + "|".join(PG_TYPES) + r")\b")
#: Advisory lock that serialises schema migrations of processes starting at once.
MIGRATION_LOCK = 0x666F676C  # "fogl"
#: Attempts of one apply when the connection breaks or the server aborts the transaction.
APPLY_ATTEMPTS = 4


def postgres_ddl(statement: str) -> str:
    """One statement of the SQLite migrations in PostgreSQL's dialect (only the types differ)."""
    return _TYPE_WORD.sub(lambda m: PG_TYPES[m.group(1)], statement)


def migrate(conn: psycopg.Connection[Any], component: str, steps: Sequence[str]) -> int:
    """Apply the not-yet-applied steps of `component` (SQLite-dialect scripts); its version."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " component TEXT PRIMARY KEY, version BIGINT NOT NULL)"
        )
        row = conn.execute(
            "SELECT version FROM schema_migrations WHERE component = %s", (component,)
        ).fetchone()
        version = int(row[0]) if row else 0
        if version >= len(steps):
            return version
        for script in steps[version:]:
            for statement in statements(script):
                conn.execute(postgres_ddl(statement))
        conn.execute(
            "INSERT INTO schema_migrations (component, version) VALUES (%s, %s)"
            " ON CONFLICT (component) DO UPDATE SET version = excluded.version",
            (component, len(steps)),
        )
    return len(steps)


def connect(url: str, *, application: str = "fogline") -> psycopg.Connection[Any]:
    """An autocommit connection (transactions are explicit) to the database at `url`."""
    return psycopg.connect(url, autocommit=True, connect_timeout=10, application_name=application)


class PostgresInbox:
    """The custody inbox in a PostgreSQL table: same columns and merge as `custody.Inbox`."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn
        migrate(conn, "inbox", INBOX_MIGRATIONS)

    def lock(self, streams: Sequence[str]) -> None:
        """Create the missing inbox rows of `streams` and lock them all, in sorted order, until
        the end of the transaction."""
        if not streams:
            return
        names = sorted(streams)
        # A row another worker is inserting makes this wait for its commit, so every row
        # exists (committed) when the SELECT below locks them.
        self.conn.execute(
            "INSERT INTO inbox (stream, hwm) SELECT s, -1 FROM unnest(%s::text[]) AS s"
            " ORDER BY s ON CONFLICT (stream) DO NOTHING",
            (names,),
        )
        self.conn.execute(
            "SELECT stream FROM inbox WHERE stream = ANY(%s) ORDER BY stream FOR UPDATE",
            (names,),
        )

    def _state(self, stream: str, *, lock: bool) -> tuple[int, list[list[int]]]:
        row = self.conn.execute(
            "SELECT hwm, ranges FROM inbox WHERE stream = %s" + (" FOR UPDATE" if lock else ""),
            (stream,),
        ).fetchone()
        return (-1, []) if row is None else (int(row[0]), json.loads(row[1]))

    def accept(self, stream: str, batch: Batch) -> list[Record]:
        """Return the records of `batch` not seen before and remember them (inside the apply
        transaction, which holds the stream's row lock)."""
        a = admit(*self._state(stream, lock=True), batch)
        self.conn.execute(
            "INSERT INTO inbox (stream, hwm, ranges, records, duplicates)"
            " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (stream) DO UPDATE SET"
            " hwm = excluded.hwm, ranges = excluded.ranges,"
            " records = inbox.records + excluded.records,"
            " duplicates = inbox.duplicates + excluded.duplicates",
            (stream, a.hwm, json.dumps(a.ranges), len(a.fresh), a.duplicates),
        )
        return a.fresh

    def ack(self, stream: str) -> Ack:
        """The cumulative acknowledgement of `stream` as committed (by any worker)."""
        hwm, ranges = self._state(stream, lock=False)
        return Ack(stream=stream, hwm=hwm, ranges=tuple((lo, hi) for lo, hi in ranges))


class PostgresStore(CloudStore):
    """The cloud database in PostgreSQL; rows go in with `COPY`, one transaction per apply."""

    inbox: PostgresInbox

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url
        self.location = redact(url)
        self._open()

    def _open(self) -> None:
        self.conn = connect(self.url, application="fogline-cloud-sink")
        migrate(self.conn, "cloud", MIGRATIONS)
        self.inbox = PostgresInbox(self.conn)
        self._columns = {
            t: [
                r[0]
                for r in self.conn.execute(
                    "SELECT column_name FROM information_schema.columns WHERE"
                    " table_schema = current_schema() AND table_name = %s"
                    " ORDER BY ordinal_position",
                    (t,),
                )
            ]
            for t in TABLES
        }

    def _transaction(self, streams: Sequence[str]) -> AbstractContextManager[Any]:
        return self._locked(streams)

    @contextmanager
    def _locked(self, streams: Sequence[str]) -> Iterator[None]:
        with self.conn.transaction():
            self.inbox.lock(streams)
            yield

    def _insert(self, table: str, rows: list[dict[str, Any]]) -> None:
        cols = self._columns[table]
        self._check_columns(table, rows, cols)
        sql = f"COPY {table} ({', '.join(cols)}) FROM STDIN"
        with self.conn.cursor() as cur, cur.copy(sql) as copy:
            for r in rows:
                copy.write_row(tuple(r.get(c) for c in cols))

    def apply(self, batches: list[tuple[str, Batch]], now: float | None = None) -> Counter[str]:
        """As `CloudStore.apply`; a broken connection or an aborted transaction (deadlock,
        failover) is retried on a new connection: the inbox makes a repeat harmless."""
        for attempt in range(1, APPLY_ATTEMPTS + 1):
            try:
                if self.conn.broken or self.conn.closed:
                    self.conn.close()
                    self._open()
                return super().apply(batches, now)
            except psycopg.OperationalError as exc:
                if attempt == APPLY_ATTEMPTS:
                    raise
                log.warning(
                    "apply failed on %s (%s); retrying (%d/%d)",
                    self.location, exc, attempt, APPLY_ATTEMPTS - 1,
                )  # fmt: skip
                time.sleep(0.1 * 2**attempt)
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()
