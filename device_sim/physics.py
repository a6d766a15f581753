"""A fleet of motor-driven pumps with developing faults and their ground truth (pure numpy, no I/O).

Simulated time `t` is in seconds since the fleet's start, which is midnight of day 0. Fields:

    vib_rms       mm/s  velocity RMS at the bearing housing (healthy ~1-3, ISO 10816 "bad" > ~7)
    vib_peak      mm/s  velocity peak of the same window (crest factor peak/rms ~1.4-3 healthy)
    vib_kurtosis  1     kurtosis of the high-frequency (bearing) band, 3 for Gaussian noise
    temp_bearing  degC  drive-end bearing temperature
    temp_motor    degC  motor winding/housing temperature
    current       A     motor phase current
    pressure      bar   pump discharge gauge pressure

Model of machine m (constants drawn per machine, ranges in `Fleet.__init__`):

    load    = clip(mu + A_d cos(2 pi (t - t_d) / 1 d) + x, 0.2, 1), x an Ornstein-Uhlenbeck walk
              (time constant 30 min, sd 0.1), integrated exactly for any step
    speed   -> f * n_sync * (1 - slip * load) through a 4 s ramp, f a drive set-point in
              {0.7, 0.8, 0.9, 1.0} changing every ~4 h; sr = speed / rated speed (~1,480 or
              ~2,950 rpm: 4- or 2-pole motors with 1-2 % slip)
    ambient = T_a + A_a cos(2 pi (t - t_a) / 1 d)
    T_motor -> ambient + dT_m (0.15 + 0.85 load^2) + R_oh s_oh^2 through a first-order lag
              (tau 8-20 min); T_bearing alike (tau 5-15 min) with dT_b sr (0.5 + 0.5 load).
              The lag is integrated exactly with the target held over each step, so any dt works.
    current = I_rated (i0 + (1 - i0) load)
    pressure = p_nom sr^2 (1.05 - 0.1 load): the affinity law, head falling slightly with flow
    vibration: broadband b sr, running-speed (1x) component (a + A_imb s_imb) sr^2, bearing
              impulses B w(s_bw) sr with w(s) = s + 8 s^4 (slow rise, steep end);
              rms = sqrt of the sum of squares, peak = sqrt(2) 1x + c_g broadband + 4 impulses,
              kurtosis = 3 + e0 + k_b w(s_bw) (the 1x imbalance tone is outside the kurtosis band).

Severity s rises linearly from 0 at onset to 1 at failure. At failure a wearing fault trips the
machine: it coasts down, current and pressure fall to 0 and it cools to ambient. Sensor faults
act on the readings of one field only: stuck (frozen at the reading at onset), dropout (stretches
of 5-30 s reading 0.0, a lost 4-20 mA loop), spikes (isolated +-30-80 % of the sensor span) and
drift (a bias growing 0.5-2 % of span per hour). Sensor noise is a per-field absolute plus
relative term.

Per-machine constants and the fault schedule come from a counter-based hash of (seed, global
device number), so device k is the same machine whatever `first` is; the dynamics and sensor noise
come from generators seeded by (seed, first), the sensor faults' randomness from a separate one, so
a fleet without faults (`mix=None`) and the same seed is the exact healthy twin of one with them.
`Fleet.regime` holds the true load, speed and ambient of the last `sample()`, whose `load=`
argument can replace the simulated load (a scenario, or a step for a test).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

FIELDS: tuple[str, ...] = (
    "vib_rms",
    "vib_peak",
    "vib_kurtosis",
    "temp_bearing",
    "temp_motor",
    "current",
    "pressure",
)
FAULT_KINDS: tuple[str, ...] = (
    "bearing_wear",
    "overheating",
    "imbalance",
    "sensor_stuck",
    "sensor_dropout",
    "sensor_spikes",
    "sensor_drift",
)
WEARING: frozenset[str] = frozenset({"bearing_wear", "overheating", "imbalance"})

_KIND_NAMES = np.array(["", *FAULT_KINDS], dtype=object)
_F = len(FIELDS)
_RMS, _PEAK, _KURT, _TB, _TM, _CUR, _PRES = range(_F)
_BW, _OH, _IMB, _STUCK, _DROP, _SPIKE, _DRIFT = range(len(FAULT_KINDS))
_DAY = 86_400.0
_HOUR = 3_600.0

_LOAD_TAU = 1_800.0  # s: the process demand wanders over half an hour
_LOAD_SD = 0.1
_SPEED_TAU = 4.0  # s: drive ramp and coast-down
_SETPOINTS = np.array([0.7, 0.8, 0.9, 1.0])
_SETPOINT_DWELL = 4 * _HOUR
_DROP_P = 0.3  # chance that a dropout slot is lost
_SPIKE_P = 0.01  # chance per reading of a spike
# Sensor span of each field (current and pressure spans are per machine, set in Fleet).
_SPAN = np.array([20.0, 50.0, 20.0, 150.0, 150.0, 0.0, 0.0])
_NOISE_REL = np.array([0.03, 0.06, 0.03, 0.0, 0.0, 0.0, 0.005])
_FLOOR32 = np.array([0, 0, 1, -np.inf, -np.inf, 0, 0], dtype=np.float32)  # physical bounds

_U64 = np.uint64
_GOLDEN = _U64(0x9E3779B97F4A7C15)


def _mix(z: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser: a bijective 64-bit hash (wraps on overflow, as intended)."""
    z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
    return z ^ (z >> _U64(31))


def _unit(key: int, *counters: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) numbers that depend only on the key and the (broadcast) counters."""
    shape = np.broadcast_shapes(*(np.shape(c) for c in counters))
    z = _mix(np.full(shape, key % 2**64, dtype=np.uint64))
    for c in counters:
        z = _mix(z + (np.asarray(c).astype(np.uint64) + _U64(1)) * _GOLDEN)
    return (z >> _U64(11)).astype(np.float64) * 2.0**-53


@dataclass(frozen=True)
class FaultMix:
    """How many machines develop which fault, and when."""

    rates: dict[str, float]
    horizon_h: float = 24.0
    wear_hours: tuple[float, float] = (2.0, 12.0)

    def __post_init__(self) -> None:
        for kind, rate in self.rates.items():
            if kind not in FAULT_KINDS:
                raise ValueError(f"unknown fault kind {kind!r} (known: {', '.join(FAULT_KINDS)})")
            if not (isinstance(rate, numbers.Real) and 0.0 <= rate <= 1.0):
                raise ValueError(f"rate of {kind!r} must be a probability in [0, 1], not {rate!r}")
        if sum(self.rates.values()) > 1.0 + 1e-9:
            raise ValueError(f"fault rates sum to {sum(self.rates.values()):g}, more than 1")
        if not (math.isfinite(self.horizon_h) and self.horizon_h > 0):
            raise ValueError(f"horizon_h must be positive, not {self.horizon_h!r}")
        lo, hi = self.wear_hours
        if not (math.isfinite(hi) and 0 < lo <= hi):
            raise ValueError(f"wear_hours must be 0 < low <= high, not {self.wear_hours!r}")


@dataclass(frozen=True)
class Fault:
    """Ground truth of one machine's fault."""

    device: int
    kind: str
    field: str | None
    onset: float
    failure: float | None


@dataclass(frozen=True)
class Regime:
    """Operating regime of the last sample() call, each (n, count): load, speed in rpm, ambient."""

    load: np.ndarray
    speed: np.ndarray
    ambient: np.ndarray


def _lag(y: np.ndarray, target: np.ndarray, a_first: np.ndarray, a_rest: np.ndarray) -> np.ndarray:
    """First-order lag along axis 0: y_k = u_k + (y_{k-1} - u_k) a, exact for u held over a step."""
    out = np.empty_like(target)
    a = a_first
    for k in range(target.shape[0]):
        y = target[k] + (y - target[k]) * a
        out[k] = y
        a = a_rest
    return out


class Fleet:
    """Machines `first .. first+n-1` of a fleet: operating regime, sensors, faults."""

    def __init__(
        self,
        *,
        n: int,
        first: int = 0,
        seed: int = 1,
        mix: FaultMix | None = None,
        ambient_offset: float = 0.0,
    ) -> None:
        if n < 1 or first < 0:
            raise ValueError(f"need n >= 1 and first >= 0, not n={n}, first={first}")
        self.n, self.first, self.seed = n, first, seed
        key = seed % 2**64
        devices = np.arange(first, first + n, dtype=np.uint64)
        u = _unit(key, devices[:, None], np.arange(40, dtype=np.uint64)[None, :])

        def draw(col: int, lo: float, hi: float) -> np.ndarray:
            return lo + (hi - lo) * u[:, col]

        # Machine constants: the same device number is the same machine in any split.
        self._n_sync = np.where(u[:, 0] < 0.6, 1_500.0, 3_000.0)
        self._slip = draw(1, 0.010, 0.020)
        self._n_rated = self._n_sync * (1 - self._slip)
        self._load_mu = draw(2, 0.45, 0.75)
        load_day, load_phase = draw(3, 0.05, 0.15), 2 * np.pi * draw(4, 9.0, 17.0) / 24
        self._load_cos, self._load_sin = (
            load_day * np.cos(load_phase),
            load_day * np.sin(load_phase),
        )
        # The site's climate: machines in a hot plant run warmer than the ones models know.
        self._amb_mean = draw(5, 15.0, 30.0) + ambient_offset
        amb_day, amb_phase = draw(6, 2.0, 6.0), 2 * np.pi * draw(7, 13.0, 17.0) / 24
        self._amb_cos, self._amb_sin = amb_day * np.cos(amb_phase), amb_day * np.sin(amb_phase)
        self._rise_m = draw(8, 35.0, 55.0)
        self._rise_b = draw(9, 15.0, 30.0)
        self._tau = np.stack([draw(10, 480.0, 1_200.0), draw(11, 300.0, 900.0)])  # motor, bearing
        self._offset = np.stack([draw(12, -1.0, 1.0), draw(13, -1.0, 1.0)])  # sensor calibration
        self._i_rated = np.exp(draw(14, math.log(8.0), math.log(60.0)))
        i0 = draw(15, 0.30, 0.40)  # no-load current as a fraction of rated
        self._i_rated_i0, self._i_rated_load = self._i_rated * i0, self._i_rated * (1 - i0)
        self._p_nom = draw(16, 2.0, 8.0)
        self._vib_bb = draw(17, 0.6, 1.2)
        self._vib_1x = draw(18, 0.5, 1.5)
        self._vib_imb = draw(19, 6.0, 10.0)
        self._vib_brg = draw(20, 0.5, 0.8)
        self._crest_g = draw(21, 1.7, 2.4)
        self._kurt_e0 = draw(22, 0.0, 0.2)
        self._kurt_brg = draw(23, 1.5, 3.0)
        self._oh_limit = draw(24, 20.0, 30.0)
        self._f_start = _SETPOINTS[(u[:, 25] * len(_SETPOINTS)).astype(np.intp)]
        span = np.tile(_SPAN, (n, 1))
        span[:, _CUR] = 2.0 * self._i_rated
        span[:, _PRES] = 2.0 * self._p_nom
        self._span = span
        noise_abs = np.array([0.02, 0.05, 0.1, 0.15, 0.15, 0.0, 0.01])
        self._noise_abs = np.tile(noise_abs, (n, 1))
        self._noise_abs[:, _CUR] = 0.004 * self._i_rated
        self._noise_abs32 = self._noise_abs.T.astype(np.float32)  # field-major for the hot path

        # The fault schedule, from the same per-device stream.
        self._kind = np.full(n, -1, dtype=np.int8)
        self._onset = np.full(n, np.inf)
        self._failure = np.full(n, np.inf)
        self._field = (u[:, 33] * _F).astype(np.intp)
        self.faults: list[Fault] = []
        if mix is not None:
            cum = np.cumsum([mix.rates.get(k, 0.0) for k in FAULT_KINDS])
            kind = np.searchsorted(cum, u[:, 30], side="right")
            has = kind < len(FAULT_KINDS)
            self._kind[has] = kind[has]
            self._onset[has] = u[has, 31] * mix.horizon_h * _HOUR
            lo, hi = mix.wear_hours
            wearing = has & (kind <= _IMB)
            self._failure[wearing] = (
                self._onset[wearing] + (lo + (hi - lo) * u[wearing, 32]) * _HOUR
            )
            for i in np.flatnonzero(has):
                k = FAULT_KINDS[kind[i]]
                self.faults.append(
                    Fault(
                        device=first + int(i),
                        kind=k,
                        field=None if k in WEARING else FIELDS[self._field[i]],
                        onset=float(self._onset[i]),
                        failure=float(self._failure[i]) if k in WEARING else None,
                    )
                )
        wear = np.isfinite(self._failure)
        self._wear_len = np.ones(n)
        self._wear_len[wear] = self._failure[wear] - self._onset[wear]
        self._by_kind = [np.flatnonzero(self._kind == k) for k in range(len(FAULT_KINDS))]
        self._sensor = {k: self._by_kind[k] for k in (_STUCK, _DROP, _SPIKE, _DRIFT)}
        sign = np.where(u[:, 34] < 0.5, -1.0, 1.0)
        self._drift_rate = sign * draw(35, 0.005, 0.02) * span[np.arange(n), self._field] / _HOUR
        self._drop_slot = draw(36, 5.0, 30.0)
        self._stuck_value = np.full(len(self._sensor[_STUCK]), np.nan, dtype=np.float32)
        self._key = key

        # Dynamic state, initialised at the first sample().
        self._rng = np.random.default_rng([key, first, 0])
        self._fault_rng = np.random.default_rng([key, first, 1])
        self._x = np.zeros(n)  # the first sample() draws it from the stationary distribution
        self._f = self._f_start.copy()
        self._next_change = self._rng.exponential(_SETPOINT_DWELL, n)
        self._speed = np.zeros(n)
        self._temp = np.zeros((2, n))
        self._t_last: float | None = None
        self.regime: Regime | None = None

    def hours_to_failure(self, t: float) -> np.ndarray:
        """Hours from `t` to failure (negative once failed) for wearing faults, else NaN: (n,)."""
        h = (self._failure - t) / _HOUR
        return np.where(np.isfinite(self._failure), h, np.nan)

    def active(self, t: float) -> np.ndarray:
        """Fault kind active at `t` as an (n,) object array of str, "" if healthy (failed stays)."""
        return _KIND_NAMES[np.where(self._onset <= t, self._kind + 1, 0)]

    def sample(
        self, t0: float, dt: float, count: int, *, load: np.ndarray | None = None
    ) -> np.ndarray:
        """Readings at t0 + i*dt, i < count: (n, count, len(FIELDS)) float32; `load` overrides."""
        if not dt > 0 or count < 0:
            raise ValueError(f"need dt > 0 and count >= 0, not dt={dt}, count={count}")
        if self._t_last is not None and t0 <= self._t_last:
            raise ValueError(f"t0={t0} overlaps the previous sample (last reading {self._t_last})")
        n = self.n
        if count == 0:
            return np.empty((n, 0, _F), dtype=np.float32)
        t = t0 + dt * np.arange(count)
        tc = t[:, None]  # time-major (count, n) arrays below
        gap = math.inf if self._t_last is None else t0 - self._t_last
        if self._t_last is None:
            self._next_change += t0
        # Daily cycles by angle addition: cos/sin of t per call, of each machine's phase once.
        day = 2 * np.pi * t / _DAY
        cos_t, sin_t = np.cos(day)[:, None], np.sin(day)[:, None]

        # Process demand: mean + daily cycle + Ornstein-Uhlenbeck walk (exact for any step).
        a_gap, a_dt = math.exp(-gap / _LOAD_TAU), math.exp(-dt / _LOAD_TAU)
        z = self._rng.standard_normal((count, n))
        x = np.empty((count, n))
        x[0] = a_gap * self._x + _LOAD_SD * math.sqrt(1 - a_gap**2) * z[0]
        s_dt = _LOAD_SD * math.sqrt(1 - a_dt**2)
        for k in range(1, count):
            x[k] = a_dt * x[k - 1] + s_dt * z[k]
        self._x = x[-1]
        if load is None:
            demand = x + self._load_mu
            demand += cos_t * self._load_cos
            demand += sin_t * self._load_sin
            np.clip(demand, 0.2, 1.0, out=demand)
        else:
            demand = np.clip(np.broadcast_to(np.asarray(load, float), (n, count)).T, 0.0, 1.0)

        # Drive set-point changes at exponential intervals (rare: a short loop over events).
        f = np.broadcast_to(self._f, (count, n)).copy()
        while True:
            due = np.flatnonzero(self._next_change <= t[-1])
            if len(due) == 0:
                break
            k0 = np.ceil((self._next_change[due] - t0) / dt).clip(0, count)
            new = _SETPOINTS[self._rng.integers(0, len(_SETPOINTS), len(due))]
            f[:, due] = np.where(np.arange(count)[:, None] >= k0, new, f[:, due])
            self._f[due] = new
            self._next_change[due] += self._rng.exponential(_SETPOINT_DWELL, len(due))

        # A wearing fault trips its machine at failure: no current, coast-down, cooling.
        run = tc < self._failure
        rl = demand * run
        target = f * self._n_sync
        target *= 1 - self._slip * demand
        target *= run
        a_s = np.full(n, math.exp(-gap / _SPEED_TAU)), np.full(n, math.exp(-dt / _SPEED_TAU))
        speed = _lag(self._speed, target, *a_s)
        self._speed = speed[-1]
        sr = speed / self._n_rated
        sr2 = sr * sr

        # The healthy machine.
        amb = cos_t * self._amb_cos
        amb += sin_t * self._amb_sin
        amb += self._amb_mean
        heat = np.empty((count, 2, n))
        heat[:, 0] = amb + self._rise_m * run * (0.15 + 0.85 * rl * rl)
        heat[:, 1] = amb + self._rise_b * sr * (0.5 + 0.5 * rl)
        bb = self._vib_bb * sr
        one = self._vib_1x * sr2
        vals = np.empty((_F, count, n), dtype=np.float32)
        vals[_RMS] = np.sqrt(bb * bb + one * one)
        vals[_PEAK] = math.sqrt(2) * one + self._crest_g * bb
        vals[_KURT] = 3.0 + self._kurt_e0
        vals[_CUR] = run * self._i_rated_i0 + rl * self._i_rated_load
        vals[_PRES] = self._p_nom * sr2 * (1.05 - 0.1 * rl)

        # Wearing faults, on their machines only: severity 0 -> 1 from onset to failure.
        idx = self._by_kind[_OH]
        if len(idx):
            s = np.clip((tc - self._onset[idx]) / self._wear_len[idx], 0.0, 1.0)
            oh = self._oh_limit[idx] * s * s * run[:, idx]
            heat[:, 0, idx] += oh
            heat[:, 1, idx] += 0.15 * oh
        idx = self._by_kind[_BW]
        if len(idx):
            s = np.clip((tc - self._onset[idx]) / self._wear_len[idx], 0.0, 1.0)
            w = s + 8.0 * (s * s) ** 2  # slow rise, steep end
            sri = sr[:, idx]
            brg = self._vib_brg[idx] * w * sri
            heat[:, 1, idx] += 1.5 * w * sri
            vals[_RMS][:, idx] = np.sqrt(bb[:, idx] ** 2 + one[:, idx] ** 2 + brg * brg)
            vals[_PEAK][:, idx] += 4.0 * brg
            vals[_KURT][:, idx] += self._kurt_brg[idx] * w * np.minimum(1.0, sri / 0.3)
        idx = self._by_kind[_IMB]
        if len(idx):
            s = np.clip((tc - self._onset[idx]) / self._wear_len[idx], 0.0, 1.0)
            sri2 = sr2[:, idx]
            one_i = (self._vib_1x[idx] + self._vib_imb[idx] * s) * sri2
            heat[:, 1, idx] += 3.0 * s * sri2
            vals[_RMS][:, idx] = np.sqrt(bb[:, idx] ** 2 + one_i * one_i)
            vals[_PEAK][:, idx] = math.sqrt(2) * one_i + self._crest_g[idx] * bb[:, idx]

        temp = _lag(self._temp, heat, np.exp(-gap / self._tau), np.exp(-dt / self._tau))
        self._temp = temp[-1]
        vals[_TB] = temp[:, 1] + self._offset[1]
        vals[_TM] = temp[:, 0] + self._offset[0]

        # Sensor noise: absolute plus relative, then the physical floor of each field.
        noise = self._rng.standard_normal((_F, count, n), dtype=np.float32)
        for j in range(_F):
            sd = self._noise_abs32[j]
            if _NOISE_REL[j]:
                sd = sd + vals[j] * np.float32(_NOISE_REL[j])
            noise[j] *= sd
        vals += noise
        np.maximum(vals, _FLOOR32[:, None, None], out=vals)
        self._sensor_faults(vals, t)

        self._t_last = float(t[-1])
        self.regime = Regime(load=rl.T, speed=speed.T, ambient=amb.T)
        return np.ascontiguousarray(vals.transpose(2, 1, 0))

    def _sensor_faults(self, vals: np.ndarray, t: np.ndarray) -> None:
        """Apply stuck, dropout, spike and drift faults in place to field-major `vals`."""
        count = len(t)
        steps = np.arange(count)[:, None]
        # Drawn on every call, so the generator's use does not depend on the onsets.
        n_spiky = len(self._sensor[_SPIKE])
        hit = self._fault_rng.random((count, n_spiky)) < _SPIKE_P
        hit[1:] &= ~hit[:-1]  # isolated: never two in a row
        size = self._fault_rng.uniform(-0.8, 0.8, (count, n_spiky))
        for kind, idx in self._sensor.items():
            if len(idx) == 0:
                continue
            field = self._field[idx]
            after = t[:, None] >= self._onset[idx]
            if not after.any():
                continue
            cur = vals[field, steps, idx]  # (count, m)
            if kind == _STUCK:
                fresh = np.isnan(self._stuck_value) & after.any(axis=0)
                first = after.argmax(axis=0)
                cols = np.flatnonzero(fresh)
                self._stuck_value[fresh] = cur[first[fresh], cols]
                cur = np.where(after, self._stuck_value, cur)
            elif kind == _DROP:
                slot = np.floor((t[:, None] - self._onset[idx]) / self._drop_slot[idx])
                slot = np.maximum(slot, 0).astype(np.int64)
                lost = _unit(self._key ^ 0xD0D0, self.first + idx, slot) < _DROP_P
                cur = np.where(after & lost, np.float32(0.0), cur)
            elif kind == _SPIKE:
                size = np.sign(size) * (0.3 + np.abs(size) * 0.625) * self._span[idx, field]
                cur = np.where(after & hit, cur + size, cur)
            else:
                bias = self._drift_rate[idx] * np.maximum(t[:, None] - self._onset[idx], 0.0)
                cur = cur + bias
            vals[field, steps, idx] = cur
