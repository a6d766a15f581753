"""The few error classes fogline raises; each carries its context as attributes."""

from __future__ import annotations


class FoglineError(Exception):
    """Base class of every fogline error."""


class DecodeError(FoglineError):
    """A message could not be decoded or failed validation; `reason` is a short counter key."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class ConfigError(FoglineError):
    """A configuration value is unknown, missing or invalid; `key` names it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config {key!r}: {message}")
        self.key = key


class CustodyError(FoglineError):
    """The custody store refused an operation (corrupt state, closed store)."""
