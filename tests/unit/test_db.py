"""SQLite helpers: migrations apply once and in order; transactions commit, roll back and nest."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from fogline import db


class Boom(Exception):
    """Raised inside a transaction to make it fail."""


def _names(conn: sqlite3.Connection) -> list[str]:
    return [r[0] for r in conn.execute("SELECT name FROM t ORDER BY rowid")]


@pytest.fixture
def conn(tmp_path: Path) -> sqlite3.Connection:
    c = db.connect(tmp_path / "sub" / "state.db")
    c.execute("CREATE TABLE t (name TEXT)")
    return c


def _reopen(conn: sqlite3.Connection) -> sqlite3.Connection:
    """A second connection to the same file: sees only what was committed."""
    (path,) = [r[2] for r in conn.execute("PRAGMA database_list") if r[1] == "main"]
    return db.connect(Path(path))


def test_connect_creates_the_folder_and_uses_wal(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "x.db"
    conn = db.connect(path)
    assert path.exists()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


STEPS = [
    "CREATE TABLE log (step INTEGER); INSERT INTO log VALUES (1)",
    "INSERT INTO log VALUES (2);\nINSERT INTO log VALUES (20);",
    "ALTER TABLE log ADD COLUMN note TEXT; INSERT INTO log(step, note) VALUES (3, 'third')",
]


def _log(conn: sqlite3.Connection) -> list[int]:
    return [r[0] for r in conn.execute("SELECT step FROM log ORDER BY rowid")]


def test_migrate_applies_every_step_once_in_order(conn: sqlite3.Connection) -> None:
    assert db.migrate(conn, "demo", STEPS) == 3
    assert _log(conn) == [1, 2, 20, 3]
    assert db.migrate(conn, "demo", STEPS) == 3
    assert _log(conn) == [1, 2, 20, 3]


def test_processes_migrating_at_once_apply_each_step_once(conn: sqlite3.Connection) -> None:
    # Several cloud-sink workers open the same new database at the same moment.
    others = [_reopen(conn) for _ in range(4)]
    errors: list[BaseException] = []

    def run(c: sqlite3.Connection) -> None:
        try:
            assert db.migrate(c, "demo", STEPS) == 3
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(c,)) for c in [conn, *others]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert _log(conn) == [1, 2, 20, 3]


def test_migrate_with_more_steps_applies_only_the_new_ones(conn: sqlite3.Connection) -> None:
    assert db.migrate(conn, "demo", STEPS[:1]) == 1
    assert _log(conn) == [1]
    assert db.migrate(conn, "demo", STEPS) == 3
    assert _log(conn) == [1, 2, 20, 3]
    # A new process (new connection) sees the recorded version and applies nothing again.
    other = _reopen(conn)
    assert db.migrate(other, "demo", STEPS) == 3
    assert _log(other) == [1, 2, 20, 3]


def test_migrate_keeps_components_apart(conn: sqlite3.Connection) -> None:
    db.migrate(conn, "a", ["CREATE TABLE a1 (x)", "CREATE TABLE a2 (x)"])
    assert db.migrate(conn, "b", ["CREATE TABLE b1 (x)"]) == 1
    assert db.migrate(conn, "a", ["CREATE TABLE a1 (x)", "CREATE TABLE a2 (x)"]) == 2
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"a1", "a2", "b1"} <= tables


def test_a_failing_step_is_rolled_back_and_retried_later(conn: sqlite3.Connection) -> None:
    bad = [STEPS[0], "INSERT INTO log VALUES (2); INSERT INTO nowhere VALUES (1)"]
    with pytest.raises(sqlite3.OperationalError):
        db.migrate(conn, "demo", bad)
    assert _log(conn) == [1]  # step 1 committed, step 2 left nothing behind
    assert db.migrate(conn, "demo", STEPS) == 3
    assert _log(conn) == [1, 2, 20, 3]


def test_a_step_with_a_semicolon_inside_a_string_is_applied_intact(
    conn: sqlite3.Connection,
) -> None:
    db.migrate(conn, "demo", ["CREATE TABLE kv (v TEXT); INSERT INTO kv VALUES ('a;b')"])
    assert conn.execute("SELECT v FROM kv").fetchall() == [("a;b",)]


def test_transaction_commits(conn: sqlite3.Connection) -> None:
    with db.transaction(conn):
        conn.execute("INSERT INTO t VALUES ('a')")
        conn.execute("INSERT INTO t VALUES ('b')")
    assert _names(_reopen(conn)) == ["a", "b"]


def test_transaction_rolls_back_on_exception(conn: sqlite3.Connection) -> None:
    with db.transaction(conn):
        conn.execute("INSERT INTO t VALUES ('kept')")
    with pytest.raises(Boom), db.transaction(conn):
        conn.execute("INSERT INTO t VALUES ('lost')")
        raise Boom
    assert not conn.in_transaction
    assert _names(conn) == ["kept"]
    assert _names(_reopen(conn)) == ["kept"]


def test_nothing_is_visible_to_others_before_commit(conn: sqlite3.Connection) -> None:
    other = _reopen(conn)
    with db.transaction(conn):
        conn.execute("INSERT INTO t VALUES ('a')")
        assert _names(other) == []
    assert _names(other) == ["a"]


def test_nested_failure_rolls_back_only_the_inner_block(conn: sqlite3.Connection) -> None:
    with db.transaction(conn):
        conn.execute("INSERT INTO t VALUES ('outer-1')")
        with pytest.raises(Boom), db.transaction(conn):
            conn.execute("INSERT INTO t VALUES ('inner')")
            raise Boom
        conn.execute("INSERT INTO t VALUES ('outer-2')")
    assert _names(_reopen(conn)) == ["outer-1", "outer-2"]


def test_nested_success_is_committed_with_the_outer(conn: sqlite3.Connection) -> None:
    with db.transaction(conn):
        conn.execute("INSERT INTO t VALUES ('outer')")
        with db.transaction(conn):
            conn.execute("INSERT INTO t VALUES ('inner')")
    assert _names(_reopen(conn)) == ["outer", "inner"]


def test_outer_failure_rolls_back_a_completed_inner_block(conn: sqlite3.Connection) -> None:
    with pytest.raises(Boom), db.transaction(conn):
        conn.execute("INSERT INTO t VALUES ('outer')")
        with db.transaction(conn):
            conn.execute("INSERT INTO t VALUES ('inner')")
        raise Boom
    assert _names(_reopen(conn)) == []


def test_three_levels_of_nesting(conn: sqlite3.Connection) -> None:
    with db.transaction(conn):
        conn.execute("INSERT INTO t VALUES ('1')")
        with db.transaction(conn):
            conn.execute("INSERT INTO t VALUES ('2')")
            with pytest.raises(Boom), db.transaction(conn):
                conn.execute("INSERT INTO t VALUES ('3')")
                raise Boom
            conn.execute("INSERT INTO t VALUES ('2b')")
    assert _names(_reopen(conn)) == ["1", "2", "2b"]


def _open_at(path: str, start: float) -> str:
    while time.time() < start:
        pass
    try:
        conn = db.connect(Path(path))
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
        conn.close()
        return str(mode)
    except sqlite3.Error as exc:
        return f"{type(exc).__name__}: {exc}"


def test_processes_opening_a_new_database_at_once_all_get_it_in_wal(tmp_path: Path) -> None:
    """Several sink workers start together on one store that does not exist yet."""
    ctx = multiprocessing.get_context("spawn")
    for attempt in range(5):
        path = str(tmp_path / f"new{attempt}.db")
        with ctx.Pool(6) as pool:
            start = time.time() + 1.0  # all workers up before any opens
            modes = pool.starmap(_open_at, [(path, start)] * 6)
        assert modes == ["wal"] * 6
