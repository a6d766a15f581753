"""The simulated machines' signals: shaped, reproducible, finite, and spiked only when asked."""

from __future__ import annotations

import numpy as np

from device_sim.signals import _BASE, _NOISE, _SPIKE, _SWING, FIELDS, Fleet


def test_sample_shape_and_dtype() -> None:
    values = Fleet(n=7, seed=1, anomaly_rate=0.0).sample(t0=0.0, dt=0.5, count=40)
    assert values.shape == (7, 40, len(FIELDS))
    assert values.dtype == np.float32
    assert np.isfinite(values).all()


def test_sample_is_reproducible_by_seed() -> None:
    a, b, c = (Fleet(n=5, seed=s, anomaly_rate=0.1) for s in (42, 42, 43))
    for t0 in (0.0, 10.0, 20.0):
        va, vb, vc = (f.sample(t0=t0, dt=1.0, count=10) for f in (a, b, c))
        np.testing.assert_array_equal(va, vb)
        assert not np.array_equal(va, vc)


def test_values_stay_finite_over_a_long_run() -> None:
    fleet = Fleet(n=20, seed=3, anomaly_rate=0.2)
    for k in range(50):
        assert np.isfinite(fleet.sample(t0=k * 100.0, dt=1.0, count=100)).all()


def test_without_anomalies_every_value_stays_near_its_nominal_level() -> None:
    fleet = Fleet(n=50, seed=4, anomaly_rate=0.0)
    values = np.concatenate(
        [fleet.sample(t0=k * 60.0, dt=1.0, count=60) for k in range(10)], axis=1
    ).astype(np.float64)
    # per-machine offsets are a few percent of the base; the load swing and noise come on top
    bound = 0.25 * _BASE + _SWING + 6 * _NOISE
    assert (np.abs(values - _BASE) <= bound).all()
    # and nothing is anywhere near a spike
    assert (values < _BASE + _SPIKE * 0.7).all()
    # noise around the smooth load cycle is of the documented size
    resid = np.diff(values, axis=1)  # the load moves little between samples one second apart
    np.testing.assert_allclose(resid.std(axis=(0, 1)), np.sqrt(2) * _NOISE, rtol=0.2)


def test_with_every_message_anomalous_every_machine_is_offset_by_the_spike() -> None:
    calm = Fleet(n=10, seed=5, anomaly_rate=0.0)
    hit = Fleet(n=10, seed=5, anomaly_rate=1.0)
    v0 = calm.sample(t0=0.0, dt=1.0, count=30).astype(np.float64)
    v1 = hit.sample(t0=0.0, dt=1.0, count=30).astype(np.float64)
    np.testing.assert_allclose(v1 - v0, np.broadcast_to(_SPIKE, v0.shape), atol=1e-3)
    for k in range(1, 5):
        v = hit.sample(t0=k * 30.0, dt=1.0, count=30).astype(np.float64)
        assert (np.abs(v - _BASE - _SPIKE) <= 0.25 * _BASE + _SWING + 6 * _NOISE).all()
