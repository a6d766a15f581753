"""Write `.tflite` flatbuffers for small dense networks (float32, float16, int8), no TensorFlow.

The graph is what the TFLite converter produces for a Keras stack of Dense layers:
FULLY_CONNECTED with RELU fused, LOGISTIC and SOFTMAX as their own ops; float16 weights are
DEQUANTIZE'd to float32 at the start; int8 quantises the float input, runs int8 FC with int32
bias and per-tensor scales, and dequantises the output, so input and output stay float32.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import flatbuffers
import numpy as np

from fogline.models.layers import Dense, check_layers, pre_activations
from fogline.models.schema import (
    FILE_IDENTIFIER,
    NUMPY_DTYPE,
    PLACEHOLDER_FOR_GREATER_OP_CODES,
    SCHEMA_VERSION,
    SIGMOID_SOFTMAX_INT8_SCALE,
    SIGMOID_SOFTMAX_INT8_ZERO_POINT,
    SIGNATURE_KEY,
    BuiltinOp,
    FusedActivation,
    OptionsType,
    Slot,
    TensorType,
    min_op_version,
)

Flavour = Literal["float32", "float16", "int8"]
FLAVOURS: tuple[Flavour, ...] = ("float32", "float16", "int8")
METADATA_NAME = "fogline"

# TFLite's int8 range for weights is symmetric [-127, 127]; activations use [-128, 127].
_W_QMAX = 127
_BUFFER_ALIGN = 16


@dataclass(kw_only=True)
class _Quant:
    scale: list[float]
    zero_point: list[int]


@dataclass(kw_only=True)
class _Tensor:
    name: str
    shape: list[int]
    dtype: TensorType
    data: bytes | None = None
    batched: bool = False
    quant: _Quant | None = None


@dataclass(kw_only=True)
class _Op:
    code: BuiltinOp
    inputs: list[int]
    outputs: list[int]
    fused: FusedActivation | None = None
    softmax_beta: float | None = None


@dataclass(kw_only=True)
class _Graph:
    tensors: list[_Tensor] = field(default_factory=list)
    ops: list[_Op] = field(default_factory=list)

    def add(self, tensor: _Tensor) -> int:
        self.tensors.append(tensor)
        return len(self.tensors) - 1

    def const(
        self, name: str, array: np.ndarray, dtype: TensorType, quant: _Quant | None = None
    ) -> int:
        arr = np.ascontiguousarray(array, dtype=NUMPY_DTYPE[dtype])
        return self.add(
            _Tensor(name=name, shape=list(arr.shape), dtype=dtype, data=arr.tobytes(), quant=quant)
        )

    def activation(
        self, name: str, width: int, dtype: TensorType, quant: _Quant | None = None
    ) -> int:
        return self.add(
            _Tensor(name=name, shape=[1, width], dtype=dtype, batched=True, quant=quant)
        )


def write_model(
    layers: Sequence[Dense],
    *,
    flavour: Flavour = "float32",
    metadata: Mapping[str, Any] | None = None,
    representative: np.ndarray | None = None,
    input_name: str = "input",
    output_name: str = "output",
    metadata_name: str = METADATA_NAME,
    description: str = "fogline dense network",
) -> bytes:
    """Serialise `layers` as a `.tflite` model and return its bytes.

    `representative` ([n, in] float inputs, already normalised like the real ones) is required
    for int8: it calibrates every activation's range. `metadata` is stored as UTF-8 JSON in a
    metadata entry named `metadata_name`.
    """
    check_layers(layers)
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour {flavour!r} not one of {FLAVOURS}")
    if flavour == "int8":
        if representative is None:
            raise ValueError("int8 needs a representative dataset to calibrate on")
        graph, in_idx, out_idx = _int8_graph(layers, np.asarray(representative, dtype=np.float64))
    else:
        graph, in_idx, out_idx = _float_graph(layers, half=flavour == "float16")
    graph.tensors[in_idx].name = input_name
    graph.tensors[out_idx].name = output_name
    meta = json.dumps(dict(metadata or {}), sort_keys=True, allow_nan=False).encode()
    return _serialise(
        graph,
        in_idx=in_idx,
        out_idx=out_idx,
        input_name=input_name,
        output_name=output_name,
        metadata=(metadata_name, meta),
        description=description,
    )


def save_model(path: str | Path, layers: Sequence[Dense], **kwargs: Any) -> Path:
    """Write `layers` to `path` (via a temporary file and rename); keyword args as `write_model`."""
    data = write_model(layers, **kwargs)
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(target)
    return target


def _fused(activation: str) -> FusedActivation:
    return FusedActivation.RELU if activation == "relu" else FusedActivation.NONE


def _float_graph(layers: Sequence[Dense], *, half: bool) -> tuple[_Graph, int, int]:
    g = _Graph()
    f32 = TensorType.FLOAT32
    x = g.activation("input", layers[0].in_features, f32)
    params: list[tuple[int, int]] = []
    for i, layer in enumerate(layers):
        if half:
            w16 = g.const(f"dense_{i}/weights_fp16", layer.weights, TensorType.FLOAT16)
            b16 = g.const(f"dense_{i}/bias_fp16", layer.bias, TensorType.FLOAT16)
            w = g.add(
                _Tensor(name=f"dense_{i}/weights", shape=list(layer.weights.shape), dtype=f32)
            )
            b = g.add(_Tensor(name=f"dense_{i}/bias", shape=[layer.out_features], dtype=f32))
            # The converter dequantises every float16 constant up front, before the first op.
            g.ops.append(_Op(code=BuiltinOp.DEQUANTIZE, inputs=[w16], outputs=[w]))
            g.ops.append(_Op(code=BuiltinOp.DEQUANTIZE, inputs=[b16], outputs=[b]))
        else:
            w = g.const(f"dense_{i}/weights", layer.weights, f32)
            b = g.const(f"dense_{i}/bias", layer.bias, f32)
        params.append((w, b))
    for i, (layer, (w, b)) in enumerate(zip(layers, params, strict=True)):
        y = g.activation(f"dense_{i}/fc", layer.out_features, f32)
        g.ops.append(
            _Op(
                code=BuiltinOp.FULLY_CONNECTED,
                inputs=[x, w, b],
                outputs=[y],
                fused=_fused(layer.activation),
            )
        )
        x = _float_activation(g, i, layer, y, f32)
    return g, 0, x


def _float_activation(g: _Graph, i: int, layer: Dense, y: int, dtype: TensorType) -> int:
    if layer.activation in ("logistic", "softmax"):
        code = BuiltinOp.LOGISTIC if layer.activation == "logistic" else BuiltinOp.SOFTMAX
        quant = None
        if dtype is TensorType.INT8:
            quant = _Quant(
                scale=[SIGMOID_SOFTMAX_INT8_SCALE], zero_point=[SIGMOID_SOFTMAX_INT8_ZERO_POINT]
            )
        a = g.activation(f"dense_{i}/{layer.activation}", layer.out_features, dtype, quant)
        beta = 1.0 if code is BuiltinOp.SOFTMAX else None
        g.ops.append(_Op(code=code, inputs=[y], outputs=[a], softmax_beta=beta))
        return a
    return y


def activation_quant(lo: float, hi: float) -> tuple[float, int]:
    """Asymmetric int8 (scale, zero point) covering [lo, hi] and 0, as TFLite calibrates."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if hi - lo < 1e-6:
        hi = lo + 1e-6
    scale = float(np.float32((hi - lo) / 255.0))
    zero_point = int(np.clip(np.round(-128.0 - lo / scale), -128, 127))
    return scale, zero_point


def _int8_graph(layers: Sequence[Dense], rep: np.ndarray) -> tuple[_Graph, int, int]:
    if rep.ndim != 2 or rep.shape[1] != layers[0].in_features or len(rep) == 0:
        raise ValueError(
            f"representative data must be [n, {layers[0].in_features}], got {rep.shape}"
        )
    g = _Graph()
    zs = pre_activations(layers, rep)
    x_f = g.activation("input", layers[0].in_features, TensorType.FLOAT32)
    in_scale, in_zp = activation_quant(rep.min(), rep.max())
    x = g.activation(
        "input_int8",
        layers[0].in_features,
        TensorType.INT8,
        _Quant(scale=[in_scale], zero_point=[in_zp]),
    )
    g.ops.append(_Op(code=BuiltinOp.QUANTIZE, inputs=[x_f], outputs=[x]))
    for i, (layer, z) in enumerate(zip(layers, zs, strict=True)):
        x_scale = g.tensors[x].quant.scale[0]  # type: ignore[union-attr]
        w_max = float(np.abs(layer.weights).max())
        w_scale = float(np.float32(w_max / _W_QMAX)) if w_max > 0 else 1.0
        qw = np.clip(np.round(layer.weights / w_scale), -_W_QMAX, _W_QMAX).astype(np.int8)
        b_scale = float(np.float32(np.float64(x_scale) * np.float64(w_scale)))
        qb = np.clip(np.round(layer.bias / b_scale), -(2**31) + 1, 2**31 - 1).astype(np.int32)
        w = g.const(
            f"dense_{i}/weights", qw, TensorType.INT8, _Quant(scale=[w_scale], zero_point=[0])
        )
        b = g.const(
            f"dense_{i}/bias", qb, TensorType.INT32, _Quant(scale=[b_scale], zero_point=[0])
        )
        # With RELU fused the FC output only needs to cover [0, max].
        zz = np.maximum(z, 0) if layer.activation == "relu" else z
        y_scale, y_zp = activation_quant(zz.min(), zz.max())
        y = g.activation(
            f"dense_{i}/fc",
            layer.out_features,
            TensorType.INT8,
            _Quant(scale=[y_scale], zero_point=[y_zp]),
        )
        g.ops.append(
            _Op(
                code=BuiltinOp.FULLY_CONNECTED,
                inputs=[x, w, b],
                outputs=[y],
                fused=_fused(layer.activation),
            )
        )
        x = _float_activation(g, i, layer, y, TensorType.INT8)
    out = g.activation("output", layers[-1].out_features, TensorType.FLOAT32)
    g.ops.append(_Op(code=BuiltinOp.DEQUANTIZE, inputs=[x], outputs=[out]))
    return g, 0, out


def _op_versions(g: _Graph) -> list[int]:
    return [min_op_version(op.code, g.tensors[op.inputs[0]].dtype) for op in g.ops]


def _vector_of_offsets(b: flatbuffers.Builder, offsets: Sequence[int]) -> int:
    b.StartVector(4, len(offsets), 4)
    for off in reversed(offsets):
        b.PrependUOffsetTRelative(off)
    return int(b.EndVector())


def _int32_vector(b: flatbuffers.Builder, values: Sequence[int]) -> int:
    return int(b.CreateNumpyVector(np.asarray(values, dtype="<i4")))


def _bytes_vector(b: flatbuffers.Builder, data: bytes) -> int:
    # schema.fbs asks for force_align: 16 on Buffer.data so weights can be used in place.
    b.StartVector(1, len(data), _BUFFER_ALIGN)
    b.head = b.head - len(data)
    b.Bytes[b.head : b.head + len(data)] = data
    return int(b.EndVector())


def _serialise(
    g: _Graph,
    *,
    in_idx: int,
    out_idx: int,
    input_name: str,
    output_name: str,
    metadata: tuple[str, bytes],
    description: str,
) -> bytes:
    size = sum(len(t.data or b"") for t in g.tensors) + len(metadata[1])
    b = flatbuffers.Builder(size + 4096)

    # Buffers: 0 is the empty sentinel, then one per constant tensor, then the metadata.
    buffer_data: list[bytes | None] = [None]
    tensor_buffer: list[int] = []
    for t in g.tensors:
        if t.data is None:
            tensor_buffer.append(0)
        else:
            tensor_buffer.append(len(buffer_data))
            buffer_data.append(t.data)
    meta_buffer = len(buffer_data)
    buffer_data.append(metadata[1])
    # Buffer 0's table is built first so it ends the file: a file cut anywhere loses part of
    # a table the reader must visit, never only alignment padding.
    b.StartObject(Slot.BUFFER_NUM)
    buffer_offsets = [b.EndObject()]
    for data in buffer_data[1:]:
        data_off = _bytes_vector(b, data) if data else None
        b.StartObject(Slot.BUFFER_NUM)
        if data_off is not None:
            b.PrependUOffsetTRelativeSlot(Slot.BUFFER_DATA, data_off, 0)
        buffer_offsets.append(b.EndObject())
    buffers_vec = _vector_of_offsets(b, buffer_offsets)

    tensor_offsets = []
    for t, buf in zip(g.tensors, tensor_buffer, strict=True):
        name = b.CreateString(t.name)
        shape = _int32_vector(b, t.shape)
        sig = _int32_vector(b, [-1, *t.shape[1:]]) if t.batched else None
        quant = _quant_table(b, t.quant) if t.quant else None
        b.StartObject(Slot.TENSOR_NUM)
        b.PrependUOffsetTRelativeSlot(Slot.TENSOR_SHAPE, shape, 0)
        b.PrependInt8Slot(Slot.TENSOR_TYPE, int(t.dtype), 0)
        b.PrependUint32Slot(Slot.TENSOR_BUFFER, buf, 0)
        b.PrependUOffsetTRelativeSlot(Slot.TENSOR_NAME, name, 0)
        if quant is not None:
            b.PrependUOffsetTRelativeSlot(Slot.TENSOR_QUANTIZATION, quant, 0)
        if sig is not None:
            b.PrependUOffsetTRelativeSlot(Slot.TENSOR_SHAPE_SIGNATURE, sig, 0)
        tensor_offsets.append(b.EndObject())
    tensors_vec = _vector_of_offsets(b, tensor_offsets)

    codes: list[tuple[BuiltinOp, int]] = []
    op_offsets = []
    for op, version in zip(g.ops, _op_versions(g), strict=True):
        if (op.code, version) not in codes:
            codes.append((op.code, version))
        inputs = _int32_vector(b, op.inputs)
        outputs = _int32_vector(b, op.outputs)
        options, options_type = _options_table(b, op)
        b.StartObject(Slot.OP_NUM)
        b.PrependUint32Slot(Slot.OP_OPCODE_INDEX, codes.index((op.code, version)), 0)
        b.PrependUOffsetTRelativeSlot(Slot.OP_INPUTS, inputs, 0)
        b.PrependUOffsetTRelativeSlot(Slot.OP_OUTPUTS, outputs, 0)
        if options is not None:
            b.PrependUint8Slot(Slot.OP_BUILTIN_OPTIONS_TYPE, int(options_type), 0)
            b.PrependUOffsetTRelativeSlot(Slot.OP_BUILTIN_OPTIONS, options, 0)
        op_offsets.append(b.EndObject())
    ops_vec = _vector_of_offsets(b, op_offsets)

    sg_inputs = _int32_vector(b, [in_idx])
    sg_outputs = _int32_vector(b, [out_idx])
    sg_name = b.CreateString("main")
    b.StartObject(Slot.SUBGRAPH_NUM)
    b.PrependUOffsetTRelativeSlot(Slot.SUBGRAPH_TENSORS, tensors_vec, 0)
    b.PrependUOffsetTRelativeSlot(Slot.SUBGRAPH_INPUTS, sg_inputs, 0)
    b.PrependUOffsetTRelativeSlot(Slot.SUBGRAPH_OUTPUTS, sg_outputs, 0)
    b.PrependUOffsetTRelativeSlot(Slot.SUBGRAPH_OPERATORS, ops_vec, 0)
    b.PrependUOffsetTRelativeSlot(Slot.SUBGRAPH_NAME, sg_name, 0)
    subgraphs_vec = _vector_of_offsets(b, [b.EndObject()])

    code_offsets = []
    for code, version in codes:
        b.StartObject(Slot.OPCODE_NUM)
        # Old readers only look at the byte field, new ones at the int32 one: set both.
        b.PrependInt8Slot(
            Slot.OPCODE_DEPRECATED_BUILTIN_CODE, min(int(code), PLACEHOLDER_FOR_GREATER_OP_CODES), 0
        )
        b.PrependInt32Slot(Slot.OPCODE_VERSION, version, 1)
        b.PrependInt32Slot(Slot.OPCODE_BUILTIN_CODE, int(code), 0)
        code_offsets.append(b.EndObject())
    codes_vec = _vector_of_offsets(b, code_offsets)

    meta_name = b.CreateString(metadata[0])
    b.StartObject(Slot.METADATA_NUM)
    b.PrependUOffsetTRelativeSlot(Slot.METADATA_NAME, meta_name, 0)
    b.PrependUint32Slot(Slot.METADATA_BUFFER, meta_buffer, 0)
    metadata_vec = _vector_of_offsets(b, [b.EndObject()])

    sig_inputs = _vector_of_offsets(b, [_tensor_map(b, input_name, in_idx)])
    sig_outputs = _vector_of_offsets(b, [_tensor_map(b, output_name, out_idx)])
    sig_key = b.CreateString(SIGNATURE_KEY)
    b.StartObject(Slot.SIGDEF_NUM)
    b.PrependUOffsetTRelativeSlot(Slot.SIGDEF_INPUTS, sig_inputs, 0)
    b.PrependUOffsetTRelativeSlot(Slot.SIGDEF_OUTPUTS, sig_outputs, 0)
    b.PrependUOffsetTRelativeSlot(Slot.SIGDEF_SIGNATURE_KEY, sig_key, 0)
    b.PrependUint32Slot(Slot.SIGDEF_SUBGRAPH_INDEX, 0, 0)
    sigs_vec = _vector_of_offsets(b, [b.EndObject()])

    desc = b.CreateString(description)
    b.StartObject(Slot.MODEL_NUM)
    b.PrependUint32Slot(Slot.MODEL_VERSION, SCHEMA_VERSION, 0)
    b.PrependUOffsetTRelativeSlot(Slot.MODEL_OPERATOR_CODES, codes_vec, 0)
    b.PrependUOffsetTRelativeSlot(Slot.MODEL_SUBGRAPHS, subgraphs_vec, 0)
    b.PrependUOffsetTRelativeSlot(Slot.MODEL_DESCRIPTION, desc, 0)
    b.PrependUOffsetTRelativeSlot(Slot.MODEL_BUFFERS, buffers_vec, 0)
    b.PrependUOffsetTRelativeSlot(Slot.MODEL_METADATA, metadata_vec, 0)
    b.PrependUOffsetTRelativeSlot(Slot.MODEL_SIGNATURE_DEFS, sigs_vec, 0)
    model = b.EndObject()
    b.Finish(model, file_identifier=FILE_IDENTIFIER)
    return bytes(b.Output())


def _quant_table(b: flatbuffers.Builder, q: _Quant) -> int:
    scale = b.CreateNumpyVector(np.asarray(q.scale, dtype="<f4"))
    zero_point = b.CreateNumpyVector(np.asarray(q.zero_point, dtype="<i8"))
    b.StartObject(Slot.QUANT_NUM)
    b.PrependUOffsetTRelativeSlot(Slot.QUANT_SCALE, scale, 0)
    b.PrependUOffsetTRelativeSlot(Slot.QUANT_ZERO_POINT, zero_point, 0)
    b.PrependInt32Slot(Slot.QUANT_QUANTIZED_DIMENSION, 0, 0)
    return int(b.EndObject())


def _options_table(b: flatbuffers.Builder, op: _Op) -> tuple[int | None, OptionsType]:
    if op.code is BuiltinOp.FULLY_CONNECTED:
        b.StartObject(Slot.FC_NUM)
        b.PrependInt8Slot(Slot.FC_FUSED_ACTIVATION, int(op.fused or FusedActivation.NONE), 0)
        return int(b.EndObject()), OptionsType.FULLY_CONNECTED
    if op.code is BuiltinOp.SOFTMAX:
        b.StartObject(Slot.SOFTMAX_NUM)
        b.PrependFloat32Slot(Slot.SOFTMAX_BETA, op.softmax_beta or 1.0, 0.0)
        return int(b.EndObject()), OptionsType.SOFTMAX
    return None, OptionsType.NONE


def _tensor_map(b: flatbuffers.Builder, name: str, index: int) -> int:
    s = b.CreateString(name)
    b.StartObject(Slot.TENSORMAP_NUM)
    b.PrependUOffsetTRelativeSlot(Slot.TENSORMAP_NAME, s, 0)
    b.PrependUint32Slot(Slot.TENSORMAP_TENSOR_INDEX, index, 0)
    return int(b.EndObject())
