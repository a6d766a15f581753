"""The one module that touches msgpack: envelopes and their typed bodies, strictly validated.

Every message is a msgpack map `{v, kind, src, seq, ts, body}`. Decoding never raises anything
but `DecodeError`, whose `reason` is a short key used for counters and the dead-letter queue.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from fogline.errors import DecodeError

VERSION = 1
KINDS = (
    "tele", "batch", "ack", "status", "metrics", "dlq", "esc", "esc_reply",
    "manifest", "chunk", "model_ack",
)  # fmt: skip
MAX_CHUNK_BYTES = 4 * 1024 * 1024
MODEL_ACK_STATUSES = ("installed", "rejected")
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
MAX_SAMPLES = 100_000
MAX_FIELDS = 64
MAX_RECORDS = 10_000
_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
_ENVELOPE_KEYS = frozenset(("v", "kind", "src", "seq", "ts", "body"))
_UNPACK_LIMITS: dict[str, int] = {
    "max_bin_len": MAX_MESSAGE_BYTES,
    "max_str_len": 64 * 1024,
    "max_array_len": MAX_RECORDS * 4,
    "max_map_len": 4096,
    "max_ext_len": 0,
}


@dataclass(slots=True)  # not frozen: built for every message, and frozen costs 4x
class Telemetry:
    """Samples of one device: `values[i, j]` is field `fields[j]` of reading `first + i`."""

    device: str
    first: int
    t0: float
    dt: float
    fields: tuple[str, ...]
    values: np.ndarray  # float32, shape (n, len(fields))

    @property
    def count(self) -> int:
        """Number of readings in the batch."""
        return int(self.values.shape[0])

    @property
    def last(self) -> int:
        """Sequence number of the last reading."""
        return self.first + self.count - 1


@dataclass(slots=True)  # not frozen: built for every custody record, and frozen costs 4x
class Record:
    """One custody record: a per-stream sequence number, a kind and a plain-data body."""

    seq: int
    kind: str
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Batch:
    """Custody records sent in one message; `low` is the lowest seq the sender may still send."""

    low: int
    records: tuple[Record, ...]


@dataclass(frozen=True, slots=True)
class Ack:
    """Cumulative acknowledgement of a stream: every seq <= `hwm`, plus closed `ranges` above it."""

    stream: str
    hwm: int
    ranges: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True, slots=True)
class Escalation:
    """An edge asks the fog for a verdict on one window; `features` as `feature_names(fields)`."""

    id: str
    device: str
    first: int
    last: int
    fields: tuple[str, ...]
    features: np.ndarray  # float32, 4 * len(fields)


@dataclass(frozen=True, slots=True)
class EscalationReply:
    """The fog's verdict on an escalated window, correlated by `id`."""

    id: str
    fault: str
    confidence: float
    model: str


@dataclass(frozen=True, slots=True)
class ModelChunk:
    """Bytes `index * chunk_size ...` of version `version` of model `name`."""

    name: str
    version: int
    index: int
    data: bytes


@dataclass(frozen=True, slots=True)
class ModelAck:
    """An edge's answer to a model manifest: `installed`, or `rejected` with a reason."""

    name: str
    version: int
    status: str
    reason: str = ""
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Sealed:
    """An encrypted telemetry body: key id, 12-byte nonce, ciphertext with tag (`fogline.aead`)."""

    kid: str
    nonce: bytes
    ct: bytes


@dataclass(slots=True)  # not frozen: built for every message, and frozen costs 4x
class Envelope:
    """The common wrapper of every message."""

    kind: str
    src: str
    seq: int
    ts: float
    body: Any
    v: int = field(default=VERSION)


# --------------------------------------------------------------------------- encoding


def _pack(kind: str, src: str, seq: int, ts: float, body: Any) -> bytes:
    return msgpack.packb(
        {"v": VERSION, "kind": kind, "src": src, "seq": seq, "ts": ts, "body": body},
        use_bin_type=True,
    )


def _telemetry_body(tele: Telemetry) -> dict[str, Any]:
    values = np.ascontiguousarray(tele.values, dtype="<f4")
    return {
        "device": tele.device,
        "first": tele.first,
        "t0": tele.t0,
        "dt": tele.dt,
        "fields": list(tele.fields),
        "n": int(values.shape[0]),
        "data": values.tobytes(),
    }


def encode_telemetry(tele: Telemetry, *, seq: int, ts: float) -> bytes:
    """Encode a telemetry batch; the envelope `src` is the device id."""
    return _pack("tele", tele.device, seq, ts, _telemetry_body(tele))


def encode_telemetry_body(tele: Telemetry) -> bytes:
    """The msgpack of a telemetry body alone: the plaintext that `fogline.aead` seals."""
    return msgpack.packb(_telemetry_body(tele), use_bin_type=True)


def encode_sealed_telemetry(src: str, sealed: Sealed, *, seq: int, ts: float) -> bytes:
    """Encode telemetry whose body is sealed; the envelope stays in clear."""
    body = {"kid": sealed.kid, "nonce": sealed.nonce, "ct": sealed.ct}
    return _pack("tele", src, seq, ts, body)


def decode_telemetry_body(plaintext: bytes, src: str) -> Telemetry:
    """Validate an opened telemetry body of device `src`; raises only DecodeError."""
    try:
        body = msgpack.unpackb(plaintext, raw=False, strict_map_key=True, **_UNPACK_LIMITS)
    except Exception as exc:  # msgpack raises several types on odd input, all mean "malformed"
        raise DecodeError("malformed", f"sealed body: {type(exc).__name__}: {exc}") from exc
    return _telemetry(body, src)


def encode_batch(src: str, batch: Batch, *, seq: int, ts: float, compress: bool = True) -> bytes:
    """Encode custody records for the upstream hop.

    Compressed (the default), the records go as `zrecs`: zlib of their msgpack array. Records
    of one batch repeat the same keys and field names, so this typically halves the bytes.
    """
    recs = [[r.seq, r.kind, r.body] for r in batch.records]
    if not compress:
        return _pack("batch", src, seq, ts, {"low": batch.low, "recs": recs})
    packed = zlib.compress(msgpack.packb(recs, use_bin_type=True), 6)
    return _pack("batch", src, seq, ts, {"low": batch.low, "zrecs": packed})


def encode_ack(src: str, ack: Ack, *, seq: int, ts: float) -> bytes:
    """Encode an acknowledgement sent by the receiver `src`."""
    body = {"stream": ack.stream, "hwm": ack.hwm, "ranges": [list(r) for r in ack.ranges]}
    return _pack("ack", src, seq, ts, body)


def encode_escalation(src: str, esc: Escalation, *, seq: int, ts: float) -> bytes:
    """Encode an escalation request from edge `src`."""
    body = {
        "id": esc.id,
        "device": esc.device,
        "first": esc.first,
        "last": esc.last,
        "fields": list(esc.fields),
        "features": np.ascontiguousarray(esc.features, dtype="<f4").tobytes(),
    }
    return _pack("esc", src, seq, ts, body)


def encode_escalation_reply(src: str, reply: EscalationReply, *, seq: int, ts: float) -> bytes:
    """Encode the fog `src`'s verdict on an escalation."""
    body = {
        "id": reply.id,
        "fault": reply.fault,
        "confidence": reply.confidence,
        "model": reply.model,
    }
    return _pack("esc_reply", src, seq, ts, body)


def encode_manifest(src: str, signed: dict[str, Any], *, seq: int, ts: float) -> bytes:
    """Encode a signed model manifest (`fogline.signing.SignedManifest.to_dict()`)."""
    return _pack("manifest", src, seq, ts, signed)


def encode_chunk(src: str, chunk: ModelChunk, *, seq: int, ts: float) -> bytes:
    """Encode one chunk of a model's bytes."""
    body = {"name": chunk.name, "version": chunk.version, "index": chunk.index, "data": chunk.data}
    return _pack("chunk", src, seq, ts, body)


def encode_model_ack(src: str, ack: ModelAck, *, seq: int, ts: float) -> bytes:
    """Encode an edge's answer to a model manifest."""
    body = {
        "name": ack.name,
        "version": ack.version,
        "status": ack.status,
        "reason": ack.reason,
        "detail": ack.detail,
    }
    return _pack("model_ack", src, seq, ts, body)


def encode_plain(kind: str, src: str, body: dict[str, Any], *, seq: int, ts: float) -> bytes:
    """Encode a `status`, `metrics` or `dlq` message whose body is plain data."""
    if kind not in ("status", "metrics", "dlq"):
        raise ValueError(f"encode_plain does not encode kind {kind!r}")
    return _pack(kind, src, seq, ts, body)


def encode_record_body(body: dict[str, Any]) -> bytes:
    """Serialise one record body for storage in an outbox."""
    return msgpack.packb(body, use_bin_type=True)


def decode_record_body(data: bytes) -> dict[str, Any]:
    """Inverse of `encode_record_body` (outbox rows are trusted: written by this process)."""
    body = msgpack.unpackb(data, raw=False)
    if not isinstance(body, dict):
        raise DecodeError("wrong_type", "stored record body is not a map")
    return body


# --------------------------------------------------------------------------- decoding


def _expect(cond: bool, reason: str, detail: str | Callable[[], str]) -> None:
    """Raise DecodeError(reason, detail) unless `cond`; a costly detail is passed as a function
    (formatted only when the check fails: these checks run for every message)."""
    if not cond:
        raise DecodeError(reason, detail if isinstance(detail, str) else detail())


INT64_MAX = 2**63 - 1


def _is_int(x: Any) -> bool:
    """An integer that fits SQLite and numpy (signed 64 bits); bools are not integers here."""
    return isinstance(x, int) and not isinstance(x, bool) and -INT64_MAX - 1 <= x <= INT64_MAX


def _ints_fit(obj: Any) -> bool:
    """Whether every integer inside a decoded structure fits in signed 64 bits.

    Walks the structure with a stack, comparing exact types (msgpack makes exact ints, floats,
    strings, lists and dicts; bools are not integers here): it runs on every custody record."""
    low, high = -INT64_MAX - 1, INT64_MAX
    stack = [obj]
    while stack:
        o = stack.pop()
        t = type(o)
        if t is int:
            if not low <= o <= high:
                return False
        elif t is dict:
            stack.extend(o.keys())
            stack.extend(o.values())
        elif t is list:
            for x in o:
                tx = type(x)
                if tx is int:
                    if not low <= x <= high:
                        return False
                elif tx is dict or tx is list:
                    stack.append(x)
    return True


def _is_num(x: Any) -> bool:
    return (isinstance(x, int | float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_id(x: Any) -> bool:
    return isinstance(x, str) and 0 < len(x) <= 64 and set(x) <= _ID_CHARS


def decode(payload: bytes, *, expect: str | None = None) -> Envelope:
    """Decode and validate one message; the body is typed by kind. Raises only DecodeError."""
    _expect(isinstance(payload, bytes | bytearray), "wrong_type", "payload is not bytes")
    _expect(len(payload) <= MAX_MESSAGE_BYTES, "too_large", lambda: f"{len(payload)} bytes")
    try:
        obj = msgpack.unpackb(payload, raw=False, strict_map_key=True, **_UNPACK_LIMITS)
    except msgpack.ExtraData as exc:
        raise DecodeError("malformed", "trailing bytes after the message") from exc
    except (ValueError, msgpack.UnpackException) as exc:
        # OutOfData, FormatError, StackError and limit violations all derive from these.
        reason = (
            "truncated" if "incomplete" in str(exc) or "OutOfData" in repr(exc) else "malformed"
        )
        raise DecodeError(reason, f"msgpack: {exc}") from exc
    except Exception as exc:
        raise DecodeError("malformed", f"msgpack: {type(exc).__name__}: {exc}") from exc
    _expect(isinstance(obj, dict), "wrong_type", "envelope is not a map")
    _expect(
        obj.keys() == _ENVELOPE_KEYS,
        "wrong_type",
        lambda: f"envelope keys {sorted(map(repr, obj))}",
    )
    _expect(
        obj["v"] == VERSION and _is_int(obj["v"]), "bad_version", lambda: f"version {obj['v']!r}"
    )
    kind = obj["kind"]
    _expect(kind in KINDS, "unknown_kind", lambda: f"kind {kind!r}")
    if expect is not None:
        _expect(kind == expect, "unexpected_kind", lambda: f"expected {expect!r}, got {kind!r}")
    _expect(_is_id(obj["src"]), "wrong_type", lambda: f"src {obj['src']!r}")
    _expect(_is_int(obj["seq"]) and obj["seq"] >= 0, "wrong_type", "seq is not a natural number")
    _expect(_is_num(obj["ts"]), "wrong_type", "ts is not a finite number")
    body = _BODY_DECODERS[kind](obj["body"], obj["src"])
    return Envelope(kind=kind, src=obj["src"], seq=obj["seq"], ts=float(obj["ts"]), body=body)


_SEALED_KEYS = frozenset(("kid", "nonce", "ct"))
_TELEMETRY_KEYS = frozenset(("device", "first", "t0", "dt", "fields", "n", "data"))
NONCE_BYTES = 12


def _tele_or_sealed(body: Any, src: str) -> Telemetry | Sealed:
    """A clear telemetry body, or the outer structure of a sealed one (opened by the edge)."""
    if not (isinstance(body, dict) and body.keys() == _SEALED_KEYS):
        return _telemetry(body, src)
    _expect(_is_id(body["kid"]), "wrong_type", "kid is not an id")
    nonce, ct = body["nonce"], body["ct"]
    _expect(isinstance(nonce, bytes) and isinstance(ct, bytes), "wrong_type", "nonce/ct")
    _expect(len(nonce) == NONCE_BYTES, "bad_length", f"{len(nonce)} nonce bytes")
    _expect(len(ct) >= 16, "bad_length", f"{len(ct)} ciphertext bytes (shorter than a tag)")
    return Sealed(kid=body["kid"], nonce=nonce, ct=ct)


def _telemetry(body: Any, src: str) -> Telemetry:
    _expect(isinstance(body, dict), "wrong_type", "telemetry body is not a map")
    _expect(
        body.keys() == _TELEMETRY_KEYS,
        "wrong_type",
        lambda: f"telemetry keys {sorted(map(repr, body))}",
    )
    _expect(_is_id(body["device"]), "wrong_type", "device is not an id")
    _expect(body["device"] == src, "device_mismatch", "body device differs from envelope src")
    _expect(_is_int(body["first"]) and body["first"] >= 0, "wrong_type", "first")
    _expect(_is_num(body["t0"]) and _is_num(body["dt"]), "wrong_type", "t0/dt")
    fields = body["fields"]
    _expect(isinstance(fields, list) and 0 < len(fields) <= MAX_FIELDS, "wrong_type", "fields")
    _expect(all(isinstance(f, str) and 0 < len(f) <= 64 for f in fields), "wrong_type", "fields")
    _expect(len(set(fields)) == len(fields), "wrong_type", "duplicate field names")
    n = body["n"]
    _expect(_is_int(n) and 0 < n <= MAX_SAMPLES, "too_large" if _is_int(n) else "wrong_type", "n")
    # The reading after the last is a restart point in SQLite: it must fit in 64 bits too.
    _expect(body["first"] + n <= INT64_MAX, "out_of_range", "reading numbers beyond 64 bits")
    data = body["data"]
    _expect(isinstance(data, bytes), "wrong_type", "data is not bytes")
    _expect(
        len(data) == n * len(fields) * 4, "bad_length", lambda: f"{len(data)} data bytes for n={n}"
    )
    values = np.frombuffer(data, dtype="<f4").reshape(n, len(fields))
    return Telemetry(
        device=body["device"],
        first=body["first"],
        t0=float(body["t0"]),
        dt=float(body["dt"]),
        fields=tuple(fields),
        values=values,
    )


def _inflate(data: Any) -> Any:
    """Decompress and unpack `zrecs`, refusing more than MAX_MESSAGE_BYTES (no zip bombs)."""
    _expect(isinstance(data, bytes), "wrong_type", "zrecs is not bytes")
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(data, MAX_MESSAGE_BYTES)
    except zlib.error as exc:
        raise DecodeError("malformed", f"zrecs: {exc}") from exc
    _expect(not inflater.unconsumed_tail, "too_large", "zrecs inflates beyond the size limit")
    _expect(inflater.eof, "truncated", "zrecs ends early")
    try:
        return msgpack.unpackb(raw, raw=False, strict_map_key=True, **_UNPACK_LIMITS)
    except Exception as exc:  # msgpack raises several types on odd input, all mean "malformed"
        raise DecodeError("malformed", f"zrecs msgpack: {type(exc).__name__}: {exc}") from exc


def _batch(body: Any, src: str) -> Batch:
    ok = isinstance(body, dict) and set(body) in ({"low", "recs"}, {"low", "zrecs"})
    _expect(ok, "wrong_type", "batch body")
    _expect(_is_int(body["low"]) and body["low"] >= 0, "wrong_type", "low")
    recs = body["recs"] if "recs" in body else _inflate(body["zrecs"])
    _expect(isinstance(recs, list) and len(recs) <= MAX_RECORDS, "wrong_type", "recs")
    out = []
    for r in recs:
        _expect(
            isinstance(r, list) and len(r) == 3, "wrong_type", "record is not [seq, kind, body]"
        )
        seq, kind, rbody = r
        _expect(_is_int(seq) and seq >= 0, "wrong_type", "record seq")
        _expect(isinstance(kind, str) and 0 < len(kind) <= 32, "wrong_type", "record kind")
        _expect(isinstance(rbody, dict), "wrong_type", "record body is not a map")
        _expect(_ints_fit(rbody), "out_of_range", "an integer in a record exceeds 64 bits")
        out.append(Record(seq, kind, rbody))
    return Batch(low=body["low"], records=tuple(out))


def _ack(body: Any, src: str) -> Ack:
    _expect(
        isinstance(body, dict) and set(body) == {"stream", "hwm", "ranges"}, "wrong_type", "ack"
    )
    _expect(_is_id(body["stream"]), "wrong_type", "ack stream")
    _expect(_is_int(body["hwm"]) and body["hwm"] >= -1, "wrong_type", "ack hwm")
    ranges = body["ranges"]
    _expect(isinstance(ranges, list) and len(ranges) <= MAX_RECORDS, "wrong_type", "ack ranges")
    out: list[tuple[int, int]] = []
    for r in ranges:
        ok = isinstance(r, list) and len(r) == 2 and all(_is_int(x) for x in r) and r[0] <= r[1]
        _expect(ok, "wrong_type", "ack range")
        out.append((r[0], r[1]))
    return Ack(stream=body["stream"], hwm=body["hwm"], ranges=tuple(out))


def _escalation(body: Any, src: str) -> Escalation:
    keys = {"id", "device", "first", "last", "fields", "features"}
    _expect(isinstance(body, dict) and set(body) == keys, "wrong_type", "escalation keys")
    _expect(isinstance(body["id"], str) and 0 < len(body["id"]) <= 200, "wrong_type", "id")
    _expect(_is_id(body["device"]), "wrong_type", "device")
    first, last = body["first"], body["last"]
    ok = _is_int(first) and _is_int(last) and 0 <= first <= last
    _expect(ok, "wrong_type", "first/last")
    fields = body["fields"]
    _expect(isinstance(fields, list) and 0 < len(fields) <= MAX_FIELDS, "wrong_type", "fields")
    _expect(all(isinstance(f, str) and 0 < len(f) <= 64 for f in fields), "wrong_type", "fields")
    data = body["features"]
    _expect(isinstance(data, bytes), "wrong_type", "features is not bytes")
    _expect(len(data) == 16 * len(fields), "bad_length", f"{len(data)} feature bytes")
    features = np.frombuffer(data, dtype="<f4")
    _expect(bool(np.isfinite(features).all()), "non_finite", "features")
    return Escalation(body["id"], body["device"], first, last, tuple(fields), features)


def _escalation_reply(body: Any, src: str) -> EscalationReply:
    keys = {"id", "fault", "confidence", "model"}
    _expect(isinstance(body, dict) and set(body) == keys, "wrong_type", "reply keys")
    _expect(isinstance(body["id"], str) and 0 < len(body["id"]) <= 200, "wrong_type", "id")
    _expect(isinstance(body["fault"], str) and 0 < len(body["fault"]) <= 32, "wrong_type", "fault")
    conf = body["confidence"]
    _expect(_is_num(conf) and 0.0 <= conf <= 1.0, "wrong_type", "confidence")
    _expect(isinstance(body["model"], str) and len(body["model"]) <= 64, "wrong_type", "model")
    return EscalationReply(body["id"], body["fault"], float(conf), body["model"])


def _manifest(body: Any, src: str) -> dict[str, Any]:
    # The fields and signatures are checked by `fogline.signing` (reason `malformed` and others).
    keys = {"manifest", "signature", "delegation"}
    _expect(isinstance(body, dict) and set(body) == keys, "wrong_type", "manifest keys")
    return body


def _chunk(body: Any, src: str) -> ModelChunk:
    keys = {"name", "version", "index", "data"}
    _expect(isinstance(body, dict) and set(body) == keys, "wrong_type", "chunk keys")
    _expect(_is_id(body["name"]), "wrong_type", "name")
    _expect(_is_int(body["version"]) and body["version"] >= 1, "wrong_type", "version")
    _expect(_is_int(body["index"]) and 0 <= body["index"] < 1_000_000, "wrong_type", "index")
    data = body["data"]
    _expect(isinstance(data, bytes), "wrong_type", "data is not bytes")
    _expect(0 < len(data) <= MAX_CHUNK_BYTES, "bad_length", f"{len(data)} chunk bytes")
    return ModelChunk(body["name"], body["version"], body["index"], data)


def _model_ack(body: Any, src: str) -> ModelAck:
    keys = {"name", "version", "status", "reason", "detail"}
    _expect(isinstance(body, dict) and set(body) == keys, "wrong_type", "model ack keys")
    _expect(_is_id(body["name"]), "wrong_type", "name")
    _expect(_is_int(body["version"]) and body["version"] >= 0, "wrong_type", "version")
    _expect(body["status"] in MODEL_ACK_STATUSES, "wrong_type", f"status {body['status']!r}")
    for k in ("reason", "detail"):
        _expect(isinstance(body[k], str) and len(body[k]) <= 1000, "wrong_type", k)
    return ModelAck(body["name"], body["version"], body["status"], body["reason"], body["detail"])


def _plain(body: Any, src: str) -> dict[str, Any]:
    _expect(isinstance(body, dict), "wrong_type", "body is not a map")
    return body


_BODY_DECODERS: dict[str, Callable[[Any, str], Any]] = {
    "tele": _tele_or_sealed,
    "batch": _batch,
    "ack": _ack,
    "status": _plain,
    "metrics": _plain,
    "dlq": _plain,
    "esc": _escalation,
    "esc_reply": _escalation_reply,
    "manifest": _manifest,
    "chunk": _chunk,
    "model_ack": _model_ack,
}
