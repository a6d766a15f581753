"""The edge's model installer: what it refuses before loading, what it installs, crash safety."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.ota import MIGRATIONS, STEPS, Installer
from fog_aggregator.rollout import golden
from fogline.codec import ModelAck, ModelChunk
from fogline.db import connect, migrate
from fogline.models.catalog import default_model_path
from fogline.models.layers import Dense
from fogline.models.loaded import LoadedModel
from fogline.models.writer import write_model
from fogline.signing import Manifest, SignedManifest, delegate, sign_manifest

NAME = "anomaly"
BASE = default_model_path(NAME).read_bytes()
ROOT = Ed25519PrivateKey.generate()


def update(
    data: bytes = BASE,
    *,
    version: int = 2,
    root: Ed25519PrivateKey = ROOT,
    chunk: int = 4096,
    expires_in: float = 3600.0,
    delegation_expires_in: float = 86400.0,
    targets: tuple[str, ...] = ("*",),
    models: tuple[str, ...] = ("*",),
    golden_of: bytes | None = None,
) -> tuple[SignedManifest, list[ModelChunk]]:
    """A signed manifest and the chunks of `data`, as a fog would publish them."""
    import hashlib

    now = time.time()
    key, deleg = delegate(
        root, "f0", sites=["*"], models=list(models), expires=now + delegation_expires_in
    )
    n = max(1, -(-len(data) // chunk))
    manifest = Manifest(
        name=NAME,
        version=version,
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        created=now,
        expires=now + expires_in,
        metadata={},
        chunk_size=chunk,
        chunks=n,
        targets=targets,
        golden={**golden(golden_of or data), "max_latency_ms": 5000.0},
        site="site0",
    )
    chunks = [ModelChunk(NAME, version, i, data[i * chunk : (i + 1) * chunk]) for i in range(n)]
    return sign_manifest(key, deleg, manifest), chunks


class Edge:
    """An installer over a real database and folder, with the serving models it would switch."""

    def __init__(self, folder: Path, **kwargs: Any) -> None:
        self.db = connect(folder / "edge.db")
        migrate(self.db, "edge", MIGRATIONS)
        self.serving: dict[str, int] = {NAME: 1}
        self.switched: list[LoadedModel] = []
        self.fetching: set[str] = set()
        self.installer = Installer(
            self.db,
            folder / "models",
            ROOT.public_key(),
            "e0",
            names=("anomaly", "classifier", "failure"),
            running=lambda name: self.serving.get(name, 0),
            switch=self._switch,
            fetch=lambda name, on: (self.fetching.add if on else self.fetching.discard)(name),
            **kwargs,
        )

    def _switch(self, name: str, model: LoadedModel) -> None:
        self.switched.append(model)

    def deliver(self, signed: SignedManifest, chunks: list[ModelChunk]) -> list[ModelAck]:
        acks = [self.installer.on_manifest(signed, time.time())]
        acks += [self.installer.on_chunk(c) for c in chunks]
        return [a for a in acks if a is not None]

    def counter(self) -> int:
        return self.installer.counter(NAME)


def test_a_valid_update_is_installed_switched_and_counted(tmp_path: Path) -> None:
    edge = Edge(tmp_path)
    signed, chunks = update()
    assert len(chunks) > 1  # really chunked
    # Chunks that come before their manifest are not kept (nothing unverified reaches the disk).
    assert edge.installer.on_chunk(chunks[0]) is None
    assert edge.installer.on_manifest(signed, time.time()) is None
    assert edge.fetching == {NAME}  # subscribed to the chunks once the manifest checked out
    acks = [edge.installer.on_chunk(c) for c in chunks]
    assert acks[-1] == ModelAck(NAME, 2, "installed") and not any(acks[:-1])
    assert edge.fetching == set()
    assert len(edge.switched) == 1 and edge.switched[0].meta["name"] == NAME
    assert edge.counter() == 2
    current = edge.installer.current()[NAME]
    assert current.version == 2 and current.path.read_bytes() == BASE
    # The retained manifest comes again after a reconnect: answered once, nothing re-installed.
    assert edge.deliver(signed, chunks) == []
    assert len(edge.switched) == 1


def test_an_edge_that_restarts_mid_download_completes_from_what_it_kept(tmp_path: Path) -> None:
    signed, chunks = update(chunk=2048)
    first = Edge(tmp_path)
    first.installer.on_manifest(signed, time.time())
    for c in chunks[:2]:
        first.installer.on_chunk(c)
    first.db.close()
    again = Edge(tmp_path)
    assert again.installer.on_manifest(signed, time.time()) is None  # two chunks already here
    acks = [again.installer.on_chunk(c) for c in chunks[2:]]
    assert acks[-1] == ModelAck(NAME, 2, "installed")
    assert again.installer.stats["chunks"] == len(chunks) - 2


def _flipped(chunks: list[ModelChunk]) -> list[ModelChunk]:
    data = bytearray(chunks[1].data)
    data[100] ^= 0x01
    return [chunks[0], dataclasses.replace(chunks[1], data=bytes(data)), *chunks[2:]]


def _resigned_field(**change: Any) -> tuple[SignedManifest, list[ModelChunk]]:
    signed, chunks = update()
    forged = dataclasses.replace(signed.manifest, **change)
    return dataclasses.replace(signed, manifest=forged), chunks


def _nan_model() -> bytes:
    width = len(golden(BASE)["inputs"][0])
    layers = [
        Dense(weights=np.zeros((2, width)), bias=np.full(2, 3e38), activation="none"),
        Dense(weights=np.array([[10.0, -10.0]]), bias=np.zeros(1), activation="none"),
    ]
    return write_model(layers, metadata={"name": NAME, "version": 9})


CASES = {
    "flipped byte": (lambda: (update()[0], _flipped(update()[1])), "bad_sha256"),
    "bad signature": (lambda: _resigned_field(size=len(BASE) + 1), "bad_signature"),
    "undelegated key": (lambda: update(root=Ed25519PrivateKey.generate()), "bad_delegation"),
    "expired delegation": (lambda: update(delegation_expires_in=-60.0), "delegation_expired"),
    "model out of scope": (lambda: update(models=("classifier",)), "out_of_scope"),
    "older version": (lambda: update(version=1), "old_version"),
    "expired manifest": (lambda: update(expires_in=-60.0), "manifest_expired"),
    "health check NaN": (lambda: update(_nan_model(), golden_of=BASE), "health_check"),
    "too large": (lambda: update(BASE + b"\0" * 70_000), "too_large"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_update_is_refused_and_the_old_model_keeps_serving(tmp_path: Path, case: str) -> None:
    make, reason = CASES[case]
    signed, chunks = make()
    edge = Edge(tmp_path, max_bytes=len(BASE) + 1000)
    acks = edge.deliver(signed, chunks)
    assert [(a.status, a.reason) for a in acks] == [("rejected", reason)], acks
    assert edge.switched == []  # the serving model is untouched
    assert edge.counter() == 1  # the counter did not move
    assert edge.installer.current() == {}
    assert not list((tmp_path / "models").glob("*.tflite"))  # nothing installed on disk
    assert edge.fetching == set()
    assert edge.installer.stats[f"rejected.{reason}"] == 1


def test_an_update_for_other_edges_is_ignored(tmp_path: Path) -> None:
    edge = Edge(tmp_path)
    assert edge.deliver(*update(targets=("e1", "e2"))) == []
    assert edge.installer.stats["not_targeted"] == 1 and edge.switched == []


def test_a_later_version_after_a_refused_one_installs(tmp_path: Path) -> None:
    edge = Edge(tmp_path)
    edge.deliver(*update(_nan_model(), golden_of=BASE, version=2))
    assert edge.deliver(*update(version=3)) == [ModelAck(NAME, 3, "installed")]
    assert edge.counter() == 3


CRASH = """
import sys, os, signal, time
sys.path.insert(0, {tests!r})
from test_ota import Edge, update
from pathlib import Path
edge = Edge(Path({folder!r}))
def step(name):
    if name == {step!r}:
        os.kill(os.getpid(), signal.SIGKILL)
edge.installer.on_step = step
edge.deliver(*update(version=2))
"""


@pytest.mark.parametrize("step", STEPS)
def test_kill_9_at_each_install_step_boots_a_verified_model(tmp_path: Path, step: str) -> None:
    script = CRASH.format(tests=str(Path(__file__).parent), folder=str(tmp_path), step=step)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    edge = Edge(tmp_path)
    current = edge.installer.current()
    if step == "switched":
        # The database committed before the switch: the new model is the one to boot.
        assert current[NAME].version == 2 and current[NAME].path.read_bytes() == BASE
    else:
        assert current == {}  # still the model it had, the counter unchanged
        assert edge.counter() == 1
        # The retained update comes again and completes.
        assert edge.deliver(*update(version=2)) == [ModelAck(NAME, 2, "installed")]
    assert edge.installer.stats["boot_mismatch"] == 0
    assert not list((tmp_path / "models").glob("*.tmp")) or step in ("staged",)


def test_an_altered_model_file_is_not_booted(tmp_path: Path) -> None:
    edge = Edge(tmp_path)
    edge.deliver(*update())
    path = edge.installer.current()[NAME].path
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    assert Edge(tmp_path).installer.current() == {}
    assert os.path.exists(path)


def test_an_edge_with_a_missing_root_key_refuses_to_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edge_agent.__main__ import main

    missing = tmp_path / "signing.pub"
    assert main(["--ota-root-key", str(missing), "--data-dir", str(tmp_path)]) == 2
    assert "ota_root_key" in capsys.readouterr().err
