"""TensorFlow Lite model toolkit without TensorFlow: write, read, validate, execute, train.

- `writer.write_model(layers, flavour=...)` -> `.tflite` bytes (float32, float16, int8)
- `reader.read_model(bytes)` / `reader.validate(...)` -> `ParsedModel`, or `ModelRejected`
- `executor.execute(parsed, x)` -> numpy reference output
- `runtime.Model(path_or_bytes).predict(x)` -> output from ai-edge-litert / tflite-runtime
- `train.train_classifier / train_autoencoder / train_failure_predictor` -> layers + metadata
"""

from __future__ import annotations

from fogline.models.errors import ModelRejected
from fogline.models.layers import Dense, forward

__all__ = ["Dense", "ModelRejected", "forward"]
