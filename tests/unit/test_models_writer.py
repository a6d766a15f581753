"""The `.tflite` writer: files load in the runtime, keep signature/metadata, match numpy."""

from __future__ import annotations

import numpy as np
import pytest

from fogline.models.layers import Dense, forward
from fogline.models.reader import validate
from fogline.models.runtime import Model, load_interpreter
from fogline.models.schema import MAX_OP_VERSION_TFLITE_2_14, BuiltinOp, TensorType, min_op_version
from fogline.models.writer import write_model

ARCHS = {
    "classifier": ["relu", "relu", "softmax"],
    "autoencoder": ["relu", "relu", "none"],
    "sigmoid": ["logistic", "relu", "logistic"],
}
# int8 vs the float reference, on inputs from the calibration distribution: at most this many
# quantisation steps of the tensor the output is dequantised from (measured worst: 5.3 steps
# over 40 random networks).
INT8_STEPS = 8


def net(seed: int, acts: list[str], width: int = 12) -> list[Dense]:
    rng = np.random.default_rng(seed)
    sizes = [width, *[int(rng.integers(4, 20)) for _ in acts]]
    return [
        Dense(
            weights=rng.normal(size=(sizes[i + 1], sizes[i])) / np.sqrt(sizes[i]),
            bias=rng.normal(size=sizes[i + 1]) * 0.3,
            activation=a,  # type: ignore[arg-type]
        )
        for i, a in enumerate(acts)
    ]


def rep_data(seed: int, width: int = 12, n: int = 256) -> np.ndarray:
    return np.random.default_rng(seed + 1000).normal(size=(n, width)).astype(np.float32)


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("flavour", ["float32", "float16", "int8"])
def test_runtime_matches_float_reference_at_every_batch_size(flavour: str, arch: str) -> None:
    layers = net(1, ARCHS[arch])
    rep = rep_data(1)
    data = write_model(layers, flavour=flavour, representative=rep)  # type: ignore[arg-type]
    model = Model(data)
    parsed = validate(data)
    out_scale = 0.0
    if flavour == "int8":
        q = parsed.tensors[parsed.operators[-1].inputs[0]].quantization
        assert q is not None
        out_scale = q.scale[0]
    for batch in (1, 32, 256):
        x = rep[:batch]
        got = model.predict(x)
        ref = forward(layers, x)
        assert got.shape == (batch, layers[-1].out_features)
        if flavour == "float32":
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
        elif flavour == "float16":
            np.testing.assert_allclose(got, ref, rtol=1e-2, atol=1e-2)
        else:
            assert np.abs(got - ref).max() <= INT8_STEPS * out_scale


@pytest.mark.parametrize("flavour", ["float32", "float16", "int8"])
def test_serving_default_signature_and_dynamic_batch(flavour: str) -> None:
    layers = net(2, ARCHS["classifier"])
    data = write_model(
        layers,
        flavour=flavour,  # type: ignore[arg-type]
        representative=rep_data(2),
        input_name="features",
        output_name="scores",
    )
    interp = load_interpreter(data)
    assert interp.get_signature_list() == {
        "serving_default": {"inputs": ["features"], "outputs": ["scores"]}
    }
    detail = interp.get_input_details()[0]
    assert list(detail["shape"]) == [1, 12]
    assert list(detail["shape_signature"]) == [-1, 12]
    runner = interp.get_signature_runner("serving_default")
    out = runner(features=rep_data(2)[:5])["scores"]
    assert out.shape == (5, layers[-1].out_features)


def test_metadata_round_trips() -> None:
    meta = {
        "name": "fault-classifier",
        "version": 7,
        "feature_names": [f"f{i}" for i in range(12)],
        "normalisation": {"mean": [0.5] * 12, "std": [2.0] * 12},
        "training_window": {"start": "2024-01-01T00:00:00Z", "end": "2024-02-01T00:00:00Z"},
        "thresholds": {"confidence": 0.85},
        "note": "ünïcode ✓",
    }
    for flavour in ("float32", "float16", "int8"):
        data = write_model(
            net(3, ARCHS["classifier"]), flavour=flavour, metadata=meta, representative=rep_data(3)
        )  # type: ignore[arg-type]
        assert validate(data).metadata_json("fogline") == meta


EXPECTED_VERSIONS = {
    "float32": {"FULLY_CONNECTED": 1, "LOGISTIC": 1, "SOFTMAX": 1},
    "float16": {"DEQUANTIZE": 3, "FULLY_CONNECTED": 1, "LOGISTIC": 1, "SOFTMAX": 1},
    "int8": {"QUANTIZE": 1, "FULLY_CONNECTED": 4, "LOGISTIC": 2, "SOFTMAX": 2, "DEQUANTIZE": 2},
}


@pytest.mark.parametrize("flavour", sorted(EXPECTED_VERSIONS))
def test_op_versions_are_the_minimum_for_their_dtypes(flavour: str) -> None:
    layers = net(4, ["logistic", "relu", "softmax"])
    parsed = validate(write_model(layers, flavour=flavour, representative=rep_data(4)))  # type: ignore[arg-type]
    assert parsed.op_versions() == EXPECTED_VERSIONS[flavour]
    for op in parsed.operators:
        code = BuiltinOp(op.opcode)
        dtype = TensorType(parsed.tensors[op.inputs[0]].dtype)
        assert op.version == min_op_version(code, dtype)
        assert op.version <= MAX_OP_VERSION_TFLITE_2_14[code]
    for c in parsed.operator_codes:
        assert c.deprecated_builtin_code == c.builtin_code  # both set, all codes < 127


def test_file_layout_follows_the_schema_conventions() -> None:
    layers = net(5, ARCHS["autoencoder"])
    data = write_model(layers, flavour="int8", representative=rep_data(5))
    assert data[4:8] == b"TFL3"
    parsed = validate(data)
    assert parsed.version == 3
    assert parsed.buffers[0] == b""
    fcs = [op for op in parsed.operators if op.name == "FULLY_CONNECTED"]
    for layer, op in zip(layers, fcs, strict=True):
        w = parsed.constant(op.inputs[1])
        assert w.shape == (layer.out_features, layer.in_features)
        assert parsed.tensors[op.inputs[2]].type_name == "INT32"
    # Hidden RELUs are fused into their FC, as the converter does.
    assert [op.options["fused_activation_function"] for op in fcs] == [1, 1, 0]


def test_int8_sigmoid_and_softmax_outputs_use_the_fixed_quantisation() -> None:
    parsed = validate(
        write_model(net(6, ["logistic", "softmax"]), flavour="int8", representative=rep_data(6))
    )
    for op in parsed.operators:
        if op.name in ("LOGISTIC", "SOFTMAX"):
            q = parsed.tensors[op.outputs[0]].quantization
            assert q is not None
            assert q.scale == (1 / 256,) and q.zero_point == (-128,)


def test_writer_refuses_what_it_cannot_write() -> None:
    layers = net(7, ["softmax", "none"])
    with pytest.raises(ValueError, match="softmax"):
        write_model(layers)
    with pytest.raises(ValueError, match="representative"):
        write_model(net(7, ["relu", "none"]), flavour="int8")
    with pytest.raises(ValueError, match="outputs"):
        write_model([net(7, ["relu"])[0], net(8, ["none"], width=3)[0]])
