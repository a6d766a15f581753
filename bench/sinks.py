"""`sinks`: rows/s into the cloud store with 1 and 2 cloud-sink workers, on SQLite and PostgreSQL.

The same load every run: a generator stands in for 4 fogs and publishes their custody streams
(summary records, 500 per batch, as a fog cuts them) at QoS 1 all at once, then follows the acks
(re-sending what is not acknowledged after 5 s, as a fog would). A run ends when every stream is
acknowledged up to its last record: rows/s = records / (last ack - first publish), and the store
is checked to hold each record exactly once. Stores are durable in both cases: SQLite with
`synchronous=FULL` (the sink's setting), PostgreSQL with fsync and synchronous commit on. The
baseline is the default deployment measured in the same run: one worker on SQLite.
"""

from __future__ import annotations

import os
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import sqlite_utils

from bench.common import heading
from cloud_sink.sink import worker_of
from cloud_sink.store import MIGRATIONS, Store, record_rows
from device_sim.physics import FIELDS as PHYSICS_FIELDS
from fogline.broker import Broker
from fogline.codec import Ack, Batch, Record, decode, encode_batch
from fogline.db import connect, migrate, transaction
from fogline.pgcluster import PostgresCluster
from fogline.progress import bar
from fogline.topics import Topics

T = Topics()
# Four fog streams; by hash two go to each worker when the workers split by fog.
STREAMS = ("f0", "f1", "f2", "f8")
BATCH = 500
RESEND_AFTER = 5.0
#: (store, workers, split) of each configuration, the baseline first.
CONFIGS = (
    ("sqlite", 1, "shared"),
    ("sqlite", 2, "shared"),
    ("postgres", 1, "shared"),
    ("postgres", 2, "shared"),
    ("postgres", 2, "by-fog"),
)
FIELDS = list(PHYSICS_FIELDS)


def _summary(stream: str, i: int) -> dict[str, Any]:
    """A summary record body as an edge makes it (7 fields, 10 readings)."""
    return {
        "edge": f"e{stream}", "device": f"d{i % 1000:05d}", "first": 10 * i, "last": 10 * i + 9,
        "count": 10, "t0": 1.7e9 + i, "t1": 1.7e9 + i + 0.9, "fields": FIELDS,
        "min": [0.1 * k for k in range(7)], "mean": [0.2 * k + 1 for k in range(7)],
        "max": [0.3 * k + 2 for k in range(7)], "std": [0.01 * k for k in range(7)], "events": 0,
    }  # fmt: skip


def _load(records: int) -> dict[str, list[tuple[int, bytes]]]:
    """Per stream: (last seq, encoded batch message) of every batch of its records."""
    out: dict[str, list[tuple[int, bytes]]] = {}
    for stream in STREAMS:
        msgs = []
        for start in range(0, records, BATCH):
            recs = tuple(
                Record(seq=i, kind="summary", body=_summary(stream, i))
                for i in range(start, min(records, start + BATCH))
            )
            payload = encode_batch(stream, Batch(low=0, records=recs), seq=start, ts=time.time())
            msgs.append((recs[-1].seq, payload))
        out[stream] = msgs
    return out


class Generator:
    """Publishes the fogs' batches and follows the acks, as the fogs' uplinks would."""

    def __init__(self, broker: Broker, load: dict[str, list[tuple[int, bytes]]]) -> None:
        self.load = load
        self.acks: dict[str, Ack] = {}
        self.states: dict[str, str] = {}
        self.counters: dict[str, dict[str, int]] = {}
        self.done = threading.Event()
        self.last_progress = time.monotonic()
        self.lock = threading.Lock()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-sinks-{os.getpid()}"
        )
        self.client.max_inflight_messages_set(1000)
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.subscribe(T.ack("fog", "+"), qos=1)
        self.client.subscribe(T.all_status(), qos=1)
        self.client.subscribe(T.all_metrics(), qos=0)
        self.client.loop_start()

    def _on_message(self, _c: mqtt.Client, _ud: Any, msg: mqtt.MQTTMessage) -> None:
        env = decode(bytes(msg.payload))
        with self.lock:
            if env.kind == "ack":
                ack: Ack = env.body
                old = self.acks.get(ack.stream)
                if old is None or ack.hwm > old.hwm or len(ack.ranges) != len(old.ranges):
                    self.acks[ack.stream] = ack
                    self.last_progress = time.monotonic()
                if all(
                    self.acks.get(s) and self.acks[s].hwm >= msgs[-1][0]
                    for s, msgs in self.load.items()
                ):
                    self.done.set()
            elif env.kind == "status":
                self.states[msg.topic.rsplit("/", 1)[1]] = str(env.body.get("state"))
            elif env.kind == "metrics":
                self.counters[env.body["id"]] = dict(env.body.get("counters") or {})

    def wait_online(self, ids: list[str], timeout: float = 30.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self.lock:
                if all(self.states.get(i) == "online" for i in ids):
                    return
            time.sleep(0.05)
        raise RuntimeError(f"sink workers {ids} not online after {timeout}s")

    def _covered(self, stream: str, last: int) -> bool:
        ack = self.acks.get(stream)
        return ack is not None and (
            ack.hwm >= last or any(lo <= last <= hi for lo, hi in ack.ranges)
        )

    def run(self, timeout: float) -> float:
        """Publish everything, wait for the acks (re-sending); the seconds it took."""
        t0 = time.perf_counter()
        for stream, msgs in self.load.items():
            for _, payload in msgs:
                self.client.publish(T.up("fog", stream), payload, qos=1)
        end = time.monotonic() + timeout
        while not self.done.wait(0.1):
            if time.monotonic() > end:
                raise RuntimeError("the sinks did not acknowledge everything in time")
            if time.monotonic() - self.last_progress > RESEND_AFTER:
                self.last_progress = time.monotonic()
                with self.lock:
                    due = [
                        (s, p) for s, msgs in self.load.items() for last, p in msgs
                        if not self._covered(s, last)
                    ]  # fmt: skip
                for stream, payload in due:
                    self.client.publish(T.up("fog", stream), payload, qos=1)
        return time.perf_counter() - t0

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _rows(store: str, where: str | Path) -> tuple[int, int]:
    """(rows, distinct (src, seq)) in the store's summaries."""
    sql = "SELECT count(*), count(DISTINCT src || ':' || seq) FROM summaries"
    if store == "sqlite":
        conn = sqlite3.connect(where)
        try:
            n, distinct = conn.execute(sql).fetchone()
        finally:
            conn.close()
        return int(n), int(distinct)
    import psycopg

    with psycopg.connect(str(where)) as pg:
        row = pg.execute(sql).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def sqlite_baselines(load: dict[str, list[tuple[int, bytes]]]) -> dict[str, float]:
    """Rows/s into the sink's own summaries table (same schema, WAL, `synchronous=FULL`) of the
    same records, without the sink: raw `executemany` and sqlite-utils `insert_all`, 1,000 rows
    per transaction, the rows made before the clock starts; the sink's store layer alone
    (`Store.apply` on the batch messages: decode, validation, custody inbox, insert), no MQTT;
    and two of its steps on their own: decoding the messages, turning records into rows."""
    now = time.time()
    messages = [(s, p) for s, msgs in load.items() for _, p in msgs]
    out = {}
    t0 = time.perf_counter()
    batches = [(s, decode(p, expect="batch").body) for s, p in messages]
    records = sum(len(batch.records) for _s, batch in batches)
    out["decode"] = records / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    rows = [
        record_rows(stream, rec, now)[1][0][1] for stream, batch in batches for rec in batch.records
    ]
    out["convert"] = records / (time.perf_counter() - t0)
    cols = list(rows[0])
    tuples = [tuple(r[c] for c in cols) for r in rows]
    sql = f"INSERT INTO summaries ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
    with tempfile.TemporaryDirectory() as tmp:
        conn = connect(Path(tmp) / "raw.db")
        migrate(conn, "cloud", MIGRATIONS)
        t0 = time.perf_counter()
        for i in range(0, len(tuples), 1000):
            with transaction(conn):
                conn.executemany(sql, tuples[i : i + 1000])
        out["executemany"] = len(tuples) / (time.perf_counter() - t0)
        conn.close()
        conn = connect(Path(tmp) / "utils.db")
        migrate(conn, "cloud", MIGRATIONS)
        table = sqlite_utils.Database(conn).table("summaries")
        t0 = time.perf_counter()
        for i in range(0, len(rows), 1000):
            with transaction(conn):
                table.insert_all(rows[i : i + 1000], batch_size=1000)
        out["sqlite_utils"] = len(rows) / (time.perf_counter() - t0)
        conn.close()
        store = Store(Path(tmp) / "store.db")
        t0 = time.perf_counter()
        for stream, payload in messages:
            store.apply([(stream, decode(payload, expect="batch").body)])
        out["store_apply"] = len(rows) / (time.perf_counter() - t0)
        store.close()
    return out


def one_run(
    store: str, workers: int, split: str, load: dict[str, list[tuple[int, bytes]]],
    pg: PostgresCluster | None, run: int,
) -> dict[str, Any]:  # fmt: skip
    """One configuration: start the workers, push the load through them, stop them."""
    records = sum(msgs[-1][0] + 1 for msgs in load.values())
    with tempfile.TemporaryDirectory() as tmp, Broker(data_dir=Path(tmp) / "broker") as broker:
        if store == "postgres":
            assert pg is not None
            where: str | Path = pg.create_database(f"run{run}")
            store_args = ["--store", str(where)]
        else:
            where = Path(tmp) / "cloud-c0" / "cloud.db"
            store_args = []
        gen = Generator(broker, load)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "cloud_sink", "--broker-port", str(broker.port),
                 "--data-dir", tmp, "--workers", str(workers), "--worker", str(k),
                 "--split", split, "--log-level", "WARNING", "--metrics-interval", "1",
                 *store_args],
                stdout=subprocess.DEVNULL, stderr=open(Path(tmp) / f"w{k}.log", "wb"),  # noqa: SIM115
            )
            for k in range(workers)
        ]  # fmt: skip
        ids = ["c0" if k == 0 else f"c0-w{k}" for k in range(workers)]
        try:
            gen.wait_online(ids)
            seconds = gen.run(timeout=300)
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(timeout=30)
            time.sleep(0.3)  # the workers' last metrics
            gen.close()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        rows, distinct = _rows(store, where)
        if store == "postgres":
            assert pg is not None
            pg.drop_database(f"run{run}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    stored = [gen.counters.get(i, {}).get("stored.summary", 0) for i in ids]
    return {
        "store": store, "workers": workers, "split": split, "records": records,
        "seconds": seconds, "rows_per_s": records / seconds, "rows": rows,
        "exactly_once": rows == distinct == records,
        "shares": [round(n / max(1, sum(stored)), 2) for n in stored],
        "sink_cpu_s_per_100k": cpu / records * 1e5,
    }  # fmt: skip


def run(quick: bool) -> dict[str, Any]:
    """Every configuration, `rounds` times, the configurations' order rotating each round."""
    records = 5_000 if quick else 25_000
    rounds = 1 if quick else 3
    load = _load(records)
    assert {worker_of(s, 2) for s in STREAMS} == {0, 1}
    runs: list[dict[str, Any]] = []
    total = rounds * len(CONFIGS)
    baselines: list[dict[str, float]] = []
    with PostgresCluster(durable=True) as pg:
        for r in range(rounds):
            baselines.append(sqlite_baselines(load))
            print(
                "  SQLite without the sink: "
                + ", ".join(f"{k} {v:,.0f} rows/s" for k, v in baselines[-1].items()),
                flush=True,
            )
            order = CONFIGS[r % len(CONFIGS) :] + CONFIGS[: r % len(CONFIGS)]
            for store, workers, split in order:
                res = one_run(store, workers, split, load, pg, len(runs))
                runs.append(res)
                print(
                    f"  {bar(len(runs), total, 12)} {store:<8} {workers} worker(s) {split:<6}: "
                    f"{res['rows_per_s']:,.0f} rows/s, shares {res['shares']}, "
                    f"exactly once {res['exactly_once']}",
                    flush=True,
                )
        version = pg.psql("SHOW server_version").strip()
    median = []
    for store, workers, split in CONFIGS:
        mine = [
            r for r in runs if (r["store"], r["workers"], r["split"]) == (store, workers, split)
        ]
        median.append({
            "store": store, "workers": workers, "split": split,
            "rows_per_s": statistics.median(r["rows_per_s"] for r in mine),
            "all": [round(r["rows_per_s"]) for r in mine],
            "exactly_once": all(r["exactly_once"] for r in mine),
            "shares": mine[-1]["shares"],
            "sink_cpu_s_per_100k": statistics.median(r["sink_cpu_s_per_100k"] for r in mine),
        })  # fmt: skip
    sqlite = {k: statistics.median(b[k] for b in baselines) for k in baselines[0]}
    return {
        "runs": runs, "median": median, "records": records * len(STREAMS), "rounds": rounds,
        "postgres": version, "sqlite": sqlite,
        "sqlite_all": {k: [round(b[k]) for b in baselines] for k in baselines[0]},
    }  # fmt: skip


def render(res: dict[str, Any], command: str) -> str:
    """The BENCHMARKS.md section for the sink workers."""
    base = res["median"][0]["rows_per_s"]
    by = {(m["store"], m["workers"], m["split"]): m for m in res["median"]}
    lines = [
        *heading(
            "sinks: rows/s into the cloud store, 1 and 2 sink workers, SQLite and PostgreSQL",
            command,
            f", PostgreSQL {res['postgres']}",
        ),
        "| store | workers | split | rows/s (median) | vs 1 worker, same store | vs SQLite 1 "
        "worker (baseline) | each record once | share per worker | sink CPU s per 100k rows "
        "| all runs, rows/s |",
        "|---|---:|---|---:|---:|---:|:---:|---|---:|---:|",
    ]
    for m in res["median"]:
        one = by[(m["store"], 1, "shared")]["rows_per_s"]
        lines.append(
            f"| {m['store']} | {m['workers']} | {m['split']} | {m['rows_per_s']:,.0f} | "
            f"{m['rows_per_s'] / one:.2f} | {m['rows_per_s'] / base:.2f} | "
            f"{'yes' if m['exactly_once'] else 'NO'} | "
            f"{' / '.join(f'{s:.0%}' for s in m['shares'])} | {m['sink_cpu_s_per_100k']:.1f} | "
            f"{', '.join(f'{x:,}' for x in m['all'])} |"
        )
    sink = by[("sqlite", 1, "shared")]["rows_per_s"]
    raw = res["sqlite"]["executemany"]
    lines += [
        "",
        "SQLite without the sink, the same records into the same table (schema, WAL, "
        "`synchronous=FULL`), 1,000 rows per transaction, rows made before the clock starts:",
        "",
        "| writer or step | rows/s (median) | microseconds per row | raw `executemany` / it | "
        "all rounds, rows/s |",
        "|---|---:|---:|---:|---:|",
    ]
    names = {
        "executemany": "raw `executemany` (baseline)",
        "sqlite_utils": "sqlite-utils `insert_all`",
        "store_apply": "the sink's store layer alone (`Store.apply`: decode, validate, inbox, "
        "insert; 500-record batches)",
        "decode": "of which: decoding and checking the batch messages alone",
        "convert": "of which: turning records into checked rows alone",
    }
    for key, label in names.items():
        v = res["sqlite"][key]
        lines.append(
            f"| {label} | {v:,.0f} | {1e6 / v:.1f} | {raw / v:.1f} | "
            f"{', '.join(f'{x:,}' for x in res['sqlite_all'][key])} |"
        )
    lines += [
        f"| one sink worker, end to end (table above) | {sink:,.0f} | {1e6 / sink:.1f} | "
        f"{raw / sink:.1f} | |",
        "",
        f"One sink worker on SQLite stores {sink / raw:.0%} of raw `executemany`'s rows/s "
        "(goal: at least 60%).",
        "",
        f"Each run: {res['records']:,} summary records from {len(STREAMS)} fog streams "
        f"({BATCH} records per batch message) pushed at once through a private Mosquitto into a "
        "fresh store; rows/s from the first publish to the ack that covers the last record. "
        f"Medians of {res['rounds']} rounds, the order of the configurations rotating. Both "
        "stores are durable (SQLite `synchronous=FULL`, PostgreSQL fsync and synchronous "
        "commit on, a private cluster on this machine). `shared`: an MQTT shared subscription "
        "hands each batch to either worker, so both apply batches of every stream and take turns "
        "on its inbox rows; `by-fog`: each worker has two of the four streams. The generator, "
        "the broker, PostgreSQL and the workers share the machine's cores.",
    ]
    return "\n".join(lines) + "\n"
