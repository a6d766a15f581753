"""Over-the-air model updates at the edge: verify, stage, write, health-check, switch, ack.

A fog publishes a signed manifest (retained) and the model's bytes in retained chunks. The
installer checks the delegation, the signature, the expiry, the targets, the size and the version
against the persisted counter before it fetches a byte (it subscribes to the chunks only then);
stages the chunks on disk (an edge that restarts or reconnects gets the retained manifest and
chunks again and completes what is missing); checks the
size and sha256 of the assembled bytes and validates the flatbuffer before an interpreter sees
them; writes the file (temporary file, fsync, atomic rename); loads it and runs the golden inputs
of the manifest (finite outputs, within tolerance, within the latency bound); and only then
switches the model and moves the counter, in one transaction. Anything that fails leaves the
serving model and the counter as they were, and is answered with a reason.

Every step is crash-safe: the database points at a model only once its file is complete, and
`current()` re-checks the file's sha256 at boot.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fogline.codec import ModelAck, ModelChunk
from fogline.db import transaction
from fogline.errors import FoglineError
from fogline.models.loaded import LoadedModel, load_model
from fogline.models.reader import validate
from fogline.signing import Manifest, SignatureRejected, SignedManifest, verify_manifest

log = logging.getLogger(__name__)

MIGRATIONS = [
    """
    CREATE TABLE models (
        name TEXT PRIMARY KEY, version INTEGER NOT NULL, path TEXT NOT NULL,
        sha256 TEXT NOT NULL, installed REAL NOT NULL
    )
    """,
]

#: The steps of one install, in order; `on_step` is told after each (tests kill the process there).
STEPS = ("staged", "written", "loaded", "checked", "switched")


@dataclass(frozen=True, slots=True)
class Installed:
    """A model this edge runs: the file the database points at, checked at boot."""

    name: str
    version: int
    path: Path
    sha256: str


@dataclass
class _Pending:
    manifest: Manifest
    folder: Path
    have: set[int]


class Rejected(FoglineError):
    """An update that must not be installed; `reason` is the counter key and the ack's reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 16), b""):
            h.update(block)
    return h.hexdigest()


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to `path`: temporary file, fsync, rename, fsync of the folder."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def health_check(model: LoadedModel, golden: dict[str, Any]) -> float:
    """Run the manifest's golden inputs; return the latency in ms or raise `Rejected`."""
    try:
        x = np.asarray(golden["inputs"], dtype=np.float64)
        want = np.asarray(golden["outputs"], dtype=np.float64)
        tolerance = float(golden["tolerance"])
        max_ms = float(golden["max_latency_ms"])
    except (KeyError, TypeError, ValueError) as exc:
        raise Rejected("health_check", f"golden data unusable: {exc}") from exc
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] != len(model.mean):
        raise Rejected("health_check", f"golden inputs shaped {x.shape} do not fit the model")
    started = time.perf_counter()
    got = model.run(x)
    ms = (time.perf_counter() - started) * 1000.0
    if not np.isfinite(got).all():
        raise Rejected("health_check", "the model gives non-finite outputs on the golden inputs")
    if got.shape != want.shape:
        raise Rejected("health_check", f"outputs shaped {got.shape}, expected {want.shape}")
    err = float(np.abs(got - want).max())
    if err > tolerance:
        raise Rejected("health_check", f"outputs differ by {err:.3g} > tolerance {tolerance:g}")
    if ms > max_ms:
        raise Rejected("health_check", f"{ms:.1f} ms on the golden inputs > {max_ms:g} ms")
    return ms


class Installer:
    """The edge's side of model updates (runs on the worker thread, between inference batches).

    `running(name)` gives the version serving now; `switch(name, model)` puts a checked model
    into service; `fetch(name, True)` subscribes to the retained chunks of `name` (the broker
    sends them all again on every subscribe) and `fetch(name, False)` stops.
    """

    def __init__(
        self,
        db: sqlite3.Connection,
        folder: Path,
        root: Ed25519PublicKey,
        edge: str,
        *,
        names: tuple[str, ...],
        running: Callable[[str], int],
        switch: Callable[[str, LoadedModel], None],
        fetch: Callable[[str, bool], None],
        max_bytes: int = 16 * 1024 * 1024,
        on_step: Callable[[str], None] | None = None,
    ) -> None:
        self.db = db
        self.folder = folder
        self.staging = folder / "staging"
        self.root = root
        self.edge = edge
        self.names = names
        self.running = running
        self.switch = switch
        self.fetch = fetch
        self.max_bytes = max_bytes
        self.on_step = on_step or (lambda _step: None)
        self.stats: Counter[str] = Counter()
        self._pending: dict[str, _Pending] = {}
        #: The last manifest answered per model (version, signature): a retained manifest comes
        #: again on every reconnect and is answered once.
        self._answered: dict[str, tuple[int, bytes]] = {}
        self.staging.mkdir(parents=True, exist_ok=True)

    # ----------------------------------------------------------------- boot

    def current(self) -> dict[str, Installed]:
        """The installed models whose files still match their sha256 (others are skipped)."""
        out = {}
        for name, version, path, sha in self.db.execute(
            "SELECT name, version, path, sha256 FROM models"
        ):
            p = Path(path)
            try:
                ok = sha256_file(p) == sha
            except OSError:
                ok = False
            if ok:
                out[name] = Installed(name, version, p, sha)
            else:
                self.stats["boot_mismatch"] += 1
                log.error("model file %s is missing or altered: not using it", p)
        return out

    def counter(self, name: str) -> int:
        """The highest version accepted for `name` (never goes down)."""
        row = self.db.execute("SELECT version FROM models WHERE name = ?", (name,)).fetchone()
        return max(row[0] if row else 0, self.running(name))

    # ----------------------------------------------------------------- inputs

    def on_manifest(self, signed: SignedManifest, now: float) -> ModelAck | None:
        """Take a signed manifest; returns the ack to send, if any."""
        m = signed.manifest
        key = (m.version, signed.signature)
        if self._answered.get(m.name) == key:
            return None
        if not m.targets_edge(self.edge):
            self.stats["not_targeted"] += 1
            return None
        self._answered[m.name] = key
        try:
            verify_manifest(signed, self.root, now=now)
            if m.name not in self.names:
                raise Rejected("unknown_model", f"this edge runs {', '.join(self.names)}")
            self._check_version(m)
            if m.size > self.max_bytes:
                raise Rejected("too_large", f"{m.size} bytes > limit {self.max_bytes}")
        except SignatureRejected as exc:
            return self._reject(m, exc.reason, exc.detail)
        except Rejected as exc:
            if exc.reason == "already_installed":
                return ModelAck(m.name, m.version, "installed")
            return self._reject(m, exc.reason, exc.detail)
        folder = self.staging / f"{m.name}-v{m.version}"
        for old in self.staging.glob(f"{m.name}-v*"):
            if old != folder:
                shutil.rmtree(old, ignore_errors=True)
        folder.mkdir(exist_ok=True)
        have = {int(p.stem) for p in folder.glob("*.part") if p.stem.isdigit()}
        self._pending[m.name] = _Pending(m, folder, have)
        log.info(
            "model %s v%d announced (%d bytes in %d chunks); %d already here",
            m.name, m.version, m.size, m.chunks, len(have),
        )  # fmt: skip
        if len(have) < m.chunks:
            self.fetch(m.name, True)
        return self._maybe_install(m.name)

    def on_chunk(self, chunk: ModelChunk) -> ModelAck | None:
        """Take a chunk: kept only when it belongs to an announced, verified manifest."""
        p = self._pending.get(chunk.name)
        if p is None or p.manifest.version != chunk.version:
            self.stats["chunks_ignored"] += 1
            return None
        m = p.manifest
        expected = min(m.chunk_size, m.size - chunk.index * m.chunk_size)
        if chunk.index >= m.chunks or len(chunk.data) != expected:
            self.stats["chunks_bad"] += 1
            return self._fail(m, "bad_chunk", f"chunk {chunk.index}: {len(chunk.data)} bytes")
        if chunk.index not in p.have:
            write_atomically(p.folder / f"{chunk.index}.part", chunk.data)
            p.have.add(chunk.index)
            self.stats["chunks"] += 1
        return self._maybe_install(chunk.name)

    # ----------------------------------------------------------------- install

    def _check_version(self, m: Manifest) -> None:
        counter = self.counter(m.name)
        if m.version > counter:
            return
        row = self.db.execute(
            "SELECT version, sha256 FROM models WHERE name = ?", (m.name,)
        ).fetchone()
        if row is not None and (row[0], row[1]) == (m.version, m.sha256):
            raise Rejected("already_installed", f"v{m.version}")
        raise Rejected("old_version", f"v{m.version} is not newer than v{counter}")

    def _maybe_install(self, name: str) -> ModelAck | None:
        p = self._pending[name]
        m = p.manifest
        if len(p.have) < m.chunks:
            return None
        del self._pending[name]
        self.fetch(name, False)
        self.on_step("staged")
        data = b"".join((p.folder / f"{i}.part").read_bytes() for i in range(m.chunks))
        path = self.folder / f"{m.name}-v{m.version}.tflite"
        try:
            if len(data) != m.size:
                raise Rejected("bad_size", f"{len(data)} bytes, manifest says {m.size}")
            digest = hashlib.sha256(data).hexdigest()
            if digest != m.sha256:
                raise Rejected("bad_sha256", f"bytes hash to {digest[:16]}..., not the manifest's")
            try:
                validate(data)
            except FoglineError as exc:
                raise Rejected("invalid_model", str(exc)) from exc
            write_atomically(path, data)
            self.on_step("written")
            try:
                # The manifest's version is the model's version from now on (a rollback ships
                # older bytes under a newer version).
                model = dataclasses.replace(load_model(path), version=m.version)
            except (FoglineError, ValueError, RuntimeError) as exc:
                raise Rejected("invalid_model", f"{type(exc).__name__}: {exc}") from exc
            self.on_step("loaded")
            ms = health_check(model, m.golden)
            self.on_step("checked")
        except Rejected as exc:
            shutil.rmtree(p.folder, ignore_errors=True)
            path.unlink(missing_ok=True)
            return self._reject(m, exc.reason, exc.detail)
        with transaction(self.db):
            self.db.execute(
                "INSERT INTO models(name, version, path, sha256, installed) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT(name) DO UPDATE SET version = excluded.version,"
                " path = excluded.path, sha256 = excluded.sha256, installed = excluded.installed",
                (m.name, m.version, str(path), m.sha256, time.time()),
            )
        previous = self.running(m.name)
        self.switch(m.name, model)
        self.on_step("switched")
        shutil.rmtree(p.folder, ignore_errors=True)
        self._prune(m.name, keep={path.name, f"{m.name}-v{previous}.tflite"})
        self.stats["installed"] += 1
        log.info("installed %s v%d (golden inputs in %.1f ms)", m.name, m.version, ms)
        return ModelAck(m.name, m.version, "installed")

    def _prune(self, name: str, keep: set[str]) -> None:
        """Delete older files of `name`, keeping the current and the previous one."""
        for f in self.folder.glob(f"{name}-v*.tflite"):
            if f.name not in keep:
                f.unlink(missing_ok=True)

    def _fail(self, m: Manifest, reason: str, detail: str) -> ModelAck:
        self._pending.pop(m.name, None)
        self.fetch(m.name, False)
        return self._reject(m, reason, detail)

    def _reject(self, m: Manifest, reason: str, detail: str) -> ModelAck:
        self.stats[f"rejected.{reason}"] += 1
        log.warning("model %s v%d rejected: %s: %s", m.name, m.version, reason, detail)
        return ModelAck(m.name, m.version, "rejected", reason, detail[:1000])
