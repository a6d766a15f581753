"""The simulator's durable ledger: readings produced per device (the truth the report checks)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from fogline.db import connect, migrate, transaction

_MIGRATIONS = [
    """
    CREATE TABLE ledger (
        device TEXT PRIMARY KEY,
        edge TEXT NOT NULL,
        produced INTEGER NOT NULL DEFAULT 0,
        messages INTEGER NOT NULL DEFAULT 0,
        bytes INTEGER NOT NULL DEFAULT 0
    )
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

    def record(self, rows: list[tuple[str, str, int, int]]) -> None:
        """Add `(device, edge, readings, bytes)` for one round of messages, in one transaction."""
        with transaction(self.conn):
            self.conn.executemany(
                "INSERT INTO ledger(device, edge, produced, messages, bytes) VALUES (?, ?, ?, 1, ?)"
                " ON CONFLICT(device) DO UPDATE SET produced = produced + excluded.produced,"
                " messages = messages + 1, bytes = bytes + excluded.bytes",
                rows,
            )

    def close(self) -> None:
        """Close the database."""
        self.conn.close()
