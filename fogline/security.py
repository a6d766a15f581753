"""TLS and credentials: the client side (paho) and the broker's password file and ACL."""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import string
import tempfile
from collections.abc import Sequence
from pathlib import Path

import paho.mqtt.client as mqtt

from fogline.errors import FoglineError
from fogline.keys import Credential, KeysError, read_password

__all__ = [
    "AclError",
    "apply_client_security",
    "client_flags",
    "hash_password",
    "render_acl",
    "write_broker_files",
]

# Mosquitto 2.0's `$7$` hashes: PBKDF2-HMAC-SHA512, 12-byte salt, 64-byte digest. Mosquitto
# reads the iteration count from each line; its own default (101) is low.
PBKDF2_ITERATIONS = 1000
_SALT_BYTES = 12


class AclError(FoglineError):
    """The ACL template is malformed or uses an unknown placeholder."""


def hash_password(password: str, *, iterations: int = PBKDF2_ITERATIONS) -> str:
    """A password hash in the `$7$` format of Mosquitto 2.0's `password_file`."""
    salt = secrets.token_bytes(_SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
    b64 = base64.b64encode
    return f"$7${iterations}${b64(salt).decode()}${b64(digest).decode()}"


def apply_client_security(
    client: mqtt.Client,
    *,
    ca: str | Path = "",
    cert: str | Path = "",
    key: str | Path = "",
    username: str = "",
    password_file: str | Path = "",
) -> None:
    """Set TLS (when `ca` or `cert` is given) and a username and password on a paho client.

    The password is read from `password_file`, so it never appears on a command line.
    """
    if ca or cert:
        client.tls_set(
            ca_certs=str(ca) if ca else None,
            certfile=str(cert) if cert else None,
            keyfile=str(key) if key else None,
        )
    if username:
        password = read_password(password_file) if password_file else None
        client.username_pw_set(username, password)


def client_flags(cred: Credential, ca: Path) -> list[str]:
    """Process flags that connect with `cred` over TLS (paths only, never the password)."""
    return [
        "--tls-ca", str(ca), "--tls-cert", str(cred.cert), "--tls-key", str(cred.key),
        "--username", cred.name, "--password-file", str(cred.password_file),
    ]  # fmt: skip


def _blocks(template: str) -> list[tuple[tuple[str, ...], str]]:
    """Split an ACL template into `(roles, text)` blocks headed by `@role ROLE...` lines."""
    blocks: list[tuple[tuple[str, ...], list[str]]] = []
    for number, line in enumerate(template.splitlines(), 1):
        if line.startswith("@role"):
            roles = tuple(line.split()[1:])
            if not roles:
                raise AclError(f"ACL template line {number}: @role names no role")
            blocks.append((roles, []))
        elif blocks and line.strip() and not line.lstrip().startswith("#"):
            blocks[-1][1].append(line.strip())
    return [(roles, "\n".join(lines)) for roles, lines in blocks]


def render_acl(template: str, creds: Sequence[Credential], *, root: str) -> str:
    """The Mosquitto ACL file: one `user` section per credential, from its role's blocks.

    Placeholders: `${root}` (topic root), `${role}`, `${id}` (process id) and `${name}`.
    """
    blocks = _blocks(template)
    out = ["# Rendered by fogline.broker from mosquitto/acl.tmpl; do not edit."]
    for cred in creds:
        values = {"root": root, "role": cred.role, "id": cred.ident, "name": cred.name}
        out += ["", f"user {cred.name}"]
        for roles, text in blocks:
            if cred.role not in roles and "*" not in roles:
                continue
            try:
                out.append(string.Template(text).substitute(values))
            except (KeyError, ValueError) as exc:
                known = sorted(values)
                raise AclError(f"ACL template: bad placeholder {exc}; known: {known}") from exc
    return "\n".join(out) + "\n"


def _write_private(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_broker_files(
    creds: Sequence[Credential], out_dir: Path, *, acl_template: str, root: str
) -> tuple[Path, Path]:
    """Write `passwd` (hashed passwords) and `acl` into `out_dir`; return their paths."""
    lines = []
    for cred in creds:
        try:
            lines.append(f"{cred.name}:{hash_password(read_password(cred.password_file))}")
        except KeysError:
            continue  # a certificate without a password file cannot log in
    passwd, acl = out_dir / "passwd", out_dir / "acl"
    _write_private(passwd, "\n".join(lines) + "\n")
    _write_private(acl, render_acl(acl_template, creds, root=root))
    return passwd, acl
