"""`fogline models inspect`: what a `.tflite` file holds, after the validator accepted it."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

from fogline.models.errors import ModelRejected
from fogline.models.reader import ParsedModel, TensorInfo, validate
from fogline.models.schema import BuiltinOp, FusedActivation


def describe(model: ParsedModel, *, size: int) -> dict[str, Any]:
    """A JSON-ready description: ops, tensors, quantisation, signatures, metadata, size."""
    metadata: dict[str, Any] = {}
    for name, raw in model.metadata.items():
        try:
            metadata[name] = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            metadata[name] = {"bytes": len(raw)}
    return {
        "size_bytes": size,
        "schema_version": model.version,
        "description": model.description,
        "operator_codes": [
            {"op": _code_name(c.builtin_code, c.deprecated_builtin_code), "version": c.version}
            for c in model.operator_codes
        ],
        "operators": [
            {
                "index": op.index,
                "op": op.name,
                "version": op.version,
                "inputs": list(op.inputs),
                "outputs": list(op.outputs),
                "options": _options(op.options),
            }
            for op in model.operators
        ],
        "tensors": [_tensor(model, t) for t in model.tensors],
        "inputs": list(model.inputs),
        "outputs": list(model.outputs),
        "signatures": {
            key: {
                "inputs": dict(sig.inputs),
                "outputs": dict(sig.outputs),
                "subgraph": sig.subgraph_index,
            }
            for key, sig in model.signatures.items()
        },
        "metadata": metadata,
    }


def _code_name(builtin: int, deprecated: int) -> str:
    code = max(builtin, deprecated)
    try:
        return BuiltinOp(code).name
    except ValueError:
        return f"BUILTIN({code})"


def _options(options: dict[str, Any]) -> dict[str, Any]:
    out = dict(options)
    if "fused_activation_function" in out:
        with contextlib.suppress(ValueError):
            out["fused_activation_function"] = FusedActivation(
                out["fused_activation_function"]
            ).name
    return out


def _tensor(model: ParsedModel, t: TensorInfo) -> dict[str, Any]:
    data = model.buffers[t.buffer] if 0 <= t.buffer < len(model.buffers) else b""
    q = t.quantization
    return {
        "index": t.index,
        "name": t.name,
        "dtype": t.type_name,
        "shape": list(t.shape),
        "shape_signature": None if t.shape_signature is None else list(t.shape_signature),
        "buffer": t.buffer,
        "constant_bytes": len(data),
        "quantization": None
        if q is None
        else {
            "scale": list(q.scale),
            "zero_point": list(q.zero_point),
            "quantized_dimension": q.quantized_dimension,
        },
    }


def format_description(d: dict[str, Any], *, path: str = "") -> str:
    """The human-readable form of `describe`."""
    lines = [
        f"{path or 'model'}: {d['size_bytes']:,} bytes, schema v{d['schema_version']}"
        + (f", {d['description']!r}" if d["description"] else ""),
        "",
        "ops:",
    ]
    for op in d["operators"]:
        opts = ", ".join(f"{k}={v}" for k, v in op["options"].items())
        lines.append(
            f"  {op['index']:>3}  {op['op']} v{op['version']}  "
            f"{op['inputs']} -> {op['outputs']}" + (f"  ({opts})" if opts else "")
        )
    lines += ["", "tensors:"]
    for t in d["tensors"]:
        sig = "" if t["shape_signature"] is None else f" signature {t['shape_signature']}"
        const = f" const {t['constant_bytes']:,} B" if t["constant_bytes"] else ""
        q = t["quantization"]
        quant = ""
        if q is not None:
            quant = f" quant scale {_short(q['scale'])} zero_point {_short(q['zero_point'])}"
        lines.append(
            f"  {t['index']:>3}  {t['name']:<24} {t['dtype']:<8} {t['shape']}{sig}{const}{quant}"
        )
    lines += ["", f"subgraph inputs {d['inputs']} outputs {d['outputs']}", "", "signatures:"]
    for key, sig in d["signatures"].items():
        lines.append(f"  {key}: inputs {sig['inputs']} outputs {sig['outputs']}")
    lines += ["", "metadata:"]
    for name, value in d["metadata"].items():
        lines.append(f"  {name}:")
        lines += ["    " + s for s in json.dumps(value, indent=2, sort_keys=True).splitlines()]
    return "\n".join(lines)


def _short(values: list[Any]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.6g}" if isinstance(v, float) else str(v)

    if len(values) <= 4:
        return "[" + ", ".join(fmt(v) for v in values) + "]"
    return "[" + ", ".join(fmt(v) for v in values[:4]) + f", ... ({len(values)})]"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `fogline models inspect`."""
    p.add_argument("file", type=Path, help="the .tflite file")
    p.add_argument("--json", action="store_true", help="print a machine-readable JSON dump")


def run(args: argparse.Namespace) -> int:
    """Entry of `fogline models inspect`: 0 when the file validates, 2 when it is rejected."""
    try:
        data = args.file.read_bytes()
    except OSError as exc:
        print(f"fogline models inspect: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return 2
    try:
        model = validate(data)
    except ModelRejected as exc:
        print(f"fogline models inspect: {args.file} rejected: {exc.reason}", file=sys.stderr)
        return 2
    d = describe(model, size=len(data))
    print(json.dumps(d, indent=2) if args.json else format_description(d, path=str(args.file)))
    return 0
