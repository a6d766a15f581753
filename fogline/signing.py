"""Model signing: the root key delegates to fog keys, fog keys sign model manifests.

The hierarchy has two levels. The root Ed25519 key (`signing.key`, made by `fogline keys init`)
stays offline; it signs a `Delegation` that certifies a fog's own signing key for a scope (sites
and model names, `"*"` for any) until an expiry. The fog signs each model `Manifest` with its key
and ships the `SignedManifest` (manifest, signature, delegation) to the edges, which pin only the
root public key (`signing.pub`) and check everything with `verify_manifest`.

What is signed is `context + canonical(fields)`, with a different context prefix for delegations
(`b"fogline delegation v1\\0"`) and manifests (`b"fogline manifest v1\\0"`), so a signature made
for one kind of document can never be replayed as the other.

Everything here is pure (no clock, no disk) except the file helpers at the end, which read and
write a key folder the way `fogline.keys` does.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fogline import keys
from fogline.errors import FoglineError
from fogline.keys import KeysError

__all__ = [
    "ANY",
    "REASONS",
    "Delegation",
    "Manifest",
    "SignatureRejected",
    "SignedManifest",
    "canonical",
    "delegate",
    "load_root_private",
    "load_root_public",
    "load_signer",
    "read_delegation",
    "sign_manifest",
    "verify_manifest",
    "write_signer",
]

#: The scope entry that matches every site or every model name.
ANY = "*"
#: Every `SignatureRejected.reason`, in the order `verify_manifest` checks them.
REASONS = (
    "malformed",
    "bad_delegation",
    "delegation_expired",
    "out_of_scope",
    "bad_signature",
    "manifest_expired",
)

_DELEGATION_CONTEXT = b"fogline delegation v1\x00"
_MANIFEST_CONTEXT = b"fogline manifest v1\x00"
_MAX_INT = 2**63 - 1  # every integer field fits a signed 64-bit integer (msgpack, SQLite)
_MAX_DEPTH = 32  # nesting limit of metadata, so no input can exhaust the stack
_SHA256 = re.compile(r"[0-9a-f]{64}")
_KEY_SUFFIX = ".sign.key"
_DELEGATION_SUFFIX = ".delegation.json"


class SignatureRejected(FoglineError):
    """A delegation or signed manifest failed a check; `reason` is one of `REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# --------------------------------------------------------------------------- canonical bytes


def _plain(obj: Any, depth: int = 0) -> Any:
    """`obj` as plain JSON data (bytes as base64); TypeError/ValueError when it cannot be."""
    if depth > _MAX_DEPTH:
        raise ValueError(f"nested deeper than {_MAX_DEPTH} levels")
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise ValueError(f"{obj!r} has no canonical form")
        return obj
    if isinstance(obj, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(obj)).decode("ascii")
    if isinstance(obj, list | tuple):
        return [_plain(x, depth + 1) for x in obj]
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"map key {k!r} is a {type(k).__name__}, not a str")
            out[k] = _plain(v, depth + 1)
        return out
    raise TypeError(f"a {type(obj).__name__} has no canonical form")


def canonical(obj: Any) -> bytes:
    """The deterministic bytes of `obj` that signatures cover.

    JSON with sorted keys, `separators=(",", ":")` and ASCII only (`ensure_ascii`); bytes become
    standard padded base64 strings, tuples become lists; floats are written with `repr`, which
    round-trips exactly, and `1` and `1.0` stay distinct. Map keys must be `str`; NaN and
    infinities, other types and nesting deeper than 32 levels raise `TypeError`/`ValueError`.
    A base64 string and the bytes it encodes give the same bytes here: the parsers fix each
    field's type, so that is no ambiguity for `Delegation` and `Manifest` fields.
    """
    text = json.dumps(
        _plain(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )
    return text.encode("ascii")


# --------------------------------------------------------------------------- strict parsing


class _Fields:
    """Typed access to the fields of one map being parsed; every failure is `malformed`."""

    def __init__(self, d: Any, what: str, names: Sequence[str]) -> None:
        if not isinstance(d, dict):
            raise SignatureRejected("malformed", f"{what}: expected a map, got {_kind(d)}")
        unknown = sorted(repr(k) for k in d if k not in names)
        if unknown:
            raise SignatureRejected("malformed", f"{what}: unknown fields {', '.join(unknown)}")
        missing = [n for n in names if n not in d]
        if missing:
            raise SignatureRejected("malformed", f"{what}: missing fields {', '.join(missing)}")
        self.d: dict[str, Any] = d
        self.what = what

    def bad(self, name: str, expected: str) -> SignatureRejected:
        return SignatureRejected(
            "malformed", f"{self.what}.{name}: expected {expected}, got {_kind(self.d[name])}"
        )

    def text(self, name: str) -> str:
        v = self.d[name]
        if not isinstance(v, str) or not v:
            raise self.bad(name, "a non-empty string")
        return v

    def integer(self, name: str, *, low: int) -> int:
        v = self.d[name]
        if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= _MAX_INT:
            raise self.bad(name, f"an integer from {low} to 2**63-1")
        return int(v)

    def number(self, name: str, *, low: float = -math.inf, positive: bool = False) -> float:
        x = _finite(self.d[name])
        if x is None or x < low or (positive and x <= 0):
            bound = " > 0" if positive else f" >= {low}" if low > -math.inf else ""
            raise self.bad(name, f"a finite number{bound}")
        return x

    def raw(self, name: str, *, size: int) -> bytes:
        v = self.d[name]
        if not isinstance(v, bytes) or len(v) != size:
            raise self.bad(name, f"{size} bytes")
        return v

    def names(self, name: str) -> tuple[str, ...]:
        v = self.d[name]
        if not isinstance(v, list | tuple) or not v or not all(isinstance(x, str) and x for x in v):
            raise self.bad(name, "a non-empty list of non-empty strings")
        return tuple(v)

    def rows(self, name: str) -> list[list[float]]:
        v = self.d[name]
        out: list[list[float]] = []
        for r in v if isinstance(v, list | tuple) else [None]:
            row = [_finite(x) for x in r] if isinstance(r, list | tuple) else [None]
            if any(x is None for x in row):
                raise self.bad(name, "a list of lists of finite numbers")
            out.append([x for x in row if x is not None])
        return out

    def mapping(self, name: str) -> dict[str, Any]:
        v = self.d[name]
        if not isinstance(v, dict):
            raise self.bad(name, "a map")
        try:
            _plain(v)
        except (TypeError, ValueError, RecursionError) as exc:
            raise SignatureRejected("malformed", f"{self.what}.{name}: {exc}") from exc
        return dict(v)


def _kind(v: Any) -> str:
    return type(v).__name__


def _finite(v: Any) -> float | None:
    """`v` as a float when it is a finite int or float (never a bool), else None."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    try:
        x = float(v)
    except OverflowError:
        return None
    return x if math.isfinite(x) else None


def _rows(rows: Sequence[Sequence[float]]) -> list[list[float]]:
    return [[float(x) for x in r] for r in rows]


def _utc(ts: float) -> str:
    try:
        return f"{dt.datetime.fromtimestamp(ts, dt.UTC):%Y-%m-%d %H:%M:%S} UTC"
    except (OverflowError, ValueError, OSError):
        return f"unix time {ts}"


# --------------------------------------------------------------------------- documents


@dataclass(frozen=True, slots=True)
class Delegation:
    """The root's certificate that a fog's Ed25519 key may sign models in a scope until `expires`.

    `sites` and `models` are the sites and model names in scope, `("*",)` for any; `public_key`
    is the fog key's raw 32 bytes; `signature` is the root's over the other fields.
    """

    fog: str
    public_key: bytes
    sites: tuple[str, ...]
    models: tuple[str, ...]
    expires: float
    signature: bytes

    _FIELDS = ("fog", "public_key", "sites", "models", "expires", "signature")

    def _signed_fields(self) -> dict[str, Any]:
        return {
            "fog": self.fog,
            "public_key": bytes(self.public_key),
            "sites": list(self.sites),
            "models": list(self.models),
            "expires": float(self.expires),
        }

    def message(self) -> bytes:
        """The exact bytes the root signs: a context prefix and the canonical other fields."""
        return _DELEGATION_CONTEXT + canonical(self._signed_fields())

    def to_dict(self) -> dict[str, Any]:
        """The delegation as plain data for msgpack (bytes stay bytes)."""
        return {**self._signed_fields(), "signature": bytes(self.signature)}

    @classmethod
    def from_dict(cls, d: Any) -> Delegation:
        """Parse `to_dict` output strictly; a missing, unknown or mistyped field is `malformed`."""
        f = _Fields(d, "delegation", cls._FIELDS)
        return cls(
            fog=f.text("fog"),
            public_key=f.raw("public_key", size=32),
            sites=f.names("sites"),
            models=f.names("models"),
            expires=f.number("expires"),
            signature=f.raw("signature", size=64),
        )

    def covers(self, *, model: str, site: str) -> bool:
        """Whether the model name `model` at site `site` is within this delegation's scope."""
        return (ANY in self.models or model in self.models) and (
            ANY in self.sites or site in self.sites
        )


@dataclass(frozen=True, slots=True)
class Manifest:
    """What a fog signs about one model file, its rollout targets and its health check.

    `sha256` is the lowercase hex digest of the `size`-byte file, sent in `chunks` chunks of
    `chunk_size` bytes (the last one shorter; an empty file is one empty chunk). `targets` are
    the edge ids meant to install it, `("*",)` for every edge. `golden` is the health check:
    `{"inputs", "outputs"}` (lists of rows of floats, one output per input), `"tolerance"` and
    `"max_latency_ms"`. `site` is the site of the fog that signed it.
    """

    name: str
    version: int
    sha256: str
    size: int
    created: float
    expires: float
    metadata: dict[str, Any]
    chunk_size: int
    chunks: int
    targets: tuple[str, ...]
    golden: dict[str, Any]
    site: str

    _FIELDS = (
        "name",
        "version",
        "sha256",
        "size",
        "created",
        "expires",
        "metadata",
        "chunk_size",
        "chunks",
        "targets",
        "golden",
        "site",
    )
    _GOLDEN = ("inputs", "outputs", "tolerance", "max_latency_ms")

    def message(self) -> bytes:
        """The exact bytes a fog key signs: a context prefix and the canonical manifest."""
        return _MANIFEST_CONTEXT + canonical(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        """The manifest as plain data for msgpack or JSON (floats always as floats)."""
        g = self.golden
        return {
            "name": self.name,
            "version": self.version,
            "sha256": self.sha256,
            "size": self.size,
            "created": float(self.created),
            "expires": float(self.expires),
            "metadata": dict(self.metadata),
            "chunk_size": self.chunk_size,
            "chunks": self.chunks,
            "targets": list(self.targets),
            "golden": {
                "inputs": _rows(g["inputs"]),
                "outputs": _rows(g["outputs"]),
                "tolerance": float(g["tolerance"]),
                "max_latency_ms": float(g["max_latency_ms"]),
            },
            "site": self.site,
        }

    @classmethod
    def from_dict(cls, d: Any) -> Manifest:
        """Parse `to_dict` output strictly; a bad, missing or unknown field is `malformed`.

        Integers are ints (a bool is not), `version >= 1`, `size >= 0`, `chunk_size >= 1`,
        `chunks` the number of chunks `size` makes, `sha256` 64 lowercase hex digits.
        """
        f = _Fields(d, "manifest", cls._FIELDS)
        sha256 = f.text("sha256")
        if not _SHA256.fullmatch(sha256):
            raise f.bad("sha256", "64 lowercase hex digits")
        size = f.integer("size", low=0)
        chunk_size = f.integer("chunk_size", low=1)
        chunks = f.integer("chunks", low=1)
        if chunks != max(1, -(-size // chunk_size)):
            raise SignatureRejected(
                "malformed",
                f"manifest.chunks: {size} bytes in chunks of {chunk_size} are "
                f"{max(1, -(-size // chunk_size))} chunks, not {chunks}",
            )
        g = _Fields(f.mapping("golden"), "manifest.golden", cls._GOLDEN)
        inputs, outputs = g.rows("inputs"), g.rows("outputs")
        if len(inputs) != len(outputs):
            raise SignatureRejected(
                "malformed",
                f"manifest.golden: {len(inputs)} inputs but {len(outputs)} outputs",
            )
        return cls(
            name=f.text("name"),
            version=f.integer("version", low=1),
            sha256=sha256,
            size=size,
            created=f.number("created"),
            expires=f.number("expires"),
            metadata=f.mapping("metadata"),
            chunk_size=chunk_size,
            chunks=chunks,
            targets=f.names("targets"),
            golden={
                "inputs": inputs,
                "outputs": outputs,
                "tolerance": g.number("tolerance", low=0.0),
                "max_latency_ms": g.number("max_latency_ms", positive=True),
            },
            site=f.text("site"),
        )

    def targets_edge(self, edge: str) -> bool:
        """Whether edge `edge` is meant to install this manifest."""
        return ANY in self.targets or edge in self.targets


@dataclass(frozen=True, slots=True)
class SignedManifest:
    """A manifest, the fog key's signature over it and the root's delegation of that key."""

    manifest: Manifest
    signature: bytes
    delegation: Delegation

    _FIELDS = ("manifest", "signature", "delegation")

    def to_dict(self) -> dict[str, Any]:
        """The signed manifest as plain data for msgpack (bytes stay bytes)."""
        return {
            "manifest": self.manifest.to_dict(),
            "signature": bytes(self.signature),
            "delegation": self.delegation.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Any) -> SignedManifest:
        """Parse `to_dict` output strictly; anything wrong is `SignatureRejected("malformed")`."""
        f = _Fields(d, "signed manifest", cls._FIELDS)
        return cls(
            manifest=Manifest.from_dict(f.d["manifest"]),
            signature=f.raw("signature", size=64),
            delegation=Delegation.from_dict(f.d["delegation"]),
        )


# --------------------------------------------------------------------------- sign and verify


def _raw_public(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def delegate(
    root: Ed25519PrivateKey,
    fog: str,
    *,
    sites: Sequence[str],
    models: Sequence[str],
    expires: float,
) -> tuple[Ed25519PrivateKey, Delegation]:
    """Make a new fog signing key and the root's delegation of it to `fog` for a scope.

    `sites` and `models` may be `["*"]` for any; `expires` is a unix time. Raises `KeysError`
    on an empty fog id, an empty scope or a non-finite expiry.
    """
    if not isinstance(fog, str) or not fog:
        raise KeysError(f"the fog id must be a non-empty string, not {fog!r}")
    for what, names in (("sites", sites), ("models", models)):
        if isinstance(names, str) or not names or not all(isinstance(n, str) and n for n in names):
            raise KeysError(f"{what} must be a non-empty list of non-empty names, not {names!r}")
    if _finite(expires) is None:
        raise KeysError(f"the expiry must be a finite unix time, not {expires!r}")
    key = Ed25519PrivateKey.generate()
    unsigned = Delegation(
        fog=fog,
        public_key=_raw_public(key),
        sites=tuple(sites),
        models=tuple(models),
        expires=float(expires),
        signature=b"",
    )
    signed = Delegation(
        fog=unsigned.fog,
        public_key=unsigned.public_key,
        sites=unsigned.sites,
        models=unsigned.models,
        expires=unsigned.expires,
        signature=root.sign(unsigned.message()),
    )
    return key, signed


def sign_manifest(
    key: Ed25519PrivateKey, delegation: Delegation, manifest: Manifest
) -> SignedManifest:
    """Sign `manifest` with a fog key and bundle it with the key's delegation.

    The manifest is first checked as an edge would parse it (`SignatureRejected("malformed")`
    if it would be refused); whether `key` matches `delegation` and the manifest is in its
    scope is left to `verify_manifest`, so tests can make every kind of bad bundle.
    """
    manifest = Manifest.from_dict(manifest.to_dict())
    return SignedManifest(
        manifest=manifest, signature=key.sign(manifest.message()), delegation=delegation
    )


def verify_manifest(signed: SignedManifest, root: Ed25519PublicKey, *, now: float) -> Manifest:
    """Check a signed manifest against the pinned root public key at unix time `now`.

    In order: the delegation is signed by `root` (`bad_delegation`), not expired
    (`delegation_expired`), covers the manifest's name and site (`out_of_scope`); the manifest
    is signed by the delegated key (`bad_signature`) and not expired (`manifest_expired`).
    Returns the manifest; bad input of any shape raises only `SignatureRejected`.
    """
    try:
        # Re-parse so that a bundle built in code gets the same strict checks as one received.
        signed = SignedManifest.from_dict(signed.to_dict())
    except (AttributeError, TypeError, ValueError, KeyError, OverflowError) as exc:
        raise SignatureRejected("malformed", f"not a well-formed signed manifest: {exc}") from exc
    d, m = signed.delegation, signed.manifest
    try:
        root.verify(d.signature, d.message())
    except InvalidSignature as exc:
        raise SignatureRejected(
            "bad_delegation",
            f"the delegation to fog {d.fog!r} is not signed by the pinned root key",
        ) from exc
    if now >= d.expires:
        raise SignatureRejected(
            "delegation_expired", f"the delegation to fog {d.fog!r} expired at {_utc(d.expires)}"
        )
    if not (ANY in d.models or m.name in d.models):
        raise SignatureRejected(
            "out_of_scope",
            f"model {m.name!r} is not in the models {list(d.models)} delegated to fog {d.fog!r}",
        )
    if not (ANY in d.sites or m.site in d.sites):
        raise SignatureRejected(
            "out_of_scope",
            f"site {m.site!r} is not in the sites {list(d.sites)} delegated to fog {d.fog!r}",
        )
    try:
        Ed25519PublicKey.from_public_bytes(d.public_key).verify(signed.signature, m.message())
    except (InvalidSignature, ValueError) as exc:
        raise SignatureRejected(
            "bad_signature",
            f"{m.name} v{m.version} is not signed by the key delegated to fog {d.fog!r}",
        ) from exc
    if now >= m.expires:
        raise SignatureRejected(
            "manifest_expired", f"{m.name} v{m.version} expired at {_utc(m.expires)}"
        )
    return m


# --------------------------------------------------------------------------- files


def _load(path: Path, what: str, *, private: bool) -> Any:
    if not path.is_file():
        raise KeysError(f"no {what} {path}")
    try:
        data = path.read_bytes()
        if private:
            return serialization.load_pem_private_key(data, password=None)
        return serialization.load_pem_public_key(data)
    except (OSError, ValueError, TypeError) as exc:
        raise KeysError(f"cannot read the {what} {path}: {exc}") from exc


def load_root_public(path: Path) -> Ed25519PublicKey:
    """The root public key an edge pins (`signing.pub`, PEM SubjectPublicKeyInfo)."""
    key = _load(path, "root public key", private=False)
    if not isinstance(key, Ed25519PublicKey):
        raise KeysError(f"{path} is not an Ed25519 public key")
    return key


def load_root_private(path: Path) -> Ed25519PrivateKey:
    """The root signing key (`signing.key`, PEM PKCS8) that delegates to fogs."""
    key = _load(path, "root signing key", private=True)
    if not isinstance(key, Ed25519PrivateKey):
        raise KeysError(f"{path} is not an Ed25519 private key")
    return key


def _signer_paths(folder: Path, name: str) -> tuple[Path, Path]:
    if not keys._NAME.fullmatch(name) or name in keys._RESERVED:
        raise KeysError(
            f"{name!r} is not a valid signer name (1-64 of A-Z a-z 0-9 _ . -, not starting "
            f"with '.', not {' or '.join(sorted(keys._RESERVED))})"
        )
    return folder / f"{name}{_KEY_SUFFIX}", folder / f"{name}{_DELEGATION_SUFFIX}"


def write_signer(
    folder: Path, name: str, key: Ed25519PrivateKey, delegation: Delegation
) -> list[Path]:
    """Write `<name>.sign.key` (PEM, 0600) and `<name>.delegation.json` (0644) atomically.

    The JSON file holds `Delegation.to_dict()` with its bytes in base64. Returns both paths.
    """
    key_path, delegation_path = _signer_paths(folder, name)
    if _raw_public(key) != delegation.public_key:
        raise KeysError(f"the key for {name!r} is not the one its delegation certifies")
    doc = {
        k: base64.b64encode(v).decode("ascii") if isinstance(v, bytes) else v
        for k, v in delegation.to_dict().items()
    }
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    keys._write(key_path, keys._key_pem(key), 0o600)
    keys._write(delegation_path, (json.dumps(doc, indent=2) + "\n").encode(), 0o644)
    return [key_path, delegation_path]


def read_delegation(path: Path) -> Delegation:
    """The delegation in a `<name>.delegation.json` file (its signature is not checked)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise KeysError(f"cannot read the delegation {path}: {exc}") from exc
    if isinstance(doc, dict):
        for k in ("public_key", "signature"):
            if isinstance(doc.get(k), str):
                try:
                    doc[k] = base64.b64decode(doc[k], validate=True)
                except (binascii.Error, ValueError) as exc:
                    raise KeysError(f"{path}: {k} is not base64: {exc}") from exc
    try:
        return Delegation.from_dict(doc)
    except SignatureRejected as exc:
        raise KeysError(f"{path} is not a valid delegation: {exc.detail}") from exc


def load_signer(folder: Path, name: str) -> tuple[Ed25519PrivateKey, Delegation]:
    """A fog's signing key and its delegation, as `write_signer` left them in `folder`."""
    key_path, delegation_path = _signer_paths(folder, name)
    if not (key_path.is_file() and delegation_path.is_file()):
        raise KeysError(
            f"no fog signing key {name!r} in {folder} (needs {key_path.name} and "
            f"{delegation_path.name}); run `fogline keys delegate {name} --dir KEYS_DIR` where "
            f"the root signing.key is, then copy both files into {folder}"
        )
    key = _load(key_path, "fog signing key", private=True)
    if not isinstance(key, Ed25519PrivateKey):
        raise KeysError(f"{key_path} is not an Ed25519 private key")
    delegation = read_delegation(delegation_path)
    if _raw_public(key) != delegation.public_key:
        raise KeysError(
            f"{key_path.name} is not the key {delegation_path.name} certifies; "
            f"run `fogline keys delegate {name}` again and copy both files"
        )
    return key, delegation
