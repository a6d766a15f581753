"""The `.tflite` reader/validator: corrupt or unsupported files fail with ModelRejected only."""

from __future__ import annotations

import random
import struct

import numpy as np
import pytest

from fogline.models import writer
from fogline.models.errors import ModelRejected
from fogline.models.layers import Dense
from fogline.models.reader import read_model, read_model_file, validate
from fogline.models.schema import BuiltinOp, min_op_version


def net(seed: int = 0) -> list[Dense]:
    rng = np.random.default_rng(seed)
    return [
        Dense(weights=rng.normal(size=(9, 6)), bias=rng.normal(size=9), activation="relu"),
        Dense(weights=rng.normal(size=(4, 9)), bias=rng.normal(size=4), activation="softmax"),
    ]


REP = np.random.default_rng(1).normal(size=(64, 6))


@pytest.fixture(params=["float32", "float16", "int8"])
def model_bytes(request: pytest.FixtureRequest) -> bytes:
    return writer.write_model(net(), flavour=request.param, representative=REP, metadata={"v": 1})


# A tiny flatbuffer walker, independent of the reader, to corrupt specific fields.
def _table(data: bytes, pos: int) -> tuple[int, int]:
    return pos, pos - struct.unpack_from("<i", data, pos)[0]


def _field(data: bytes, table: tuple[int, int], slot: int) -> int:
    pos, vt = table
    off = struct.unpack_from("<H", data, vt + 4 + 2 * slot)[0]
    assert off, f"slot {slot} absent"
    return pos + off


def _deref(data: bytes, at: int) -> int:
    return at + struct.unpack_from("<I", data, at)[0]


def _vector_item(data: bytes, vec: int, i: int) -> int:
    return _deref(data, vec + 4 + 4 * i)


def _weights_tensor(data: bytes) -> tuple[int, int]:
    """(table position, index) of the first FC weights tensor."""
    parsed = read_model(data)
    fc = next(op for op in parsed.operators if op.name == "FULLY_CONNECTED")
    idx = fc.inputs[1]
    if parsed.tensors[idx].buffer == 0:  # float16: the FC reads a DEQUANTIZE output
        deq = next(op for op in parsed.operators if op.outputs[0] == idx)
        idx = deq.inputs[0]
    model = _table(data, struct.unpack_from("<I", data, 0)[0])
    subgraph = _table(data, _vector_item(data, _deref(data, _field(data, model, 2)), 0))
    tensors = _deref(data, _field(data, subgraph, 0))
    return _vector_item(data, tensors, idx), idx


def _rejected(data: bytes, match: str) -> None:
    with pytest.raises(ModelRejected, match=match):
        validate(data)


def test_written_models_validate(model_bytes: bytes) -> None:
    parsed = validate(model_bytes)
    assert parsed.signatures["serving_default"].inputs == {"input": parsed.inputs[0]}
    assert parsed.tensors[parsed.inputs[0]].shape_signature == (-1, 6)


def test_truncated_files_are_rejected_at_every_cut(model_bytes: bytes) -> None:
    for cut in range(len(model_bytes)):
        with pytest.raises(ModelRejected):
            read_model(model_bytes[:cut])


def test_flipped_identifier_is_rejected(model_bytes: bytes) -> None:
    _rejected(model_bytes[:4] + b"TFL2" + model_bytes[8:], "identifier")


def test_op_version_above_tflite_2_14_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    def bumped(op: BuiltinOp, dtype: object) -> int:
        return 4 if op is BuiltinOp.SOFTMAX else min_op_version(op, dtype)  # type: ignore[arg-type]

    monkeypatch.setattr(writer, "min_op_version", bumped)
    _rejected(writer.write_model(net()), r"SOFTMAX v4.*version outside 1\.\.3")


def test_non_empty_buffer_zero_is_rejected(model_bytes: bytes) -> None:
    data = bytearray(model_bytes)
    model = _table(data, struct.unpack_from("<I", data, 0)[0])
    buffers = _deref(data, _field(data, model, 4))
    # Point entry 0 of Model.buffers at buffer 1's table, which holds weights.
    target = _vector_item(data, buffers, 1)
    struct.pack_into("<I", data, buffers + 4, target - (buffers + 4))
    _rejected(bytes(data), "buffer 0 holds")


def test_out_of_range_buffer_index_is_rejected(model_bytes: bytes) -> None:
    data = bytearray(model_bytes)
    table, _ = _weights_tensor(model_bytes)
    struct.pack_into("<I", data, _field(data, _table(data, table), 2), 999)
    _rejected(bytes(data), "points at buffer 999")


def test_wrong_size_weight_buffer_is_rejected(model_bytes: bytes) -> None:
    data = bytearray(model_bytes)
    _, idx = _weights_tensor(model_bytes)
    buffer_index = read_model(model_bytes).tensors[idx].buffer
    model = _table(data, struct.unpack_from("<I", data, 0)[0])
    buf = _table(data, _vector_item(data, _deref(data, _field(data, model, 4)), buffer_index))
    vec = _deref(data, _field(data, buf, 0))
    (length,) = struct.unpack_from("<I", data, vec)
    struct.pack_into("<I", data, vec, length - 2)
    _rejected(bytes(data), "holds .* bytes, shape")


def test_fc_weight_shape_mismatch_is_rejected(model_bytes: bytes) -> None:
    data = bytearray(model_bytes)
    table, _ = _weights_tensor(model_bytes)
    shape = _deref(data, _field(data, _table(data, table), 0))
    # [9, 6] -> [6, 9]: same byte count, wrong orientation for the FC.
    struct.pack_into("<2i", data, shape + 4, 6, 9)
    _rejected(bytes(data), "does not match weights|input shape .* != output shape")


def test_missing_signature_is_rejected(model_bytes: bytes) -> None:
    data = model_bytes.replace(b"serving_default", b"serving_defaulX")
    _rejected(data, "no 'serving_default' signature")


def test_random_corruption_never_raises_anything_else(model_bytes: bytes) -> None:
    rng = random.Random(0)
    outcomes = {"ok": 0, "rejected": 0}
    for _ in range(400):
        data = bytearray(model_bytes)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            validate(bytes(data))
            outcomes["ok"] += 1
        except ModelRejected:
            outcomes["rejected"] += 1
    assert outcomes["rejected"] > 0


def test_missing_or_garbage_file(tmp_path: pytest.TempPathFactory) -> None:
    with pytest.raises(ModelRejected, match="cannot read"):
        read_model_file(tmp_path / "absent.tflite")  # type: ignore[operator]
    with pytest.raises(ModelRejected):
        read_model(b"\xff" * 64)
