"""The simulator's durable ledger: readings produced per device (the truth the report checks)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from pathlib import Path

from fogline.db import connect, migrate, transaction

_MIGRATIONS = [
    """
    CREATE TABLE ledger (
        device TEXT PRIMARY KEY,
        edge TEXT NOT NULL,
        produced INTEGER NOT NULL DEFAULT 0,
        messages INTEGER NOT NULL DEFAULT 0,
        active INTEGER NOT NULL DEFAULT 1
    );
    CREATE TABLE ledger_totals (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
    INSERT INTO ledger_totals(key, value) VALUES ('bytes', 0)
    """,
]

LEDGER_FILE = "ledger.db"


class Ledger:
    """Per-device counts of produced readings, written before the readings are published."""

    def __init__(self, path: Path) -> None:
        self.conn: sqlite3.Connection = connect(path)
        migrate(self.conn, "ledger", _MIGRATIONS)

    def produced(self) -> dict[str, int]:
        """Readings produced so far per device (the next reading's seq)."""
        return dict(self.conn.execute("SELECT device, produced FROM ledger").fetchall())

    def register(self, devices: Iterable[tuple[str, str]]) -> None:
        """Make `(device, edge)` the devices that `record_round` counts for."""
        with transaction(self.conn):
            self.conn.execute("UPDATE ledger SET active = 0")
            self.conn.executemany(
                "INSERT INTO ledger(device, edge) VALUES (?, ?)"
                " ON CONFLICT(device) DO UPDATE SET edge = excluded.edge, active = 1",
                devices,
            )

    def record_round(self, readings: int, *, nbytes: int) -> None:
        """Every registered device produced one message of `readings`; `nbytes` in all."""
        with transaction(self.conn):
            self.conn.execute(
                "UPDATE ledger SET produced = produced + ?, messages = messages + 1"
                " WHERE active = 1",
                (readings,),
            )
            self._add_bytes(nbytes)

    def record(self, rows: Iterable[tuple[str, str, int]], *, nbytes: int) -> None:
        """Add `(device, edge, readings)`, one message each, and `nbytes` in all."""
        with transaction(self.conn):
            self.conn.executemany(
                "INSERT INTO ledger(device, edge, produced, messages) VALUES (?, ?, ?, 1)"
                " ON CONFLICT(device) DO UPDATE SET produced = produced + excluded.produced,"
                " messages = messages + 1",
                rows,
            )
            self._add_bytes(nbytes)

    def add_bytes(self, nbytes: int) -> None:
        """Count `nbytes` more published (a statistic: not written ahead like the readings)."""
        with transaction(self.conn):
            self._add_bytes(nbytes)

    def _add_bytes(self, nbytes: int) -> None:
        self.conn.execute(
            "UPDATE ledger_totals SET value = value + ? WHERE key = 'bytes'", (nbytes,)
        )

    def close(self) -> None:
        """Close the database."""
        self.conn.close()
