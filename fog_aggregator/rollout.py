"""The fog's model rollouts: sign, publish in retained chunks, canary, promote or roll back.

A candidate (retrained here, or pushed by an operator into the fog's `incoming/` folder) gets the
next version number of its model, a manifest signed with the fog's delegated key and golden
inputs computed with the numpy reference executor on the exact bytes being published. It goes to
a canary share of the edges first. After `canary_period` seconds the fog compares the canaries'
health (install result, warning rate and escalation rate per reading) with the other edges', and
either promotes the model to every edge or rolls the canaries back. A rollback publishes the
previous model's bytes under a new, higher version: the edges' version counters never go down.

Every step is recorded in the fog's database and sent upstream as a `model` custody record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fogline.codec import ModelAck, ModelChunk, encode_chunk, encode_manifest
from fogline.db import transaction
from fogline.models.executor import execute
from fogline.models.reader import read_model, validate
from fogline.signing import Delegation, Manifest, sign_manifest
from fogline.topics import Topics

log = logging.getLogger(__name__)

MIGRATIONS = [
    """
    CREATE TABLE model_versions (
        name TEXT NOT NULL, version INTEGER NOT NULL, sha256 TEXT NOT NULL, data BLOB NOT NULL,
        origin TEXT NOT NULL, created REAL NOT NULL, PRIMARY KEY (name, version)
    );
    CREATE TABLE rollouts (
        name TEXT PRIMARY KEY, version INTEGER NOT NULL, stable INTEGER NOT NULL,
        state TEXT NOT NULL, canaries TEXT NOT NULL, started REAL NOT NULL, until REAL NOT NULL,
        chunks INTEGER NOT NULL, reason TEXT NOT NULL DEFAULT ''
    );
    CREATE TABLE model_acks (
        edge TEXT NOT NULL, name TEXT NOT NULL, version INTEGER NOT NULL, status TEXT NOT NULL,
        reason TEXT NOT NULL, at REAL NOT NULL, PRIMARY KEY (edge, name)
    )
    """,
]

GOLDEN_ROWS = 8


@dataclass(frozen=True, slots=True)
class RolloutPolicy:
    """How a rollout proceeds."""

    canary_share: float = 0.25
    canary_period: float = 60.0
    #: Canaries may warn or escalate up to this many times as often as the other edges ...
    tolerance: float = 2.0
    #: ... and are called worse only when their count would be this unlikely at that rate.
    significance: float = 0.01
    manifest_days: float = 30.0
    chunk_size: int = 64 * 1024
    max_latency_ms: float = 200.0


#: Edges heard from within this many seconds are candidates for a canary.
ACTIVE_WITHIN = 30.0


@dataclass(slots=True)
class _Health:
    readings: int = 0
    events: int = 0
    escalations: int = 0
    seen: float = 0.0

    def rates(self) -> tuple[float, float]:
        n = max(self.readings, 1)
        return self.events / n, self.escalations / n


def golden(data: bytes) -> dict[str, Any]:
    """Golden inputs and the outputs the numpy reference executor computes from `data`.

    The inputs are raw feature rows spread around the model's own normalisation (mean +- 2 std,
    fixed seed): they exercise every unit without needing any sample data.
    """
    parsed = read_model(data)
    meta = parsed.metadata_json("fogline")
    norm = meta.get("normalisation") or {}
    width = int(parsed.tensors[parsed.inputs[0]].shape[-1])
    mean = np.asarray(norm.get("mean", np.zeros(width)), dtype=np.float64)
    std = np.asarray(norm.get("std", np.ones(width)), dtype=np.float64)
    z = np.random.default_rng(0x601D).uniform(-2.0, 2.0, size=(GOLDEN_ROWS, width))
    x = mean + std * z
    out = execute(parsed, ((x - mean) / std).astype(np.float32))
    flavour = str(meta.get("flavour", "float32"))
    # int8 kernels of the runtime and of the executor may differ by one quantisation step.
    tolerance = 0.05 if flavour == "int8" else 1e-3
    return {
        "inputs": x.tolist(),
        "outputs": np.asarray(out, dtype=np.float64).tolist(),
        "tolerance": tolerance,
    }


def poisson_tail(k: int, lam: float) -> float:
    """P(X >= k) for X ~ Poisson(lam)."""
    if k <= 0:
        return 1.0
    term = total = math.exp(-lam)
    for i in range(1, k):
        term *= lam / i
        total += term
    return max(0.0, 1.0 - total)


def canaries_for(edges: Sequence[str], share: float, salt: str) -> list[str]:
    """A stable choice of `share` of the edges (at least one, never all of two or more)."""
    ranked = sorted(edges, key=lambda e: hashlib.sha256(f"{salt}/{e}".encode()).digest())
    k = max(1, math.ceil(share * len(ranked)))
    if len(ranked) >= 2:
        k = min(k, len(ranked) - 1)
    return sorted(ranked[:k])


class Rollouts:
    """Versions, manifests, chunks and the canary state of every model this fog distributes."""

    def __init__(
        self,
        db: Any,
        *,
        fog: str,
        site: str,
        topics: Topics,
        signer: tuple[Ed25519PrivateKey, Delegation],
        publish: Callable[[str, bytes], None],
        record: Callable[[dict[str, Any]], None],
        next_seq: Callable[[], int],
        policy: RolloutPolicy = RolloutPolicy(),
    ) -> None:
        self.db = db
        self.fog = fog
        self.site = site
        self.topics = topics
        self.key, self.delegation = signer
        self._publish = publish
        self._record = record
        self._next_seq = next_seq
        self.policy = policy
        self.health: dict[str, _Health] = {}
        self._at_start: dict[str, dict[str, _Health]] = {}

    # ----------------------------------------------------------------- versions

    def latest_version(self, name: str) -> int:
        """The highest version of `name` this fog has made (0 when none)."""
        row = self.db.execute(
            "SELECT max(version) FROM model_versions WHERE name = ?", (name,)
        ).fetchone()
        return int(row[0] or 0)

    def stable(self, name: str) -> tuple[int, bytes] | None:
        """The version every edge should run, and its bytes (None before the first rollout)."""
        row = self.db.execute(
            "SELECT v.version, v.data FROM rollouts r JOIN model_versions v"
            " ON v.name = r.name AND v.version = r.stable WHERE r.name = ?",
            (name,),
        ).fetchone()
        return (int(row[0]), bytes(row[1])) if row else None

    def register_baseline(self, name: str, version: int, data: bytes) -> None:
        """Record the model the edges start with (not published: they already have it)."""
        if self.latest_version(name) > 0:
            return
        sha = hashlib.sha256(data).hexdigest()
        with transaction(self.db):
            self.db.execute(
                "INSERT INTO model_versions VALUES (?, ?, ?, ?, 'baseline', ?)",
                (name, version, sha, data, time.time()),
            )
            self.db.execute(
                "INSERT INTO rollouts VALUES (?, ?, ?, 'stable', '[]', 0, 0, 0, 'baseline')",
                (name, version, version),
            )

    # ----------------------------------------------------------------- proposing

    def propose(self, name: str, data: bytes, edges: Sequence[str], *, origin: str) -> int:
        """Start a canary rollout of `data` as the next version of `name`; returns the version."""
        validate(data)
        now = time.time()
        version = self.latest_version(name) + 1
        stable = self.stable(name)
        canaries = canaries_for(edges, self.policy.canary_share, f"{name}/{version}")
        sha = hashlib.sha256(data).hexdigest()
        with transaction(self.db):
            self.db.execute(
                "INSERT INTO model_versions VALUES (?, ?, ?, ?, ?, ?)",
                (name, version, sha, data, origin, now),
            )
            self.db.execute(
                "INSERT INTO rollouts(name, version, stable, state, canaries, started, until,"
                " chunks) VALUES (?, ?, ?, 'canary', ?, ?, ?, 0) ON CONFLICT(name) DO UPDATE"
                " SET version = excluded.version, state = 'canary',"
                " canaries = excluded.canaries, started = excluded.started,"
                " until = excluded.until, reason = ''",
                (
                    name, version, stable[0] if stable else 0, json.dumps(canaries), now,
                    now + self.policy.canary_period,
                ),
            )  # fmt: skip
        self._at_start[name] = {e: dataclasses.replace(h) for e, h in self.health.items()}
        self._send(name, version, data, tuple(canaries) or ("*",))
        self.note(name, version, "canary", f"{origin}; canaries {', '.join(canaries) or '-'}")
        return version

    def _send(self, name: str, version: int, data: bytes, targets: tuple[str, ...]) -> None:
        """Publish the chunks (retained), clear surplus old chunks, then the signed manifest."""
        p = self.policy
        now = time.time()
        chunks = max(1, math.ceil(len(data) / p.chunk_size))
        row = self.db.execute("SELECT chunks FROM rollouts WHERE name = ?", (name,)).fetchone()
        old_chunks = int(row[0]) if row else 0
        for i in range(chunks):
            part = data[i * p.chunk_size : (i + 1) * p.chunk_size]
            payload = encode_chunk(
                self.fog, ModelChunk(name, version, i, part), seq=self._next_seq(), ts=now
            )
            self._publish(self.topics.model_chunk(self.fog, name, i), payload)
        for i in range(chunks, old_chunks):
            self._publish(self.topics.model_chunk(self.fog, name, i), b"")
        meta = read_model(data).metadata_json("fogline")
        manifest = Manifest(
            name=name,
            version=version,
            sha256=hashlib.sha256(data).hexdigest(),
            size=len(data),
            created=now,
            expires=now + p.manifest_days * 86400.0,
            metadata={k: meta[k] for k in ("name", "version", "flavour", "created") if k in meta},
            chunk_size=p.chunk_size,
            chunks=chunks,
            targets=targets,
            golden={**golden(data), "max_latency_ms": p.max_latency_ms},
            site=self.site,
        )
        signed = sign_manifest(self.key, self.delegation, manifest)
        payload = encode_manifest(self.fog, signed.to_dict(), seq=self._next_seq(), ts=now)
        self._publish(self.topics.model(self.fog, name), payload)
        with transaction(self.db):
            self.db.execute("UPDATE rollouts SET chunks = ? WHERE name = ?", (chunks, name))

    # ----------------------------------------------------------------- watching

    def observe(
        self, edge: str, *, readings: int = 0, events: int = 0, escalations: int = 0
    ) -> None:
        """Count what an edge delivered (its health during a canary period)."""
        h = self.health.setdefault(edge, _Health())
        h.readings += readings
        h.events += events
        h.escalations += escalations
        h.seen = time.time()

    def active_edges(self, now: float) -> list[str]:
        """The edges that delivered something lately (the candidates for a canary)."""
        return sorted(e for e, h in self.health.items() if now - h.seen < ACTIVE_WITHIN)

    def on_ack(self, edge: str, ack: ModelAck, now: float) -> None:
        """Record an edge's answer to a manifest (a repeated answer only once)."""
        known = self.db.execute(
            "SELECT version, status FROM model_acks WHERE edge = ? AND name = ?", (edge, ack.name)
        ).fetchone()
        if known is not None and tuple(known) == (ack.version, ack.status):
            return
        with transaction(self.db):
            self.db.execute(
                "INSERT INTO model_acks VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(edge, name)"
                " DO UPDATE SET version = excluded.version, status = excluded.status,"
                " reason = excluded.reason, at = excluded.at",
                (edge, ack.name, ack.version, ack.status, ack.reason, now),
            )
        detail = ack.reason + (f": {ack.detail}" if ack.detail else "")
        self.note(ack.name, ack.version, ack.status, detail, edge=edge)

    def tick(self, now: float) -> bool:
        """Decide the canary rollouts whose period is over; returns whether any was decided."""
        decided = False
        for name, version, stable, canaries_json, until in self.db.execute(
            "SELECT name, version, stable, canaries, until FROM rollouts WHERE state = 'canary'"
        ).fetchall():
            canaries = json.loads(canaries_json)
            failed = self._failed_canaries(name, version, canaries)
            if failed:
                self._roll_back(name, version, stable, canaries, failed)
            elif now >= until:
                verdict = self._compare(name, canaries)
                if verdict:
                    self._roll_back(name, version, stable, canaries, verdict)
                else:
                    self._promote(name, version)
            decided = decided or bool(failed) or now >= until
        return decided

    def _failed_canaries(self, name: str, version: int, canaries: list[str]) -> str:
        rows = self.db.execute(
            "SELECT edge, reason FROM model_acks WHERE name = ? AND version = ?"
            " AND status = 'rejected'",
            (name, version),
        ).fetchall()
        bad = [f"{edge} ({reason})" for edge, reason in rows if edge in canaries]
        return f"rejected by {', '.join(bad)}" if bad else ""

    def _compare(self, name: str, canaries: list[str]) -> str:
        """Why the canaries look worse than the others ('' when they do not)."""
        installed = {
            edge
            for (edge,) in self.db.execute(
                "SELECT edge FROM model_acks WHERE name = ? AND status = 'installed'"
                " AND version = (SELECT version FROM rollouts WHERE name = ?)",
                (name, name),
            )
        }
        missing = sorted(set(canaries) - installed)
        if missing:
            return f"no install confirmed by {', '.join(missing)}"
        start = self._at_start.get(name, {})
        canary, rest = _Health(), _Health()
        for edge, h in self.health.items():
            s = start.get(edge, _Health())
            group = canary if edge in canaries else rest
            group.readings += h.readings - s.readings
            group.events += h.events - s.events
            group.escalations += h.escalations - s.escalations
        if canary.readings == 0:
            return "the canaries delivered no readings during the canary period"
        if rest.readings == 0:
            # No other edge to compare with: the canaries before the update are the baseline.
            for edge in canaries:
                s = start.get(edge, _Health())
                rest.readings += s.readings
                rest.events += s.events
                rest.escalations += s.escalations
        if rest.readings == 0:
            return ""  # installed and delivering, with nothing to compare against
        p = self.policy
        counts = (
            ("warning", canary.events, rest.events),
            ("escalation", canary.escalations, rest.escalations),
        )
        for what, c, r in counts:
            # What the canaries would show at `tolerance` times the others' rate (a rate of at
            # least one per the others' readings, so that zero is not taken as certain); worse
            # only when that many is unlikely (Poisson tail below `significance`).
            expected = p.tolerance * max(r, 1) / rest.readings * canary.readings
            if c > expected and poisson_tail(c, expected) < p.significance:
                return (
                    f"{what} rate of the canaries {c / canary.readings * 1000:.2f}/1000 readings"
                    f" against {r / rest.readings * 1000:.2f} on the other edges"
                    f" ({c} where {expected:.1f} would be tolerated)"
                )
        return ""

    def _promote(self, name: str, version: int) -> None:
        self._send(name, version, self._data(name, version), ("*",))
        with transaction(self.db):
            self.db.execute(
                "UPDATE rollouts SET state = 'promoted', stable = version, reason = ''"
                " WHERE name = ?",
                (name,),
            )
        self.note(name, version, "promoted", "canaries healthy")

    def _roll_back(
        self, name: str, version: int, stable: int, canaries: list[str], why: str
    ) -> None:
        data = self._data(name, stable)
        again = self.latest_version(name) + 1
        sha = hashlib.sha256(data).hexdigest()
        with transaction(self.db):
            self.db.execute(
                "INSERT INTO model_versions VALUES (?, ?, ?, ?, ?, ?)",
                (name, again, sha, data, f"rollback of v{version} to v{stable}", time.time()),
            )
            self.db.execute(
                "UPDATE rollouts SET state = 'rolled_back', version = ?, stable = ?, reason = ?"
                " WHERE name = ?",
                (again, again, why, name),
            )
        self._send(name, again, data, tuple(canaries) or ("*",))
        log.warning("rolled %s v%d back (as v%d = v%d): %s", name, version, again, stable, why)
        self.note(name, version, "rolled_back", f"{why}; canaries get v{again} = v{stable}")

    def _data(self, name: str, version: int) -> bytes:
        row = self.db.execute(
            "SELECT data FROM model_versions WHERE name = ? AND version = ?", (name, version)
        ).fetchone()
        return bytes(row[0])

    # ----------------------------------------------------------------- reporting

    def state(self) -> dict[str, Any]:
        """Rollout state per model and per edge (for the fog's status)."""
        out: dict[str, Any] = {}
        for name, version, stable, state, canaries, reason in self.db.execute(
            "SELECT name, version, stable, state, canaries, reason FROM rollouts"
        ):
            edges = {
                edge: {"version": v, "status": status, "reason": r}
                for edge, v, status, r in self.db.execute(
                    "SELECT edge, version, status, reason FROM model_acks WHERE name = ?", (name,)
                )
            }
            out[name] = {
                "version": version,
                "stable": stable,
                "state": state,
                "canaries": json.loads(canaries),
                "reason": reason,
                "edges": edges,
            }
        return out

    def note(self, name: str, version: int, event: str, detail: str, *, edge: str = "") -> None:
        """Record a step of a model's life (logged and sent upstream as a `model` record)."""
        log.info(
            "model %s v%d: %s%s %s", name, version, event, f" on {edge}" if edge else "", detail
        )
        self._record(
            {
                "fog": self.fog, "name": name, "version": version, "event": event,
                "edge": edge or None, "detail": detail[:500] or None, "ts": time.time(),
            }
        )  # fmt: skip


def read_incoming(folder: Path, pattern: str = "*.tflite") -> list[tuple[str, bytes, Path]]:
    """Models an operator dropped into `folder`: `(name from metadata, bytes, path)`."""
    out = []
    for path in sorted(folder.glob(pattern)):
        data = path.read_bytes()
        name = str(read_model(data).metadata_json("fogline").get("name") or path.stem)
        out.append((name, data, path))
    return out
