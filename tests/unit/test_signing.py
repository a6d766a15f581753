"""Model signing: root -> fog delegation -> signed manifest, every rejection, the key files."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fogline import keys, signing
from fogline.cli import main
from fogline.signing import (
    Delegation,
    Manifest,
    SignatureRejected,
    SignedManifest,
    canonical,
    delegate,
    sign_manifest,
    verify_manifest,
)

NOW = 1_700_000_000.0
DAY = 86_400.0
MODEL = b"\x00tflite model bytes " * 100
ROOT = Ed25519PrivateKey.generate()
FOG_KEY, DELEGATION = delegate(
    ROOT, "f0", sites=["s1", "s2"], models=["anomaly", "classifier"], expires=NOW + 30 * DAY
)


def _manifest(**changes: Any) -> Manifest:
    m = Manifest(
        name="anomaly",
        version=3,
        sha256=hashlib.sha256(MODEL).hexdigest(),
        size=len(MODEL),
        created=NOW - 60,
        expires=NOW + 7 * DAY,
        metadata={"arch": "dense", "threshold": 0.25, "classes": ["ok", "bad"], "raw": b"\x01"},
        chunk_size=512,
        chunks=4,  # 2000 bytes in chunks of 512
        targets=("e0", "e1"),
        golden={
            "inputs": [[0.0, 1.5], [2.0, -1.0]],
            "outputs": [[0.1], [0.9]],
            "tolerance": 0.01,
            "max_latency_ms": 50.0,
        },
        site="s1",
    )
    return dataclasses.replace(m, **changes)


def _signed(manifest: Manifest | None = None, **changes: Any) -> SignedManifest:
    return sign_manifest(FOG_KEY, DELEGATION, manifest or _manifest(**changes))


def _reason(signed: SignedManifest, *, now: float = NOW) -> str:
    with pytest.raises(SignatureRejected) as got:
        verify_manifest(signed, ROOT.public_key(), now=now)
    return got.value.reason


def _over_the_wire(signed: SignedManifest) -> SignedManifest:
    """What an edge gets: the bundle through msgpack and the strict parser."""
    packed = msgpack.packb(signed.to_dict(), use_bin_type=True)
    return SignedManifest.from_dict(msgpack.unpackb(packed, raw=False))


# --------------------------------------------------------------------------- the happy path


def test_a_signed_manifest_verifies_after_a_trip_over_the_wire() -> None:
    signed = _signed()
    received = _over_the_wire(signed)
    assert received == signed
    manifest = verify_manifest(received, ROOT.public_key(), now=NOW)
    assert manifest == _manifest()
    assert manifest.targets_edge("e1") and not manifest.targets_edge("e9")
    assert _manifest(targets=("*",)).targets_edge("e9")


def test_ints_given_for_floats_sign_the_same_as_the_floats_an_edge_parses() -> None:
    golden = {"inputs": [[0, 1]], "outputs": [[1]], "tolerance": 0, "max_latency_ms": 50}
    signed = _signed(created=int(NOW), expires=int(NOW + DAY), golden=golden)
    manifest = verify_manifest(_over_the_wire(signed), ROOT.public_key(), now=NOW)
    assert manifest.golden["inputs"] == [[0.0, 1.0]] and isinstance(manifest.created, float)


def test_a_wildcard_delegation_covers_any_model_and_site() -> None:
    key, anything = delegate(ROOT, "f1", sites=["*"], models=["*"], expires=NOW + DAY)
    assert anything.covers(model="whatever", site="anywhere")
    assert DELEGATION.covers(model="classifier", site="s2")
    assert not DELEGATION.covers(model="failure", site="s1")
    assert not DELEGATION.covers(model="anomaly", site="s3")
    signed = sign_manifest(key, anything, _manifest(name="failure", site="s9"))
    assert verify_manifest(signed, ROOT.public_key(), now=NOW).name == "failure"


# --------------------------------------------------------------------------- every rejection


def _resign_delegation(root: Ed25519PrivateKey, d: Delegation) -> Delegation:
    unsigned = dataclasses.replace(d, signature=b"")
    return dataclasses.replace(d, signature=root.sign(unsigned.message()))


def _flip_hex(h: str) -> str:
    return ("1" if h[0] == "0" else "0") + h[1:]


def _flip_byte(b: bytes) -> bytes:
    return bytes([b[0] ^ 1]) + b[1:]


def _forged_scope(s: SignedManifest) -> SignedManifest:
    """A fog widens its own scope without the root."""
    wider = dataclasses.replace(s.delegation, models=("*",), sites=("*",))
    return dataclasses.replace(s, delegation=wider)


def _attacker_key(s: SignedManifest) -> SignedManifest:
    """Someone puts their own key into a delegation and signs with it."""
    mallory = Ed25519PrivateKey.generate()
    pub = signing._raw_public(mallory)
    forged = dataclasses.replace(s.delegation, public_key=pub)
    return sign_manifest(mallory, forged, s.manifest)


TAMPERING: dict[str, tuple[Callable[[SignedManifest], SignedManifest], str]] = {
    "sha256 changed": (
        lambda s: dataclasses.replace(
            s, manifest=dataclasses.replace(s.manifest, sha256=_flip_hex(s.manifest.sha256))
        ),
        "bad_signature",
    ),
    "version bumped": (
        lambda s: dataclasses.replace(s, manifest=dataclasses.replace(s.manifest, version=99)),
        "bad_signature",
    ),
    "metadata changed": (
        lambda s: dataclasses.replace(
            s,
            manifest=dataclasses.replace(
                s.manifest, metadata={**s.manifest.metadata, "threshold": 0.5}
            ),
        ),
        "bad_signature",
    ),
    "targets widened": (
        lambda s: dataclasses.replace(s, manifest=dataclasses.replace(s.manifest, targets=("*",))),
        "bad_signature",
    ),
    "golden tolerance loosened": (
        lambda s: dataclasses.replace(
            s,
            manifest=dataclasses.replace(
                s.manifest, golden={**s.manifest.golden, "tolerance": 10.0}
            ),
        ),
        "bad_signature",
    ),
    "expiry extended": (
        lambda s: dataclasses.replace(
            s, manifest=dataclasses.replace(s.manifest, expires=s.manifest.expires + DAY)
        ),
        "bad_signature",
    ),
    "signature byte flipped": (
        lambda s: dataclasses.replace(s, signature=_flip_byte(s.signature)),
        "bad_signature",
    ),
    "signed by an undelegated key": (
        lambda s: sign_manifest(Ed25519PrivateKey.generate(), s.delegation, s.manifest),
        "bad_signature",
    ),
    "delegation signed by another root": (
        lambda s: dataclasses.replace(
            s, delegation=_resign_delegation(Ed25519PrivateKey.generate(), s.delegation)
        ),
        "bad_delegation",
    ),
    "delegation scope widened": (_forged_scope, "bad_delegation"),
    "delegation given to another fog": (
        lambda s: dataclasses.replace(s, delegation=dataclasses.replace(s.delegation, fog="f9")),
        "bad_delegation",
    ),
    "delegation key replaced": (_attacker_key, "bad_delegation"),
    "delegation expiry extended": (
        lambda s: dataclasses.replace(
            s, delegation=dataclasses.replace(s.delegation, expires=s.delegation.expires + DAY)
        ),
        "bad_delegation",
    ),
    "model out of scope": (
        lambda s: sign_manifest(
            FOG_KEY, s.delegation, dataclasses.replace(s.manifest, name="failure")
        ),
        "out_of_scope",
    ),
    "site out of scope": (
        lambda s: sign_manifest(FOG_KEY, s.delegation, dataclasses.replace(s.manifest, site="s3")),
        "out_of_scope",
    ),
}


@pytest.mark.parametrize("tamper", list(TAMPERING), ids=list(TAMPERING))
def test_each_tampering_is_rejected_with_its_reason(tamper: str) -> None:
    change, reason = TAMPERING[tamper]
    assert _reason(_over_the_wire(change(_signed()))) == reason


def test_expiry_of_the_delegation_and_of_the_manifest() -> None:
    signed = _signed()
    assert _reason(signed, now=DELEGATION.expires) == "delegation_expired"
    assert _reason(signed, now=signed.manifest.expires) == "manifest_expired"
    verify_manifest(signed, ROOT.public_key(), now=signed.manifest.expires - 1.0)


def test_checks_run_in_the_documented_order() -> None:
    other_root = Ed25519PrivateKey.generate()
    bad = sign_manifest(
        Ed25519PrivateKey.generate(),
        _resign_delegation(other_root, DELEGATION),
        _manifest(name="failure"),
    )
    late = DELEGATION.expires + DAY
    assert _reason(bad, now=late) == "bad_delegation"
    bad = dataclasses.replace(bad, delegation=DELEGATION)
    assert _reason(bad, now=late) == "delegation_expired"
    assert _reason(bad) == "out_of_scope"
    bad = dataclasses.replace(bad, manifest=_manifest())
    assert _reason(bad, now=_manifest().expires) == "bad_signature"


def test_rejection_carries_reason_and_detail() -> None:
    exc = SignatureRejected("out_of_scope", "model 'x'")
    assert (exc.reason, exc.detail, str(exc)) == (
        "out_of_scope",
        "model 'x'",
        "out_of_scope: model 'x'",
    )
    with pytest.raises(SignatureRejected) as got:
        verify_manifest(_signed(site="s3"), ROOT.public_key(), now=NOW)
    assert "s3" in got.value.detail and "f0" in got.value.detail


# --------------------------------------------------------------------------- malformed input


def _drop(*path: str) -> Callable[[dict[str, Any]], None]:
    def change(d: dict[str, Any]) -> None:
        for p in path[:-1]:
            d = d[p]
        del d[path[-1]]

    return change


def _set(value: Any, *path: str) -> Callable[[dict[str, Any]], None]:
    def change(d: dict[str, Any]) -> None:
        for p in path[:-1]:
            d = d[p]
        d[path[-1]] = value

    return change


MALFORMED: dict[str, Callable[[dict[str, Any]], None]] = {
    "no manifest": _drop("manifest"),
    "no signature": _drop("signature"),
    "no manifest name": _drop("manifest", "name"),
    "no delegation expiry": _drop("delegation", "expires"),
    "no golden outputs": _drop("manifest", "golden", "outputs"),
    "unknown field": _set(1, "manifest", "debug"),
    "signature is a str": _set("00" * 64, "signature"),
    "signature is a list": _set([1, 2, 3], "signature"),
    "signature too short": _set(b"\x00" * 63, "signature"),
    "delegation signature is a str": _set("sig", "delegation", "signature"),
    "public key too long": _set(b"\x00" * 33, "delegation", "public_key"),
    "version is a bool": _set(True, "manifest", "version"),
    "version is a float": _set(3.0, "manifest", "version"),
    "version is 0": _set(0, "manifest", "version"),
    "version too big": _set(2**63, "manifest", "version"),
    "size is negative": _set(-1, "manifest", "size"),
    "size is a str": _set("2000", "manifest", "size"),
    "chunks is 0": _set(0, "manifest", "chunks"),
    "chunks disagree with size": _set(5, "manifest", "chunks"),
    "chunk_size is 0": _set(0, "manifest", "chunk_size"),
    "sha256 uppercase": _set("AB" * 32, "manifest", "sha256"),
    "sha256 short": _set("ab" * 31, "manifest", "sha256"),
    "sha256 is bytes": _set(b"\xab" * 32, "manifest", "sha256"),
    "expires is NaN": _set(math.nan, "manifest", "expires"),
    "expires is a bool": _set(False, "delegation", "expires"),
    "created is a str": _set("yesterday", "manifest", "created"),
    "name is empty": _set("", "manifest", "name"),
    "targets empty": _set([], "manifest", "targets"),
    "targets is a str": _set("e0", "manifest", "targets"),
    "sites hold a number": _set([1], "delegation", "sites"),
    "metadata is a list": _set([], "manifest", "metadata"),
    "metadata has an int key": _set({1: "x"}, "manifest", "metadata"),
    "metadata holds infinity": _set({"x": math.inf}, "manifest", "metadata"),
    "golden outputs missing a row": _set([[0.1]], "manifest", "golden", "outputs"),
    "golden input is not a row": _set([0.0, [1.0]], "manifest", "golden", "inputs"),
    "golden holds a bool": _set([[True], [0.9]], "manifest", "golden", "outputs"),
    "golden max latency 0": _set(0.0, "manifest", "golden", "max_latency_ms"),
    "golden tolerance negative": _set(-0.1, "manifest", "golden", "tolerance"),
    "manifest is a list": _set([], "manifest"),
    "delegation is None": _set(None, "delegation"),
}


@pytest.mark.parametrize("mangle", list(MALFORMED), ids=list(MALFORMED))
def test_malformed_dicts_are_rejected_as_malformed(mangle: str) -> None:
    d = copy.deepcopy(_signed().to_dict())
    MALFORMED[mangle](d)
    with pytest.raises(SignatureRejected) as got:
        SignedManifest.from_dict(d)
    assert got.value.reason == "malformed"


@pytest.mark.parametrize("value", [None, [], "x", b"x", 1, {1: 2}])
def test_anything_but_a_map_is_malformed(value: Any) -> None:
    for cls in (SignedManifest, Manifest, Delegation):
        with pytest.raises(SignatureRejected, match="malformed"):
            cls.from_dict(value)


def test_verify_rejects_a_bundle_built_with_wrong_types_as_malformed() -> None:
    good = _signed()
    for bad in (
        dataclasses.replace(good, signature="not bytes"),  # type: ignore[arg-type]
        dataclasses.replace(good, manifest=dataclasses.replace(good.manifest, golden={})),
        dataclasses.replace(good, delegation=None),  # type: ignore[arg-type]
        "not a bundle",
    ):
        assert _reason(bad) == "malformed"  # type: ignore[arg-type]


_leaf = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=70)
)
_value = st.recursive(
    _leaf,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8) | st.integers(), inner, max_size=4)
    ),
    max_leaves=16,
)
_FIELDS = (
    *Manifest._FIELDS,
    *Delegation._FIELDS,
    *Manifest._GOLDEN,
    *SignedManifest._FIELDS,
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(_FIELDS) | st.text(max_size=6), _value, max_size=12))
def test_random_dicts_raise_only_signature_rejected(d: dict[str, Any]) -> None:
    try:
        SignedManifest.from_dict(d)
    except SignatureRejected as exc:
        assert exc.reason == "malformed"


def _paths(d: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(d, dict):
        for k, v in d.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            out += _paths(v, (*prefix, i))
    return out


_GOOD = _signed().to_dict()
_GOOD_PATHS = _paths(_GOOD)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(_GOOD_PATHS), _value)
def test_any_single_change_to_a_signed_bundle_is_refused_or_harmless(
    path: tuple[Any, ...], value: Any
) -> None:
    d = copy.deepcopy(_GOOD)
    target = d
    for p in path[:-1]:
        target = target[p]
    target[path[-1]] = value
    try:
        manifest = verify_manifest(SignedManifest.from_dict(d), ROOT.public_key(), now=NOW)
    except SignatureRejected as exc:
        assert exc.reason in signing.REASONS
    else:
        # Accepted only when the change did not change what was signed (e.g. 4 for 4.0).
        assert canonical(manifest.to_dict()) == canonical(_GOOD["manifest"])


# --------------------------------------------------------------------------- canonical bytes


def test_canonical_bytes_do_not_depend_on_key_order() -> None:
    a = {"b": 1, "a": {"y": [1.5, b"\x00\xff"], "x": None}, "c": "é"}
    b = {"c": "é", "a": {"x": None, "y": (1.5, b"\x00\xff")}, "b": 1}
    assert canonical(a) == canonical(b)
    assert canonical(a) == b'{"a":{"x":null,"y":[1.5,"AP8="]},"b":1,"c":"\\u00e9"}'
    assert canonical(_manifest().to_dict()) == canonical(
        dict(reversed(list(_manifest().to_dict().items())))
    )


@pytest.mark.parametrize("x", [0.1, 1 / 3, 1e-300, 1.7976931348623157e308, -0.0, NOW + 0.123456])
def test_canonical_floats_round_trip(x: float) -> None:
    back = json.loads(canonical({"x": x}))["x"]
    assert back == x and math.copysign(1, back) == math.copysign(1, x)


def test_canonical_keeps_ints_and_floats_apart_and_refuses_what_it_cannot_encode() -> None:
    assert canonical({"x": 1}) != canonical({"x": 1.0})
    assert canonical({"x": True}) != canonical({"x": 1})
    for bad in ({"x": math.nan}, {"x": math.inf}, {1: "x"}, {"x": object()}, {"x": {1, 2}}):
        with pytest.raises((TypeError, ValueError)):
            canonical(bad)


# --------------------------------------------------------------------------- key files and CLI


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_cli_delegates_a_fog_key_that_signs_what_edges_verify(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "k"
    assert main(["keys", "init", "--dir", str(d)]) == 0
    argv = [
        "keys",
        "delegate",
        "f0",
        "--site",
        "s1",
        "--site",
        "s2",
        "--models",
        "anomaly, failure",
    ]
    assert main([*argv, "--days", "30", "--dir", str(d)]) == 0
    out = capsys.readouterr().out
    assert "f0.sign.key" in out and "f0.delegation.json" in out and "expires" in out
    assert _mode(d / "f0.sign.key") == 0o600
    assert _mode(d / "f0.delegation.json") == 0o644
    assert not list(d.glob(".*.tmp"))

    key, delegation = signing.load_signer(d, "f0")
    assert (delegation.fog, delegation.sites, delegation.models) == (
        "f0",
        ("s1", "s2"),
        ("anomaly", "failure"),
    )
    root = signing.load_root_public(d / "signing.pub")
    manifest = _manifest(site="s2", expires=delegation.expires + DAY)
    signed = _over_the_wire(sign_manifest(key, delegation, manifest))
    now = delegation.expires - 29.5 * DAY
    assert verify_manifest(signed, root, now=now) == manifest
    with pytest.raises(SignatureRejected, match="delegation_expired"):
        verify_manifest(signed, root, now=delegation.expires + 1)
    with pytest.raises(SignatureRejected, match="bad_delegation"):
        verify_manifest(signed, ROOT.public_key(), now=now)  # another deployment's root

    assert main(["keys", "list", "--dir", str(d)]) == 0
    listing = capsys.readouterr().out
    assert "fog-signer" in listing and "29 days left" in listing
    assert {e.name for e in keys.entries(d)} >= {"ca", "signing", "f0"}


def test_the_cli_defaults_to_any_scope_for_90_days(tmp_path: Path) -> None:
    d = tmp_path / "k"
    assert main(["keys", "init", "--dir", str(d)]) == 0
    before = time.time()
    assert main(["keys", "delegate", "f1", "--data-dir", str(tmp_path / "x"), "--dir", str(d)]) == 0
    after = time.time()
    key, delegation = signing.load_signer(d, "f1")
    assert delegation.sites == ("*",) and delegation.models == ("*",)
    assert before + 90 * DAY <= delegation.expires <= after + 90 * DAY
    root = signing.load_root_private(d / "signing.key")
    assert signing._raw_public(root) != signing._raw_public(key)  # the fog key is its own
    assert main(["keys", "delegate", "f1", "--days", "-1", "--dir", str(d)]) == 0
    new_key, expired = signing.load_signer(d, "f1")
    assert expired.expires < time.time()
    assert signing._raw_public(new_key) != signing._raw_public(key)  # replaced, not reused


def test_delegate_without_a_root_key_says_to_run_init(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keys", "delegate", "f0", "--dir", str(tmp_path / "none")]) == 2
    assert "fogline keys init" in capsys.readouterr().err
    keys.init(tmp_path)
    assert main(["keys", "delegate", "../f0", "--dir", str(tmp_path)]) == 2
    assert main(["keys", "delegate", "f0", "--models", ",", "--dir", str(tmp_path)]) == 2


def test_missing_or_wrong_key_files_raise_keys_error(tmp_path: Path) -> None:
    d = tmp_path / "k"
    keys.init(d)
    with pytest.raises(keys.KeysError, match="keys delegate f0"):
        signing.load_signer(d, "f0")
    with pytest.raises(keys.KeysError, match="no root public key"):
        signing.load_root_public(d / "absent.pub")
    with pytest.raises(keys.KeysError, match="not an Ed25519"):
        signing.load_root_private(d / "ca.key")  # an EC key
    (d / "junk.pub").write_text("not a key")
    with pytest.raises(keys.KeysError, match="cannot read"):
        signing.load_root_public(d / "junk.pub")

    signing.write_signer(d, "f0", FOG_KEY, DELEGATION)
    signing.write_signer(d, "f1", *delegate(ROOT, "f1", sites=["*"], models=["*"], expires=NOW))
    (d / "f0.sign.key").write_bytes((d / "f1.sign.key").read_bytes())
    with pytest.raises(keys.KeysError, match="not the key"):
        signing.load_signer(d, "f0")
    (d / "f1.delegation.json").write_text('{"fog": "f1"}')
    with pytest.raises(keys.KeysError, match="not a valid delegation"):
        signing.load_signer(d, "f1")
    with pytest.raises(keys.KeysError, match="not the one"):
        signing.write_signer(d, "f2", Ed25519PrivateKey.generate(), DELEGATION)


def test_no_credential_can_overwrite_a_fog_signing_key(tmp_path: Path) -> None:
    d = tmp_path / "k"
    keys.init(d)
    with pytest.raises(keys.KeysError, match=r"\.sign"):
        keys.issue(d, "f0.sign", role="fog")
