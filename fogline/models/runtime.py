"""The one TFLite import seam: ai-edge-litert when installed, else tflite-runtime."""

from __future__ import annotations

import importlib
import logging
import threading
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fogline.models.errors import ModelRejected

log = logging.getLogger(__name__)

Backend = Literal["auto", "ai_edge_litert", "tflite_runtime"]
_MODULES = {
    "ai_edge_litert": "ai_edge_litert.interpreter",
    "tflite_runtime": "tflite_runtime.interpreter",
}


def interpreter_class(backend: Backend = "auto") -> tuple[str, Any]:
    """Return (backend name, Interpreter class); `auto` prefers ai-edge-litert."""
    names = list(_MODULES) if backend == "auto" else [backend]
    errors = []
    for name in names:
        try:
            module = importlib.import_module(_MODULES[name])
        except ImportError as exc:
            errors.append(f"{name}: {exc}")
            continue
        return name, module.Interpreter
    raise ImportError("no TFLite runtime importable (" + "; ".join(errors) + ")")


def load_interpreter(
    model: str | Path | bytes, *, backend: Backend = "auto", num_threads: int = 1
) -> Any:
    """Build an Interpreter for a `.tflite` path or its bytes; a refused model is ModelRejected."""
    name, cls = interpreter_class(backend)
    content = bytes(model) if isinstance(model, bytes | bytearray) else Path(model).read_bytes()
    try:
        interpreter = cls(model_content=content, num_threads=num_threads)
        interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        raise ModelRejected(f"{name} refused the model: {exc}") from exc
    log.debug("loaded %d-byte model with %s", len(content), name)
    return interpreter


class Model:
    """A loaded dense model: `predict` scores a whole batch with one `invoke()`.

    Not safe to share between threads without the internal lock it takes per call.
    """

    def __init__(
        self, model: str | Path | bytes, *, backend: Backend = "auto", num_threads: int = 1
    ) -> None:
        self.backend, _ = interpreter_class(backend)
        self._interpreter = load_interpreter(model, backend=backend, num_threads=num_threads)
        inputs = self._interpreter.get_input_details()
        outputs = self._interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ModelRejected(
                f"expected one input and one output, got {len(inputs)}/{len(outputs)}"
            )
        self._input = inputs[0]["index"]
        self._output = outputs[0]["index"]
        self.input_size = int(inputs[0]["shape"][-1])
        self.output_size = int(outputs[0]["shape"][-1])
        self._batch = int(inputs[0]["shape"][0])
        self._lock = threading.Lock()

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Run `x` ([batch, input_size]) and return [batch, output_size] float32."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.input_size:
            raise ValueError(f"input must be [batch, {self.input_size}], got {x.shape}")
        if len(x) == 0:
            return np.zeros((0, self.output_size), dtype=np.float32)
        with self._lock:
            if len(x) != self._batch:
                self._interpreter.resize_tensor_input(self._input, [len(x), self.input_size])
                self._interpreter.allocate_tensors()
                self._batch = len(x)
            self._interpreter.set_tensor(self._input, x)
            self._interpreter.invoke()
            return np.array(self._interpreter.get_tensor(self._output), dtype=np.float32)
