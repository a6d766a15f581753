"""The edge core: summaries tile what arrived, every missing or unusable reading is a drop."""

from __future__ import annotations

import itertools
import random
import zlib
from collections import defaultdict
from typing import Any

import numpy as np
import pytest

from edge_agent.core import EdgeCore, Record, Rules
from fogline.codec import Telemetry
from fogline.report import size, union

FIELDS = ("vib", "temp")
DT = 0.1
BASE = np.array([10.0, 50.0])
NOISE = np.array([0.5, 1.0])  # per-reading standard deviation of each field


def _tele(
    device: str, first: int, values: np.ndarray, fields: tuple[str, ...] = FIELDS
) -> Telemetry:
    values = np.asarray(values, dtype=np.float32).reshape(-1, len(fields))
    return Telemetry(device=device, first=first, t0=first * DT, dt=DT, fields=fields, values=values)


def _noise(rng: np.random.Generator, n: int) -> np.ndarray:
    return (BASE + rng.normal(size=(n, len(FIELDS))) * NOISE).astype(np.float32)


def _of(records: list[Record], kind: str, device: str | None = None) -> list[dict[str, Any]]:
    out = [b for k, b in records if k == kind]
    if device is not None:
        out = [b for b in out if b.get("device") == device or kind == "drop"]
    return out


def _drop_ranges(records: list[Record], reason: str | None = None) -> list[list[Any]]:
    return [
        list(r)
        for k, b in records
        if k == "drop" and (reason is None or b["reason"] == reason)
        for r in b["ranges"]
    ]


def _spans(bodies: list[dict[str, Any]], device: str) -> list[tuple[int, int]]:
    return sorted((b["first"], b["last"]) for b in bodies if b["device"] == device)


# --------------------------------------------------------------------------- summaries


def test_contiguous_telemetry_is_tiled_by_summaries_with_exact_statistics() -> None:
    rng = np.random.default_rng(1)
    core = EdgeCore("e0", Rules(summary_interval=5.0))
    devices = ["d0", "d1", "d2"]
    n = 200
    data = {d: _noise(rng, n) for d in devices}
    pos = dict.fromkeys(devices, 0)
    out: list[Record] = []
    now = 0.0
    while any(p < n for p in pos.values()):
        for d in devices:
            if pos[d] >= n:
                continue
            k = int(rng.integers(1, 30))
            chunk = data[d][pos[d] : pos[d] + k]
            out += core.ingest(_tele(d, pos[d], chunk), now)
            pos[d] += len(chunk)
        now += 1.0
        out += core.due_summaries(now)
    out += core.due_summaries(now, force=True)

    assert _drop_ranges(out) == []
    summaries = _of(out, "summary")
    for d in devices:
        mine = sorted((b for b in summaries if b["device"] == d), key=lambda b: b["first"])
        assert len(mine) > 1, "summaries close on their interval, not only at the end"
        assert mine[0]["first"] == 0
        assert mine[-1]["last"] == n - 1
        for prev, nxt in itertools.pairwise(mine):
            assert nxt["first"] == prev["last"] + 1
        for b in mine:
            assert b["count"] == b["last"] - b["first"] + 1
            assert b["edge"] == "e0"
            assert b["fields"] == list(FIELDS)
            x = data[d][b["first"] : b["last"] + 1].astype(np.float64)
            np.testing.assert_allclose(b["min"], x.min(0), rtol=1e-9)
            np.testing.assert_allclose(b["max"], x.max(0), rtol=1e-9)
            np.testing.assert_allclose(b["mean"], x.mean(0), rtol=1e-9)
            np.testing.assert_allclose(b["std"], x.std(0), rtol=1e-6, atol=1e-9)
            assert b["t0"] == pytest.approx(b["first"] * DT)
            assert b["t1"] >= b["t0"]
    assert core.stats["readings"] == n * len(devices)


def _first_interval(device: str, interval: float) -> float:
    return interval * (0.5 + 0.5 * zlib.crc32(device.encode()) / 2**32)


def test_a_summary_closes_when_its_interval_elapses() -> None:
    rng = np.random.default_rng(2)
    core = EdgeCore("e0", Rules(summary_interval=5.0))
    due = 100.0 + _first_interval("d", 5.0)  # the device's first summary: see the next test
    assert core.ingest(_tele("d", 0, _noise(rng, 10)), now=100.0) == []
    assert core.ingest(_tele("d", 10, _noise(rng, 10)), now=100.1) == []
    assert core.due_summaries(due - 0.01) == []

    closed = core.due_summaries(due)
    assert [(b["first"], b["last"], b["count"]) for b in _of(closed, "summary")] == [(0, 19, 20)]
    assert core.due_summaries(200.0) == [], "nothing is open any more"

    # The next summary's interval starts with its first reading, not with the previous summary.
    assert core.ingest(_tele("d", 20, _noise(rng, 5)), now=206.0) == []
    assert core.due_summaries(210.9) == []
    closed = core.due_summaries(211.0)
    assert [(b["first"], b["last"]) for b in _of(closed, "summary")] == [(20, 24)]


def test_devices_that_start_together_close_their_summaries_spread_over_the_interval() -> None:
    """200 devices sending in step every 0.5 s, summaries checked every 0.1 s for 15 s."""
    rng = np.random.default_rng(3)
    core = EdgeCore("e0", Rules(summary_interval=5.0))
    devices = [f"d{i:03d}" for i in range(200)]
    closed_per_tick = []
    for tick in range(150):
        now = 0.1 * tick
        if tick % 5 == 0:
            for d in devices:
                core.ingest(_tele(d, tick, _noise(rng, 5)), now=now)
        closed_per_tick.append(len(core.due_summaries(now)))
    assert sum(closed_per_tick[:25]) == 0, "none before half the interval"
    assert sum(closed_per_tick) >= 400  # every device closed at least two summaries
    # Never all of them at once, and the spread stays. A summary reopens with its device's next
    # message (every 0.5 s), so closes gather in groups of 5 ticks' worth: 200 / (25 / 5) = 40
    # per tick on average, against all 200 in one tick without the spread.
    assert max(closed_per_tick) <= len(devices) // 4, closed_per_tick


# --------------------------------------------------------------------------- sequencing


def test_a_gap_is_reported_as_a_drop_and_no_summary_spans_it() -> None:
    rng = np.random.default_rng(3)
    core = EdgeCore("e0", Rules())
    core.ingest(_tele("d", 0, _noise(rng, 10)), now=0.0)
    out = core.ingest(_tele("d", 15, _noise(rng, 10)), now=1.0)

    assert [(b["first"], b["last"]) for b in _of(out, "summary")] == [(0, 9)]
    (drop,) = _of(out, "drop")
    assert drop["reason"] == "gap"
    assert drop["origin"] == "e0"
    assert drop["ranges"] == [["d", 10, 14]]
    assert core.stats["gaps"] == 5

    out = core.due_summaries(1.0, force=True)
    assert [(b["first"], b["last"], b["count"]) for b in _of(out, "summary")] == [(15, 24, 10)]


def test_a_device_first_seen_mid_stream_reports_its_earlier_readings_as_a_gap() -> None:
    """Devices number their readings from 0: a lost first message is a gap, not a fresh start."""
    rng = np.random.default_rng(12)
    core = EdgeCore("e0", Rules())
    out = core.ingest(_tele("d", 10, _noise(rng, 10)), now=0.0)
    out += core.due_summaries(0.0, force=True)
    assert _drop_ranges(out, "gap") == [["d", 0, 9]]
    assert [(b["first"], b["last"]) for b in _of(out, "summary")] == [(10, 19)]


def test_a_batch_already_seen_yields_nothing_and_is_counted_as_duplicates() -> None:
    rng = np.random.default_rng(4)
    core = EdgeCore("e0", Rules())
    first = _noise(rng, 10)
    core.ingest(_tele("d", 0, first), now=0.0)
    assert core.ingest(_tele("d", 0, first + 100), now=1.0) == []
    assert core.ingest(_tele("d", 3, first[3:8]), now=1.0) == []
    assert core.stats["duplicates"] == 15

    (s,) = _of(core.due_summaries(2.0, force=True), "summary")
    assert (s["first"], s["last"], s["count"]) == (0, 9, 10)
    np.testing.assert_allclose(s["max"], first.astype(np.float64).max(0))


def test_a_partially_overlapping_batch_keeps_only_the_new_readings() -> None:
    rng = np.random.default_rng(5)
    core = EdgeCore("e0", Rules())
    a = _noise(rng, 10)
    b = _noise(rng, 10)
    b[:5] = 999.0  # readings 5..9 again, with values that must not be used
    core.ingest(_tele("d", 0, a), now=0.0)
    out = core.ingest(_tele("d", 5, b), now=0.0)
    assert _drop_ranges(out) == []
    assert core.stats["duplicates"] == 5

    (s,) = _of(core.due_summaries(1.0, force=True), "summary")
    assert (s["first"], s["last"], s["count"]) == (0, 14, 15)
    x = np.concatenate([a, b[5:]]).astype(np.float64)
    np.testing.assert_allclose(s["max"], x.max(0))
    np.testing.assert_allclose(s["mean"], x.mean(0))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_batch_with_non_finite_values_is_dropped_and_does_not_pollute_summaries(
    bad: float,
) -> None:
    rng = np.random.default_rng(6)
    core = EdgeCore("e0", Rules())
    a, b, c = _noise(rng, 10), _noise(rng, 10), _noise(rng, 10)
    b[4, 1] = bad
    out = core.ingest(_tele("d", 0, a), now=0.0)
    out += core.ingest(_tele("d", 10, b), now=0.0)
    out += core.ingest(_tele("d", 20, c), now=0.0)
    out += core.due_summaries(1.0, force=True)

    assert _drop_ranges(out, "non_finite") == [["d", 10, 19]]
    assert _drop_ranges(out) == [["d", 10, 19]]
    summaries = _of(out, "summary")
    assert [(s["first"], s["last"]) for s in summaries] == [(0, 9), (20, 29)]
    for s, x in zip(summaries, (a, c), strict=True):
        for key in ("min", "mean", "max", "std"):
            assert np.isfinite(s[key]).all()
        np.testing.assert_allclose(s["mean"], x.astype(np.float64).mean(0))
        np.testing.assert_allclose(s["max"], x.astype(np.float64).max(0))
    assert core.stats["non_finite"] == 10


# --------------------------------------------------------------------------- detection


def _feed_windows(
    core: EdgeCore, device: str, windows: list[np.ndarray], start: int, now: float = 0.0
) -> tuple[list[Record], int]:
    out: list[Record] = []
    for w in windows:
        out += core.ingest(_tele(device, start, w), now)
        start += len(w)
    return out, start


def _steady(seed: int, windows: int, rules: Rules) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    core = EdgeCore("e0", rules)
    out, _ = _feed_windows(core, "d", [_noise(rng, rules.window) for _ in range(windows)], 0)
    return _of(out, "event")


def test_a_steady_noisy_signal_raises_no_event_once_the_baseline_has_settled() -> None:
    rules = Rules(window=20, z_threshold=4.0, warmup_windows=5)
    for seed in range(5):
        late = [e for e in _steady(seed, 300, rules) if e["first"] >= 30 * rules.window]
        assert late == [], f"seed {seed}: false alarms on a steady signal: {late}"


def test_false_alarms_right_after_warmup_are_rare() -> None:
    """A 4-sigma threshold on a steady Gaussian signal must not fire in >0.5% of windows."""
    rules = Rules(window=20, z_threshold=4.0, warmup_windows=5)
    seeds, windows = 200, 25
    alarms = sum(len(_steady(1000 + s, windows, rules)) for s in range(seeds))
    judged = seeds * (windows - rules.warmup_windows)
    assert alarms <= 0.005 * judged, f"{alarms} false alarms in {judged} steady windows"


def test_a_step_of_ten_sigma_on_one_field_raises_an_event_naming_it() -> None:
    rng = np.random.default_rng(7)
    rules = Rules(window=20, z_threshold=4.0, warmup_windows=5)
    core = EdgeCore("e0", rules)
    _, pos = _feed_windows(core, "d", [_noise(rng, 20) for _ in range(100)], 0)
    before = core.stats["events"]

    spike = _noise(rng, 20)
    spike[:, 1] += 10 * NOISE[1]
    out, _ = _feed_windows(core, "d", [spike], pos)
    (event,) = _of(out, "event")
    assert event["device"] == "d"
    assert event["edge"] == "e0"
    assert event["kind"] == "zscore"
    assert event["field"] == "temp"
    assert (event["first"], event["last"], event["count"]) == (pos, pos + 19, 20)
    assert abs(event["z"]) > rules.z_threshold
    assert event["value"] == pytest.approx(float(spike[:, 1].astype(np.float64).mean()))
    assert event["baseline"] == pytest.approx(BASE[1], abs=0.5)
    assert core.stats["events"] == before + 1

    (s,) = _of(core.due_summaries(0.0, force=True), "summary")
    assert s["events"] == before + 1


def test_no_event_during_warmup() -> None:
    rng = np.random.default_rng(8)
    rules = Rules(window=20, z_threshold=4.0, warmup_windows=5)
    core = EdgeCore("e0", rules)
    windows = [_noise(rng, 20) for _ in range(rules.warmup_windows)]
    for i in (1, 3, 4):
        windows[i][:, 0] += 50 * NOISE[0]
    out, _ = _feed_windows(core, "d", windows, 0)
    assert _of(out, "event") == []


def test_an_abnormal_window_does_not_shift_the_baseline() -> None:
    rng = np.random.default_rng(9)
    rules = Rules(window=20, z_threshold=4.0, warmup_windows=5)
    core = EdgeCore("e0", rules)
    _, pos = _feed_windows(core, "d", [_noise(rng, 20) for _ in range(60)], 0)

    spike = _noise(rng, 20)
    spike[:, 0] += 10 * NOISE[0]
    windows = [spike, _noise(rng, 20), _noise(rng, 20), spike.copy()]
    out, _ = _feed_windows(core, "d", windows, pos)
    events = _of(out, "event")
    assert [(e["first"], e["field"]) for e in events] == [(pos, "vib"), (pos + 60, "vib")]
    first, second = events
    assert abs(second["z"]) > rules.z_threshold
    assert second["baseline"] == pytest.approx(first["baseline"], abs=0.1 * NOISE[0])
    assert second["z"] == pytest.approx(first["z"], rel=0.3)


def test_an_event_only_claims_readings_that_were_received() -> None:
    """A window that straddles a gap must not name the missing readings as its own."""
    rng = np.random.default_rng(10)
    rules = Rules(window=20, z_threshold=4.0, warmup_windows=5)
    core = EdgeCore("e0", rules)
    out, pos = _feed_windows(core, "d", [_noise(rng, 20) for _ in range(30)], 0)
    out += core.ingest(_tele("d", pos, _noise(rng, 10)), 0.0)  # half a window
    pos += 10
    spike = _noise(rng, 60)
    spike[:, 1] += 10 * NOISE[1]
    out += core.ingest(_tele("d", pos + 50, spike), 0.0)  # readings pos..pos+49 are lost
    out += core.due_summaries(0.0, force=True)

    assert _drop_ranges(out, "gap") == [["d", pos, pos + 49]]
    received = union(_spans(_of(out, "summary"), "d"))
    events = _of(out, "event")
    assert events, "the step is detected"
    for e in events:
        assert e["count"] == e["last"] - e["first"] + 1
        inside = [(e["first"], e["last"])]
        assert union([*received, *inside]) == received, (
            f"event {e['first']}..{e['last']} claims readings outside {received}"
        )


# --------------------------------------------------------------------------- restart


def test_committed_is_the_restart_point_and_a_restarted_core_reports_lost_readings() -> None:
    rng = np.random.default_rng(11)
    core = EdgeCore("e0", Rules())
    core.ingest(_tele("d", 0, _noise(rng, 30)), now=0.0)
    core.ingest(_tele("x", 0, _noise(rng, 5)), now=0.0)
    assert core.committed() == {"d": 0, "x": 0}
    assert [(b["first"], b["last"]) for b in _of(core.due_summaries(0.0, force=True), "summary")]
    assert core.committed() == {"d": 30, "x": 5}

    core.ingest(_tele("d", 30, _noise(rng, 20)), now=1.0)  # open summary 30..49, not yet sent
    assert core.committed()["d"] == 30

    # A gap closes the open summary and reports the drop: both are out, so they are committed.
    out = core.ingest(_tele("d", 60, _noise(rng, 5)), now=1.0)
    assert [(b["first"], b["last"]) for b in _of(out, "summary")] == [(30, 49)]
    assert _drop_ranges(out) == [["d", 50, 59]]
    assert core.committed()["d"] == 60

    # A non-finite batch is reported at once: the restart point moves past it.
    out = core.ingest(_tele("d", 65, np.full((5, 2), np.nan)), now=1.0)
    assert core.committed()["d"] == 65 + 5

    core.ingest(_tele("d", 70, _noise(rng, 10)), now=1.0)
    restart_at = core.committed()
    assert restart_at == {"d": 70, "x": 5}

    # The process dies: readings 70..79 were never sent upstream, 80..89 never reached the edge.
    again = EdgeCore("e0", Rules(), expected=restart_at)
    out = again.ingest(_tele("d", 90, _noise(rng, 10)), now=2.0)
    assert _drop_ranges(out) == [["d", 70, 89]]
    assert _of(out, "drop")[0]["reason"] == "gap"
    out = again.due_summaries(3.0, force=True)
    assert [(b["first"], b["last"]) for b in _of(out, "summary")] == [(90, 99)]


# --------------------------------------------------------------------------- property


def _run_random_stream(seed: int) -> None:
    rnd = random.Random(seed)
    rng = np.random.default_rng(seed)
    rules = Rules(window=rnd.choice([3, 7, 20]), summary_interval=rnd.choice([0.5, 2.0, 5.0]))
    core = EdgeCore("e0", rules)
    devices = [f"d{i}" for i in range(rnd.randint(1, 3))]
    produced = dict.fromkeys(devices, 0)
    sent: dict[str, list[tuple[int, np.ndarray]]] = defaultdict(list)
    seen_max = dict.fromkeys(devices, -1)
    out: list[Record] = []
    now = 0.0
    for _ in range(rnd.randint(1, 40)):
        d = rnd.choice(devices)
        action = rnd.random()
        if action < 0.15 and sent[d]:  # a re-sent old batch
            first, vals = rnd.choice(sent[d])
        elif action < 0.3 and sent[d]:  # a batch overlapping the tail of what was sent
            last_first, last_vals = sent[d][-1]
            back = rnd.randint(1, len(last_vals))
            n_new = rnd.randint(0, 10)
            first = last_first + len(last_vals) - back
            vals = np.concatenate([last_vals[len(last_vals) - back :], _noise(rng, n_new)])
            produced[d] = max(produced[d], first + len(vals))
        else:
            n = rnd.randint(1, 25)
            first, vals = produced[d], _noise(rng, n)
            produced[d] += n
            if rnd.random() < 0.15:
                vals[rnd.randrange(n), rnd.randrange(len(FIELDS))] = np.nan
            if rnd.random() < 0.2:  # lost on the way
                continue
        sent[d].append((first, vals))
        out += core.ingest(_tele(d, first, vals), now)
        seen_max[d] = max(seen_max[d], first + len(vals) - 1)
        now += rnd.choice([0.0, 0.1, 1.0, 3.0])
        if rnd.random() < 0.3:
            out += core.due_summaries(now)
    out += core.due_summaries(now, force=True)

    for d in devices:
        summ = _spans(_of(out, "summary"), d)
        drops = sorted((r[1], r[2]) for r in _drop_ranges(out) if r[0] == d)
        for a, b in summ + drops:
            assert a <= b
        assert size(union(summ)) == size(summ), f"seed {seed}: summaries overlap: {summ}"
        assert size(union(summ)) + size(union(drops)) == size(union(summ + drops)), (
            f"seed {seed}: a drop overlaps a summary: {summ} / {drops}"
        )
        expected = [(0, seen_max[d])] if seen_max[d] >= 0 else []
        assert union(summ + drops) == expected, f"seed {seed} device {d}"
        for b in _of(out, "summary"):
            assert b["count"] == b["last"] - b["first"] + 1
            assert np.isfinite(b["mean"]).all()
    assert core.committed() == {d: seen_max[d] + 1 for d in devices if seen_max[d] >= 0}


def test_random_streams_are_accounted_for_exactly() -> None:
    for seed in range(300):
        _run_random_stream(seed)
