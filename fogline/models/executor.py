"""A numpy reference executor for parsed dense-network models, batch at a time.

Driven only by the `ParsedModel`: weights come from its buffers, the graph from its operators.
int8 follows the integer arithmetic of the runtime's default CPU path (XNNPACK delegate plus
builtin kernels): int32 accumulation, requantisation by a Q31 multiplier and shift rounded once
(ties up, as ruy and XNNPACK do), QUANTIZE as x * (1/scale) rounded to even, and lookup tables
for LOGISTIC and SOFTMAX built as TFLite's optimized kernels build them. That path is matched
bit for bit. The builtin x86 FULLY_CONNECTED kernel run without delegates rounds near-ties
differently and can differ by 1 LSB on a few elements.
"""

from __future__ import annotations

import math

import numpy as np

from fogline.models.errors import ModelRejected
from fogline.models.reader import OperatorInfo, ParsedModel, TensorInfo, validate
from fogline.models.schema import BuiltinOp, FusedActivation, TensorType

_INT8_MIN, _INT8_MAX = -128, 127


def execute(model: ParsedModel, x: np.ndarray) -> np.ndarray:
    """Run `x` ([batch, in], float32) through `model` and return its output ([batch, out])."""
    validate(model)
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ModelRejected("the executor runs single-input, single-output models only")
    inp = model.tensors[model.inputs[0]]
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != inp.shape[-1]:
        raise ValueError(f"input must be [batch, {inp.shape[-1]}], got {x.shape}")
    values: dict[int, np.ndarray] = {inp.index: x.astype(_np_dtype(inp))}
    for op in model.operators:
        args = [values[i] if i in values else model.constant(i) for i in op.inputs]
        values[op.outputs[0]] = _run(model, op, args)
    return values[model.outputs[0]]


def _np_dtype(t: TensorInfo) -> type:
    return {
        TensorType.FLOAT32: np.float32,
        TensorType.FLOAT16: np.float16,
        TensorType.INT8: np.int8,
        TensorType.INT32: np.int32,
    }[TensorType(t.dtype)]


def _run(model: ParsedModel, op: OperatorInfo, args: list[np.ndarray]) -> np.ndarray:
    code = BuiltinOp(op.opcode)
    src = model.tensors[op.inputs[0]]
    dst = model.tensors[op.outputs[0]]
    quantized = src.dtype == TensorType.INT8
    if code is BuiltinOp.DEQUANTIZE:
        return _dequantize(args[0], src)
    if code is BuiltinOp.QUANTIZE:
        return quantize(args[0], _scale(dst), _zero_point(dst))
    if code is BuiltinOp.FULLY_CONNECTED:
        fused = op.options.get("fused_activation_function", FusedActivation.NONE)
        if quantized:
            return _fc_int8(model, op, args, relu=fused == FusedActivation.RELU)
        y = args[0].astype(np.float32) @ args[1].astype(np.float32).T + args[2].astype(np.float32)
        return np.maximum(y, np.float32(0)) if fused == FusedActivation.RELU else y
    if code is BuiltinOp.RELU:
        if quantized:
            return _requantize_identity_relu(args[0], src, dst)
        return np.maximum(args[0], np.float32(0))
    if code is BuiltinOp.LOGISTIC:
        if quantized:
            table = _logistic_table(src, dst)
            return table[args[0].astype(np.int32) - _INT8_MIN]
        return (np.float32(1) / (np.float32(1) + np.exp(-args[0]))).astype(np.float32)
    if code is BuiltinOp.SOFTMAX:
        beta = float(op.options.get("beta", 1.0))
        if quantized:
            return _softmax_int8(args[0], _scale(src), beta, dst)
        z = args[0].astype(np.float32) * np.float32(beta)
        e = np.exp(z - z.max(axis=-1, keepdims=True))
        return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)
    raise ModelRejected(f"operator {op.index}: {op.name} not supported by the executor")


def _scale(t: TensorInfo) -> float:
    if t.quantization is None or not t.quantization.scale:
        raise ModelRejected(f"tensor {t.index} ({t.name!r}) has no quantisation")
    if len(t.quantization.scale) != 1:
        raise ModelRejected(f"tensor {t.index}: per-channel quantisation not supported here")
    return t.quantization.scale[0]


def _zero_point(t: TensorInfo) -> int:
    assert t.quantization is not None
    return t.quantization.zero_point[0]


def _round_away(x: np.ndarray) -> np.ndarray:
    """std::round: halves away from zero (numpy rounds halves to even)."""
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def quantize(x: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """Float -> int8 as TFLite's QUANTIZE kernel: x * (1 / scale) in float32, ties to even."""
    inv = np.float32(1) / np.float32(scale)
    q = np.round((x.astype(np.float32) * inv).astype(np.float32)).astype(np.int64) + zero_point
    return np.clip(q, _INT8_MIN, _INT8_MAX).astype(np.int8)


def _dequantize(x: np.ndarray, t: TensorInfo) -> np.ndarray:
    if t.dtype == TensorType.FLOAT16:
        return x.astype(np.float32)
    scale = np.float32(_scale(t))
    return (scale * (x.astype(np.int32) - _zero_point(t)).astype(np.float32)).astype(np.float32)


def quantize_multiplier(real: float) -> tuple[int, int]:
    """TFLite's QuantizeMultiplier: `real` as a Q31 multiplier and a power-of-two shift."""
    if real == 0.0:
        return 0, 0
    frac, shift = math.frexp(real)
    q = math.floor(abs(frac) * (1 << 31) + 0.5) * (1 if frac > 0 else -1)
    if q == 1 << 31:
        q //= 2
        shift += 1
    if shift < -31:
        return 0, 0
    if shift > 30:
        return (1 << 31) - 1, 30
    return q, shift


def _saturating_rounding_doubling_high_mul(a: np.ndarray, b: int) -> np.ndarray:
    ab = a.astype(np.int64) * np.int64(b)
    nudge = np.where(ab >= 0, np.int64(1 << 30), np.int64(1 - (1 << 30)))
    # C++ integer division truncates toward zero.
    s = ab + nudge
    q = np.where(s >= 0, s // (1 << 31), -((-s) // (1 << 31)))
    overflow = (a == np.iinfo(np.int32).min) & (b == np.iinfo(np.int32).min)
    return np.where(overflow, np.iinfo(np.int32).max, q).astype(np.int64)


def _rounding_divide_by_pot(x: np.ndarray, exponent: int) -> np.ndarray:
    if exponent == 0:
        return x
    mask = (1 << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0).astype(np.int64)
    return (x >> exponent) + (remainder > threshold).astype(np.int64)


def multiply_by_quantized_multiplier(x: np.ndarray, multiplier: int, shift: int) -> np.ndarray:
    """TFLite's MultiplyByQuantizedMultiplier (double rounding) on an int32 array."""
    left = shift if shift > 0 else 0
    right = 0 if shift > 0 else -shift
    shifted = np.clip(x.astype(np.int64) * (1 << left), -(2**31), 2**31 - 1)
    return _rounding_divide_by_pot(
        _saturating_rounding_doubling_high_mul(shifted, multiplier), right
    )


def _single_rounding_multiply(x: np.ndarray, multiplier: int, shift: int) -> np.ndarray:
    """ruy's MultiplyByQuantizedMultiplier (used by the int8 FC kernel): one rounding, ties up."""
    total = 31 - shift
    return (x.astype(np.int64) * np.int64(multiplier) + np.int64(1 << (total - 1))) >> total


def _fc_int8(
    model: ParsedModel, op: OperatorInfo, args: list[np.ndarray], *, relu: bool
) -> np.ndarray:
    x_t, w_t, _b_t = (model.tensors[i] for i in op.inputs)
    y_t = model.tensors[op.outputs[0]]
    x, w, b = args
    if w_t.dtype != TensorType.INT8:
        raise ModelRejected(f"operator {op.index}: int8 FC needs int8 weights")
    acc = (x.astype(np.int64) - _zero_point(x_t)) @ (w.astype(np.int64) - _zero_point(w_t)).T
    acc = acc + b.astype(np.int64)
    # int32 accumulation: a sum TFLite could not hold would be undefined there.
    if acc.size and (acc.max() > 2**31 - 1 or acc.min() < -(2**31)):
        raise ModelRejected(f"operator {op.index}: int32 accumulator overflow")
    real = float(np.float64(_scale(x_t)) * np.float64(_scale(w_t)) / np.float64(_scale(y_t)))
    multiplier, shift = quantize_multiplier(real)
    y = _single_rounding_multiply(acc, multiplier, shift) + _zero_point(y_t)
    lo, hi = _INT8_MIN, _INT8_MAX
    if relu:
        lo = max(lo, _zero_point(y_t))
    return np.clip(y, lo, hi).astype(np.int8)


def _requantize_identity_relu(x: np.ndarray, src: TensorInfo, dst: TensorInfo) -> np.ndarray:
    # int8 RELU rescales input to output quantisation (ReluQuantized): y = max(x, zp) requantised.
    real = _scale(src) / _scale(dst)
    multiplier, shift = quantize_multiplier(real)
    xs = x.astype(np.int64) - _zero_point(src)
    y = _zero_point(dst) + multiply_by_quantized_multiplier(xs, multiplier, shift)
    return np.clip(y, max(_INT8_MIN, _zero_point(dst)), _INT8_MAX).astype(np.int8)


def _logistic_table(src: TensorInfo, dst: TensorInfo) -> np.ndarray:
    """The 256-entry table TFLite's int8 LOGISTIC kernel builds, in float32 as it does."""
    q = np.arange(_INT8_MIN, _INT8_MAX + 1, dtype=np.int32)
    deq = np.float32(_scale(src)) * (q - _zero_point(src)).astype(np.float32)
    with np.errstate(over="ignore"):
        sig = np.float32(1) / (np.float32(1) + np.exp(-deq))
    inverse_scale = np.float32(1) / np.float32(_scale(dst))
    rescaled = _round_away((sig * inverse_scale).astype(np.float32))
    out = rescaled.astype(np.int64) + _zero_point(dst)
    return np.clip(out, _INT8_MIN, _INT8_MAX).astype(np.int8)


def _softmax_int8(x: np.ndarray, in_scale: float, beta: float, dst: TensorInfo) -> np.ndarray:
    """TFLite's optimized int8 softmax: a float exp table, float32 sums, round to the output."""
    scale = np.float32(-np.float32(in_scale) * np.float32(beta))
    table = np.exp(scale * np.arange(256, dtype=np.float32)).astype(np.float32)[::-1].copy()
    xi = x.astype(np.int32)
    offsets = 255 - xi.max(axis=-1, keepdims=True) + xi
    values = table[offsets]
    total = np.zeros(x.shape[0], dtype=np.float32)
    for j in range(x.shape[1]):  # sequential float32 sum, as the kernel's loop
        total = (total + values[:, j]).astype(np.float32)
    inv = (np.float32(1) / (total * np.float32(_scale(dst)))).astype(np.float32)
    prob = (values * inv[:, None]).astype(np.float32)
    out = _round_away(prob).astype(np.int64) + _zero_point(dst)
    return np.clip(out, _INT8_MIN, _INT8_MAX).astype(np.int8)
