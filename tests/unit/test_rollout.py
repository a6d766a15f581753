"""The fog's rollouts: versions, signed chunks, canary choice, promotion and rollback."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fog_aggregator.rollout import (
    MIGRATIONS,
    RolloutPolicy,
    Rollouts,
    canaries_for,
    poisson_tail,
)
from fogline.codec import ModelAck, decode
from fogline.db import connect, migrate
from fogline.models.catalog import default_model_path
from fogline.signing import SignedManifest, delegate, verify_manifest
from fogline.topics import Topics

ROOT = Ed25519PrivateKey.generate()
BASE = default_model_path("classifier").read_bytes()


class Fog:
    def __init__(self, folder: Path, **policy: Any) -> None:
        db = connect(folder / "fog.db")
        migrate(db, "fog", MIGRATIONS)
        self.sent: dict[str, bytes] = {}
        self.records: list[dict[str, Any]] = []
        seq = iter(range(1, 10**6))
        signer = delegate(ROOT, "f0", sites=["*"], models=["*"], expires=time.time() + 3600)
        self.r = Rollouts(
            db, fog="f0", site="site0", topics=Topics(), signer=signer,
            publish=self.sent.__setitem__, record=self.records.append,
            next_seq=lambda: next(seq), policy=RolloutPolicy(**policy),
        )  # fmt: skip
        self.r.register_baseline("classifier", 1, BASE)

    def manifest(self) -> SignedManifest:
        env = decode(self.sent["fl/v1/fog/f0/model/classifier"], expect="manifest")
        signed = SignedManifest.from_dict(env.body)
        verify_manifest(signed, ROOT.public_key(), now=time.time())
        return signed

    def events(self) -> list[tuple[int, str]]:
        return [(r["version"], r["event"]) for r in self.records]

    def deliver(self, edge: str, readings: int, events: int = 0) -> None:
        self.r.observe(edge, readings=readings, events=events)


def test_canaries_are_a_stable_share_never_everyone() -> None:
    edges = [f"e{i}" for i in range(10)]
    assert canaries_for(edges, 0.25, "m/2") == canaries_for(list(reversed(edges)), 0.25, "m/2")
    assert len(canaries_for(edges, 0.25, "m/2")) == 3
    assert len(canaries_for(["e0", "e1"], 1.0, "x")) == 1
    assert canaries_for(["e0"], 0.1, "x") == ["e0"]


def test_poisson_tail() -> None:
    assert poisson_tail(0, 3.0) == 1.0
    assert poisson_tail(1, 2.0) == pytest.approx(1 - 2.718281828**-2)
    assert poisson_tail(12, 1.7) < 1e-6 < poisson_tail(3, 1.7)


def _start(tmp_path: Path, **policy: Any) -> tuple[Fog, list[str]]:
    fog = Fog(tmp_path, **{"canary_period": 0.0, "chunk_size": 4096, **policy})
    for e in ("e0", "e1", "e2", "e3"):
        fog.deliver(e, 1000, 1)
    assert fog.r.propose("classifier", BASE, fog.r.active_edges(time.time()), origin="test") == 2
    signed = fog.manifest()
    canaries = list(signed.manifest.targets)
    assert canaries == canaries_for(["e0", "e1", "e2", "e3"], 0.25, "classifier/2")
    chunks = [t for t in fog.sent if "/chunk/" in t]
    assert len(chunks) == signed.manifest.chunks == -(-len(BASE) // 4096)
    return fog, canaries


def test_healthy_canaries_are_promoted_to_every_edge(tmp_path: Path) -> None:
    fog, canaries = _start(tmp_path)
    for e in ("e0", "e1", "e2", "e3"):
        fog.deliver(e, 1000, 2)
    fog.r.on_ack(canaries[0], ModelAck("classifier", 2, "installed"), time.time())
    assert fog.r.tick(time.time())
    assert fog.manifest().manifest.targets == ("*",)
    assert fog.events()[-1] == (2, "promoted")
    assert fog.r.stable("classifier") == (2, BASE)


def test_canaries_that_warn_far_more_are_rolled_back_under_a_new_version(tmp_path: Path) -> None:
    fog, canaries = _start(tmp_path)
    for e in ("e0", "e1", "e2", "e3"):
        fog.deliver(e, 1000, 30 if e in canaries else 1)
    fog.r.on_ack(canaries[0], ModelAck("classifier", 2, "installed"), time.time())
    fog.r.tick(time.time())
    assert fog.events()[-1] == (2, "rolled_back")
    assert "warning rate" in fog.records[-1]["detail"]
    m = fog.manifest().manifest
    assert (m.version, m.targets) == (3, tuple(canaries))  # the old bytes, as a newer version
    assert fog.r.stable("classifier") == (3, BASE)


def test_a_canary_that_refuses_the_model_rolls_it_back_at_once(tmp_path: Path) -> None:
    fog, canaries = _start(tmp_path, canary_period=3600.0)
    fog.r.on_ack(canaries[0], ModelAck("classifier", 2, "rejected", "health_check"), time.time())
    assert fog.r.tick(time.time())
    assert fog.events()[-1] == (2, "rolled_back")
    assert "health_check" in fog.records[-1]["detail"]


def test_a_canary_that_never_confirms_is_rolled_back(tmp_path: Path) -> None:
    fog, _ = _start(tmp_path)
    fog.r.tick(time.time())
    assert fog.events()[-1] == (2, "rolled_back")
    assert "no install confirmed" in fog.records[-1]["detail"]
