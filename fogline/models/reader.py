"""Parse a `.tflite` flatbuffer into plain dataclasses and validate it, no `tflite` package.

Every read is bounds-checked: malformed, truncated or corrupted bytes raise `ModelRejected`
and nothing else.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fogline.models.errors import ModelRejected
from fogline.models.schema import (
    FILE_IDENTIFIER,
    MAX_OP_VERSION_TFLITE_2_14,
    NUMPY_DTYPE,
    SCHEMA_VERSION,
    SIGMOID_SOFTMAX_INT8_SCALE,
    SIGMOID_SOFTMAX_INT8_ZERO_POINT,
    SIGNATURE_KEY,
    BuiltinOp,
    FusedActivation,
    OptionsType,
    Slot,
    TensorType,
)

MAX_MODEL_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class Quantization:
    """Affine quantisation: real = scale * (q - zero_point), per tensor or per channel."""

    scale: tuple[float, ...]
    zero_point: tuple[int, ...]
    quantized_dimension: int = 0


@dataclass(frozen=True, kw_only=True)
class TensorInfo:
    """One tensor of the main subgraph."""

    index: int
    name: str
    shape: tuple[int, ...]
    shape_signature: tuple[int, ...] | None
    dtype: int
    buffer: int
    quantization: Quantization | None

    @property
    def type_name(self) -> str:
        """The TensorType name, or `UNKNOWN(n)`."""
        try:
            return TensorType(self.dtype).name
        except ValueError:
            return f"UNKNOWN({self.dtype})"


@dataclass(frozen=True, kw_only=True)
class OperatorInfo:
    """One operator of the main subgraph, its code resolved through the operator_codes table."""

    index: int
    opcode: int
    version: int
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    options: dict[str, Any] = field(default_factory=dict)
    custom_code: str | None = None

    @property
    def name(self) -> str:
        """The builtin op name, or `CUSTOM:<code>` / `BUILTIN(n)`."""
        if self.custom_code is not None:
            return f"CUSTOM:{self.custom_code}"
        try:
            return BuiltinOp(self.opcode).name
        except ValueError:
            return f"BUILTIN({self.opcode})"


@dataclass(frozen=True, kw_only=True)
class OperatorCodeInfo:
    """One entry of the model's operator_codes table, both code fields as stored."""

    deprecated_builtin_code: int
    builtin_code: int
    version: int
    custom_code: str | None


@dataclass(frozen=True, kw_only=True)
class SignatureInfo:
    """A SignatureDef: named inputs and outputs mapped to tensor indices."""

    key: str
    inputs: dict[str, int]
    outputs: dict[str, int]
    subgraph_index: int


@dataclass(frozen=True, kw_only=True)
class ParsedModel:
    """What a `.tflite` file holds, as far as a dense network needs."""

    version: int
    description: str | None
    subgraph_count: int
    operator_codes: tuple[OperatorCodeInfo, ...]
    tensors: tuple[TensorInfo, ...]
    operators: tuple[OperatorInfo, ...]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    buffers: tuple[bytes, ...]
    signatures: dict[str, SignatureInfo]
    metadata: dict[str, bytes]

    def constant(self, index: int) -> np.ndarray:
        """The constant data of tensor `index` as a numpy array of its shape and dtype."""
        t = self.tensors[index]
        data = self.buffers[t.buffer] if 0 <= t.buffer < len(self.buffers) else b""
        if not data:
            raise ModelRejected(f"tensor {index} ({t.name!r}) has no constant data")
        try:
            dtype = NUMPY_DTYPE[TensorType(t.dtype)]
            return np.frombuffer(data, dtype=dtype).reshape(t.shape)
        except (ValueError, KeyError) as exc:
            raise ModelRejected(f"tensor {index} ({t.name!r}): {exc}") from exc

    def metadata_json(self, name: str = "fogline") -> dict[str, Any]:
        """The metadata entry `name` decoded as a UTF-8 JSON object."""
        if name not in self.metadata:
            raise ModelRejected(f"no metadata entry {name!r}")
        try:
            value = json.loads(self.metadata[name].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelRejected(f"metadata {name!r} is not UTF-8 JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise ModelRejected(f"metadata {name!r} is not a JSON object")
        return value

    def op_versions(self) -> dict[str, int]:
        """Op name -> version for every operator (highest if an op appears twice)."""
        out: dict[str, int] = {}
        for op in self.operators:
            out[op.name] = max(out.get(op.name, 0), op.version)
        return out


class _Reader:
    """Bounds-checked little-endian reads from the file's bytes."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size = len(data)

    def read(self, fmt: str, pos: int) -> Any:
        n = struct.calcsize(fmt)
        if pos < 0 or pos + n > self.size:
            raise ModelRejected(
                f"truncated or corrupt: read of {n} bytes at {pos}, file has {self.size}"
            )
        return struct.unpack_from(fmt, self.data, pos)[0]

    def span(self, pos: int, length: int) -> bytes:
        if pos < 0 or length < 0 or pos + length > self.size:
            raise ModelRejected(
                f"truncated or corrupt: {length} bytes at {pos}, file has {self.size}"
            )
        return self.data[pos : pos + length]

    def table(self, pos: int) -> _Table:
        return _Table(self, pos)


class _Table:
    """A flatbuffer table: fields found through its vtable."""

    def __init__(self, r: _Reader, pos: int) -> None:
        self.r = r
        self.pos = pos
        self.vtable = pos - r.read("<i", pos)
        self.vt_len = r.read("<H", self.vtable)
        self.obj_len = r.read("<H", self.vtable + 2)
        if self.vt_len < 4 or self.vt_len % 2 or self.obj_len < 4:
            raise ModelRejected(f"corrupt table at {pos}: vtable {self.vt_len}/{self.obj_len}")
        r.span(self.vtable, self.vt_len)
        r.span(pos, self.obj_len)

    def _field(self, slot: int) -> int | None:
        o = 4 + 2 * slot
        if o >= self.vt_len:
            return None
        off: int = self.r.read("<H", self.vtable + o)
        if not off:
            return None
        if off >= self.obj_len:
            raise ModelRejected(f"corrupt table at {self.pos}: field {slot} outside the object")
        return self.pos + off

    def scalar(self, slot: int, fmt: str, default: Any = 0) -> Any:
        p = self._field(slot)
        return default if p is None else self.r.read(fmt, p)

    def _target(self, slot: int) -> int | None:
        p = self._field(slot)
        return None if p is None else p + self.r.read("<I", p)

    def table(self, slot: int) -> _Table | None:
        p = self._target(slot)
        return None if p is None else self.r.table(p)

    def string(self, slot: int) -> str | None:
        p = self._target(slot)
        if p is None:
            return None
        n = self.r.read("<I", p)
        try:
            return self.r.span(p + 4, n).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ModelRejected(f"corrupt string at {p}: {exc}") from exc

    def raw_vector(self, slot: int, item: int) -> tuple[int, int] | None:
        p = self._target(slot)
        if p is None:
            return None
        n = self.r.read("<I", p)
        self.r.span(p + 4, n * item)
        return p + 4, n

    def bytes_vector(self, slot: int) -> bytes:
        v = self.raw_vector(slot, 1)
        return b"" if v is None else self.r.span(v[0], v[1])

    def numbers(self, slot: int, fmt: str) -> tuple[Any, ...] | None:
        size = struct.calcsize("<" + fmt)
        v = self.raw_vector(slot, size)
        if v is None:
            return None
        return struct.unpack_from(f"<{v[1]}{fmt}", self.r.data, v[0])

    def tables(self, slot: int) -> list[_Table]:
        v = self.raw_vector(slot, 4)
        if v is None:
            return []
        start, n = v
        return [self.r.table(start + 4 * i + self.r.read("<I", start + 4 * i)) for i in range(n)]


def read_model(data: bytes | bytearray | memoryview) -> ParsedModel:
    """Parse `.tflite` bytes into a `ParsedModel`; raise `ModelRejected` if they are malformed."""
    data = bytes(data)
    if len(data) < 8:
        raise ModelRejected(f"truncated: {len(data)} bytes is too short for a flatbuffer")
    if len(data) > MAX_MODEL_BYTES:
        raise ModelRejected(f"{len(data)} bytes is larger than the {MAX_MODEL_BYTES} allowed")
    if data[4:8] != FILE_IDENTIFIER:
        raise ModelRejected(f"file identifier {data[4:8]!r} is not {FILE_IDENTIFIER!r}")
    try:
        return _parse(_Reader(data))
    except ModelRejected:
        raise
    except (
        struct.error,
        ValueError,
        OverflowError,
        IndexError,
        MemoryError,
        RecursionError,
    ) as exc:
        raise ModelRejected(f"corrupt flatbuffer: {exc}") from exc


def read_model_file(path: str | Path) -> ParsedModel:
    """Read and parse a `.tflite` file."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ModelRejected(f"cannot read {path}: {exc}") from exc
    return read_model(data)


def _parse(r: _Reader) -> ParsedModel:
    model = r.table(r.read("<I", 0))
    version = model.scalar(Slot.MODEL_VERSION, "<I")
    buffers = tuple(t.bytes_vector(Slot.BUFFER_DATA) for t in model.tables(Slot.MODEL_BUFFERS))
    for i, t in enumerate(model.tables(Slot.MODEL_BUFFERS)):
        if t.scalar(Slot.BUFFER_OFFSET, "<Q") > 1:
            raise ModelRejected(f"buffer {i} is stored outside the flatbuffer (unsupported)")
    code_infos = tuple(_opcode(t) for t in model.tables(Slot.MODEL_OPERATOR_CODES))
    # As TFLite's GetBuiltinCode: the larger of the two code fields wins.
    codes = [
        (max(c.deprecated_builtin_code, c.builtin_code), c.version, c.custom_code)
        for c in code_infos
    ]
    subgraphs = model.tables(Slot.MODEL_SUBGRAPHS)
    if not subgraphs:
        raise ModelRejected("model has no subgraph")
    sg = subgraphs[0]
    tensors = tuple(_tensor(i, t) for i, t in enumerate(sg.tables(Slot.SUBGRAPH_TENSORS)))
    operators = tuple(
        _operator(i, t, codes) for i, t in enumerate(sg.tables(Slot.SUBGRAPH_OPERATORS))
    )
    metadata: dict[str, bytes] = {}
    for t in model.tables(Slot.MODEL_METADATA):
        name = t.string(Slot.METADATA_NAME) or ""
        idx = t.scalar(Slot.METADATA_BUFFER, "<I")
        if idx >= len(buffers):
            raise ModelRejected(f"metadata {name!r} points at buffer {idx} of {len(buffers)}")
        metadata[name] = buffers[idx]
    signatures: dict[str, SignatureInfo] = {}
    for t in model.tables(Slot.MODEL_SIGNATURE_DEFS):
        key = t.string(Slot.SIGDEF_SIGNATURE_KEY) or ""
        signatures[key] = SignatureInfo(
            key=key,
            inputs=_tensor_maps(t.tables(Slot.SIGDEF_INPUTS)),
            outputs=_tensor_maps(t.tables(Slot.SIGDEF_OUTPUTS)),
            subgraph_index=t.scalar(Slot.SIGDEF_SUBGRAPH_INDEX, "<I"),
        )
    return ParsedModel(
        version=version,
        description=model.string(Slot.MODEL_DESCRIPTION),
        subgraph_count=len(subgraphs),
        operator_codes=code_infos,
        tensors=tensors,
        operators=operators,
        inputs=sg.numbers(Slot.SUBGRAPH_INPUTS, "i") or (),
        outputs=sg.numbers(Slot.SUBGRAPH_OUTPUTS, "i") or (),
        buffers=buffers,
        signatures=signatures,
        metadata=metadata,
    )


def _opcode(t: _Table) -> OperatorCodeInfo:
    return OperatorCodeInfo(
        deprecated_builtin_code=t.scalar(Slot.OPCODE_DEPRECATED_BUILTIN_CODE, "<b"),
        builtin_code=t.scalar(Slot.OPCODE_BUILTIN_CODE, "<i"),
        version=t.scalar(Slot.OPCODE_VERSION, "<i", 1),
        custom_code=t.string(Slot.OPCODE_CUSTOM_CODE),
    )


def _quantization(t: _Table | None) -> Quantization | None:
    if t is None:
        return None
    scale = t.numbers(Slot.QUANT_SCALE, "f")
    zero_point = t.numbers(Slot.QUANT_ZERO_POINT, "q")
    if not scale and not zero_point:
        return None
    return Quantization(
        scale=tuple(float(s) for s in scale or ()),
        zero_point=tuple(int(z) for z in zero_point or ()),
        quantized_dimension=t.scalar(Slot.QUANT_QUANTIZED_DIMENSION, "<i"),
    )


def _tensor(index: int, t: _Table) -> TensorInfo:
    sig = t.numbers(Slot.TENSOR_SHAPE_SIGNATURE, "i")
    return TensorInfo(
        index=index,
        name=t.string(Slot.TENSOR_NAME) or "",
        shape=t.numbers(Slot.TENSOR_SHAPE, "i") or (),
        shape_signature=sig,
        dtype=t.scalar(Slot.TENSOR_TYPE, "<b"),
        buffer=t.scalar(Slot.TENSOR_BUFFER, "<I"),
        quantization=_quantization(t.table(Slot.TENSOR_QUANTIZATION)),
    )


def _operator(index: int, t: _Table, codes: list[tuple[int, int, str | None]]) -> OperatorInfo:
    code_index = t.scalar(Slot.OP_OPCODE_INDEX, "<I")
    if code_index >= len(codes):
        raise ModelRejected(f"operator {index} uses opcode index {code_index} of {len(codes)}")
    opcode, version, custom = codes[code_index]
    options: dict[str, Any] = {}
    options_type = t.scalar(Slot.OP_BUILTIN_OPTIONS_TYPE, "<B")
    table = t.table(Slot.OP_BUILTIN_OPTIONS)
    if options_type == OptionsType.FULLY_CONNECTED and table is not None:
        options = {
            "fused_activation_function": table.scalar(Slot.FC_FUSED_ACTIVATION, "<b"),
            "weights_format": table.scalar(Slot.FC_WEIGHTS_FORMAT, "<b"),
            "keep_num_dims": bool(table.scalar(Slot.FC_KEEP_NUM_DIMS, "<B")),
            "asymmetric_quantize_inputs": bool(
                table.scalar(Slot.FC_ASYMMETRIC_QUANTIZE_INPUTS, "<B")
            ),
        }
    elif options_type == OptionsType.SOFTMAX and table is not None:
        options = {"beta": table.scalar(Slot.SOFTMAX_BETA, "<f", 0.0)}
    elif options_type != OptionsType.NONE:
        options = {"options_type": options_type}
    return OperatorInfo(
        index=index,
        opcode=opcode,
        version=version,
        inputs=t.numbers(Slot.OP_INPUTS, "i") or (),
        outputs=t.numbers(Slot.OP_OUTPUTS, "i") or (),
        options=options,
        custom_code=custom,
    )


def _tensor_maps(tables: list[_Table]) -> dict[str, int]:
    return {
        t.string(Slot.TENSORMAP_NAME) or "": t.scalar(Slot.TENSORMAP_TENSOR_INDEX, "<I")
        for t in tables
    }


def validate(model: bytes | bytearray | memoryview | ParsedModel) -> ParsedModel:
    """Parse if needed and reject what tflite-runtime 2.14 or ai-edge-litert would refuse.

    Also rejects anything the fogline executor cannot run: ops other than the dense-network
    set, more than one subgraph, a missing `serving_default` signature.
    """
    m = model if isinstance(model, ParsedModel) else read_model(model)
    if m.version != SCHEMA_VERSION:
        raise ModelRejected(f"schema version {m.version}, expected {SCHEMA_VERSION}")
    if not m.buffers:
        raise ModelRejected("model has no buffers (buffer 0 must exist and be empty)")
    if m.buffers[0]:
        raise ModelRejected(f"buffer 0 holds {len(m.buffers[0])} bytes; it must be empty")
    if m.subgraph_count != 1:
        raise ModelRejected(
            f"{m.subgraph_count} subgraphs; only single-subgraph models are supported"
        )
    for t in m.tensors:
        _check_tensor(m, t)
    n = len(m.tensors)
    for label, indices in (("input", m.inputs), ("output", m.outputs)):
        if not indices:
            raise ModelRejected(f"subgraph has no {label}")
        for i in indices:
            if not 0 <= i < n:
                raise ModelRejected(f"subgraph {label} tensor {i} out of range ({n} tensors)")
    for op in m.operators:
        _check_operator(m, op)
    _check_signature(m)
    for name in m.metadata:
        if name == "fogline":
            m.metadata_json(name)
    return m


def _check_tensor(m: ParsedModel, t: TensorInfo) -> None:
    where = f"tensor {t.index} ({t.name!r})"
    try:
        dtype = TensorType(t.dtype)
    except ValueError:
        raise ModelRejected(f"{where} has unsupported type {t.dtype}") from None
    if any(d < 0 for d in t.shape):
        raise ModelRejected(f"{where} has a negative dimension in shape {t.shape}")
    if t.shape_signature is not None and (
        len(t.shape_signature) != len(t.shape)
        or any(s != d and s != -1 for s, d in zip(t.shape_signature, t.shape, strict=True))
    ):
        raise ModelRejected(f"{where} shape_signature {t.shape_signature} disagrees with {t.shape}")
    if t.buffer >= len(m.buffers):
        raise ModelRejected(f"{where} points at buffer {t.buffer}, model has {len(m.buffers)}")
    data = m.buffers[t.buffer]
    if data:
        expected = math.prod(t.shape) * NUMPY_DTYPE[dtype].itemsize
        if len(data) != expected:
            raise ModelRejected(
                f"{where} buffer {t.buffer} holds {len(data)} bytes, shape {list(t.shape)} of "
                f"{dtype.name} needs {expected}"
            )
    q = t.quantization
    if dtype in (TensorType.INT8, TensorType.UINT8, TensorType.INT16) and (
        q is None or not q.scale
    ):
        raise ModelRejected(f"{where} is {dtype.name} without quantisation parameters")
    if q is not None and q.scale:
        if len(q.scale) != len(q.zero_point):
            raise ModelRejected(
                f"{where} has {len(q.scale)} scales but {len(q.zero_point)} zero points"
            )
        if not all(math.isfinite(s) and s > 0 for s in q.scale):
            raise ModelRejected(f"{where} has a non-positive or non-finite scale")
        if len(q.scale) > 1 and (
            not 0 <= q.quantized_dimension < len(t.shape)
            or t.shape[q.quantized_dimension] != len(q.scale)
        ):
            raise ModelRejected(f"{where} per-channel scales do not match its shape")
        if dtype is TensorType.INT8 and not all(-128 <= z <= 127 for z in q.zero_point):
            raise ModelRejected(f"{where} zero point outside int8")


def _check_operator(m: ParsedModel, op: OperatorInfo) -> None:
    where = f"operator {op.index} ({op.name} v{op.version})"
    if op.custom_code is not None:
        raise ModelRejected(f"{where}: custom ops are not supported")
    try:
        code = BuiltinOp(op.opcode)
    except ValueError:
        raise ModelRejected(f"{where}: op not supported by the fogline toolkit") from None
    if not 1 <= op.version <= MAX_OP_VERSION_TFLITE_2_14[code]:
        raise ModelRejected(
            f"{where}: version outside 1..{MAX_OP_VERSION_TFLITE_2_14[code]} (tflite-runtime 2.14)"
        )
    n = len(m.tensors)
    for i in (*op.inputs, *op.outputs):
        if not 0 <= i < n:
            raise ModelRejected(f"{where}: tensor index {i} out of range ({n} tensors)")
    want_inputs = 3 if code is BuiltinOp.FULLY_CONNECTED else 1
    if len(op.inputs) != want_inputs or len(op.outputs) != 1:
        raise ModelRejected(
            f"{where}: {len(op.inputs)} inputs / {len(op.outputs)} outputs, "
            f"expected {want_inputs} / 1"
        )
    src, dst = m.tensors[op.inputs[0]], m.tensors[op.outputs[0]]
    if code is BuiltinOp.FULLY_CONNECTED:
        _check_fc(m, op, where)
    elif src.shape != dst.shape:
        raise ModelRejected(f"{where}: input shape {src.shape} != output shape {dst.shape}")
    if code in (BuiltinOp.LOGISTIC, BuiltinOp.SOFTMAX) and dst.dtype == TensorType.INT8:
        q = dst.quantization
        assert q is not None  # checked with the tensor
        if (
            q.zero_point[0] != SIGMOID_SOFTMAX_INT8_ZERO_POINT
            or abs(q.scale[0] - SIGMOID_SOFTMAX_INT8_SCALE) > 1e-8
        ):
            raise ModelRejected(f"{where}: int8 output must have scale 1/256 and zero point -128")


def _check_fc(m: ParsedModel, op: OperatorInfo, where: str) -> None:
    x, w, b = (m.tensors[i] for i in op.inputs)
    y = m.tensors[op.outputs[0]]
    if len(w.shape) != 2:
        raise ModelRejected(f"{where}: weights shape {w.shape} is not [out, in]")
    out_f, in_f = w.shape
    if not x.shape or x.shape[-1] != in_f:
        raise ModelRejected(
            f"{where}: input shape {x.shape} does not match weights [out, in] = {w.shape}"
        )
    if not y.shape or y.shape[-1] != out_f:
        raise ModelRejected(f"{where}: output shape {y.shape} does not match weights {w.shape}")
    if b.shape != (out_f,):
        raise ModelRejected(f"{where}: bias shape {b.shape} does not match {out_f} outputs")
    fused = op.options.get("fused_activation_function", 0)
    if fused not in (FusedActivation.NONE, FusedActivation.RELU):
        raise ModelRejected(f"{where}: fused activation {fused} not supported")
    if op.options.get("weights_format", 0) or op.options.get("keep_num_dims"):
        raise ModelRejected(f"{where}: only default weights format without keep_num_dims")


def _check_signature(m: ParsedModel) -> None:
    sig = m.signatures.get(SIGNATURE_KEY)
    if sig is None:
        raise ModelRejected(f"no {SIGNATURE_KEY!r} signature (found {sorted(m.signatures)})")
    if sig.subgraph_index != 0:
        raise ModelRejected(f"signature points at subgraph {sig.subgraph_index}")
    if sorted(sig.inputs.values()) != sorted(m.inputs) or sorted(sig.outputs.values()) != sorted(
        m.outputs
    ):
        raise ModelRejected("signature inputs/outputs do not match the subgraph's")
