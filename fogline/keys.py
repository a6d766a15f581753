"""`fogline keys`: the project CA, per-process TLS credentials and the model-signing keys.

Everything is made with `cryptography` and written atomically into one folder (`0600` for keys
and passwords, `0644` for certificates):

| file | contents |
|---|---|
| `ca.crt`, `ca.key` | the project CA (EC P-256, self-signed, 10 years) |
| `signing.key`, `signing.pub` | the root Ed25519 signing key (keep `signing.key` offline) |
| `<fog>.sign.key` | a fog's Ed25519 model-signing key (`keys delegate`, `fogline.signing`) |
| `<fog>.delegation.json` | the root's delegation of that key: scope (sites, models) and expiry |
| `<name>.crt`, `<name>.key` | a certificate (role in its OU) and key signed by the CA |
| `<name>.password` | the random MQTT password of `<name>` (its username is `<name>`) |
| `aead/<device>.<n>.key` | a device's random 32-byte telemetry key (`fogline.aead`) |
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import os
import re
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fogline.errors import FoglineError

__all__ = [
    "BROKER",
    "PROCESS_ROLES",
    "ROLES",
    "Credential",
    "Entry",
    "KeysError",
    "credential",
    "credentials",
    "default_dir",
    "entries",
    "init",
    "issue",
    "read_password",
    "role_from_name",
]

#: Roles a certificate can be issued for. `device` is one device's own credential, `monitor`
#: a read-only observer (the `fogline up` progress line, dashboards).
ROLES = ("broker", "device-sim", "edge", "fog", "cloud", "device", "monitor")
#: Roles of the four pipeline processes (their names in status and metrics topics).
PROCESS_ROLES = ("device-sim", "edge", "fog", "cloud")
BROKER = "broker"
CA_DAYS = 3650
DEFAULT_DAYS = 365
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}")
_RESERVED = frozenset({"ca", "signing"})
#: `<fog>.sign.key` is a fog's signing key: no credential may be named `<fog>.sign`.
_SIGNER_SUFFIX = ".sign"
DELEGATION_DAYS = 90
_SKEW = dt.timedelta(minutes=5)
_ORG = "fogline"


class KeysError(FoglineError):
    """A key folder is missing, incomplete or unreadable, or a name or role is invalid."""


@dataclass(frozen=True, slots=True)
class Credential:
    """The files of one issued certificate; `ident` is the process id it stands for."""

    name: str
    role: str
    cert: Path
    key: Path
    password_file: Path
    not_after: dt.datetime

    @property
    def ident(self) -> str:
        """The process id: the name without a leading `<role>-` (`edge-e0` -> `e0`)."""
        return self.name.removeprefix(f"{self.role}-") or self.name


@dataclass(frozen=True, slots=True)
class Entry:
    """One line of `fogline keys list`."""

    name: str
    kind: str
    path: Path
    not_after: dt.datetime | None


def default_dir(data_dir: Path) -> Path:
    """The key folder of a data dir."""
    return data_dir / "keys"


def _now(now: dt.datetime | None) -> dt.datetime:
    return now if now is not None else dt.datetime.now(dt.UTC)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write `data` to `path` atomically with permissions `mode` (never readable in between)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _key_pem(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """Key usage of the CA (signs certificates) or of a leaf (ECDSA signatures, ECDH)."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not ca,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise KeysError(f"cannot read the certificate {path}: {exc}") from exc


def _load_ca(folder: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = folder / "ca.crt", folder / "ca.key"
    if not (cert_path.is_file() and key_path.is_file()):
        raise KeysError(f"no project CA in {folder}; run `fogline keys init --dir {folder}` first")
    cert = _load_cert(cert_path)
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise KeysError(f"cannot read the CA key {key_path}: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeysError(f"{key_path} is not an EC private key")
    return cert, key


def init(folder: Path, *, now: dt.datetime | None = None) -> list[Path]:
    """Make the project CA and the root signing key unless present; return the files written."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    written: list[Path] = []
    if not (folder / "ca.crt").exists() or not (folder / "ca.key").exists():
        key = ec.generate_private_key(ec.SECP256R1())
        start = _now(now) - _SKEW
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORG),
                x509.NameAttribute(
                    NameOID.COMMON_NAME, f"fogline project CA {secrets.token_hex(4)}"
                ),
            ]
        )
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        _write(folder / "ca.key", _key_pem(key), 0o600)
        _write(folder / "ca.crt", cert.public_bytes(serialization.Encoding.PEM), 0o644)
        written += [folder / "ca.key", folder / "ca.crt"]
    if not (folder / "signing.key").exists():
        signing = ed25519.Ed25519PrivateKey.generate()
        pub = signing.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        _write(folder / "signing.key", _key_pem(signing), 0o600)
        _write(folder / "signing.pub", pub, 0o644)
        written += [folder / "signing.key", folder / "signing.pub"]
    return written


def _check_name(name: str, role: str) -> None:
    if not _NAME.fullmatch(name) or name in _RESERVED or name.endswith(_SIGNER_SUFFIX):
        raise KeysError(
            f"{name!r} is not a valid credential name (1-64 of A-Z a-z 0-9 _ . -, not starting "
            f"with '.', not ending in '{_SIGNER_SUFFIX}', not {' or '.join(sorted(_RESERVED))})"
        )
    if role not in ROLES:
        raise KeysError(f"unknown role {role!r}; use one of {', '.join(ROLES)}")


def issue(
    folder: Path,
    name: str,
    *,
    role: str,
    days: int = DEFAULT_DAYS,
    now: dt.datetime | None = None,
) -> Credential:
    """Issue (or replace) a certificate, key and random password for `name`, signed by the CA.

    A negative `days` makes a certificate that has already expired (for tests).
    """
    _check_name(name, role)
    ca_cert, ca_key = _load_ca(folder)
    key = ec.generate_private_key(ec.SECP256R1())
    start = _now(now)
    not_after = min(start + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    not_before = min(start - _SKEW, not_after - dt.timedelta(days=1))
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if role == BROKER:
        # The broker also probes itself as a client while it starts.
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    builder = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORG),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                    x509.NameAttribute(NameOID.COMMON_NAME, name),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if role == BROKER:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    _write(folder / f"{name}.key", _key_pem(key), 0o600)
    _write(folder / f"{name}.password", (secrets.token_urlsafe(24) + "\n").encode(), 0o600)
    _write(folder / f"{name}.crt", cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return credential(folder, name)


def credential(folder: Path, name: str) -> Credential:
    """The issued credential `name` of a key folder."""
    path = folder / f"{name}.crt"
    if not path.is_file():
        raise KeysError(f"no certificate {path}; run `fogline keys issue {name} --dir {folder}`")
    cert = _load_cert(path)
    roles = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    role = str(roles[0].value) if roles else ""
    if role not in ROLES:
        raise KeysError(f"{path} names no fogline role (its OU is {role!r})")
    return Credential(
        name=name,
        role=role,
        cert=path,
        key=folder / f"{name}.key",
        password_file=folder / f"{name}.password",
        not_after=cert.not_valid_after_utc,
    )


def credentials(folder: Path) -> list[Credential]:
    """Every issued credential of a key folder, by name."""
    names = sorted(p.name.removesuffix(".crt") for p in folder.glob("*.crt"))
    return [credential(folder, n) for n in names if n not in _RESERVED]


def read_password(path: Path | str) -> str:
    """The password held in a file (its first line)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise KeysError(f"cannot read the password file {path}: {exc.strerror}") from exc
    lines = text.splitlines()
    if not lines or not lines[0]:
        raise KeysError(f"the password file {path} is empty")
    return lines[0]


def entries(folder: Path) -> list[Entry]:
    """What a key folder holds: the CA, the signing keys and each issued credential."""
    from fogline import signing  # it imports this module

    out: list[Entry] = []
    if (folder / "ca.crt").is_file():
        ca = _load_cert(folder / "ca.crt")
        out.append(Entry("ca", "ca", folder / "ca.crt", ca.not_valid_after_utc))
    if (folder / "signing.key").is_file():
        out.append(Entry("signing", "signing-key (Ed25519)", folder / "signing.key", None))
    for path in sorted(folder.glob("*.delegation.json")):
        d = signing.read_delegation(path)
        scope = f"sites {','.join(d.sites)}; models {','.join(d.models)}"
        out.append(Entry(path.name.removesuffix(".delegation.json"), f"fog-signer ({scope})",
                         path, _from_unix(d.expires)))  # fmt: skip
    out += [Entry(c.name, c.role, c.cert, c.not_after) for c in credentials(folder)]
    return out


def _from_unix(ts: float) -> dt.datetime | None:
    try:
        return dt.datetime.fromtimestamp(ts, dt.UTC)
    except (OverflowError, ValueError, OSError):
        return None


# --------------------------------------------------------------------------- the CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The subcommands and flags of `fogline keys`."""
    sub = p.add_subparsers(dest="keys_command", required=True, metavar="SUBCOMMAND")

    def common(s: argparse.ArgumentParser) -> None:
        s.add_argument(
            "--dir", type=Path, default=None,
            help="key folder (default: DATA_DIR/keys)",
        )  # fmt: skip
        s.add_argument(
            "--data-dir", type=Path, default=Path(".fogline/data"),
            help="data dir whose keys/ folder is used without --dir (default: .fogline/data)",
        )  # fmt: skip

    s = sub.add_parser(
        "init",
        help="make the project CA and the root signing key (kept if present)",
        description="Make the project CA (EC P-256, 10 years) and the root Ed25519 signing key "
        "in the key folder; existing ones are kept.",
    )
    common(s)
    s = sub.add_parser(
        "issue",
        help="issue a certificate, key and password for the broker or a client",
        description="Issue (or replace) NAME.crt, NAME.key and NAME.password signed by the "
        "project CA. The MQTT username is NAME; the process id is NAME without '<role>-'.",
    )
    common(s)
    s.add_argument("name", metavar="NAME", help="credential name, e.g. broker or edge-e0")
    s.add_argument("--role", choices=ROLES, default=None, help="role (default: from NAME)")
    s.add_argument(
        "--days", type=int, default=DEFAULT_DAYS,
        help=f"days of validity; negative makes an expired certificate (default: {DEFAULT_DAYS})",
    )  # fmt: skip
    s = sub.add_parser(
        "delegate",
        help="make a fog's model-signing key, certified by the root signing key for a scope",
        description="Make NAME.sign.key (0600), a new Ed25519 key for fog NAME, and "
        "NAME.delegation.json (0644), the root signing key's delegation of it for the given "
        "sites and model names until an expiry. Needs signing.key in the key folder; copy "
        "both files to the fog.",
    )
    common(s)
    s.add_argument("name", metavar="NAME", help="the fog signer name, e.g. fog-f0")
    s.add_argument(
        "--site", action="append", default=None, metavar="SITE",
        help="a site in scope; repeat for several (default: * = any)",
    )  # fmt: skip
    s.add_argument(
        "--models", default="*", metavar="A,B,C",
        help="comma-separated model names in scope (default: * = any)",
    )  # fmt: skip
    s.add_argument(
        "--days", type=int, default=DELEGATION_DAYS,
        help=f"days until the delegation expires (default: {DELEGATION_DAYS})",
    )  # fmt: skip
    s = sub.add_parser(
        "list",
        help="show the CA, signing keys and issued certificates with expiry dates",
        description="List what the key folder holds, with the expiry of each certificate and "
        "fog signing delegation.",
    )
    common(s)
    s.add_argument("--json", action="store_true", help="print JSON")
    s = sub.add_parser(
        "devices",
        help="give each device a random AEAD key for sealed telemetry (aead/ in the key folder)",
        description="Write a random 32-byte ChaCha20-Poly1305 key <device>.<n>.key (0600) into "
        "the aead/ folder of the key folder for every device that has none; with --rotate, a "
        "newer key for every device (older ones stay valid until their files are removed).",
    )
    common(s)
    s.add_argument("--devices", type=int, required=True, help="number of devices")
    s.add_argument(
        "--first-device", type=int, default=0,
        help="number of the first device (default: 0)",
    )  # fmt: skip
    s.add_argument(
        "--rotate", action="store_true", help="add a newer key to every device (rotation)"
    )


def role_from_name(name: str) -> str:
    """The role a name like `edge-e0` stands for (`broker` for `broker`)."""
    if name == BROKER:
        return BROKER
    for role in sorted(ROLES, key=len, reverse=True):
        if name.startswith(f"{role}-"):
            return role
    raise KeysError(f"cannot tell the role of {name!r} from its name; pass --role")


def run(args: argparse.Namespace) -> int:
    """Entry of `fogline keys`."""
    folder: Path = args.dir if args.dir is not None else default_dir(args.data_dir)
    if args.keys_command == "init":
        written = init(folder)
        for path in written:
            print(f"wrote {path}")
        if not written:
            print(f"fogline keys: {folder} already holds a CA and a signing key", file=sys.stderr)
        else:
            print(f"keep {folder / 'signing.key'} offline once models are signed", file=sys.stderr)
        return 0
    if args.keys_command == "issue":
        role = args.role or role_from_name(args.name)
        cred = issue(folder, args.name, role=role, days=args.days)
        print(f"wrote {cred.cert}, {cred.key}, {cred.password_file} (role {cred.role}, "
              f"expires {cred.not_after:%Y-%m-%d %H:%M} UTC)")  # fmt: skip
        return 0
    if args.keys_command == "devices":
        return _devices(folder, args)
    if args.keys_command == "delegate":
        return _delegate(folder, args)
    now = dt.datetime.now(dt.UTC)
    rows = entries(folder)
    if args.json:
        print(json.dumps([
            {"name": e.name, "kind": e.kind, "path": str(e.path),
             "not_after": e.not_after.isoformat() if e.not_after else None,
             "expired": bool(e.not_after and e.not_after <= now)}
            for e in rows
        ], indent=2))  # fmt: skip
        return 0
    if not rows:
        print(f"fogline keys: nothing in {folder}; run `fogline keys init`", file=sys.stderr)
        return 0
    table = [("name", "kind", "expires (UTC)", "state")]
    for e in rows:
        if e.not_after is None:
            table.append((e.name, e.kind, "-", "-"))
            continue
        left = (e.not_after - now).days
        state = "expired" if e.not_after <= now else f"{left} days left"
        table.append((e.name, e.kind, f"{e.not_after:%Y-%m-%d %H:%M}", state))
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def _delegate(folder: Path, args: argparse.Namespace) -> int:
    """`fogline keys delegate`: a fog signing key and the root's delegation of it."""
    from fogline import signing  # it imports this module

    sites = args.site or [signing.ANY]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models or not all(s.strip() for s in sites):
        raise KeysError("--site and --models need at least one non-empty name")
    root_path = folder / "signing.key"
    if not root_path.is_file():
        raise KeysError(
            f"no root signing key {root_path}; run `fogline keys init --dir {folder}` first "
            "(or put the offline signing.key back there for this step)"
        )
    root = signing.load_root_private(root_path)
    expires = time.time() + args.days * 86400
    key, delegation = signing.delegate(
        root, args.name, sites=[s.strip() for s in sites], models=models, expires=expires
    )
    key_path, delegation_path = signing.write_signer(folder, args.name, key, delegation)
    until = _from_unix(delegation.expires)
    print(f"wrote {key_path}, {delegation_path} (fog {delegation.fog}, sites "
          f"{','.join(delegation.sites)}, models {','.join(delegation.models)}, expires "
          f"{f'{until:%Y-%m-%d %H:%M} UTC' if until else delegation.expires})")  # fmt: skip
    print(f"copy both to fog {args.name}'s key folder; edges need only {folder / 'signing.pub'}",
          file=sys.stderr)  # fmt: skip
    return 0


def _devices(folder: Path, args: argparse.Namespace) -> int:
    """`fogline keys devices`: provision (or rotate) the devices' AEAD keys."""
    from fogline import aead  # the codec and numpy only for this subcommand
    from fogline.fleet import device_id

    if args.devices < 1 or args.first_device < 0:
        raise KeysError("--devices must be at least 1 and --first-device at least 0")
    target = aead.default_dir(folder)
    names = [device_id(i) for i in range(args.first_device, args.first_device + args.devices)]
    try:
        written = aead.provision(target, names, rotate=args.rotate)
    except FoglineError as exc:
        raise KeysError(str(exc)) from exc
    print(f"wrote {len(written)} device keys into {target} ({len(names)} devices)")
    return 0
