"""`fogline report --html`: one self-contained HTML page for a maintenance engineer.

The page holds the text report, the devices at risk, and figures drawn with matplotlib (Agg,
embedded as base64 PNG, so the file needs nothing else): the anomaly score of the devices with the
soonest predicted failure, predicted hours to failure against the ground truth (when the data dir
has `device-sim-*/truth.json`), readings per layer and bytes per hop, and escalations and models
over time; with ground truth also the evaluation of `fogline simulate`. It only reads the data
dir (the stores read-only) and starts no process.
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import json
import math
import re
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter

from fogline import query
from fogline.evaluate import TRUTH_FILE, format_evaluation
from fogline.report import build_report, format_report

MAX_DEVICES = 6  # small multiples per figure
AT_RISK_ROWS = 20
MAX_BINS = 24
_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
_FAULT_COLORS = {
    "anomaly": "#7f7f7f",
    "bearing_wear": "#d62728",
    "overheating": "#ff7f0e",
    "imbalance": "#9467bd",
    "sensor_stuck": "#17becf",
    "sensor_dropout": "#1f77b4",
    "sensor_spikes": "#2ca02c",
    "sensor_drift": "#bcbd22",
}


@dataclass(frozen=True, slots=True)
class TrueFault:
    """A device's true fault from the simulator: kind, onset and failure as Unix seconds of
    the simulated clock (the clock of the events' `ts`)."""

    device: str
    kind: str
    onset: float
    failure: float | None


@dataclass(frozen=True, slots=True)
class Truth:
    """The ground truth of a data dir: per device its fault, and when simulated time 0 was."""

    faults: dict[str, TrueFault]
    start: float


def load_truth(data_dir: Path) -> Truth | None:
    """The simulators' `truth.json` files of `data_dir`, or None when there is none."""
    faults: dict[str, TrueFault] = {}
    starts = []
    for path in sorted(data_dir.glob(f"device-sim-*/{TRUTH_FILE}")):
        doc = json.loads(path.read_text())
        start, dt = float(doc["start"]), float(doc["dt"])
        starts.append(start)
        for f in doc["faults"]:
            failure = None if f["failure_seq"] is None else start + f["failure_seq"] * dt
            faults[f["device"]] = TrueFault(
                f["device"], f["kind"], start + f["onset_seq"] * dt, failure
            )
    return Truth(faults, min(starts)) if starts else None


# --------------------------------------------------------------------------- figures


def _png(fig: Figure) -> str:
    """The figure as a base64 PNG."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _grid(n: int, *, width: float = 12.0, row_height: float = 3.0) -> tuple[Figure, list[Axes]]:
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(width, row_height * rows + 0.4), layout="constrained")
    # One time axis for all devices, so that their histories line up.
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True).ravel().tolist()
    for ax in axes:
        ax.tick_params(labelbottom=True)
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _hours(ts: float, t0: float) -> float:
    return (ts - t0) / 3600.0


def _mark_truth(ax: Axes, fault: TrueFault | None, t0: float) -> None:
    if fault is None:
        return
    ax.axvline(_hours(fault.onset, t0), color="#ff7f0e", ls=":", lw=1.2, label="true onset")
    if fault.failure is not None:
        ax.axvline(_hours(fault.failure, t0), color="#000000", lw=1.2, label="true failure")


def score_figure(
    events: list[dict[str, Any]],
    devices: Sequence[dict[str, Any]],
    *,
    t0: float,
    truth: Truth | None,
    xlabel: str,
) -> Figure:
    """Per at-risk device: the model events' anomaly score against time, coloured by the fault
    class, escalated ones hollow, with the warning threshold and, with ground truth, the true
    onset and failure."""
    by_device: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        by_device[e["device"]].append(e)
    fig, axes = _grid(len(devices))
    faults_seen: set[str] = set()
    for ax, row in zip(axes, devices, strict=True):
        evs = sorted(by_device[row["device"]], key=lambda e: e["ts"])
        xs = [_hours(e["ts"], t0) for e in evs]
        scores = [e["score"] for e in evs]
        ax.plot(xs, scores, color="#bbbbbb", lw=1, zorder=1)
        for e, x in zip(evs, xs, strict=True):
            fault = e["fault"] or "anomaly"
            faults_seen.add(fault)
            color = _FAULT_COLORS.get(fault, "#000000")
            ax.scatter(
                [x], [e["score"]], s=36, zorder=3,
                facecolors="none" if e["escalated"] else color, edgecolors=color, linewidths=1.5,
            )  # fmt: skip
        for threshold in sorted({e["threshold"] for e in evs if e["threshold"] is not None}):
            ax.axhline(threshold, color="#d62728", ls="--", lw=1, label="threshold")
        positive = [s for s in scores if s and s > 0]
        if positive and max(positive) / min(positive) > 30:
            ax.set_yscale("log")
        fault = truth.faults.get(row["device"]) if truth else None
        _mark_truth(ax, fault, t0)
        htf = row["hours_to_failure"]
        said = (row["fault"] or "anomaly") + (
            f", {htf:.1f} h to failure" if htf is not None else ""
        )
        title = f"{row['device']} ({row['edge']}): {said}"
        if fault is not None:
            title += f"\ntruth: {fault.kind}"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel("anomaly score", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    handles = [
        Line2D([], [], ls="", marker="o", color=_FAULT_COLORS.get(f, "#000000"), label=f)
        for f in sorted(faults_seen)
    ]
    handles += [
        Line2D([], [], ls="", marker="o", mfc="none", color="#333333", label="escalated (hollow)"),
        Line2D([], [], color="#d62728", ls="--", label="warning threshold"),
    ]
    if truth is not None:
        handles += [
            Line2D([], [], color="#ff7f0e", ls=":", label="true onset"),
            Line2D([], [], color="#000000", label="true failure"),
        ]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6), fontsize=8)
    return fig


def failure_devices(events: list[dict[str, Any]], truth: Truth) -> list[str]:
    """Devices with a true failure and predictions of hours to failure, most predictions first
    (at most MAX_DEVICES)."""
    counts = Counter(
        e["device"]
        for e in events
        if e["hours_to_failure"] is not None
        and (f := truth.faults.get(e["device"])) is not None
        and f.failure is not None
    )
    return [d for d, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))][:MAX_DEVICES]


def failure_figure(
    events: list[dict[str, Any]], devices: list[str], *, truth: Truth, t0: float, xlabel: str
) -> Figure:
    """Per device: predicted hours to failure at each event against time, with the true hours
    to failure as a line (reaching 0 at the true failure), and the mean absolute error."""
    fig, axes = _grid(len(devices))
    for ax, device in zip(axes, devices, strict=True):
        fault = truth.faults[device]
        assert fault.failure is not None
        evs = sorted(
            (e for e in events if e["device"] == device and e["hours_to_failure"] is not None),
            key=lambda e: e["ts"],
        )
        xs = [_hours(e["ts"], t0) for e in evs]
        ys = [e["hours_to_failure"] for e in evs]
        x_fail = _hours(fault.failure, t0)
        lo = min([*xs, _hours(fault.onset, t0)])
        hi = max([*xs, x_fail])
        pad = 0.05 * (hi - lo or 1.0)
        line_x = [lo - pad, hi + pad]
        ax.plot(line_x, [x_fail - x for x in line_x], color="#d62728", lw=1.5, label="truth")
        ax.axhline(0, color="#555555", lw=0.8)
        ax.plot(xs, ys, "o-", color="#1f77b4", ms=5, lw=1, label="predicted")
        _mark_truth(ax, fault, t0)
        errors = [abs(y - (x_fail - x)) for x, y in zip(xs, ys, strict=True)]
        ax.set_title(
            f"{device}: {fault.kind}, MAE {sum(errors) / len(errors):.2f} h over {len(errors)}",
            fontsize=9,
        )
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel("hours to failure", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    handles = [
        Line2D([], [], color="#1f77b4", marker="o", label="predicted at the event"),
        Line2D([], [], color="#d62728", label="true hours to failure"),
        Line2D([], [], color="#ff7f0e", ls=":", label="true onset"),
        Line2D([], [], color="#000000", label="true failure"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=4, fontsize=8)
    return fig


def _bar_labels(ax: Axes, bars: Any, labels: list[str]) -> None:
    ax.bar_label(bars, labels=labels, fontsize=8, padding=2)
    ax.margins(y=0.15)


def _kb(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB" if n >= 1e3 else f"{n:.0f} B"


def flow_figure(report: dict[str, Any], rollup_readings: int | None) -> Figure:
    """Readings per layer (produced, delivered to the fog, covered in the cloud, dropped,
    unaccounted) and payload bytes per hop with the saving against the hop before."""
    fig = Figure(figsize=(12, 3.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    names = ["devices\nproduced"]
    values = [report["produced"]]
    if rollup_readings is not None:
        names.append("fog\n(rollups)")
        values.append(rollup_readings)
    names.append("cloud\ncovered")
    values.append(report["covered"])
    dropped = sum(report["dropped"].values())
    names.append("dropped")
    values.append(dropped)
    colors = ["#1f77b4"] * (len(values) - 1) + ["#ff7f0e"]
    if report["unaccounted"]:
        names.append("unaccounted")
        values.append(report["unaccounted"])
        colors.append("#d62728")
    bars = left.bar(names, values, color=colors)
    _bar_labels(left, bars, [f"{v:,}" for v in values])
    left.set_title("Readings per layer", fontsize=10)
    left.set_ylabel("readings", fontsize=8)
    left.tick_params(labelsize=8)
    b = report["bytes"]
    hops = ["device→edge", "edge→fog", "fog→cloud"]
    sizes = [b["device_edge"], b["edge_fog"], b["fog_cloud"]]
    bars = right.bar(hops, sizes, color=["#7f7f7f", "#2ca02c", "#17becf"])
    labels = [_kb(sizes[0])]
    for before, now in itertools.pairwise(sizes):
        saved = f", {1 - now / before:.0%} less" if before and now else ""
        labels.append(_kb(now) + saved)
    _bar_labels(right, bars, labels)
    right.set_title("Payload bytes per hop (saving against the hop before)", fontsize=10)
    right.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: _kb(v)))
    right.tick_params(labelsize=8)
    return fig


def escalation_figure(events: list[dict[str, Any]], *, t0: float, xlabel: str) -> Figure:
    """Model events over time in bins: stacked by the model whose verdict was used (its name
    and version), and the share escalated to the fog."""
    xs = [_hours(e["ts"], t0) for e in events]
    distinct = sorted(set(xs))
    if len(distinct) <= MAX_BINS:
        # Windows end on a grid (every `window` readings): one bar per moment avoids empty bins.
        gaps = [b - a for a, b in itertools.pairwise(distinct)]
        width = min(gaps, default=1.0)
        centers = distinct
        n_bins = len(distinct)
        index = {x: i for i, x in enumerate(distinct)}

        def bin_of(x: float) -> int:
            return index[x]

    else:
        lo, hi = distinct[0], distinct[-1]
        n_bins = MAX_BINS
        width = (hi - lo) / n_bins
        centers = [lo + (i + 0.5) * width for i in range(n_bins)]

        def bin_of(x: float) -> int:
            return min(n_bins - 1, int((x - lo) / width))

    models = sorted({e["model"] or "unknown" for e in events})
    counts = {m: [0] * n_bins for m in models}
    escalated = [0] * n_bins
    total = [0] * n_bins
    for e, x in zip(events, xs, strict=True):
        i = bin_of(x)
        counts[e["model"] or "unknown"][i] += 1
        total[i] += 1
        escalated[i] += bool(e["escalated"])
    fig = Figure(figsize=(12, 5), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    base = [0] * n_bins
    for m, color in zip(models, _COLORS * (len(models) // len(_COLORS) + 1), strict=False):
        top.bar(centers, counts[m], width=width * 0.9, bottom=base, color=color, label=m)
        base = [a + c for a, c in zip(base, counts[m], strict=True)]
    top.set_ylabel("model events", fontsize=8)
    top.set_title("Model events per period, by the model whose verdict was used", fontsize=10)
    top.legend(fontsize=8, loc="upper left")
    top.tick_params(labelsize=8)
    rate_x = [c for c, t in zip(centers, total, strict=True) if t]
    rate_y = [s / t for s, t in zip(escalated, total, strict=True) if t]
    overall = sum(escalated) / len(events)
    bottom.plot(rate_x, rate_y, "o-", color="#9467bd", label="escalated share per period")
    bottom.axhline(overall, color="#555555", ls="--", lw=1, label=f"overall {overall:.0%}")
    bottom.set_ylim(-0.05, 1.05)
    bottom.set_ylabel("escalated to the fog", fontsize=8)
    bottom.set_xlabel(xlabel, fontsize=8)
    bottom.legend(fontsize=8, loc="upper left")
    bottom.tick_params(labelsize=8)
    bottom.grid(alpha=0.3)
    return fig


# --------------------------------------------------------------------------- the page

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1240px; color: #222;
  padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f0f0f0; }
img { max-width: 100%; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: 0.6em 1em; }
.meta { color: #666; font-size: 0.9em; }
"""


def _esc(x: Any) -> str:
    return html.escape(str(x))


def _figure(fig: Figure, alt: str) -> str:
    return f'<p><img alt="{_esc(alt)}" src="data:image/png;base64,{_png(fig)}"></p>'


def _note(text: str) -> str:
    return f'<p class="note">{_esc(text)}</p>'


_NUMERIC = re.compile(r"-?[\d.,]+x?")


def _cell(v: Any) -> str:
    numeric = isinstance(v, int | float) or bool(_NUMERIC.fullmatch(str(v)))
    return f'<td class="n">{_esc(v)}</td>' if numeric else f"<td>{_esc(v)}</td>"


def _table(cols: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_esc(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _num(x: Any, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def _at_risk_table(rows: list[dict[str, Any]]) -> str:
    cols = ("device", "edge", "fault", "confidence", "hours to failure", "recommendation",
            "warnings", "last warning", "model")  # fmt: skip
    cells = [
        (
            r["device"],
            r["edge"],
            r["fault"] or "anomaly",
            _num(r["confidence"]),
            _num(r["hours_to_failure"], "{:.1f}"),
            r["recommendation"] or "-",
            r["warnings"],
            "-"
            if r["last_warning"] is None
            else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["last_warning"])),
            r["model"] or "-",
        )
        for r in rows[:AT_RISK_ROWS]
    ]
    more = len(rows) - AT_RISK_ROWS
    more_text = f" The table shows the first {AT_RISK_ROWS}; {more} more." if more > 0 else ""
    note = (
        "<p class='meta'>Fault, confidence, hours to failure and recommendation are those of "
        "the device's latest warning; times are the events' (in a simulation the simulated "
        f"clock).{more_text} <code>fogline query at-risk</code> lists them all.</p>"
    )
    return _table(cols, cells) + note


def _evaluation_html(ev: dict[str, Any]) -> str:
    faults = _table(
        ("fault kind", "devices", "detected", "recall", "mean delay (h)"),
        [
            (k, r["devices"], r["detected"], _num(r["recall"]), _num(r["mean_delay_h"]))
            for k, r in ev["faults"].items()
        ],
    )
    precision = _table(
        ("predicted kind", "events", "precision"),
        [(k, p["events"], _num(p["precision"])) for k, p in ev["precision"].items()],
    )
    bw = ev["bandwidth"]
    summary = _table(
        ("measure", "value"),
        [
            ("simulated hours", _num(ev["simulated_hours"], "{:.1f}")),
            ("events", ev["events"]),
            ("false alarms", ev["false_alarms"]),
            ("false alarms per device-hour", _num(ev["false_alarms_per_device_hour"], "{:.3f}")),
            ("failure prediction MAE (h)", _num(ev["failure_prediction_mae_h"])),
            ("failure predictions", ev["failure_predictions"]),
            ("escalation rate", _num(ev["escalation_rate"])),
            ("edge reduction (device→edge / edge→fog)", _num(bw["edge_reduction"], "{:.1f}x")),
            ("end-to-end reduction", _num(bw["end_to_end_reduction"], "{:.1f}x")),
        ],
    )
    return (
        "<h3>Detection per true fault kind</h3>" + faults + "<h3>Precision per predicted kind</h3>"
        + precision + "<h3>Summary</h3>" + summary
        + f"<details><summary>as text</summary><pre>{_esc(format_evaluation(ev))}</pre></details>"
    )  # fmt: skip


def _scenario_name(data_dir: Path) -> str:
    try:
        return str(json.loads((data_dir / "evaluation.json").read_text())["scenario"])
    except (OSError, ValueError, KeyError, TypeError):
        return data_dir.resolve().name


def build_html(
    data_dir: Path, *, report: dict[str, Any] | None = None, stores: Sequence[str] = ()
) -> str:
    """The page for `data_dir` and the PostgreSQL `stores` (the report is computed when not
    given; the evaluation against the ground truth reads the SQLite stores only)."""
    rep = build_report(data_dir, stores) if report is None else report
    truth = load_truth(data_dir)
    try:
        all_events = query.events(data_dir, limit=None, stores=stores)
        at_risk = query.at_risk(data_dir, stores=stores)
        rollup_rows = query.rollups(data_dir, limit=None, stores=stores)
    except query.QueryError as exc:
        all_events, at_risk, rollup_rows, store_problem = [], [], [], str(exc)
    else:
        store_problem = ""
    events = [e for e in all_events if e["kind"] == "model" and e["ts"] is not None]
    if truth is not None:
        t0 = truth.start
        xlabel = "simulated hours since the run started"
    else:
        t0 = min((e["ts"] for e in events), default=0.0)
        xlabel = "hours since the first model event"

    parts = [
        f"<h1>fogline report: {_esc(data_dir)}</h1>",
        f"<p class='meta'>written {_esc(time.strftime('%Y-%m-%d %H:%M:%S %Z'))}; "
        f"{rep['devices']} devices, {len(all_events)} events ({len(events)} from the models), "
        f"ground truth {'present' if truth else 'absent'}.</p>",
        "<h2 id='report'>Custody report</h2>",
        f"<pre>{_esc(format_report(rep))}</pre>",
    ]
    if store_problem:
        parts.append(_note(f"Cannot read the cloud store: {store_problem}."))
    no_models = (
        "No model events in the cloud store: the edges judged windows with the z-score rule "
        f"(--detector zscore; z-score events: {len(all_events)}). Anomaly scores, failure "
        "predictions and escalations come from the models only."
    )
    no_models_again = "No model events (z-score only), so nothing to draw here."

    parts.append("<h2 id='at-risk'>Devices at risk</h2>")
    parts.append(_at_risk_table(at_risk) if at_risk else _note("No device has a model warning."))

    parts.append("<h2 id='scores'>Anomaly score of the devices at risk</h2>")
    shown = at_risk[:MAX_DEVICES]
    if events and shown:
        parts.append(
            f"<p>The {len(shown)} devices with the soonest predicted failure: the anomaly score "
            "of each model event (filled: decided at the edge, hollow: escalated to the fog), "
            "coloured by fault class, with the warning threshold"
            + (" and the true onset and failure." if truth else ".")
            + "</p>"
        )
        fig = score_figure(events, shown, t0=t0, truth=truth, xlabel=xlabel)
        parts.append(_figure(fig, "anomaly score over time per device at risk"))
    else:
        parts.append(_note(no_models if not events else "No device has a model warning."))

    parts.append("<h2 id='failure'>Predicted hours to failure against the truth</h2>")
    if truth is None:
        parts.append(_note("No ground truth (device-sim-*/truth.json) in this data dir."))
    elif not events:
        parts.append(_note(no_models_again))
    elif devices := failure_devices(events, truth):
        parts.append(
            "<p>Devices with a wearing fault and the most predictions: each event's predicted "
            "hours to failure against the true hours left (the line reaches 0 at the true "
            "failure). Predictions converging on the line are good.</p>"
        )
        fig = failure_figure(events, devices, truth=truth, t0=t0, xlabel=xlabel)
        parts.append(_figure(fig, "predicted against true hours to failure"))
    else:
        parts.append(_note("No event predicts hours to failure on a device that truly fails."))

    parts.append("<h2 id='flow'>Readings per layer and bytes per hop</h2>")
    rollup_readings = sum(r["readings"] or 0 for r in rollup_rows) if rollup_rows else None
    parts.append(_figure(flow_figure(rep, rollup_readings), "readings per layer, bytes per hop"))

    parts.append("<h2 id='escalations'>Escalations and models over time</h2>")
    if events:
        parts.append(_figure(escalation_figure(events, t0=t0, xlabel=xlabel), "escalations"))
    else:
        parts.append(_note(no_models_again))

    if truth is not None:
        parts.append("<h2 id='evaluation'>Evaluation against the ground truth</h2>")
        # Imported here: fogline.simulate pulls in the pipeline runner, which this page never runs.
        from fogline.simulate import evaluation

        try:
            parts.append(_evaluation_html(evaluation(data_dir, _scenario_name(data_dir))))
        except (ValueError, KeyError) as exc:
            parts.append(_note(f"Cannot evaluate: {exc}"))

    body = "\n".join(parts)
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>fogline report: {_esc(data_dir)}</title><style>{_CSS}</style></head>"
        f"<body>\n{body}\n</body></html>\n"
    )


def write_html(
    data_dir: Path, out: Path, *, report: dict[str, Any] | None = None, stores: Sequence[str] = ()
) -> Path:
    """Write the page for `data_dir` (and the PostgreSQL `stores`) to `out` (atomically) and
    return `out`."""
    page = build_html(data_dir, report=report, stores=stores)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out
