"""Naming of a simulated fleet: device and edge ids, which edge serves which device, and how a
fleet is split over sites."""

from __future__ import annotations

from dataclasses import dataclass


def edge_ids(count: int, first: int = 0) -> list[str]:
    """Ids of `count` edges from number `first`: `e0`, `e1`, ..."""
    return [f"e{i}" for i in range(first, first + count)]


def device_id(index: int) -> str:
    """Id of device number `index`: `d00000`, `d00001`, ..."""
    return f"d{index:05d}"


def edge_of(index: int, edges: int, first_edge: int = 0) -> str:
    """The edge that serves device number `index`: round robin over `edges` edges numbered from
    `first_edge`."""
    return f"e{first_edge + index % edges}"


@dataclass(frozen=True, slots=True)
class Site:
    """One site: a broker of its own, one fog, a block of edges and the devices they serve."""

    index: int
    first_edge: int
    edges: int
    first_device: int
    devices: int

    @property
    def name(self) -> str:
        """`site0`, `site1`, ...: names the site's broker folder and bridge."""
        return f"site{self.index}"

    @property
    def fog(self) -> str:
        """Id of the site's fog: `f0`, `f1`, ..."""
        return f"f{self.index}"

    @property
    def sim(self) -> str:
        """Id of the simulator of the site's devices: `s0`, `s1`, ..."""
        return f"s{self.index}"

    @property
    def edge_ids(self) -> list[str]:
        """Ids of the site's edges."""
        return edge_ids(self.edges, self.first_edge)


def split_sites(devices: int, edges: int, sites: int) -> list[Site]:
    """Split a fleet over `sites` sites: each gets a contiguous block of edges (the first ones one
    more when they do not divide evenly) and of devices, in proportion to its edges.

    Raises ValueError when a site would get no edge or no device."""
    if sites < 1:
        raise ValueError(f"need at least one site, not {sites}")
    if edges < sites:
        raise ValueError(f"{edges} edges cannot serve {sites} sites: give each site an edge")
    out: list[Site] = []
    first_edge = 0
    for k in range(sites):
        count = edges // sites + (1 if k < edges % sites else 0)
        lo = devices * first_edge // edges
        hi = devices * (first_edge + count) // edges
        if hi <= lo:
            raise ValueError(f"{devices} devices are too few for {sites} sites of {edges} edges")
        out.append(Site(k, first_edge, count, lo, hi - lo))
        first_edge += count
    return out
