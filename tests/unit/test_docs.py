"""The README is the manual: every command, flag, topic, config key and report key is in it."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import re
import tomllib
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cloud_sink.sink import SinkConfig
from device_sim.sim import SimConfig
from edge_agent.agent import EdgeConfig
from fog_aggregator.aggregator import FogConfig
from fogline.codec import Telemetry, encode_telemetry
from fogline.config import ServiceConfig
from fogline.custody import SenderConfig
from fogline.report import build_report
from fogline.topics import Topics

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"

CONFIG_CLASSES: tuple[type[ServiceConfig], ...] = (
    ServiceConfig,
    SenderConfig,
    SimConfig,
    EdgeConfig,
    FogConfig,
    SinkConfig,
)
# How topic builder parameters are written in the README's topic table.
PLACEHOLDERS = {
    "edge": "{edge}",
    "device": "{device}",
    "fog": "{fog}",
    "role": "{role}",
    "ident": "{id}",
    "name": "{name}",
    "index": "{index}",
    "group": "{group}",
}
# Builders whose `role` is a custody hop: documented once per sending role, not as `{role}`.
CUSTODY_BUILDERS = ("up", "ack", "up_sub")
CUSTODY_ROLES = ("edge", "fog")
# Keys `fogline up` adds to the report of `build_report`.
UP_REPORT_KEYS = ("restarts",)
SHARED_FLAGS_HEADING = "Shared flags"


# --------------------------------------------------------------------------- reading the README


def _readme() -> str:
    assert README.is_file(), f"{README} is missing"
    return README.read_text()


def _sections(text: str) -> dict[str, str]:
    """Heading title -> the text under it, up to the next heading of the same or a higher level."""
    headings: list[tuple[int, int, str]] = []  # (line index, level, title)
    lines = text.splitlines()
    fenced = False
    for i, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
            continue
        m = re.match(r"^(#{1,6})\s+(.*?)\s*$", line)
        if m and not fenced:
            headings.append((i, len(m.group(1)), m.group(2)))
    out: dict[str, str] = {}
    for n, (start, level, title) in enumerate(headings):
        end = len(lines)
        for later, lvl, _ in headings[n + 1 :]:
            if lvl <= level:
                end = later
                break
        out[title] = "\n".join(lines[start + 1 : end])
    return out


def _section(title: str) -> str:
    sections = _sections(_readme())
    assert title in sections, f"README.md has no section headed {title!r}"
    return sections[title]


def _section_containing(fragment: str) -> str:
    sections = _sections(_readme())
    found = [t for t in sections if fragment in t]
    assert len(found) == 1, f"README.md needs exactly one heading containing {fragment!r}: {found}"
    return sections[found[0]]


def _has_flag(text: str, flag: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text) is not None


# --------------------------------------------------------------------------- reading the code


def _console_scripts() -> dict[str, str]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    scripts: dict[str, str] = data["project"]["scripts"]
    return scripts


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__(parser.prog)
        self.parser = parser


def _parser_of(entry: str, monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    """The argument parser the console-script entry point `module:function` really builds."""
    module, _, func = entry.partition(":")
    main = getattr(importlib.import_module(module), func)

    def capture(self: argparse.ArgumentParser, *_a: Any, **_k: Any) -> Any:
        raise _Captured(self)

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", capture)
        m.setattr(argparse.ArgumentParser, "parse_known_args", capture)
        try:
            main([])
        except _Captured as got:
            return got.parser
    raise AssertionError(f"{entry} did not parse its arguments with argparse")


def _flags(parser: argparse.ArgumentParser) -> list[str]:
    return [
        opt
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction | argparse._SubParsersAction)
        for opt in action.option_strings
        if opt.startswith("--")
    ]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    out: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            out.update(action.choices)
    return out


def _topic_patterns() -> Iterator[str]:
    """Every topic and subscription filter `Topics` builds, with placeholders for the ids."""
    topics = Topics()
    for name, method in inspect.getmembers(topics, inspect.ismethod):
        if name.startswith("_") or name.startswith("parse_"):
            continue
        params = list(inspect.signature(method).parameters)
        if name in CUSTODY_BUILDERS:
            for role in CUSTODY_ROLES:
                args = {p: role if p == "role" else "{" + role + "}" for p in params}
                yield method(**args)
            continue
        unknown = [p for p in params if p not in PLACEHOLDERS]
        assert not unknown, f"Topics.{name} has parameters {unknown}; add them to PLACEHOLDERS"
        yield method(**{p: PLACEHOLDERS[p] for p in params})


def _own_fields(cls: type) -> list[dataclasses.Field[Any]]:
    """Fields `cls` declares or redeclares (the rest are documented with its base class)."""
    base = cls.__mro__[1]
    inherited = (
        {f.name: f for f in dataclasses.fields(base)} if dataclasses.is_dataclass(base) else {}
    )
    out = []
    for f in dataclasses.fields(cls):
        old = inherited.get(f.name)
        if old is None or _default(f) != _default(old) or f.metadata != old.metadata:
            out.append(f)
    return out


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _shown(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


# --------------------------------------------------------------------------- (a) commands


def test_every_command_has_a_section(monkeypatch: pytest.MonkeyPatch) -> None:
    scripts = _console_scripts()
    titles = set(_sections(_readme()))
    wanted = [f"`{name}`" for name in scripts]
    fogline = _parser_of(scripts["fogline"], monkeypatch)
    wanted += [f"`fogline {sub}`" for sub in _subparsers(fogline)]
    missing = [w for w in wanted if w not in titles]
    assert not missing, f"README.md has no section headed {', '.join(missing)}"


# --------------------------------------------------------------------------- (b) flags


def test_every_flag_of_fogline_is_documented(monkeypatch: pytest.MonkeyPatch) -> None:
    fogline = _parser_of(_console_scripts()["fogline"], monkeypatch)
    missing = [
        f"fogline {flag}" for flag in _flags(fogline) if not _has_flag(_section("`fogline`"), flag)
    ]
    for sub, parser in _subparsers(fogline).items():
        text = _section(f"`fogline {sub}`")
        missing += [f"fogline {sub} {flag}" for flag in _flags(parser) if not _has_flag(text, flag)]
    assert not missing, f"flags missing from their command's README section: {missing}"


def test_every_flag_of_the_process_commands_is_documented(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    shared = _section(SHARED_FLAGS_HEADING)
    missing = []
    for name, entry in _console_scripts().items():
        if name == "fogline":
            continue
        own = _section(f"`{name}`")
        for flag in _flags(_parser_of(entry, monkeypatch)):
            if not (_has_flag(own, flag) or _has_flag(shared, flag)):
                missing.append(f"{name} {flag}")
    assert not missing, (
        f"flags in neither the command's README section nor {SHARED_FLAGS_HEADING!r}: {missing}"
    )


# --------------------------------------------------------------------------- (c) topics


def test_every_topic_is_in_the_topic_table() -> None:
    text = _section("Topics")
    patterns = sorted(set(_topic_patterns()))
    assert "fl/v1/dev/{edge}/{device}/tele" in patterns  # the placeholder scheme still applies
    missing = [p for p in patterns if f"`{p}`" not in text]
    assert not missing, f"topics missing from the README's Topics section: {missing}"


# --------------------------------------------------------------------------- (d) config keys

_ROW = re.compile(r"^\|\s*`(\w+)`\s*\|\s*([^|]*?)\s*\|\s*`([^`]*)`\s*\|", re.MULTILINE)


@pytest.mark.parametrize("cls", CONFIG_CLASSES, ids=lambda c: c.__name__)
def test_every_config_key_is_in_its_table(cls: type[ServiceConfig]) -> None:
    text = _section_containing(f"(`{cls.__name__}`)")
    rows = {m.group(1): (m.group(2), m.group(3)) for m in _ROW.finditer(text)}
    hints = typing.get_type_hints(cls)
    own = _own_fields(cls)
    missing = [f.name for f in own if f.name not in rows]
    assert not missing, f"{cls.__name__} keys missing from its README table: {missing}"
    wrong = [
        f"{f.name}: README says {rows[f.name]}, code has "
        f"({hints[f.name].__name__!r}, {_shown(_default(f))!r})"
        for f in own
        if rows[f.name] != (hints[f.name].__name__, _shown(_default(f)))
    ]
    assert not wrong, f"{cls.__name__} keys documented with a wrong type or default: {wrong}"
    stale = sorted(set(rows) - {f.name for f in own})
    assert not stale, f"{cls.__name__}'s README table lists keys it does not declare: {stale}"


# --------------------------------------------------------------------------- (e) report keys


def test_every_report_key_is_documented(tmp_path: Path) -> None:
    text = _section("Report")
    rep = build_report(tmp_path)
    missing = [k for k in [*rep, *UP_REPORT_KEYS] if f"| `{k}` |" not in text]
    missing += [f"bytes.{k}" for k in rep["bytes"] if f"`{k}`" not in text]
    assert not missing, f"report keys missing from the README's Report section: {missing}"


# --------------------------------------------------------------------------- the decoding example


def test_the_telemetry_decoding_example_decodes_a_real_message() -> None:
    blocks = re.findall(r"```python\n(.*?)```", _readme(), re.DOTALL)
    code = [b for b in blocks if "def decode_tele" in b]
    assert len(code) == 1, "README.md needs one python block defining decode_tele"
    assert "fogline" not in code[0], "the decoding example must not need fogline"
    namespace: dict[str, Any] = {}
    exec(code[0], namespace)
    values = np.array([[1.5, 55.0, -3.0], [1.6, 55.25, 0.0]], dtype=np.float32)
    tele = Telemetry(
        device="d00007", first=120, t0=1700000000.0, dt=0.1, fields=("a", "b", "c"), values=values
    )
    device, fields, seqs, times, got = namespace["decode_tele"](
        encode_telemetry(tele, seq=3, ts=1700000000.5)
    )
    what = "the README's decode_tele example gets"
    assert device == "d00007", f"{what} the device wrong: {device!r}"
    assert list(fields) == ["a", "b", "c"], f"{what} the fields wrong: {fields!r}"
    assert list(seqs) == [120, 121], f"{what} the reading numbers wrong: {seqs!r}"
    assert np.allclose(times, [1700000000.0, 1700000000.1]), f"{what} the times wrong: {times!r}"
    assert np.array_equal(got, values), f"{what} the values wrong: {got!r}"
