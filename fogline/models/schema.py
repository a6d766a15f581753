"""The slice of the TensorFlow Lite flatbuffer schema (schema.fbs, version 3) fogline uses.

Field slots are the declaration order of each table in schema.fbs; a union field takes two
slots (its type byte, then the value). Op versions follow TFLite's op_version rules.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np

FILE_IDENTIFIER = b"TFL3"
SCHEMA_VERSION = 3
SIGNATURE_KEY = "serving_default"


class TensorType(IntEnum):
    """`tflite.TensorType` values this toolkit reads or writes."""

    FLOAT32 = 0
    FLOAT16 = 1
    INT32 = 2
    UINT8 = 3
    INT64 = 4
    INT16 = 7
    INT8 = 9


NUMPY_DTYPE: dict[TensorType, np.dtype] = {
    TensorType.FLOAT32: np.dtype("<f4"),
    TensorType.FLOAT16: np.dtype("<f2"),
    TensorType.INT32: np.dtype("<i4"),
    TensorType.UINT8: np.dtype("u1"),
    TensorType.INT64: np.dtype("<i8"),
    TensorType.INT16: np.dtype("<i2"),
    TensorType.INT8: np.dtype("i1"),
}


class BuiltinOp(IntEnum):
    """`tflite.BuiltinOperator` codes of the ops a dense network needs."""

    DEQUANTIZE = 6
    FULLY_CONNECTED = 9
    LOGISTIC = 14
    RELU = 19
    SOFTMAX = 25
    QUANTIZE = 114


# First code that does not fit `OperatorCode.deprecated_builtin_code` (a byte).
PLACEHOLDER_FOR_GREATER_OP_CODES = 127


class FusedActivation(IntEnum):
    """`tflite.ActivationFunctionType`."""

    NONE = 0
    RELU = 1
    RELU_N1_TO_1 = 2
    RELU6 = 3
    TANH = 4
    SIGN_BIT = 5


class OptionsType(IntEnum):
    """`tflite.BuiltinOptions` union tags (1-based position in the union)."""

    NONE = 0
    FULLY_CONNECTED = 8
    SOFTMAX = 9
    DEQUANTIZE = 38
    QUANTIZE = 89


class Slot:
    """Field index of each table field used (vtable offset is 4 + 2 * index)."""

    MODEL_VERSION = 0
    MODEL_OPERATOR_CODES = 1
    MODEL_SUBGRAPHS = 2
    MODEL_DESCRIPTION = 3
    MODEL_BUFFERS = 4
    MODEL_METADATA_BUFFER = 5
    MODEL_METADATA = 6
    MODEL_SIGNATURE_DEFS = 7
    MODEL_NUM = 8

    SUBGRAPH_TENSORS = 0
    SUBGRAPH_INPUTS = 1
    SUBGRAPH_OUTPUTS = 2
    SUBGRAPH_OPERATORS = 3
    SUBGRAPH_NAME = 4
    SUBGRAPH_NUM = 5

    TENSOR_SHAPE = 0
    TENSOR_TYPE = 1
    TENSOR_BUFFER = 2
    TENSOR_NAME = 3
    TENSOR_QUANTIZATION = 4
    TENSOR_IS_VARIABLE = 5
    TENSOR_SPARSITY = 6
    TENSOR_SHAPE_SIGNATURE = 7
    TENSOR_HAS_RANK = 8
    TENSOR_NUM = 9

    QUANT_MIN = 0
    QUANT_MAX = 1
    QUANT_SCALE = 2
    QUANT_ZERO_POINT = 3
    QUANT_DETAILS_TYPE = 4
    QUANT_DETAILS = 5
    QUANT_QUANTIZED_DIMENSION = 6
    QUANT_NUM = 7

    OPCODE_DEPRECATED_BUILTIN_CODE = 0
    OPCODE_CUSTOM_CODE = 1
    OPCODE_VERSION = 2
    OPCODE_BUILTIN_CODE = 3
    OPCODE_NUM = 4

    OP_OPCODE_INDEX = 0
    OP_INPUTS = 1
    OP_OUTPUTS = 2
    OP_BUILTIN_OPTIONS_TYPE = 3
    OP_BUILTIN_OPTIONS = 4
    OP_CUSTOM_OPTIONS = 5
    OP_NUM = 5

    BUFFER_DATA = 0
    BUFFER_OFFSET = 1
    BUFFER_SIZE = 2
    BUFFER_NUM = 1

    METADATA_NAME = 0
    METADATA_BUFFER = 1
    METADATA_NUM = 2

    TENSORMAP_NAME = 0
    TENSORMAP_TENSOR_INDEX = 1
    TENSORMAP_NUM = 2

    SIGDEF_INPUTS = 0
    SIGDEF_OUTPUTS = 1
    SIGDEF_SIGNATURE_KEY = 2
    SIGDEF_DEPRECATED_TAG = 3
    SIGDEF_SUBGRAPH_INDEX = 4
    SIGDEF_NUM = 5

    FC_FUSED_ACTIVATION = 0
    FC_WEIGHTS_FORMAT = 1
    FC_KEEP_NUM_DIMS = 2
    FC_ASYMMETRIC_QUANTIZE_INPUTS = 3
    FC_NUM = 4

    SOFTMAX_BETA = 0
    SOFTMAX_NUM = 1


def min_op_version(op: BuiltinOp, input_type: TensorType) -> int:
    """Lowest version of `op` that covers `input_type`, per TFLite's op_version rules.

    FULLY_CONNECTED here always has a bias and int8 weights with int8 input/output, so:
    float 1, int8 4. DEQUANTIZE: int8 2, float16 3. QUANTIZE float32 -> int8: 1.
    RELU/LOGISTIC/SOFTMAX: float 1, int8 2.
    """
    if op is BuiltinOp.FULLY_CONNECTED:
        return 4 if input_type is TensorType.INT8 else 1
    if op is BuiltinOp.DEQUANTIZE:
        if input_type in (TensorType.FLOAT16, TensorType.INT16):
            return 3
        return 2 if input_type is TensorType.INT8 else 1
    if op is BuiltinOp.QUANTIZE:
        return 2 if input_type is TensorType.INT16 else 1
    if input_type is TensorType.INT16:
        return 3
    return 2 if input_type is TensorType.INT8 else 1


# Highest version of each op that tflite-runtime 2.14's builtin op resolver registers, probed by
# loading models with every version 1..15. ai-edge-litert 2.3 registers at least as many
# (DEQUANTIZE 9, FULLY_CONNECTED 14, SOFTMAX 4, QUANTIZE 6, LOGISTIC 3, RELU 3), so the 2.14
# limits are the ones a file must respect to run on both.
MAX_OP_VERSION_TFLITE_2_14: dict[BuiltinOp, int] = {
    BuiltinOp.DEQUANTIZE: 5,
    BuiltinOp.FULLY_CONNECTED: 10,
    BuiltinOp.LOGISTIC: 3,
    BuiltinOp.RELU: 3,
    BuiltinOp.SOFTMAX: 3,
    BuiltinOp.QUANTIZE: 3,
}

# TFLite requires this output quantisation for int8 LOGISTIC and SOFTMAX.
SIGMOID_SOFTMAX_INT8_SCALE = 1.0 / 256.0
SIGMOID_SOFTMAX_INT8_ZERO_POINT = -128
