"""Property-based fuzzing of the decode path of the edge, fog and cloud processes.

Each process is built on a temporary data dir, its `publish` replaced by a recorder, and fed
batches of generated payloads through its real `handle()`, with a valid message before and after
the bad ones. The properties a user would check: no exception escapes, every rejected message is
counted once under `rejected.<reason>` and copied to the DLQ, and the valid messages around the
bad ones are still processed. Runs are derandomised, so a failure reproduces.
"""

from __future__ import annotations

import copy
import logging
import random
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import strategies as st

from cloud_sink.sink import CloudSink, SinkConfig
from device_sim.physics import FIELDS as PHYSICS_FIELDS
from edge_agent.agent import EdgeAgent, EdgeConfig
from fog_aggregator.aggregator import FogAggregator, FogConfig
from fogline.codec import (
    MAX_MESSAGE_BYTES,
    Batch,
    Record,
    Telemetry,
    decode,
    encode_batch,
    encode_telemetry,
)
from fogline.errors import DecodeError
from fogline.service import DLQ_COPY_BYTES, Inbound, Service
from fogline.topics import Topics

T = Topics()
EXAMPLES = 250  # examples per process; each feeds at least 4 * MIN_BATCH payloads
MIN_BATCH, MAX_BATCH = 10, 16
MIN_PAYLOADS = 10_000
FIELDS = list(PHYSICS_FIELDS)
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
    # No shrinking (minutes on a stateful process): `culprit()` names the failing message.
    phases=[Phase.explicit, Phase.generate],
    verbosity=Verbosity.quiet,
)

# ----------------------------------------------------------------------------- the processes


class Harness:
    """One process with a recording `publish`, fed through its real `handle()`."""

    def __init__(self, svc: Service) -> None:
        self.svc = svc
        self.sent: list[tuple[str, bytes]] = []
        svc.publish = self._publish  # type: ignore[method-assign]
        svc.on_start()
        self.dlq_topic = T.dlq(svc.role, svc.config.id)
        self.handle_seconds = 0.0

    def _publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        self.sent.append((topic, payload))

    def rejected(self) -> Counter[str]:
        """The `rejected.<reason>` counters, by reason."""
        return Counter(
            {
                k.split(".", 1)[1]: v
                for k, v in self.svc.counters.items()
                if k.startswith("rejected.")
            }
        )

    def feed(self, msgs: list[tuple[str, bytes]]) -> tuple[list[dict[str, Any]], list[Any]]:
        """Handle `msgs` in one batch; check the reject accounting; return DLQ bodies and sends."""
        before, start = self.rejected(), len(self.sent)
        inbound = [Inbound(t, p, i + 1, 1) for i, (t, p) in enumerate(msgs)]
        started = time.perf_counter()
        self.svc.handle(inbound)
        self.handle_seconds += time.perf_counter() - started
        new = self.sent[start:]
        dlq = [decode(p, expect="dlq").body for t, p in new if t == self.dlq_topic]
        counted = self.rejected() - before
        copied = Counter(d["reason"] for d in dlq)
        assert counted == copied, f"rejects counted {dict(counted)} but copied {dict(copied)}"
        return dlq, new

    def close(self) -> None:
        self.svc.on_stopped()


def edge(data: Path) -> Harness:
    return Harness(EdgeAgent(EdgeConfig(id="e0", fog_id="f0", data_dir=data)))


def fog(data: Path) -> Harness:
    return Harness(FogAggregator(FogConfig(id="f0", cloud_id="c0", data_dir=data)))


def cloud(data: Path) -> Harness:
    return Harness(CloudSink(SinkConfig(id="c0", data_dir=data)))


# ----------------------------------------------------------------------------- oracles
# Which reason the process must reject a message with, by its topic and the codec's verdict.


def _expect_decode(payload: bytes, kind: str) -> tuple[str | None, Any]:
    try:
        return None, decode(payload, expect=kind)
    except DecodeError as exc:
        return exc.reason, None


def edge_oracle(topic: str, payload: bytes) -> str | None:
    kinds = {T.ack("edge", "e0"): "ack", T.status("fog", "f0"): "status"}
    kinds[T.esc_reply("e0")] = "esc_reply"
    if topic in kinds:
        return _expect_decode(payload, kinds[topic])[0]
    try:
        _, device = T.parse_tele(topic)
    except DecodeError as exc:
        return exc.reason
    reason, env = _expect_decode(payload, "tele")
    if reason is None and env.body.device != device:
        return "forged_device"
    return reason


def _sender_oracle(topic: str, payload: bytes, role: str) -> str | None:
    try:
        sender = T.parse_sender(topic, role)
    except DecodeError as exc:
        return exc.reason
    reason, env = _expect_decode(payload, "batch")
    if reason is None and env.src != sender:
        return "forged_source"
    return reason


def fog_oracle(topic: str, payload: bytes) -> str | None:
    if topic.endswith("/esc"):
        try:
            edge_id = T.parse_esc(topic)
        except DecodeError as exc:
            return exc.reason
        reason, env = _expect_decode(payload, "esc")
        if reason is None and env.src != edge_id:
            return "forged_source"
        return reason
    if topic == T.ack("fog", "f0"):
        return _expect_decode(payload, "ack")[0]
    if topic == T.status("cloud", "c0"):
        return _expect_decode(payload, "status")[0]
    return _sender_oracle(topic, payload, "edge")


def cloud_oracle(topic: str, payload: bytes) -> str | None:
    return _sender_oracle(topic, payload, "fog")


#: Reasons a process may give a message the codec accepts (they depend on its state).
STATE_REASONS = {
    "edge": {"replay", "non_finite"},
    "fog": {"unknown_record_kind", "unknown_features", "bad_training_sample"},
    "cloud": set(),
}


def check_rejects(
    dlq: list[dict[str, Any]],
    msgs: list[tuple[str, bytes]],
    oracle: Callable[[str, bytes], str | None],
    role: str,
) -> int:
    """Every message the oracle refuses is in the DLQ once with its reason; returns the count."""
    expected: Counter[tuple[str, bytes, str]] = Counter()
    valid: set[tuple[str, bytes]] = set()
    for topic, payload in msgs:
        reason = oracle(topic, payload)
        if reason is None:
            valid.add((topic, payload[:DLQ_COPY_BYTES]))
        else:
            expected[(topic, payload[:DLQ_COPY_BYTES], reason)] += 1
    got = Counter((d["topic"], d["payload"], d["reason"]) for d in dlq)
    missing = expected - got
    assert not missing, f"rejects not dead-lettered: {list(missing)[:3]}"
    for topic, prefix, reason in got - expected:
        assert reason in STATE_REASONS[role], f"unexpected reject {reason!r} on {topic}"
        assert (topic, prefix) in valid, f"{reason!r} for a message that was not sent"
    sizes = {(t, p[:DLQ_COPY_BYTES], len(p)) for t, p in msgs}
    assert all((d["topic"], d["payload"], d["size"]) in sizes for d in dlq)
    return sum(expected.values())


# ----------------------------------------------------------------------------- valid messages


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def envelope(kind: str, src: str, body: Any, seq: int = 1) -> dict[str, Any]:
    return {"v": 1, "kind": kind, "src": src, "seq": seq, "ts": 1.7e9, "body": body}


DEVICES = ["d0", "d1", "d2"]
EDGES = ["e1", "e2", "e3"]
FOGS = ["f1", "f2", "f3"]
small = st.integers(0, 300)


@st.composite
def tele_env(draw: st.DrawFn, device: str | None = None) -> dict[str, Any]:
    device = device or draw(st.sampled_from(DEVICES))
    n = draw(st.integers(1, 40))
    fields = FIELDS if draw(st.booleans()) else draw(st.permutations(FIELDS))[:3]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    values = rng.normal(10.0, 1.0, (n, len(fields))).astype("<f4")
    if draw(st.integers(0, 9)) == 0:
        values[draw(st.integers(0, n - 1)), 0] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    body = {
        "device": device,
        "first": draw(small),
        "t0": 1.7e9,
        "dt": 0.1,
        "fields": list(fields),
        "n": n,
        "data": values.tobytes(),
    }
    return envelope("tele", device, body, draw(small))


def _range(draw: st.DrawFn) -> dict[str, Any]:
    first, count = draw(small), draw(st.integers(1, 50))
    return {"device": draw(st.sampled_from(DEVICES)), "first": first, "last": first + count - 1,
            "count": count}  # fmt: skip


@st.composite
def record(draw: st.DrawFn, kinds: tuple[str, ...]) -> list[Any]:
    kind = draw(st.sampled_from(kinds))
    k = len(FIELDS)
    if kind == "summary":
        body = {"edge": "e1", **_range(draw), "t0": 1.0, "t1": 2.0, "fields": FIELDS,
                "min": [0.0] * k, "mean": [1.0] * k, "max": [2.0] * k, "std": [0.5] * k,
                "events": 0}  # fmt: skip
    elif kind == "event":
        body = {"edge": "e1", **_range(draw), "ts": 1.0, "kind": "zscore", "field": "vib_rms",
                "value": 9.0, "baseline": 1.0, "z": 8.0}  # fmt: skip
    elif kind == "drop":
        r = _range(draw)
        body = {"reason": "gap", "origin": "e1", "records": 0, "kinds": {},
                "ranges": [[r["device"], r["first"], r["last"]]], "ts": 1.0}  # fmt: skip
    elif kind == "rollup":
        body = {"fog": "f1", "edge": "e1", "t0": 1.0, "t1": 2.0, "readings": 10,
                "summaries": 1, "events": 0, "dropped": 0, "devices": 1}  # fmt: skip
    else:  # train
        body = {"edge": "e1", **_range(draw), "ts": 1.0, "label": "normal", "score": 0.1,
                "fields": FIELDS, "features": bytes(16 * k)}  # fmt: skip
    return [draw(small), kind, body]


def batch_env(src: str, kinds: tuple[str, ...]) -> st.SearchStrategy[dict[str, Any]]:
    recs = st.lists(record(kinds), max_size=8)
    return st.builds(lambda low, rs: envelope("batch", src, {"low": low, "recs": rs}), small, recs)


@st.composite
def esc_env(draw: st.DrawFn, src: str) -> dict[str, Any]:
    fields = FIELDS if draw(st.integers(0, 3)) else ["x", "y"]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    body = {"id": f"{src}:{draw(small)}", "device": draw(st.sampled_from(DEVICES)), "first": 0,
            "last": 19, "fields": fields,
            "features": rng.normal(5.0, 2.0, 4 * len(fields)).astype("<f4").tobytes()}  # fmt: skip
    return envelope("esc", src, body)


def ack_env(src: str, stream: str) -> st.SearchStrategy[dict[str, Any]]:
    ranges = st.lists(st.tuples(small, small).map(lambda r: sorted(r)), max_size=3)
    body = st.builds(
        lambda h, r: {"stream": stream, "hwm": h, "ranges": r}, st.integers(-1, 300), ranges
    )
    return body.map(lambda b: envelope("ack", src, b))


def status_env(src: str) -> st.SearchStrategy[dict[str, Any]]:
    body = st.builds(
        lambda state, started: {"state": state, "pid": 1, "version": "1", "started": started},
        st.sampled_from(["online", "offline", "stopped"]),
        st.sampled_from([1.0, 2.0, 3.0]),
    )
    return body.map(lambda b: envelope("status", src, b, 0))


reply_env = st.builds(
    lambda i, c: envelope(
        "esc_reply",
        "f0",
        {"id": f"e0:{i}", "fault": "bearing_wear", "confidence": c, "model": "m@1"},
    ),
    small,
    st.floats(0.0, 1.0),
)

# (topic, valid envelope) generators per process, and the topics a message may be misrouted to.
VALID: dict[str, st.SearchStrategy[tuple[str, dict[str, Any]]]] = {
    "edge": st.one_of(
        st.sampled_from(DEVICES).flatmap(lambda d: tele_env(d).map(lambda e: (T.tele("e0", d), e))),
        ack_env("f0", "e0").map(lambda e: (T.ack("edge", "e0"), e)),
        status_env("f0").map(lambda e: (T.status("fog", "f0"), e)),
        reply_env.map(lambda e: (T.esc_reply("e0"), e)),
    ),
    "fog": st.one_of(
        st.sampled_from(EDGES).flatmap(
            lambda s: batch_env(s, ("summary", "event", "drop", "train", "rollup")).map(
                lambda e: (T.up("edge", s), e)
            )
        ),
        st.sampled_from(EDGES).flatmap(lambda s: esc_env(s).map(lambda e: (T.esc(s), e))),
        ack_env("c0", "f0").map(lambda e: (T.ack("fog", "f0"), e)),
        status_env("c0").map(lambda e: (T.status("cloud", "c0"), e)),
    ),
    "cloud": st.sampled_from(FOGS).flatmap(
        lambda s: batch_env(s, ("summary", "event", "drop", "rollup", "train")).map(
            lambda e: (T.up("fog", s), e)
        )
    ),
}
TOPICS = {
    "edge": [
        T.tele("e0", "d0"),
        T.tele("e0", "bad device"),
        T.tele("e0", "x" * 65),
        T.ack("edge", "e0"),
        T.status("fog", "f0"),
        T.esc_reply("e0"),
    ],
    "fog": [
        T.up("edge", "e1"),
        T.up("edge", "bad/id"),
        T.esc("e1"),
        "fl/v1/edge/e1/esc/x",
        T.ack("fog", "f0"),
        T.status("cloud", "c0"),
    ],
    "cloud": [T.up("fog", "f1"), T.up("fog", "f2"), "fl/v1/fog/f1/up/x", "fl/v1/fog//up"],
}

# ----------------------------------------------------------------------------- bad payloads

BIG_INT = st.sampled_from([-(2**63), -1, 2**31, 2**63 - 1, 2**63, 2**64 - 1])
leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    BIG_INT,
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.binary(max_size=40),
)
value = st.recursive(
    leaf,
    lambda c: st.one_of(
        st.lists(c, max_size=6), st.dictionaries(st.text(max_size=8), c, max_size=6)
    ),
    max_leaves=25,
)
#: Containers at (and just over) the decoder's limits.
BIG_VALUES = [
    [None] * 40_000,
    [None] * 40_001,
    {str(i): i for i in range(4096)},
    {str(i): i for i in range(4097)},
    "s" * (64 * 1024),
    "s" * (64 * 1024 + 1),
]
#: Raw msgpack spliced in place of one value: what Python objects cannot express.
RAW = [
    b"\xa4\xff\xfe\xc0\x80",  # str that is not UTF-8
    b"\xd9\x03\xed\xa0\x80",  # UTF-8-encoded surrogate
    b"\x91" * 600 + b"\xc0",  # deep nesting within the limit
    b"\x91" * 2000 + b"\xc0",  # beyond the unpacker's stack
    b"\x81" * 300 + b"\xa1a\xc0",  # nested maps (keys are nil: strict_map_key)
    b"\xd4\x01\x00",  # ext type
    b"\xc1",  # never-used byte
    b"\x81\x01\x01",  # int map key
    b"\xdd\xff\xff\xff\xff",  # array header far beyond the limit and the data
    b"\xdb\x7f\xff\xff\xff",  # str header far beyond the data
    b"\xc6\x00\x80\x00\x01",  # bin header just over 8 MiB
    b"\xcb" + b"\x7f\xf8" + bytes(6),  # float64 NaN
    b"\xca\x7f\x80\x00\x00",  # float32 inf
    b"\xcf" + b"\xff" * 8,  # uint64 max
    b"\xd3\x80" + bytes(7),  # int64 min
]
PLACEHOLDER = "\x00fuzz-placeholder\x00"
#: zlib that inflates beyond 8 MiB (a bomb) and zlib of nonsense.
BOMB = zlib.compress(bytes(MAX_MESSAGE_BYTES + 1), 9)
BOMB_MSGPACK = zlib.compress(b"\x91" * (MAX_MESSAGE_BYTES // 2), 9)


def _slots(obj: Any, out: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """Every (container, key) inside `obj`."""
    items = (
        obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    )
    for k, v in items:
        out.append((obj, k))
        _slots(v, out)
    return out


@st.composite
def mutate_packed(draw: st.DrawFn, root: Any) -> bytes:
    """`root` with one value replaced, deleted or added, packed (raw splices included)."""
    root = copy.deepcopy(root)
    slots = _slots(root, [])
    raw = None
    if slots:
        container, key = draw(st.sampled_from(slots))
        actions = ["value", "value", "big", "raw", "delete", "extra", "bool", "int", "int"]
        action = draw(st.sampled_from(actions))
        if action == "int":  # bool-for-int's sibling: ints at the edges of int64/uint64
            container[key] = draw(BIG_INT)
        elif action == "value":
            container[key] = draw(value)
        elif action == "big":
            container[key] = draw(st.sampled_from(BIG_VALUES))
        elif action == "raw":
            container[key], raw = PLACEHOLDER, draw(st.sampled_from(RAW))
        elif action == "bool":
            container[key] = draw(st.booleans())
        elif action == "delete" and isinstance(container, dict):
            del container[key]
        elif action == "delete":
            container.pop(key)
        elif isinstance(container, dict):
            container[draw(st.text(max_size=8))] = draw(value)
        else:
            container.append(draw(value))
    out = pack(root)
    return out if raw is None else out.replace(pack(PLACEHOLDER), raw, 1)


@st.composite
def zrecs_payload(draw: st.DrawFn, env: dict[str, Any]) -> bytes:
    """A batch with compressed records: valid, mutated inside, damaged, or a bomb."""
    recs = env["body"]["recs"]
    inner = draw(st.one_of(st.just(pack(recs)), mutate_packed(recs)))
    z = zlib.compress(inner, 6)
    how = draw(st.sampled_from(["ok", "flip", "cut", "tail", "bomb", "bomb2", "junk", "empty"]))
    if how == "flip" and z:
        i = draw(st.integers(0, len(z) - 1))
        z = z[:i] + bytes([z[i] ^ draw(st.integers(1, 255))]) + z[i + 1 :]
    elif how == "cut":
        z = z[: draw(st.integers(0, max(0, len(z) - 1)))]
    elif how == "tail":
        z = z + draw(st.binary(min_size=1, max_size=8))
    elif how == "bomb":
        z = BOMB
    elif how == "bomb2":
        z = BOMB_MSGPACK
    elif how == "junk":
        z = zlib.compress(draw(st.binary(max_size=64)))
    elif how == "empty":
        z = b""
    body = {"low": env["body"]["low"], "zrecs": z}
    return pack({**env, "body": body})


@st.composite
def forged(draw: st.DrawFn, topic: str, env: dict[str, Any]) -> tuple[str, bytes]:
    """The payload names a different device (tele) or sender (batch, esc) than its topic."""
    env = copy.deepcopy(env)
    if env["kind"] == "tele":
        other = draw(st.sampled_from([d for d in DEVICES if f"/{d}/" not in topic] + ["zz"]))
        env["src"] = env["body"]["device"] = other
    else:
        env["src"] = draw(st.sampled_from(["zz", "e1", "e2", "f1", "f2", "c0", "f0"]))
    return topic, pack(env)


@st.composite
def fuzz_message(draw: st.DrawFn, role: str) -> tuple[str, bytes]:
    topic, env = draw(VALID[role])
    good = pack(env)
    family = draw(st.integers(0, 11))
    if family == 0:
        return topic, good
    if family == 1:
        return topic, good[: draw(st.integers(0, len(good) - 1))]
    if family == 2:
        return topic, good + draw(st.binary(min_size=1, max_size=16))
    if family == 3:
        return draw(st.sampled_from(TOPICS[role])), draw(st.binary(max_size=200))
    if family == 4:
        return draw(st.sampled_from(TOPICS[role])), pack(draw(value))
    if family == 5:  # the right envelope around a random body
        return topic, pack({**env, "body": draw(value)})
    if family == 6:  # misrouted: a valid message on another of the process's topics
        return draw(st.sampled_from(TOPICS[role])), good
    if family == 7:
        return draw(forged(topic, env))
    if family == 8 and env["kind"] == "batch":
        return topic, draw(zrecs_payload(env))
    return topic, draw(mutate_packed(env))


def oversized(topic: str) -> tuple[str, bytes]:
    """A message one byte over the limit (a valid map, padded with a bin)."""
    head = pack(envelope("tele", "d0", {"pad": b""}))
    pad = MAX_MESSAGE_BYTES + 1 - len(head)
    return topic, pack(envelope("tele", "d0", {"pad": bytes(pad - 5)}))


# ----------------------------------------------------------------------------- sentinels
# Valid messages placed around the fuzz; the test checks the process took them.


def sentinel_tele(first: int) -> tuple[str, bytes]:
    values = np.full((10, len(FIELDS)), 1.0, dtype=np.float32)
    tele = Telemetry("sentinel", first, 1.7e9, 0.1, tuple(FIELDS), values)
    return T.tele("e0", "sentinel"), encode_telemetry(tele, seq=first, ts=1.7e9)


def sentinel_batch(role: str, seqs: range, compress: bool) -> tuple[str, bytes]:
    body = {"edge": "sentinel", "device": "sentinel", "first": 0, "last": 9, "count": 10,
            "t0": 1.0, "t1": 2.0, "fields": ["a"], "min": [0.0], "mean": [0.0], "max": [0.0],
            "std": [0.0], "events": 0}  # fmt: skip
    batch = Batch(low=seqs.start, records=tuple(Record(s, "summary", body) for s in seqs))
    payload = encode_batch("sentinel", batch, seq=1, ts=1.7e9, compress=compress)
    return T.up(role, "sentinel"), payload


def _inbox(svc: Service) -> Any:
    return svc.store.inbox if isinstance(svc, CloudSink) else svc.inbox  # type: ignore[attr-defined]


def sentinels(h: Harness) -> tuple[list[tuple[str, bytes]], list[tuple[str, bytes]], int]:
    """A valid message for before and after the fuzz, and the position they should reach."""
    svc = h.svc
    if isinstance(svc, EdgeAgent):
        state = svc.core.devices.get("sentinel")
        at = state.expected if state else 0
        return [sentinel_tele(at)], [sentinel_tele(at + 10)], at + 20
    up = "edge" if isinstance(svc, FogAggregator) else "fog"
    at = _inbox(svc).ack("sentinel").hwm + 1
    before = [sentinel_batch(up, range(at, at + 2), True)]
    return before, [sentinel_batch(up, range(at + 2, at + 3), False)], at + 2


def check_sentinels(h: Harness, sent: list[tuple[str, bytes]], goal: int) -> None:
    """The valid messages around the fuzz were processed."""
    svc = h.svc
    if isinstance(svc, EdgeAgent):
        assert svc.core.devices["sentinel"].expected == goal, "sentinel telemetry not taken"
        return
    role = "edge" if isinstance(svc, FogAggregator) else "fog"
    acks = [decode(p, expect="ack").body for t, p in sent if t == T.ack(role, "sentinel")]
    assert acks and acks[-1].hwm == goal, "the sentinel batches were not acknowledged"
    if isinstance(svc, CloudSink):
        rows = svc.store.db.execute("SELECT count(*) FROM summaries WHERE src = 'sentinel'")
        assert rows.fetchone()[0] == goal + 1


# ----------------------------------------------------------------------------- the fuzz tests

FACTORIES = {"edge": edge, "fog": fog, "cloud": cloud}
ORACLES = {"edge": edge_oracle, "fog": fog_oracle, "cloud": cloud_oracle}


@pytest.fixture(autouse=True)
def _quiet_rejects() -> Iterator[None]:
    """Rejects are logged (rate-limited per process); thousands of fresh ones would only slow."""
    logger = logging.getLogger("fogline.service")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


def culprit(role: str, root: Path, msgs: list[tuple[str, bytes]]) -> str:
    """The first message that fails the checks alone on a fresh process, described."""
    for topic, payload in msgs:
        try:
            run_once(FACTORIES[role](Path(tempfile.mkdtemp(dir=root))), [(topic, payload)])
        except Exception as exc:
            return f"{type(exc).__name__}: {exc} <- {topic} {payload[:300]!r} ({len(payload)} B)"
    return "no single message fails alone (an interaction)"


def run_once(h: Harness, msgs: list[tuple[str, bytes]]) -> int:
    """`h` handles sentinel + `msgs` + sentinel in one batch; all checks applied."""
    before, after, goal = sentinels(h)
    batch = before + msgs + after
    dlq, sent = h.feed(batch)
    rejects = check_rejects(dlq, batch, ORACLES[h.svc.role], h.svc.role)
    check_sentinels(h, sent, goal)
    return rejects


def amplify(msgs: list[tuple[str, bytes]], rnd: random.Random) -> list[tuple[str, bytes]]:
    """Each generated message, and cheap byte-level variants of it: cut, extended, flipped."""
    out = []
    for topic, payload in msgs:
        out.append((topic, payload))
        if not payload:
            continue
        out.append((topic, payload[: rnd.randrange(len(payload))]))
        out.append((topic, payload + rnd.randbytes(rnd.randrange(1, 9))))
        i = rnd.randrange(len(payload))
        out.append(
            (topic, payload[:i] + bytes([payload[i] ^ rnd.randrange(1, 256)]) + payload[i + 1 :])
        )
    return out


@pytest.mark.parametrize("role", ["edge", "fog", "cloud"])
def test_fuzz_handle(role: str, tmp_path: Path) -> None:
    """10,000+ generated payloads per process: no escape, every reject counted and dead-lettered."""
    totals = Counter[str]()
    h = FACTORIES[role](tmp_path / "shared")
    extra = [oversized(TOPICS[role][0])]

    @FUZZ
    @given(st.lists(fuzz_message(role), min_size=MIN_BATCH, max_size=MAX_BATCH), st.randoms())
    def fuzz(drawn: list[tuple[str, bytes]], rnd: random.Random) -> None:
        msgs = amplify(drawn, rnd) + extra
        extra.clear()  # the 8 MiB message goes once
        try:
            totals["rejects"] += run_once(h, msgs)
        except Exception as exc:
            raise AssertionError(f"{role}: {culprit(role, tmp_path, msgs)}") from exc
        totals["payloads"] += len(msgs)

    started = time.perf_counter()
    try:
        fuzz()
    finally:
        elapsed = time.perf_counter() - started
        print(f"\nfuzz {role}: {totals['payloads']} payloads through handle(),"
              f" {totals['rejects']} rejected, {elapsed:.1f}s")  # fmt: skip
        h.close()
    assert totals["payloads"] >= MIN_PAYLOADS


# ----------------------------------------------------------------------------- regressions
# Inputs the fuzzer found that escape `handle()` or are counted without a DLQ copy.


def _batch(src: str, recs: list[Any], low: int = 0) -> bytes:
    return pack(envelope("batch", src, {"low": low, "recs": recs}))


def _ack(src: str, stream: str, hwm: int, ranges: list[list[int]] | None = None) -> bytes:
    return pack(envelope("ack", src, {"stream": stream, "hwm": hwm, "ranges": ranges or []}))


def _tele(device: str, first: int) -> bytes:
    values = np.zeros((1, 1), dtype=np.float32)
    return encode_telemetry(Telemetry(device, first, 1.0, 1.0, ("a",), values), seq=1, ts=1.0)


SUMMARY = {"edge": "e1", "device": "d0", "first": 0, "last": 0, "count": 1, "t0": 1.0,
           "t1": 1.0, "fields": ["a"], "min": [0.0], "mean": [0.0], "max": [0.0], "std": [0.0],
           "events": 0}  # fmt: skip
HUGE = 2**64 - 1
REGRESSIONS = [
    # edge: a telemetry `first` beyond SQLite's int64 (devices.expected)
    ("edge", T.tele("e0", "d0"), _tele("d0", HUGE)),
    ("edge", T.tele("e0", "d0"), _tele("d0", 2**63 - 1)),
    # edge: the first reading fits in int64, the reading after the last does not
    (
        "edge",
        T.tele("e0", "d0"),
        encode_telemetry(
            Telemetry("d0", 2**63 - 7, 1.0, 1.0, ("a",), np.full((7, 1), np.inf, np.float32)),
            seq=1,
            ts=1.0,
        ),
    ),
    # edge and fog: an ack whose hwm or range is beyond int64 (outbox DELETE)
    ("edge", T.ack("edge", "e0"), _ack("f0", "e0", HUGE)),
    ("edge", T.ack("edge", "e0"), _ack("f0", "e0", 0, [[0, HUGE]])),
    ("fog", T.ack("fog", "f0"), _ack("c0", "f0", HUGE)),
    # fog: record seq / low beyond int64 (inbox hwm)
    ("fog", T.up("edge", "e1"), _batch("e1", [], low=HUGE)),
    ("fog", T.up("edge", "e1"), _batch("e1", [[2**63, "summary", SUMMARY]], low=2**63)),
    # fog: a forwarded record whose `first` is beyond int64 (outbox coverage columns)
    ("fog", T.up("edge", "e1"), _batch("e1", [[0, "summary", {**SUMMARY, "first": HUGE}]])),
    # fog: a summary whose count is beyond int64 (rollup_acc.readings)
    ("fog", T.up("edge", "e1"), _batch("e1", [[0, "summary", {**SUMMARY, "count": HUGE}]])),
    # fog: a train record whose `first` is not a number (bound into the training table)
    (
        "fog",
        T.up("edge", "e1"),
        _batch("e1", [[0, "train", {"features": b"", "label": "x", "first": [1]}]]),
    ),
    # fog: a train record whose field names are bytes (not JSON)
    (
        "fog",
        T.up("edge", "e1"),
        _batch(
            "e1",
            [
                [
                    0,
                    "train",
                    {
                        "device": "d0",
                        "first": 0,
                        "last": 1,
                        "label": "x",
                        "features": bytes(16),
                        "fields": [b"x"],
                    },
                ]
            ],
        ),
    ),
    # fog: a train record without features: counted rejected.bad_training_sample, no DLQ copy
    ("fog", T.up("edge", "e1"), _batch("e1", [[0, "train", {"label": "x"}]])),
    # cloud: record seq / low beyond int64
    ("cloud", T.up("fog", "f1"), _batch("f1", [[HUGE, "summary", SUMMARY]])),
    ("cloud", T.up("fog", "f1"), _batch("f1", [], low=HUGE)),
    # cloud: a record field beyond int64 passes `_int` and fails the insert
    ("cloud", T.up("fog", "f1"), _batch("f1", [[0, "summary", {**SUMMARY, "events": HUGE}]])),
    # cloud: bytes inside a value that is stored as JSON
    (
        "cloud",
        T.up("fog", "f1"),
        _batch(
            "f1",
            [
                [
                    0,
                    "drop",
                    {
                        "reason": "gap",
                        "origin": "e1",
                        "records": 0,
                        "kinds": {"a": b"x"},
                        "ranges": [],
                        "ts": 1.0,
                    },
                ]
            ],
        ),
    ),
    ("cloud", T.up("fog", "f1"), _batch("f1", [[0, "summary", {**SUMMARY, "min": [b"x"]}]])),
    # cloud: a bytes map key in a record that goes to the `rejected` table
    ("cloud", T.up("fog", "f1"), _batch("f1", [[0, "nope", {b"k": 1}]])),
]


@pytest.mark.parametrize(
    ("role", "topic", "payload"),
    REGRESSIONS,
    ids=[f"{r}-{i}" for i, (r, _, _) in enumerate(REGRESSIONS)],
)
def test_fuzz_regression(role: str, topic: str, payload: bytes, tmp_path: Path) -> None:
    """A bad message found by the fuzzer is refused or stored, never crashes the process."""
    h = FACTORIES[role](tmp_path)
    try:
        run_once(h, [(topic, payload)])
    finally:
        h.close()


# ----------------------------------------------------------------------------- reject rate


def reject_corpus(role: str, n: int, seed: int = 7) -> list[tuple[str, bytes]]:
    """`n` messages every process must refuse at decode: garbage, truncation, wrong types."""
    rng = random.Random(seed)
    topic = TOPICS[role][0]
    good = pack(envelope("batch" if role != "edge" else "tele", "d0", {"low": 0, "recs": []}))
    out = []
    for i in range(n):
        k = i % 4
        if k == 0:
            payload = b"\xc1" + rng.randbytes(rng.randrange(0, 64))
        elif k == 1:
            payload = good[: rng.randrange(1, len(good))]
        elif k == 2:
            payload = good + b"\x00"
        else:
            payload = pack(envelope("tele", "d0", rng.randrange(1 << 30)))
        out.append((topic, payload))
    return out


@pytest.mark.parametrize("role", ["edge", "fog", "cloud"])
def test_reject_rate(role: str, tmp_path: Path) -> None:
    """Rejected-input handling rate through `handle()` (batches of 2,000, as the runtime takes)."""
    h = FACTORIES[role](tmp_path)
    corpus = reject_corpus(role, 20_000)
    for i in range(0, len(corpus), 2000):
        dlq, _ = h.feed(corpus[i : i + 2000])
        assert len(dlq) == 2000
    h.close()
    elapsed = h.handle_seconds
    rate = len(corpus) / elapsed
    print(f"\nreject rate {role}: {rate:,.0f} rejects/s ({len(corpus)} in {elapsed:.2f}s)")
