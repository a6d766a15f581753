"""A text progress bar for long commands (works on terminals and in logs alike)."""

from __future__ import annotations


def bar(done: float, total: float, width: int = 20) -> str:
    """`[########------------]  40%`: how far `done` is towards `total`."""
    share = 0.0 if total <= 0 else min(1.0, max(0.0, done / total))
    filled = round(share * width)
    return f"[{'#' * filled}{'-' * (width - filled)}] {share:4.0%}"
