"""The machine-fleet model: physical correlations, developing faults and their ground truth."""

from __future__ import annotations

import time

import numpy as np
import pytest

from device_sim.physics import FAULT_KINDS, FIELDS, WEARING, Fault, FaultMix, Fleet

RMS, PEAK, KURT, TB, TM, CUR, PRES = (FIELDS.index(f) for f in FIELDS)
EVERY_KIND = FaultMix({k: 1 / len(FAULT_KINDS) for k in FAULT_KINDS}, horizon_h=1.0)


def run(fleet: Fleet, t_end: float, dt: float, chunk: int = 100) -> np.ndarray:
    """Sample `fleet` from 0 to `t_end` in consecutive chunks: (n, readings, fields) float64."""
    out, t = [], 0.0
    while t < t_end:
        count = min(chunk, round((t_end - t) / dt))
        out.append(fleet.sample(t, dt, count))
        t += count * dt
    return np.concatenate(out, axis=1).astype(np.float64)


def one_kind(kind: str, n: int, seed: int = 3, hours: float = 2.0) -> tuple[Fleet, Fleet]:
    """A fleet where every machine gets `kind` in its first hour, and its healthy twin."""
    mix = FaultMix({kind: 1.0}, horizon_h=1.0, wear_hours=(hours, hours))
    return Fleet(n=n, seed=seed, mix=mix), Fleet(n=n, seed=seed)


def severity(fault: Fault, t: np.ndarray) -> np.ndarray:
    """Ground-truth severity of a wearing fault at times `t`."""
    assert fault.failure is not None
    return np.clip((t - fault.onset) / (fault.failure - fault.onset), 0.0, 1.0)


def rise(
    x: np.ndarray, s: np.ndarray, a: tuple[float, float], b: tuple[float, float]
) -> np.ndarray:
    """Mean change of vib_rms and vib_kurtosis in readings `x` from severity range `a` to `b`."""
    at_a, at_b = (s >= a[0]) & (s < a[1]), (s >= b[0]) & (s < b[1])
    return x[at_b][:, [RMS, KURT]].mean(axis=0) - x[at_a][:, [RMS, KURT]].mean(axis=0)


def test_readings_have_the_documented_shape_and_stay_finite_through_failures() -> None:
    fleet = Fleet(n=30, seed=1, mix=EVERY_KIND)
    for k in range(6):  # 0 .. 18 h: every fault starts, the wearing ones end in failure
        values = fleet.sample(t0=k * 3 * 3600.0, dt=60.0, count=180)
        assert values.shape == (30, 180, len(FIELDS))
        assert values.dtype == np.float32
        assert np.isfinite(values).all()
    assert fleet.regime is not None and fleet.regime.speed.shape == (30, 180)


def test_same_arguments_give_the_same_bytes_and_another_seed_does_not() -> None:
    a, b, c = (Fleet(n=8, seed=s, mix=EVERY_KIND) for s in (42, 42, 43))
    for t0 in (0.0, 1800.0, 3600.0):
        va, vb, vc = (f.sample(t0, 18.0, 100) for f in (a, b, c))
        assert va.tobytes() == vb.tobytes()
        assert not np.array_equal(va, vc)
    assert a.faults == b.faults != c.faults


def test_a_split_fleet_has_the_same_fault_schedule_as_the_whole() -> None:
    mix = FaultMix({"bearing_wear": 0.3, "sensor_drift": 0.3, "overheating": 0.2})
    whole = Fleet(n=20, seed=7, mix=mix)
    left, right = Fleet(n=10, seed=7, mix=mix), Fleet(n=10, first=10, seed=7, mix=mix)
    assert left.faults + right.faults == whole.faults
    assert len(whole.faults) > 5
    both = np.concatenate([left.hours_to_failure(100.0), right.hours_to_failure(100.0)])
    np.testing.assert_array_equal(both, whole.hours_to_failure(100.0))


def test_current_follows_load() -> None:
    fleet = Fleet(n=30, seed=2)
    values, loads = [], []
    for k in range(6):  # 6 h at 30 s
        values.append(fleet.sample(k * 3600.0, 30.0, 120)[:, :, CUR])
        assert fleet.regime is not None
        loads.append(fleet.regime.load)
    current, load = np.concatenate(values, axis=1), np.concatenate(loads, axis=1)
    assert load.min() >= 0.2 and load.max() <= 1.0 and load.std(axis=1).min() > 0.02
    level = [np.corrcoef(c, x)[0, 1] for c, x in zip(current, load, strict=True)]
    change = [np.corrcoef(np.diff(c), np.diff(x))[0, 1] for c, x in zip(current, load, strict=True)]
    assert min(level) > 0.9
    assert np.median(change) > 0.6


def test_motor_temperature_lags_a_load_step() -> None:
    stepped, steady = Fleet(n=20, seed=4), Fleet(n=20, seed=4)
    for fleet in (stepped, steady):
        fleet.sample(0.0, 60.0, 1, load=np.full((20, 1), 0.3))  # starts in equilibrium
    after = stepped.sample(60.0, 60.0, 200, load=np.full((20, 200), 0.9))[:, :, TM]
    before = steady.sample(60.0, 60.0, 200, load=np.full((20, 200), 0.3))[:, :, TM]
    rise = (after - before).astype(np.float64)  # same ambient and noise: the step response
    final = rise[:, -1]
    assert (final > 10).all()
    # time constants are 8-20 min: one time constant in, at most 1 - 1/e of the way
    assert (rise[:, 7] / final < 0.7).all()
    assert (rise[:, 0] / final > 0.03).all()
    # five time constants in, there
    assert (rise[:, 99] / final > 0.97).all()


def test_the_thermal_lag_is_exact_for_steps_much_longer_than_its_time_constant() -> None:
    fine, coarse = Fleet(n=20, seed=5), Fleet(n=20, seed=5)
    for fleet in (fine, coarse):
        fleet.sample(0.0, 60.0, 1, load=np.full((20, 1), 0.3))
    a = fine.sample(60.0, 60.0, 60, load=np.full((20, 60), 0.9))[:, -1, TM]  # t = 3600 s
    b = coarse.sample(3600.0, 3600.0, 1, load=np.full((20, 1), 0.9))[:, 0, TM]
    assert np.abs(a - b).max() < 1.0  # the same temperature, up to sensor noise (0.15 degC)


def test_pressure_follows_speed_squared_and_vibration_grows_with_speed() -> None:
    fleet = Fleet(n=20, seed=6)
    values = fleet.sample(0.0, 120.0, 1440, load=np.full((20, 1440), 0.6))  # 48 h
    assert fleet.regime is not None
    speed = fleet.regime.speed
    top = speed.max(axis=1)  # 4-pole (sync 1,500 rpm) and 2-pole (3,000 rpm) motors
    assert ((top > 900) & (top < 1500)).any() and ((top > 2000) & (top < 3000)).any()
    slopes, vib = [], []
    for m in range(20):
        if speed[m].max() / speed[m].min() < 1.1:
            continue  # no set-point change on this machine
        p, s = values[m, :, PRES].astype(np.float64), speed[m]
        slopes.append(np.polyfit(np.log(s), np.log(p), 1)[0])
        vib.append(np.corrcoef(s, values[m, :, RMS])[0, 1])
    assert len(slopes) >= 10
    np.testing.assert_allclose(slopes, 2.0, atol=0.1)
    assert min(vib) > 0.5


def test_healthy_vibration_features_look_healthy() -> None:
    values = Fleet(n=50, seed=8).sample(0.0, 10.0, 100)
    rms, peak, kurt = values[:, :, RMS], values[:, :, PEAK], values[:, :, KURT]
    assert 0.5 < np.median(rms) < 3.0
    crest = np.median(peak / rms, axis=1)
    assert ((crest > 1.4) & (crest < 3.0)).all()
    assert 2.8 < np.median(kurt) < 3.3


def test_bearing_wear_raises_vibration_slowly_then_steeply_until_failure() -> None:
    fleet, _ = one_kind("bearing_wear", n=20)
    values = run(fleet, 3.5 * 3600, dt=30.0)
    t = np.arange(values.shape[1]) * 30.0
    first_half, last_tenth, crest_up = [], [], []
    for fault in fleet.faults:
        assert fault.failure is not None
        s = np.where(t < fault.failure, severity(fault, t), np.nan)  # while running
        x = values[fault.device]
        first_half.append(rise(x, s, (0.0, 0.05), (0.45, 0.5)))
        last_tenth.append(rise(x, s, (0.85, 0.9), (0.95, 1.0)))
        crest = x[:, PEAK] / np.maximum(x[:, RMS], 1e-3)
        crest_up.append(crest[s > 0.9].mean() - crest[s == 0].mean())
        stopped = t > fault.failure + 600
        assert x[stopped, CUR].max() < 0.05 * x[s == 0, CUR].mean()  # tripped at failure
        assert x[stopped, RMS].max() < 0.1
    first, last = np.array(first_half), np.array(last_tenth)
    assert np.median(first[:, 1]) > 0.5  # kurtosis is the early warning
    assert (np.median(last, axis=0) > 2 * np.median(first, axis=0)).all()
    assert np.mean(last > first) > 0.8
    assert min(crest_up) > 0.5


def test_overheating_drives_motor_temperature_away_from_what_load_explains() -> None:
    fleet, twin = one_kind("overheating", n=10)
    residual = run(fleet, 3 * 3600, dt=60.0)[:, :, TM] - run(twin, 3 * 3600, dt=60.0)[:, :, TM]
    t = np.arange(residual.shape[1]) * 60.0
    for fault in fleet.faults:
        s, r = severity(fault, t), residual[fault.device]
        assert np.abs(r[t < fault.onset]).max() < 0.01
        at = [r[(s > lo) & (s < lo + 0.1)].mean() for lo in (0.2, 0.5, 0.85)]
        assert 0 < at[0] < at[1] < at[2]
        assert at[2] > 10


def test_imbalance_raises_vibration_rms_but_not_kurtosis() -> None:
    fleet, twin = one_kind("imbalance", n=10)
    a, b = run(fleet, 3 * 3600, dt=60.0), run(twin, 3 * 3600, dt=60.0)
    t = np.arange(a.shape[1]) * 60.0
    for fault in fleet.faults:
        assert fault.failure is not None
        late = (severity(fault, t) > 0.8) & (t < fault.failure)
        m = fault.device
        assert a[m, late, RMS].mean() > 2 * b[m, late, RMS].mean()
        assert abs(a[m, late, KURT].mean() - b[m, late, KURT].mean()) < 0.1


def sensor_fault(kind: str) -> tuple[list[Fault], np.ndarray, np.ndarray, np.ndarray]:
    """Readings of 14 machines with `kind` (onset in the first hour) and of their healthy twins."""
    fleet, twin = one_kind(kind, n=14)
    a, b = run(fleet, 7200.0, dt=2.0, chunk=600), run(twin, 7200.0, dt=2.0, chunk=600)
    return fleet.faults, a, b, np.arange(a.shape[1]) * 2.0


def test_a_stuck_sensor_freezes_its_field_from_onset() -> None:
    faults, a, b, t = sensor_fault("sensor_stuck")
    assert len({f.field for f in faults}) >= 4
    for f in faults:
        j, after = FIELDS.index(str(f.field)), t >= f.onset
        assert a[f.device, after, j].std() == 0.0
        assert a[f.device, ~after, j].std() > 0.0
        others = np.arange(len(FIELDS)) != j
        np.testing.assert_array_equal(a[f.device][:, others], b[f.device][:, others])


def test_a_dropout_reads_zero_for_stretches() -> None:
    faults, a, b, t = sensor_fault("sensor_dropout")
    assert (b != 0.0).all()
    for f in faults:
        x, after = a[f.device, :, FIELDS.index(str(f.field))], t >= f.onset
        zero = x == 0.0
        assert not zero[~after].any()
        assert 0.05 < zero[after].mean() < 0.7  # intermittent
        edges = np.diff(zero.astype(int))
        stretches = (edges == 1).sum() + zero[0]
        assert zero.sum() / stretches >= 2.5  # in stretches, not single readings


def test_spikes_are_isolated_large_outliers() -> None:
    faults, a, b, t = sensor_fault("sensor_spikes")
    for f in faults:
        j = FIELDS.index(str(f.field))
        x, healthy = a[f.device, :, j], b[f.device, :, j]
        spike = np.abs(x - healthy) > 1e-3
        assert not spike[t < f.onset].any()
        assert spike.sum() >= 5
        assert not (spike[1:] & spike[:-1]).any()
        typical = np.median(np.abs(np.diff(healthy))) + 1e-3
        assert (np.abs(x - healthy)[spike] > 20 * typical).all()


def test_drift_is_a_bias_growing_linearly_from_onset() -> None:
    faults, a, b, t = sensor_fault("sensor_drift")
    for f in faults:
        j = FIELDS.index(str(f.field))
        bias, after = a[f.device, :, j] - b[f.device, :, j], t > f.onset + 60
        assert np.abs(bias[t < f.onset]).max() < 1e-3
        since = t[after] - f.onset
        rate = np.polyfit(since, bias[after], 1)[0]
        expected = rate * since
        assert np.abs(bias[after] - expected).max() < 0.01 * np.abs(expected).max() + 1e-3
        assert abs(bias[-1]) > 2 * abs(bias[after][len(since) // 4])


def test_hours_to_failure_counts_down_for_wearing_faults_only() -> None:
    mix = FaultMix({"bearing_wear": 0.3, "overheating": 0.2, "sensor_drift": 0.3})
    fleet = Fleet(n=60, seed=9, mix=mix)
    wearing = np.array([False] * 60)
    for f in fleet.faults:
        wearing[f.device] = f.kind in WEARING
        assert (f.failure is not None) == (f.kind in WEARING)
        assert (f.field is None) == (f.kind in WEARING)
    assert 10 < wearing.sum() < 50
    h0, h1 = fleet.hours_to_failure(3600.0), fleet.hours_to_failure(5 * 3600.0)
    assert np.isnan(h0[~wearing]).all() and np.isnan(h1[~wearing]).all()
    np.testing.assert_allclose(h0[wearing] - h1[wearing], 4.0)
    for f in fleet.faults:
        if f.failure is not None:
            assert fleet.hours_to_failure(f.failure)[f.device] == 0.0
            assert 2.0 <= (f.failure - f.onset) / 3600 <= 12.0


def test_active_names_the_fault_from_its_onset() -> None:
    fleet = Fleet(n=40, seed=10, mix=EVERY_KIND)
    assert fleet.active(0.0).tolist() == [""] * 40
    faulty = {f.device: f.kind for f in fleet.faults}
    assert set(faulty.values()) == set(FAULT_KINDS)
    assert fleet.active(1e9).tolist() == [faulty.get(m, "") for m in range(40)]
    for f in fleet.faults:
        assert fleet.active(f.onset - 1)[f.device] == ""
        assert fleet.active(f.onset)[f.device] == f.kind


@pytest.mark.parametrize(
    ("rates", "kwargs", "names"),
    [
        ({"bearing_waer": 0.1}, {}, "bearing_waer"),
        ({"imbalance": -0.1}, {}, "imbalance"),
        ({"overheating": 1.5}, {}, "overheating"),
        ({"sensor_drift": float("nan")}, {}, "sensor_drift"),
        ({"imbalance": 0.6, "overheating": 0.6}, {}, "sum"),
        ({"imbalance": 0.1}, {"horizon_h": 0.0}, "horizon_h"),
        ({"imbalance": 0.1}, {"wear_hours": (5.0, 2.0)}, "wear_hours"),
    ],
)
def test_a_bad_fault_mix_is_rejected_with_its_reason(
    rates: dict[str, float], kwargs: dict[str, object], names: str
) -> None:
    with pytest.raises(ValueError, match=names):
        FaultMix(rates, **kwargs)  # type: ignore[arg-type]


def test_overlapping_sample_ranges_are_rejected() -> None:
    fleet = Fleet(n=2)
    fleet.sample(0.0, 1.0, 10)
    with pytest.raises(ValueError, match="overlaps"):
        fleet.sample(5.0, 1.0, 10)


def test_time_of_one_sample_for_ten_thousand_devices(capsys: pytest.CaptureFixture[str]) -> None:
    fleet = Fleet(n=10_000, seed=1, mix=EVERY_KIND)
    fleet.sample(0.0, 0.1, 10)
    times = []
    for k in range(1, 6):
        start = time.perf_counter()
        fleet.sample(float(k), 0.1, 10)
        times.append(time.perf_counter() - start)
    with capsys.disabled():
        print(f"\nsample() 10,000 devices x 10 readings: {1e3 * min(times):.1f} ms (best of 5)")
