"""The latency-versus-throughput curve, drawn from latency sweep reports.

Reports are the JSON of ``python -m tidemq.cli.bench_latency sweep`` or of
``tide bench --json`` (its ``latency_sweep``, or its single-rate ``latency``). Each
report is one series (one run configuration, e.g. "12 partitions, RF 2"): x is the
achieved send rate (msg/s), y the end-to-end latency in ms on a log scale, with one
line per percentile (p50 solid, p99 dashed, p99.9 dotted) in the series' colour.

matplotlib (the ``bench`` extra) is imported only when drawing, with the Agg backend
(no display), so ``tide`` works without it.

    python -m tidemq.cli.bench_curve a.json b.json -o docs/latency-curve.png
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import click

LineStyle = Literal["-", "--", ":"]
# (report key, legend name, line style) of each percentile drawn
PERCENTILES: tuple[tuple[str, str, LineStyle], ...] = (
    ("p50_ms", "p50", "-"),
    ("p99_ms", "p99", "--"),
    ("p999_ms", "p99.9", ":"),
)


MAX_RATE_TICKS = 12


class CurveError(Exception):
    """A report cannot be read, or matplotlib is missing."""


@dataclass(frozen=True)
class Series:
    label: str
    rates_per_s: tuple[int, ...]  # asked, per step: the x ticks
    achieved_per_s: tuple[float, ...]
    latency_ms: dict[str, tuple[float, ...]]  # "p50_ms" -> one value per step


def sweep_of(report: dict[str, Any]) -> dict[str, Any]:
    """The sweep inside a report: a harness report, or ``tide bench --json``'s
    ``latency_sweep`` or single-rate ``latency`` (a one-step sweep)."""
    if isinstance(report.get("steps"), list):
        return report
    if isinstance(report.get("latency_sweep"), dict):
        return sweep_of(report["latency_sweep"])
    if isinstance(report.get("latency"), dict):
        return {**report, "steps": [report["latency"]]}
    raise CurveError("not a latency report: no 'steps', 'latency_sweep' or 'latency'")


def load_report(path: str | Path) -> dict[str, Any]:
    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CurveError(f"{path}: {error}") from error
    if not isinstance(report, dict):
        raise CurveError(f"{path}: not a JSON object")
    try:
        return sweep_of(report)
    except CurveError as error:
        raise CurveError(f"{path}: {error}") from error


def _label(sweep: dict[str, Any]) -> str:
    label = sweep.get("label")
    if isinstance(label, str) and label:
        return label
    partitions = sweep.get("partitions", "?")
    factor = sweep.get("replication_factor")
    noun = "partition" if partitions == 1 else "partitions"
    return f"{partitions} {noun}, RF {factor if factor is not None else '?'}"


def series_of(reports: Sequence[dict[str, Any]]) -> list[Series]:
    """One series per report, its steps in rate order; steps without latencies are
    left out; a label seen before gets " (2)", " (3)"."""
    series = []
    seen: dict[str, int] = {}
    for report in reports:
        sweep = sweep_of(report)
        steps = sorted(
            (step for step in sweep["steps"] if step.get("p50_ms") is not None),
            key=lambda step: float(step.get("rate_per_s", 0)),
        )
        label = _label(sweep)
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            label = f"{label} ({seen[label]})"
        series.append(
            Series(
                label,
                tuple(int(step.get("rate_per_s", 0)) for step in steps),
                tuple(float(step.get("achieved_per_s", step.get("rate_per_s"))) for step in steps),
                {key: tuple(float(step[key]) for step in steps) for key, _, _ in PERCENTILES},
            )
        )
    return series


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as error:
        raise CurveError(
            "drawing the curve needs matplotlib: pip install 'tidemq[bench]'"
        ) from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def draw(
    series: Sequence[Series],
    path: str | Path,
    title: str | None = None,
    log_x: bool | None = None,
) -> list[str]:
    """Writes the image (format from the suffix, e.g. .png, .svg); returns the labels
    of the lines drawn ("<series> p50", ...), one per series and percentile. The x
    axis is logarithmic when ``log_x``, or (None) when the rates span 10x or more."""
    if not series:
        raise CurveError("no series to draw")
    pyplot = _pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, NullLocator

    figure, axes = pyplot.subplots(figsize=(10, 5.5), dpi=110)
    try:
        colours = pyplot.rcParams["axes.prop_cycle"].by_key()["color"]
        for index, one in enumerate(series):
            colour = colours[index % len(colours)]
            for key, name, style in PERCENTILES:
                axes.plot(
                    one.achieved_per_s,
                    one.latency_ms[key],
                    linestyle=style,
                    marker="o",
                    markersize=3,
                    color=colour,
                    label=f"{one.label} {name}",
                )
        axes.set_yscale("log")
        rates = sorted({rate for one in series for rate in one.rates_per_s if rate > 0})
        if log_x or (log_x is None and rates and rates[-1] >= 10 * rates[0]):
            axes.set_xscale("log")
        plain = FuncFormatter(lambda value, _position: f"{value:g}")
        axes.yaxis.set_major_formatter(plain)
        axes.yaxis.set_minor_formatter(plain)
        if 0 < len(rates) <= MAX_RATE_TICKS:  # the asked rates, where the points are
            axes.xaxis.set_minor_locator(NullLocator())
            axes.set_xticks(rates)
        axes.xaxis.set_major_formatter(plain)
        axes.set_xlabel("achieved throughput (msg/s)")
        axes.set_ylabel("end-to-end latency (ms, log scale)")
        axes.set_title(title or "tidemq: end-to-end latency versus throughput")
        axes.grid(True, which="both", alpha=0.3)
        # Two legends: colour = run configuration, line style = percentile.
        by_series = [Line2D([], [], color=colours[i % len(colours)]) for i in range(len(series))]
        first = axes.legend(
            by_series,
            [one.label for one in series],
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            fontsize="small",
        )
        axes.add_artist(first)
        by_style = [Line2D([], [], color="black", linestyle=style) for _, _, style in PERCENTILES]
        second = axes.legend(
            by_style,
            [name for _, name, _ in PERCENTILES],
            loc="lower left",
            bbox_to_anchor=(1.01, 0.0),
            fontsize="small",
        )
        figure.savefig(str(path), bbox_inches="tight", bbox_extra_artists=[first, second])
        return [str(line.get_label()) for line in axes.get_lines()]
    finally:
        pyplot.close(figure)


def draw_reports(
    paths: Sequence[str | Path],
    out: str | Path,
    title: str | None = None,
    log_x: bool | None = None,
) -> str:
    """Loads the reports, draws them into ``out``; returns a one-line summary."""
    series = series_of([load_report(path) for path in paths])
    draw(series, out, title, log_x)
    return f"wrote {out}: {', '.join(one.label for one in series)}"


@click.command()
@click.argument("reports", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False))
@click.option("--title", default=None)
@click.option(
    "--log-x/--linear-x",
    default=None,
    help="Throughput axis scale (default: log when the rates span 10x or more).",
)
def main(reports: tuple[str, ...], out: str, title: str | None, log_x: bool | None) -> None:
    """Draws the latency-versus-throughput curve of one or more JSON reports."""
    try:
        click.echo(draw_reports(reports, out, title, log_x), err=True)
    except CurveError as error:
        raise click.ClickException(str(error)) from error


if __name__ == "__main__":
    main()
