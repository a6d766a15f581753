"""Naming of a simulated fleet: device and edge ids and which edge serves which device."""

from __future__ import annotations


def edge_ids(count: int) -> list[str]:
    """Ids of `count` edges: `e0`, `e1`, ..."""
    return [f"e{i}" for i in range(count)]


def device_id(index: int) -> str:
    """Id of device number `index`: `d00000`, `d00001`, ..."""
    return f"d{index:05d}"


def edge_of(index: int, edges: int) -> str:
    """The edge that serves device number `index` (round robin)."""
    return f"e{index % edges}"
