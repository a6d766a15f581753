"""The codec: what goes in comes out, and anything malformed is rejected with a reason."""

from __future__ import annotations

import math
import random
from typing import Any

import msgpack
import numpy as np
import pytest

from fogline import codec
from fogline.codec import Ack, Batch, Record, Telemetry
from fogline.errors import DecodeError


def _telemetry(n: int = 4, fields: tuple[str, ...] = ("temp", "vib", "rpm")) -> Telemetry:
    values = np.arange(n * len(fields), dtype=np.float32).reshape(n, len(fields)) * 0.5 - 3.25
    return Telemetry(
        device="pump-7", first=1000, t0=1_700_000_000.0, dt=0.01, fields=fields, values=values
    )


def _envelope(**overrides: Any) -> dict[str, Any]:
    """A valid status envelope as plain data, with some keys replaced."""
    env: dict[str, Any] = {
        "v": 1,
        "kind": "status",
        "src": "edge-1",
        "seq": 3,
        "ts": 1_700_000_000.5,
        "body": {"state": "online"},
    }
    env.update(overrides)
    return env


def _tele_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "device": "pump-7",
        "first": 0,
        "t0": 0.0,
        "dt": 0.1,
        "fields": ["a", "b"],
        "n": 2,
        "data": np.zeros((2, 2), dtype="<f4").tobytes(),
    }
    body.update(overrides)
    return body


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _reason(payload: bytes, **kwargs: Any) -> str:
    with pytest.raises(DecodeError) as info:
        codec.decode(payload, **kwargs)
    return info.value.reason


# --------------------------------------------------------------------------- round trips


def test_telemetry_round_trip_keeps_values_and_reading_numbers() -> None:
    tele = _telemetry(n=5)
    env = codec.decode(codec.encode_telemetry(tele, seq=42, ts=123.5))

    assert (env.kind, env.src, env.seq, env.ts, env.v) == ("tele", "pump-7", 42, 123.5, 1)
    got = env.body
    assert isinstance(got, Telemetry)
    assert got.values.dtype == np.float32
    assert got.values.shape == (5, 3)
    np.testing.assert_array_equal(got.values, tele.values)
    assert got.fields == ("temp", "vib", "rpm")
    assert (got.device, got.t0, got.dt) == ("pump-7", 1_700_000_000.0, 0.01)
    assert (got.first, got.last, got.count) == (1000, 1004, 5)


def test_telemetry_from_float64_values_is_sent_as_float32() -> None:
    values = np.array([[0.1, 1e10], [-2.5, 3.0]], dtype=np.float64)
    tele = Telemetry(device="d1", first=0, t0=0.0, dt=1.0, fields=("x", "y"), values=values)
    got = codec.decode(codec.encode_telemetry(tele, seq=0, ts=0.0)).body
    assert got.values.dtype == np.float32
    np.testing.assert_array_equal(got.values, values.astype(np.float32))


def test_single_reading_telemetry_has_first_equal_last() -> None:
    tele = _telemetry(n=1, fields=("only",))
    got = codec.decode(codec.encode_telemetry(tele, seq=0, ts=1.0)).body
    assert (got.first, got.last, got.count) == (1000, 1000, 1)


def test_batch_round_trip() -> None:
    batch = Batch(
        low=7,
        records=(
            Record(seq=7, kind="event", body={"device": "d1", "first": 1, "last": 9, "score": 0.9}),
            Record(seq=9, kind="summary", body={"device": "d2", "stats": [1.0, 2.0], "ok": True}),
            Record(seq=12, kind="drop", body={"reason": "outbox_full", "kinds": {"train": 3}}),
        ),
    )
    env = codec.decode(codec.encode_batch("edge-1", batch, seq=5, ts=10.0), expect="batch")
    assert (env.kind, env.src, env.seq, env.ts) == ("batch", "edge-1", 5, 10.0)
    assert env.body == batch


def test_empty_batch_round_trip() -> None:
    batch = Batch(low=3, records=())
    assert codec.decode(codec.encode_batch("e", batch, seq=0, ts=0.0)).body == batch


def test_ack_round_trip() -> None:
    ack = Ack(stream="edge-1", hwm=41, ranges=((44, 50), (52, 52)))
    env = codec.decode(codec.encode_ack("fog-1", ack, seq=8, ts=2.0), expect="ack")
    assert (env.kind, env.src) == ("ack", "fog-1")
    assert env.body == ack


def test_ack_of_an_empty_stream_round_trips() -> None:
    ack = Ack(stream="edge-1", hwm=-1)
    assert codec.decode(codec.encode_ack("fog-1", ack, seq=0, ts=0.0)).body == ack


@pytest.mark.parametrize("kind", ["status", "metrics", "dlq"])
def test_plain_kinds_round_trip(kind: str) -> None:
    body = {"state": "online", "pid": 12, "rates": {"in": 1.5}, "raw": b"\x00\x01", "tags": ["a"]}
    env = codec.decode(codec.encode_plain(kind, "edge-1", body, seq=1, ts=3.0), expect=kind)
    assert (env.kind, env.src, env.seq, env.ts) == (kind, "edge-1", 1, 3.0)
    assert env.body == body


def test_encode_plain_refuses_typed_kinds() -> None:
    with pytest.raises(ValueError):
        codec.encode_plain("tele", "d1", {}, seq=0, ts=0.0)


def test_record_body_storage_round_trip() -> None:
    body = {"device": "d1", "first": 0, "last": 9, "vals": [1.5, -2.0], "blob": b"\xff"}
    assert codec.decode_record_body(codec.encode_record_body(body)) == body


# --------------------------------------------------------------------------- rejects


def test_every_prefix_of_a_valid_message_is_rejected_as_truncated() -> None:
    payload = codec.encode_telemetry(_telemetry(), seq=1, ts=2.0)
    for cut in range(len(payload)):
        try:
            codec.decode(payload[:cut])
        except DecodeError as exc:
            assert exc.reason == "truncated", (cut, exc)
        else:
            pytest.fail(f"a {cut}-byte prefix of a {len(payload)}-byte message decoded")


def test_every_prefix_of_a_batch_is_rejected() -> None:
    batch = Batch(low=0, records=(Record(0, "event", {"a": [1, 2, {"b": "c"}]}),))
    payload = codec.encode_batch("e1", batch, seq=0, ts=0.0)
    for cut in range(len(payload)):
        with pytest.raises(DecodeError):
            codec.decode(payload[:cut])


def test_empty_payload_is_truncated() -> None:
    assert _reason(b"") == "truncated"


def test_trailing_garbage_is_malformed() -> None:
    payload = codec.encode_plain("status", "e1", {"state": "online"}, seq=0, ts=0.0)
    assert _reason(payload + b"\x00") == "malformed"
    assert _reason(payload + payload) == "malformed"


def test_payload_that_is_not_bytes_is_rejected() -> None:
    assert _reason("not bytes") == "wrong_type"  # type: ignore[arg-type]


def test_oversized_payload_is_rejected_before_unpacking() -> None:
    assert _reason(b"\xc0" * (codec.MAX_MESSAGE_BYTES + 1)) == "too_large"


@pytest.mark.parametrize("obj", [[1, "status", "e", 0, 0.0, {}], 7, "text", None, b"raw"])
def test_envelope_that_is_not_a_map_is_rejected(obj: Any) -> None:
    assert _reason(_pack(obj)) == "wrong_type"


@pytest.mark.parametrize("missing", ["v", "kind", "src", "seq", "ts", "body"])
def test_envelope_missing_a_key_is_rejected(missing: str) -> None:
    env = _envelope()
    del env[missing]
    assert _reason(_pack(env)) == "wrong_type"


def test_envelope_with_an_extra_key_is_rejected() -> None:
    assert _reason(_pack({**_envelope(), "extra": 1})) == "wrong_type"


def test_envelope_with_mixed_str_and_bytes_keys_is_rejected_with_decode_error() -> None:
    # The key set differs from the expected one, so this must be a DecodeError, not a TypeError
    # from building the error message.
    env = _envelope()
    env[b"extra"] = 1
    assert _reason(_pack(env)) == "wrong_type"


@pytest.mark.parametrize("version", [2, 0, "1", 1.0, True, None])
def test_unknown_version_is_rejected(version: Any) -> None:
    assert _reason(_pack(_envelope(v=version))) == "bad_version"


@pytest.mark.parametrize("kind", ["telemetry", "", "STATUS", 3, None])
def test_unknown_kind_is_rejected(kind: Any) -> None:
    assert _reason(_pack(_envelope(kind=kind))) == "unknown_kind"


@pytest.mark.parametrize("seq", [True, False, -1, 1.0, "3", None])
def test_seq_that_is_not_a_natural_number_is_rejected(seq: Any) -> None:
    assert _reason(_pack(_envelope(seq=seq))) == "wrong_type"


@pytest.mark.parametrize("ts", [math.nan, math.inf, -math.inf, True, "1.0", None])
def test_ts_that_is_not_a_finite_number_is_rejected(ts: Any) -> None:
    assert _reason(_pack(_envelope(ts=ts))) == "wrong_type"


def test_integer_ts_is_accepted_as_float() -> None:
    env = codec.decode(_pack(_envelope(ts=17)))
    assert env.ts == 17.0
    assert isinstance(env.ts, float)


@pytest.mark.parametrize("src", ["", "a/b", "+", "#", "x" * 65, 5, None])
def test_src_that_is_not_an_id_is_rejected(src: Any) -> None:
    assert _reason(_pack(_envelope(src=src))) == "wrong_type"


@pytest.mark.parametrize("body", [[], "x", None, 1])
def test_plain_body_that_is_not_a_map_is_rejected(body: Any) -> None:
    assert _reason(_pack(_envelope(body=body))) == "wrong_type"


def _tele(body: dict[str, Any], src: str = "pump-7") -> bytes:
    return _pack(_envelope(kind="tele", src=src, body=body))


def test_valid_hand_built_telemetry_decodes() -> None:
    # Guards the reject tests below: each changes exactly one thing of this message.
    assert codec.decode(_tele(_tele_body())).body.count == 2


def test_telemetry_body_with_mixed_str_and_bytes_keys_is_rejected_with_decode_error() -> None:
    body: dict[Any, Any] = _tele_body()
    body[b"unit"] = "C"
    assert _reason(_tele(body)) == "wrong_type"


def test_telemetry_device_other_than_src_is_device_mismatch() -> None:
    assert _reason(_tele(_tele_body(device="pump-8"))) == "device_mismatch"


def test_telemetry_data_length_not_matching_n_is_bad_length() -> None:
    data = np.zeros((2, 2), dtype="<f4").tobytes()
    assert _reason(_tele(_tele_body(data=data[:-4]))) == "bad_length"
    assert _reason(_tele(_tele_body(data=data + b"\0\0\0\0"))) == "bad_length"
    assert _reason(_tele(_tele_body(n=3))) == "bad_length"
    assert _reason(_tele(_tele_body(fields=["a", "b", "c"]))) == "bad_length"


def test_telemetry_with_more_than_max_samples_is_too_large() -> None:
    n = codec.MAX_SAMPLES + 1
    body = _tele_body(fields=["a"], n=n, data=np.zeros(n, dtype="<f4").tobytes())
    assert _reason(_tele(body)) == "too_large"


def test_telemetry_with_exactly_max_samples_decodes() -> None:
    n = codec.MAX_SAMPLES
    body = _tele_body(fields=["a"], n=n, data=np.ones(n, dtype="<f4").tobytes())
    assert codec.decode(_tele(body)).body.count == n


def test_telemetry_with_too_many_fields_is_rejected() -> None:
    fields = [f"f{i}" for i in range(codec.MAX_FIELDS + 1)]
    data = np.zeros((1, len(fields)), dtype="<f4").tobytes()
    assert _reason(_tele(_tele_body(fields=fields, n=1, data=data))) == "wrong_type"


def test_telemetry_with_duplicate_field_names_is_rejected() -> None:
    assert _reason(_tele(_tele_body(fields=["a", "a"]))) == "wrong_type"


@pytest.mark.parametrize(
    "change",
    [
        {"fields": []},
        {"fields": "ab"},
        {"fields": ["a", ""]},
        {"fields": ["a", 1]},
        {"first": -1},
        {"first": True},
        {"n": True},
        {"n": 2.0},
        {"t0": math.nan},
        {"dt": math.inf},
        {"data": "text"},
        {"data": [0.0, 0.0, 0.0, 0.0]},
    ],
)
def test_telemetry_with_a_wrong_field_type_is_rejected(change: dict[str, Any]) -> None:
    assert _reason(_tele(_tele_body(**change))) == "wrong_type"


def test_telemetry_with_missing_or_extra_body_key_is_rejected() -> None:
    body = _tele_body()
    del body["dt"]
    assert _reason(_tele(body)) == "wrong_type"
    assert _reason(_tele({**_tele_body(), "unit": "C"})) == "wrong_type"


def _batch(body: Any) -> bytes:
    return _pack(_envelope(kind="batch", body=body))


@pytest.mark.parametrize(
    "rec",
    [
        [0, "event"],
        [0, "event", {}, 1],
        {"seq": 0, "kind": "event", "body": {}},
        [-1, "event", {}],
        [True, "event", {}],
        [0, "", {}],
        [0, "k" * 33, {}],
        [0, 5, {}],
        [0, "event", [1]],
        [0, "event", None],
    ],
)
def test_batch_record_that_is_not_seq_kind_body_is_rejected(rec: Any) -> None:
    assert _reason(_batch({"low": 0, "recs": [[1, "event", {}], rec]})) == "wrong_type"


@pytest.mark.parametrize(
    "body", [{"low": 0}, {"low": -1, "recs": []}, {"low": 0, "recs": {}}, [0, []]]
)
def test_batch_body_with_wrong_shape_is_rejected(body: Any) -> None:
    assert _reason(_batch(body)) == "wrong_type"


def _ack(body: Any) -> bytes:
    return _pack(_envelope(kind="ack", body=body))


def test_ack_range_with_lo_above_hi_is_rejected() -> None:
    good = {"stream": "edge-1", "hwm": 3, "ranges": [[5, 6]]}
    assert codec.decode(_ack(good)).body == Ack("edge-1", 3, ((5, 6),))
    assert _reason(_ack({**good, "ranges": [[5, 6], [9, 8]]})) == "wrong_type"


@pytest.mark.parametrize(
    "change",
    [
        {"hwm": -2},
        {"hwm": True},
        {"stream": "a/b"},
        {"ranges": [[1, 2, 3]]},
        {"ranges": [[1.0, 2]]},
        {"ranges": [5]},
    ],
)
def test_ack_with_wrong_fields_is_rejected(change: dict[str, Any]) -> None:
    assert _reason(_ack({"stream": "edge-1", "hwm": 3, "ranges": [], **change})) == "wrong_type"


def test_expecting_ack_but_getting_telemetry_is_unexpected_kind() -> None:
    payload = codec.encode_telemetry(_telemetry(), seq=0, ts=0.0)
    assert _reason(payload, expect="ack") == "unexpected_kind"


def test_expect_accepts_the_matching_kind() -> None:
    payload = codec.encode_telemetry(_telemetry(), seq=0, ts=0.0)
    assert codec.decode(payload, expect="tele").kind == "tele"


# --------------------------------------------------------------------------- fuzz


def _decodes_or_decode_error(payload: bytes) -> bool:
    """True when `payload` decodes, False when it is rejected; any other exception escapes."""
    try:
        codec.decode(payload)
    except DecodeError:
        return False
    return True


def test_random_bytes_only_ever_raise_decode_error() -> None:
    rng = random.Random(20240601)
    for _ in range(2000):
        payload = rng.randbytes(rng.randint(0, 64))
        _decodes_or_decode_error(payload)


def test_single_byte_mutations_only_ever_raise_decode_error() -> None:
    rng = random.Random(7)
    valid = [
        codec.encode_telemetry(_telemetry(n=3), seq=1, ts=2.0),
        codec.encode_batch(
            "edge-1",
            Batch(low=0, records=(Record(0, "event", {"device": "d", "first": 0, "last": 3}),)),
            seq=1,
            ts=1.0,
        ),
        codec.encode_ack("fog-1", Ack("edge-1", 3, ((5, 6),)), seq=1, ts=1.0),
        codec.encode_plain("status", "edge-1", {"state": "online"}, seq=1, ts=1.0),
    ]
    decoded = 0
    for i in range(2000):
        payload = bytearray(valid[i % len(valid)])
        payload[rng.randrange(len(payload))] = rng.randrange(256)
        decoded += _decodes_or_decode_error(bytes(payload))
    # Some mutations (inside float data, say) leave a valid message: both outcomes occur.
    assert 0 < decoded < 2000


def test_compressed_batches_round_trip_and_are_smaller() -> None:
    body = {"edge": "e0", "device": "d1", "fields": ["vib_rms", "temp_motor"], "mean": [1.0, 2.0]}
    batch = codec.Batch(
        low=3, records=tuple(codec.Record(s, "summary", body) for s in range(3, 60))
    )
    packed = codec.encode_batch("e0", batch, seq=1, ts=1.0)
    plain = codec.encode_batch("e0", batch, seq=1, ts=1.0, compress=False)
    assert len(packed) < len(plain) / 3
    for payload in (packed, plain):
        assert codec.decode(payload, expect="batch").body == batch


def _zbatch(zrecs: bytes) -> bytes:
    env = {"v": 1, "kind": "batch", "src": "e0", "seq": 1, "ts": 1.0,
           "body": {"low": 0, "zrecs": zrecs}}  # fmt: skip
    return msgpack.packb(env, use_bin_type=True)


def test_compressed_batches_refuse_bombs_and_damage() -> None:
    import zlib

    bomb = zlib.compress(msgpack.packb([[0, "summary", {"x": "a" * (9 * 1024 * 1024)}]]), 9)
    assert len(bomb) < 100_000
    with pytest.raises(codec.DecodeError) as err:
        codec.decode(_zbatch(bomb))
    assert err.value.reason == "too_large"
    good = zlib.compress(msgpack.packb([[0, "summary", {}]]))
    for damaged, reason in [(b"not zlib", "malformed"), (good[:-6], "truncated")]:
        with pytest.raises(codec.DecodeError) as err:
            codec.decode(_zbatch(damaged))
        assert err.value.reason == reason
