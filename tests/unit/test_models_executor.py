"""The numpy executor, driven by the parsed file, against ai-edge-litert."""

from __future__ import annotations

import numpy as np
import pytest

from fogline.models.executor import execute, quantize_multiplier
from fogline.models.layers import Dense
from fogline.models.reader import validate
from fogline.models.runtime import Model
from fogline.models.writer import write_model

ARCHS = [["relu", "relu", "softmax"], ["relu", "none"], ["logistic", "relu", "logistic"]]


def net(seed: int, acts: list[str]) -> list[Dense]:
    rng = np.random.default_rng(seed)
    sizes = [10, *[int(rng.integers(3, 24)) for _ in acts]]
    return [
        Dense(
            weights=rng.normal(size=(sizes[i + 1], sizes[i])) / np.sqrt(sizes[i]),
            bias=rng.normal(size=sizes[i + 1]) * 0.3,
            activation=a,  # type: ignore[arg-type]
        )
        for i, a in enumerate(acts)
    ]


@pytest.mark.parametrize("flavour", ["float32", "float16", "int8"])
@pytest.mark.parametrize("arch", range(len(ARCHS)))
def test_executor_matches_runtime(flavour: str, arch: int) -> None:
    rng = np.random.default_rng(arch)
    layers = net(arch + 10, ARCHS[arch])
    rep = rng.normal(size=(256, 10))
    data = write_model(layers, flavour=flavour, representative=rep)  # type: ignore[arg-type]
    parsed = validate(data)
    model = Model(data)
    # Include inputs outside the calibration range so int8 saturation is exercised too.
    x = np.concatenate([rep, 3 * rng.normal(size=(64, 10))]).astype(np.float32)
    for batch in (1, 32, len(x)):
        ours, theirs = execute(parsed, x[:batch]), model.predict(x[:batch])
        assert ours.shape == theirs.shape == (batch, layers[-1].out_features)
        if flavour == "int8":
            # Same integer arithmetic as the runtime's default (XNNPACK) path: bit-exact.
            np.testing.assert_array_equal(ours, theirs)
        else:
            np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_quantize_multiplier_matches_tflite_examples() -> None:
    assert quantize_multiplier(0.5) == (1 << 30, 0)
    assert quantize_multiplier(0.25) == (1 << 30, -1)
    assert quantize_multiplier(1.0) == (1 << 30, 1)
    q, shift = quantize_multiplier(0.0123)
    assert abs(q * 2.0 ** (shift - 31) - 0.0123) < 1e-9


def test_executor_rejects_wrong_input_width() -> None:
    parsed = validate(write_model(net(1, ["none"])))
    with pytest.raises(ValueError, match="input must be"):
        execute(parsed, np.zeros((2, 3), dtype=np.float32))
