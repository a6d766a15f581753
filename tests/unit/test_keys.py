"""`fogline keys`, the broker's password file and ACL, and the refusal of unsafe client configs."""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import hashlib
import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from fogline import keys, up
from fogline.cli import main
from fogline.config import ServiceConfig, build, check_startup
from fogline.errors import ConfigError
from fogline.security import hash_password, render_acl

ACL_TEMPLATE = (Path(__file__).resolve().parents[2] / "mosquitto" / "acl.tmpl").read_text()


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    d = tmp_path / "keys"
    keys.init(d)
    return d


def test_init_makes_a_self_signed_ca_for_ten_years_and_is_idempotent(folder: Path) -> None:
    ca = _cert(folder / "ca.crt")
    ca.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    years = (ca.not_valid_after_utc - ca.not_valid_before_utc).days / 365
    assert 9.9 < years < 10.1
    before = (folder / "ca.crt").read_bytes(), (folder / "signing.key").read_bytes()
    assert keys.init(folder) == []
    assert ((folder / "ca.crt").read_bytes(), (folder / "signing.key").read_bytes()) == before


def test_the_signing_key_is_ed25519_and_matches_its_public_key(folder: Path) -> None:
    private = serialization.load_pem_private_key((folder / "signing.key").read_bytes(), None)
    public = serialization.load_pem_public_key((folder / "signing.pub").read_bytes())
    assert isinstance(private, ed25519.Ed25519PrivateKey)
    assert isinstance(public, ed25519.Ed25519PublicKey)
    public.verify(private.sign(b"model"), b"model")


def test_issued_certificates_verify_against_the_ca(folder: Path) -> None:
    ca = _cert(folder / "ca.crt")
    broker = keys.issue(folder, "broker", role="broker")
    edge = keys.issue(folder, "edge-e0", role="edge")
    for cred in (broker, edge):
        _cert(cred.cert).verify_directly_issued_by(ca)
    san = _cert(broker.cert).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert "localhost" in san.value.get_values_for_type(x509.DNSName)
    assert ipaddress.ip_address("127.0.0.1") in san.value.get_values_for_type(x509.IPAddress)
    assert (edge.role, edge.ident) == ("edge", "e0")
    assert [c.name for c in keys.credentials(folder)] == ["broker", "edge-e0"]


def test_a_certificate_from_another_ca_does_not_verify(folder: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    keys.init(other)
    stranger = keys.issue(other, "edge-e0", role="edge")
    with pytest.raises((ValueError, TypeError)):
        _cert(stranger.cert).verify_directly_issued_by(_cert(folder / "ca.crt"))


def test_expiry_follows_days_and_negative_days_make_an_expired_certificate(folder: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    fresh = keys.issue(folder, "fog-f0", role="fog", days=30)
    assert dt.timedelta(days=29) < fresh.not_after - now <= dt.timedelta(days=30)
    old = keys.issue(folder, "edge-old", role="edge", days=-1)
    cert = _cert(old.cert)
    assert cert.not_valid_after_utc < now
    assert cert.not_valid_before_utc < cert.not_valid_after_utc
    cert.verify_directly_issued_by(_cert(folder / "ca.crt"))  # expired, not forged
    listed = {e.name: e for e in keys.entries(folder)}
    assert listed["edge-old"].not_after == old.not_after
    assert {"ca", "signing", "fog-f0", "edge-old"} <= set(listed)


def test_files_are_written_with_private_and_public_permissions(folder: Path) -> None:
    cred = keys.issue(folder, "cloud-c0", role="cloud")
    assert _mode(folder) == 0o700
    for private in (folder / "ca.key", folder / "signing.key", cred.key, cred.password_file):
        assert _mode(private) == 0o600, private
    for public in (folder / "ca.crt", folder / "signing.pub", cred.cert):
        assert _mode(public) == 0o644, public
    assert not list(folder.glob(".*tmp")), "a temporary file was left behind"


def test_each_client_gets_its_own_random_password(folder: Path) -> None:
    a = keys.read_password(keys.issue(folder, "edge-e0", role="edge").password_file)
    b = keys.read_password(keys.issue(folder, "edge-e1", role="edge").password_file)
    assert a != b and len(a) >= 24


def test_bad_names_and_roles_and_a_missing_ca_are_refused(folder: Path, tmp_path: Path) -> None:
    for name in ("", "../x", "ca", "a b", "x:y"):
        with pytest.raises(keys.KeysError):
            keys.issue(folder, name, role="edge")
    with pytest.raises(keys.KeysError):
        keys.issue(folder, "edge-e0", role="admin")
    with pytest.raises(keys.KeysError, match="keys init"):
        keys.issue(tmp_path / "empty", "edge-e0", role="edge")


def test_the_cli_inits_issues_and_lists(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path / "k")
    assert main(["keys", "init", "--dir", d]) == 0
    assert main(["keys", "issue", "edge-e0", "--dir", d, "--days", "10"]) == 0
    assert main(["keys", "issue", "whoever", "--dir", d]) == 2  # role not in the name
    capsys.readouterr()
    assert main(["keys", "list", "--dir", d]) == 0
    out = capsys.readouterr().out
    assert "edge-e0" in out and "9 days left" in out and "ca" in out


def test_password_hashes_are_mosquitto_pbkdf2_sha512() -> None:
    _, alg, iterations, salt, digest = hash_password("s3cret").split("$")
    assert alg == "7"
    expect = hashlib.pbkdf2_hmac("sha512", b"s3cret", base64.b64decode(salt), int(iterations), 64)
    assert base64.b64decode(digest) == expect


def test_the_acl_gives_each_role_only_its_topics(folder: Path) -> None:
    creds = [
        keys.issue(folder, n, role=keys.role_from_name(n))
        for n in ("broker", "device-sim-s0", "edge-e0", "fog-f0", "cloud-c0", "monitor-up")
    ]
    acl = render_acl(ACL_TEMPLATE, creds, root="fl/v1")
    users: dict[str, list[str]] = {}
    for line in acl.splitlines():
        if line.startswith("user "):
            current = users.setdefault(line.split()[1], [])
        elif line.startswith("topic "):
            current.append(line.removeprefix("topic "))
    assert users["broker"] == []
    assert "write fl/v1/dev/+/+/tele" in users["device-sim-s0"]
    assert not [r for r in users["device-sim-s0"] if r.startswith("read") and "status" not in r]
    assert set(users["edge-e0"]) >= {
        "read fl/v1/dev/e0/+/tele", "write fl/v1/edge/e0/up", "read fl/v1/edge/e0/ack",
        "read fl/v1/edge/e0/esc/reply", "write fl/v1/status/edge/e0", "read fl/v1/status/#",
    }  # fmt: skip
    assert "write fl/v1/fog/f0/up" in users["fog-f0"]
    assert "read fl/v1/fog/+/up" in users["cloud-c0"]
    assert not [r for r in users["monitor-up"] if r.startswith("write")]
    everything = [r for rules in users.values() for r in rules if r.split()[1] in ("#", "fl/v1/#")]
    assert everything == [], "no credential may read or write every topic"


def test_secure_up_passes_paths_never_passwords_on_the_command_line(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    up.add_arguments(parser)
    args = parser.parse_args(["--secure", "--data-dir", str(tmp_path / "data"), "--edges", "2"])
    pipeline = up.Pipeline(args)
    folder = tmp_path / "data" / "keys"
    passwords = [keys.read_password(p) for p in folder.glob("*.password")]
    assert len(passwords) == 7  # broker, monitor, cloud, fog, 2 edges, simulator
    for module, ident in [("cloud_sink", "c0"), ("fog_aggregator", "f0"),
                          ("edge_agent", "e1"), ("device_sim", "s0")]:  # fmt: skip
        argv = pipeline._argv(module, ident)
        assert "--password-file" in argv and "--tls-cert" in argv
        assert not [a for a in argv for pw in passwords if pw in a], f"a password in {argv}"
    first = {p.name: p.read_bytes() for p in folder.glob("*.crt")}
    up.Pipeline(args)  # a second start keeps valid credentials
    assert {p.name: p.read_bytes() for p in folder.glob("*.crt")} == first


@pytest.mark.parametrize(
    ("values", "key", "words"),
    [
        ({"broker_host": "10.1.2.3"}, "broker_host", "without TLS"),
        ({"broker_host": "mqtt.example.com", "tls_ca": "CA"}, "broker_host", "anonymously"),
        ({"tls_cert": "CA"}, "tls_key", "go together"),
        ({"username": "u", "password_file": "/nonexistent/pw"}, "password_file", "cannot read"),
        ({"password_file": "CA"}, "username", "username is empty"),
        ({"data_dir": "CA/data"}, "data_dir", "not writable"),
    ],
)
def test_unsafe_client_configs_are_refused(
    tmp_path: Path, values: dict[str, str], key: str, words: str
) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    values = {k: str(ca) + v.removeprefix("CA") if v.startswith("CA") else v
              for k, v in values.items()}  # fmt: skip
    with pytest.raises(ConfigError, match=words) as info:
        check_startup(build(ServiceConfig, values))
    assert info.value.key == key


def test_a_remote_broker_with_tls_and_a_login_is_accepted(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("secret\n")
    cfg = build(
        ServiceConfig,
        {"broker_host": "10.1.2.3", "tls_ca": str(pw), "username": "u", "password_file": str(pw)},
    )
    check_startup(cfg)
    build(ServiceConfig, {"broker_host": "mqtt.local"})  # a valid config alone...


def test_a_process_refuses_to_start_against_a_remote_broker_without_tls(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cloud_sink.__main__ import main as sink_main

    argv = ["--broker-host", "10.1.2.3", "--data-dir", str(tmp_path)]
    assert sink_main(argv) == 2  # ...but the process does not start
    assert "refusing to connect without TLS" in capsys.readouterr().err
