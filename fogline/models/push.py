"""`fogline models push`: hand a model file to a fog for a signed canary rollout to its edges.

The file is validated here first (what the edges' runtimes would refuse never leaves), then
written atomically into the fog's `incoming/` folder, which the fog aggregator watches: it gives
the model the next version number, signs it and starts the canary rollout.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fogline.errors import FoglineError
from fogline.models.reader import validate
from fogline.topics import check_id

#: The models an edge runs: what a fog can roll out.
EDGE_MODELS = ("anomaly", "classifier", "failure")


def incoming_dir(data_dir: Path, fog: str) -> Path:
    """The folder fog `fog` takes new models from."""
    return data_dir / f"fog-{fog}" / "incoming"


def push(file: Path, data_dir: Path, fog: str) -> tuple[str, Path]:
    """Validate `file` and queue it at fog `fog`; returns (model name, queued path)."""
    check_id(fog, "fog")
    data = file.read_bytes()
    meta = validate(data).metadata_json("fogline")
    name = meta.get("name")
    if name not in EDGE_MODELS:
        raise FoglineError(
            f"{file}: metadata name {name!r} is not an edge model ({', '.join(EDGE_MODELS)})"
        )
    folder = incoming_dir(data_dir, fog)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{name}-{os.getpid()}-{file.stem}.tflite"
    tmp = folder / f".{target.name}.part"  # not *.tflite: the fog ignores it until renamed
    tmp.write_bytes(data)
    os.replace(tmp, target)
    return str(name), target


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `fogline models push`."""
    p.add_argument("file", type=Path, help="the .tflite file (its metadata names the model)")
    p.add_argument(
        "--data-dir", type=Path, default=Path(".fogline/data"),
        help="the deployment's data dir (default: .fogline/data)",
    )  # fmt: skip
    p.add_argument("--fog", default="f0", help="the fog that signs and rolls out (default: f0)")


def run(args: argparse.Namespace) -> int:
    """Entry of `fogline models push`: 0 when queued, 2 when the file is refused."""
    try:
        name, target = push(args.file, args.data_dir, args.fog)
    except OSError as exc:
        print(f"fogline models push: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return 2
    except FoglineError as exc:
        print(f"fogline models push: {exc}", file=sys.stderr)
        return 2
    print(
        f"queued {args.file} as the next {name} at fog {args.fog} ({target}); it rolls out to a "
        "canary share of the edges first (watch: fogline status, fogline query rollouts)"
    )
    return 0
