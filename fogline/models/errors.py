"""The error the model toolkit raises for a `.tflite` file it will not accept."""

from __future__ import annotations

from fogline.errors import FoglineError


class ModelRejected(FoglineError):
    """A model file is malformed or uses something a runtime would refuse; `reason` says what."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
