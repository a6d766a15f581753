"""Sealed telemetry: round trip, tampering of every kind refused, rotation, key files."""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import pytest

from fogline import aead, codec
from fogline.codec import Sealed, Telemetry
from fogline.errors import DecodeError

TOPIC = "fl/v1/dev/e0/d00001/tele"


def _tele(device: str = "d00001", first: int = 40) -> Telemetry:
    values = np.arange(21, dtype="<f4").reshape(3, 7)
    fields = tuple(f"f{i}" for i in range(7))
    return Telemetry(device=device, first=first, t0=1.7e9, dt=6.0, fields=fields, values=values)


@pytest.fixture
def store(tmp_path: Path) -> aead.KeyStore:
    aead.provision(tmp_path / "aead", ["d00001", "d00002"])
    return aead.KeyStore(tmp_path / "aead")


def _sealed(store: aead.KeyStore, device: str = "d00001", topic: str = TOPIC) -> bytes:
    kid, key = store.newest(device)
    return aead.seal_telemetry(_tele(device), kid, key, topic=topic, seq=7, ts=1.7e9)


def _open(store: aead.KeyStore, payload: bytes, topic: str = TOPIC) -> Telemetry:
    return aead.open_telemetry(store, codec.decode(payload, expect="tele"), topic=topic)


def test_round_trip(store: aead.KeyStore) -> None:
    payload = _sealed(store)
    env = codec.decode(payload, expect="tele")
    assert (env.src, env.seq) == ("d00001", 7)
    assert isinstance(env.body, Sealed) and len(env.body.nonce) == aead.NONCE_BYTES
    got = _open(store, payload)
    want = _tele()
    assert (got.device, got.first, got.fields) == (want.device, want.first, want.fields)
    assert np.array_equal(got.values, want.values)
    # The readings are not visible in the message.
    assert want.values.tobytes() not in payload


def test_seal_and_open_primitives() -> None:
    key = bytes(range(32))
    ctx = {"src": "d1", "seq": 3, "topic": "t", "key_id": "d1.1"}
    nonce, ct = aead.seal(key, b"hello", **ctx)  # type: ignore[arg-type]
    assert len(nonce) == 12 and len(ct) == len(b"hello") + 16
    assert aead.open_(key, nonce, ct, **ctx) == b"hello"  # type: ignore[arg-type]
    assert aead.associated_data(src="d1", seq=3, topic="t", key_id="d1.1") == b"d1|3|t|d1.1"
    # A fresh random nonce per message: the same plaintext never gives the same ciphertext.
    assert aead.seal(key, b"hello", **ctx) != aead.seal(key, b"hello", **ctx)  # type: ignore[arg-type]


def test_every_flipped_ciphertext_byte_is_refused(store: aead.KeyStore) -> None:
    kid, key = store.newest("d00001")
    plaintext = codec.encode_telemetry_body(_tele())
    ctx = {"src": "d00001", "seq": 7, "topic": TOPIC, "key_id": kid}
    nonce, ct = aead.seal(key, plaintext, **ctx)  # type: ignore[arg-type]
    accepted = 0
    attempts = 0
    for i in range(len(ct)):
        for mask in (0x01, 0x80, 0xFF):
            bad = bytearray(ct)
            bad[i] ^= mask
            attempts += 1
            try:
                aead.open_(key, nonce, bytes(bad), **ctx)  # type: ignore[arg-type]
                accepted += 1
            except DecodeError as exc:
                assert exc.reason == "bad_tag"
    for i in range(len(nonce)):
        bad = bytearray(nonce)
        bad[i] ^= 0x01
        attempts += 1
        with pytest.raises(DecodeError, match="bad_tag"):
            aead.open_(key, bytes(bad), ct, **ctx)  # type: ignore[arg-type]
    for cut in (ct[:-1], ct[1:], ct + b"\0", b""):
        attempts += 1
        with pytest.raises(DecodeError, match="bad_tag"):
            aead.open_(key, nonce, cut, **ctx)  # type: ignore[arg-type]
    assert attempts > 3 * len(ct) and accepted == 0


@pytest.mark.parametrize(
    "change",
    [
        {"src": "d00002"},
        {"src": "d0000"},
        {"seq": 8},
        {"seq": 6},
        {"topic": "fl/v1/dev/e1/d00001/tele"},
        {"topic": TOPIC + " "},
        {"key_id": "d00001.2"},
    ],
)
def test_any_change_of_the_associated_data_is_refused(
    store: aead.KeyStore, change: dict[str, object]
) -> None:
    kid, key = store.newest("d00001")
    ctx: dict[str, object] = {"src": "d00001", "seq": 7, "topic": TOPIC, "key_id": kid}
    nonce, ct = aead.seal(key, b"readings", **ctx)  # type: ignore[arg-type]
    with pytest.raises(DecodeError) as info:
        aead.open_(key, nonce, ct, **{**ctx, **change})  # type: ignore[arg-type]
    assert info.value.reason == "bad_tag"


def test_tampered_envelopes_are_refused_end_to_end(store: aead.KeyStore) -> None:
    """Edit the clear envelope of a real sealed message: 0 accepted out of all attempts."""
    import msgpack

    payload = _sealed(store)
    outer = msgpack.unpackb(payload, raw=False)
    variants: list[tuple[bytes, str]] = []
    for field, value in (("src", "d00002"), ("seq", 8)):
        variants.append((msgpack.packb({**outer, field: value}), TOPIC))
    kid_other = store.newest("d00002")[0]
    variants.append((msgpack.packb({**outer, "body": {**outer["body"], "kid": kid_other}}), TOPIC))
    variants.append((payload, "fl/v1/dev/e0/d00002/tele"))  # moved to another topic
    accepted = 0
    for data, topic in variants:
        try:
            _open(store, data, topic)
            accepted += 1
        except DecodeError as exc:
            assert exc.reason in ("bad_tag", "unknown_key"), exc
    assert accepted == 0


def test_another_devices_key_is_refused(store: aead.KeyStore) -> None:
    kid1, _key1 = store.newest("d00001")
    kid2, key2 = store.newest("d00002")
    # d00002's key under d00001's key id: authentication fails.
    forged = aead.seal_telemetry(_tele("d00001"), kid1, key2, topic=TOPIC, seq=7, ts=1.0)
    with pytest.raises(DecodeError) as info:
        _open(store, forged)
    assert info.value.reason == "bad_tag"
    # d00002's key and key id on d00001's telemetry: not one of d00001's keys.
    forged = aead.seal_telemetry(_tele("d00001"), kid2, key2, topic=TOPIC, seq=7, ts=1.0)
    with pytest.raises(DecodeError) as info:
        _open(store, forged)
    assert info.value.reason == "unknown_key"


def test_unknown_key_id(store: aead.KeyStore, tmp_path: Path) -> None:
    other = aead.KeyStore(tmp_path / "elsewhere")
    aead.provision(tmp_path / "elsewhere", ["d00001"])
    other.reload()
    payload = _sealed(other)  # d00001.1 of another folder: same id, different key
    with pytest.raises(DecodeError, match="bad_tag"):
        _open(store, payload)
    kid, key = "d00001.9", other.newest("d00001")[1]
    payload = aead.seal_telemetry(_tele(), kid, key, topic=TOPIC, seq=7, ts=1.0)
    with pytest.raises(DecodeError) as info:
        _open(store, payload)
    assert info.value.reason == "unknown_key"


def test_rotation_keeps_old_keys_until_removed(tmp_path: Path) -> None:
    folder = tmp_path / "aead"
    aead.provision(folder, ["d00001"])
    old_store = aead.KeyStore(folder)
    old = _sealed(old_store)
    written = aead.provision(folder, ["d00001"], rotate=True)
    assert [p.name for p in written] == ["d00001.2.key"]
    edge = aead.KeyStore(folder)
    assert edge.key_ids("d00001") == ["d00001.1", "d00001.2"]
    new = _sealed(edge)
    assert codec.decode(new).body.kid == "d00001.2"  # the sim seals with the newest
    assert codec.decode(old).body.kid == "d00001.1"
    _open(edge, old)
    _open(edge, new)
    # Retiring the old key: its file removed, the edge's store refreshed.
    (folder / "d00001.1.key").unlink()
    assert edge.refresh()
    with pytest.raises(DecodeError) as info:
        _open(edge, old)
    assert info.value.reason == "unknown_key"
    _open(edge, new)
    assert not edge.refresh()  # nothing changed since


def test_keys_are_random_distinct_and_private(tmp_path: Path) -> None:
    folder = tmp_path / "aead"
    devices = [f"d{i:05d}" for i in range(20)]
    written = aead.provision(folder, devices)
    assert len(written) == 20
    assert aead.provision(folder, devices) == []  # existing keys are kept
    aead.provision(folder, devices, rotate=True)
    keys = [p.read_bytes() for p in sorted(folder.glob("*.key"))]
    assert len(keys) == 40
    assert all(len(k) == 32 for k in keys)
    assert len(set(keys)) == 40  # every device, every rotation: a different key
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in folder.glob("*.key"))
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    # Random, not derived: the bits of all keys together are balanced.
    bits = np.unpackbits(np.frombuffer(b"".join(keys), dtype=np.uint8))
    assert 0.45 < bits.mean() < 0.55


def test_bad_key_files_are_refused(tmp_path: Path) -> None:
    folder = tmp_path / "aead"
    folder.mkdir()
    (folder / "d00001.1.key").write_bytes(b"short")
    with pytest.raises(Exception, match="not a 32-byte key"):
        aead.KeyStore(folder)
    with pytest.raises(Exception, match="no key for device"):
        aead.KeyStore(tmp_path / "none").newest("d00001")


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"kid": "d1.1", "nonce": b"\0" * 11, "ct": b"\0" * 32}, "bad_length"),
        ({"kid": "d1.1", "nonce": b"\0" * 12, "ct": b"\0" * 15}, "bad_length"),
        ({"kid": "d1.1", "nonce": "x" * 12, "ct": b"\0" * 32}, "wrong_type"),
        ({"kid": "a b", "nonce": b"\0" * 12, "ct": b"\0" * 32}, "wrong_type"),
    ],
)
def test_the_codec_checks_the_sealed_structure(body: dict[str, object], reason: str) -> None:
    import msgpack

    payload = msgpack.packb(
        {"v": 1, "kind": "tele", "src": "d1", "seq": 0, "ts": 1.0, "body": body}, use_bin_type=True
    )
    with pytest.raises(DecodeError) as info:
        codec.decode(payload)
    assert info.value.reason == reason


def test_an_opened_body_is_validated_as_usual(store: aead.KeyStore) -> None:
    kid, key = store.newest("d00001")
    ctx = {"src": "d00001", "seq": 1, "topic": TOPIC, "key_id": kid}
    for plaintext, reason in ((b"\xc1", "malformed"), (codec.encode_telemetry_body(_tele("d00002")),
                                                       "device_mismatch")):  # fmt: skip
        nonce, ct = aead.seal(key, plaintext, **ctx)  # type: ignore[arg-type]
        payload = codec.encode_sealed_telemetry("d00001", Sealed(kid, nonce, ct), seq=1, ts=1.0)
        with pytest.raises(DecodeError) as info:
            _open(store, payload)
        assert info.value.reason == reason


def test_bench_cost_reports_ratios(capsys: pytest.CaptureFixture[str]) -> None:
    out = aead.bench_cost(number=20, repeat=3)
    assert out["seal_ratio"] > 0 and out["open_ratio"] > 0
    assert "encode+seal" in capsys.readouterr().out


def test_the_keys_devices_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fogline.cli import main

    argv = ["keys", "devices", "--devices", "3", "--first-device", "5", "--dir", str(tmp_path)]
    assert main(argv) == 0
    names = sorted(p.name for p in (tmp_path / "aead").iterdir())
    assert names == ["d00005.1.key", "d00006.1.key", "d00007.1.key"]
    assert main([*argv, "--rotate"]) == 0
    assert aead.KeyStore(tmp_path / "aead").newest("d00007")[0] == "d00007.2"
    assert "wrote 3 device keys" in capsys.readouterr().out
