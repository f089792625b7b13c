"""The report's figures, drawn with matplotlib and kept as inline SVG text.

Text stays text (`svg.fonttype = none`: the reader's own sans-serif font, nothing embedded or
fetched), and every plotted point or bar is its own SVG group with an id (`<figure>-point-<i>`,
`<figure>-bar-<i>`), so a browser test can count what was drawn. Each figure gets its own
hash salt, so the ids matplotlib writes never collide between figures on one page.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass

PUBLISHED = "#b45f06"  # the published estimate: orange, hollow
OURS = "#1f4e79"  # the federated estimate: NHS-like dark blue, filled
POOLED = "#2d6a4f"
GREY = "#6b6b6b"


@dataclass
class Figure:
    """One figure: its SVG, its caption, and how many points and bars it holds."""

    id: str
    svg: str
    caption: str
    points: int = 0
    bars: int = 0


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


class _Canvas:
    """A matplotlib figure that numbers its points and bars and renders to SVG text."""

    def __init__(self, figure_id: str, width: float, height: float):
        plt = _pyplot()
        self.id = figure_id
        self.points = 0
        self.bars = 0
        self.style = {
            "svg.fonttype": "none",
            "svg.hashsalt": figure_id,
            "font.family": "sans-serif",
            "font.size": 9,
            "axes.spines.top": False,
            "axes.spines.right": False,
        }
        with plt.rc_context(self.style):
            self.fig, self.ax = plt.subplots(figsize=(width, height))

    def point(self, ax, x, y, *, color=OURS, hollow=False, marker="s", size=5, xerr=None, yerr=None, label=None):
        """One estimate with its interval: a marker and its whiskers, grouped under one id."""
        kwargs = {"fmt": marker, "color": color, "markersize": size, "capsize": 0, "elinewidth": 1.2}
        if hollow:
            kwargs["markerfacecolor"] = "white"
        container = ax.errorbar([x], [y], xerr=xerr, yerr=yerr, label=label, **kwargs)
        gid = f"{self.id}-point-{self.points}"
        for artist in container.lines[0:1]:
            artist.set_gid(gid)
        self.points += 1
        return container

    def bar(self, patch):
        patch.set_gid(f"{self.id}-bar-{self.bars}")
        self.bars += 1

    def svg(self) -> str:
        plt = _pyplot()
        buffer = io.StringIO()
        with plt.rc_context(self.style):
            self.fig.tight_layout()
            self.fig.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None})
        plt.close(self.fig)
        text = buffer.getvalue()
        text = text[text.index("<svg") :]  # drop the XML declaration and DOCTYPE for inline use
        text = re.sub(r"\s*<metadata>.*?</metadata>", "", text, count=1, flags=re.S)
        # Scale with the page: drop the fixed size, keep the viewBox.
        text = re.sub(r'<svg([^>]*?) width="[^"]*" height="[^"]*"', r'<svg\1 class="figure" role="img"', text, count=1)
        return text


def _log_axis(ax, lows, highs, reference=1.0):
    finite = [v for v in [*lows, *highs] if v is not None and v > 0 and math.isfinite(v)]
    if not finite:
        return
    lo, hi = min(*finite, reference), max(*finite, reference)
    pad = (math.log(hi) - math.log(lo)) * 0.08 or 0.1
    ax.set_xscale("log")
    ax.set_xlim(math.exp(math.log(lo) - pad), math.exp(math.log(hi) + pad))
    ax.axvline(reference, color=GREY, linewidth=0.8, linestyle="--")
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    left, right = ax.get_xlim()
    ticks = [t for t in NICE_RATIOS if left <= t <= right]
    while len(ticks) > 8:
        ticks = ticks[::2] if reference not in ticks[::2] else ticks[::2]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])


# Round ratios to label a log axis with.
NICE_RATIOS = [
    0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0,
    1.1, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 10.0, 20.0, 50.0, 100.0,
]  # fmt: skip


def forest(figure_id: str, rows: list[dict], *, xlabel: str, caption: str, published: bool = False) -> Figure:
    """Ratios with 95% intervals on a log axis, one row each (top to bottom as given).
    rows: {label, ratio, low, high} and, with `published`, {paper, paper_low, paper_high}
    drawn just below in a hollow marker."""
    height = 0.9 + 0.32 * len(rows) * (1.6 if published else 1.0)
    canvas = _Canvas(figure_id, 7.0, height)
    ax = canvas.ax
    lows, highs, ticks, labels = [], [], [], []
    for i, row in enumerate(rows):
        y = -i
        ticks.append(y)
        labels.append(row["label"])
        if row.get("ratio") is not None:
            err = [[row["ratio"] - row["low"]], [row["high"] - row["ratio"]]]
            pooled = row.get("pooled", False)
            canvas.point(
                ax,
                row["ratio"],
                y + (0.15 if published else 0),
                xerr=err,
                color=POOLED if pooled else OURS,
                marker="D" if pooled else "s",
                size=6 if pooled else 5,
            )
            lows.append(row["low"])
            highs.append(row["high"])
        if published and row.get("paper") is not None:
            err = [[row["paper"] - row["paper_low"]], [row["paper_high"] - row["paper"]]]
            canvas.point(ax, row["paper"], y - 0.2, xerr=err, color=PUBLISHED, hollow=True, marker="o")
            lows.append(row["paper_low"])
            highs.append(row["paper_high"])
    ax.set_yticks(ticks, labels)
    ax.set_ylim(-len(rows) + 0.4, 0.6)
    ax.spines["left"].set_visible(False)
    ax.tick_params(axis="y", length=0)
    _log_axis(ax, lows, highs)
    ax.set_xlabel(xlabel)
    if published:
        from matplotlib.lines import Line2D

        ax.legend(
            handles=[
                Line2D([], [], marker="s", color=OURS, linestyle="", label="iaptnet (federated)"),
                Line2D([], [], marker="o", color=PUBLISHED, markerfacecolor="white", linestyle="", label="published"),
            ],
            loc="lower center",
            bbox_to_anchor=(0.5, 1.0),
            ncol=2,
            frameon=False,
        )
    return Figure(figure_id, canvas.svg(), caption, points=canvas.points)


def horizontal_bars(figure_id: str, labels: list[str], values: list, *, xlabel: str, caption: str) -> Figure:
    """One bar per row (a funnel's steps); None draws no bar (suppressed)."""
    canvas = _Canvas(figure_id, 7.0, 0.8 + 0.38 * len(labels))
    ax = canvas.ax
    for i, value in enumerate(values):
        if value is None:
            continue
        (patch,) = ax.barh([-i], [value], color=OURS, height=0.6).patches
        canvas.bar(patch)
        ax.text(value, -i, f" {value:,.0f}", va="center", fontsize=8)
    ax.set_yticks([-i for i in range(len(labels))], labels)
    ax.set_xlabel(xlabel)
    ax.set_xlim(0, max([v for v in values if v is not None] or [1]) * 1.18)
    ax.xaxis.set_major_formatter(_thousands())
    return Figure(figure_id, canvas.svg(), caption, bars=canvas.bars)


def _thousands():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _: f"{v:,.0f}")


def love_plot(figure_id: str, rows: list[dict], *, threshold: float, caption: str) -> Figure:
    """Absolute standardised mean differences before (hollow) and after (filled) matching or
    weighting, one row per term, with the balance threshold marked."""
    canvas = _Canvas(figure_id, 7.0, 1.0 + 0.2 * len(rows))
    ax = canvas.ax
    for i, row in enumerate(rows):
        y = -i
        if row.get("before") is not None:
            canvas.point(ax, abs(row["before"]), y, color=PUBLISHED, hollow=True, marker="o", size=4)
        if row.get("after") is not None:
            canvas.point(ax, abs(row["after"]), y, color=OURS, marker="s", size=4)
    ax.axvline(threshold, color=GREY, linewidth=0.8, linestyle="--")
    ax.set_yticks([-i for i in range(len(rows))], [r["label"] for r in rows], fontsize=7)
    ax.set_ylim(-len(rows) + 0.4, 0.6)
    ax.set_xlabel("absolute standardised mean difference (hollow: before, filled: after)")
    ax.set_xlim(left=0)
    return Figure(figure_id, canvas.svg(), caption, points=canvas.points)


def rates(figure_id: str, rows: list[dict], *, xlabel: str, caption: str) -> Figure:
    """Rates with 95% intervals, one row per group level (linear axis from zero)."""
    canvas = _Canvas(figure_id, 7.0, 0.8 + 0.3 * len(rows))
    ax = canvas.ax
    for i, row in enumerate(rows):
        if row.get("rate") is None:
            continue
        err = [[row["rate"] - row["low"]], [row["high"] - row["rate"]]]
        canvas.point(ax, row["rate"], -i, xerr=err, color=OURS)
    ax.set_yticks([-i for i in range(len(rows))], [r["label"] for r in rows])
    ax.set_ylim(-len(rows) + 0.4, 0.6)
    ax.set_xlim(left=0)
    ax.set_xlabel(xlabel)
    ax.xaxis.set_major_formatter(_thousands())
    return Figure(figure_id, canvas.svg(), caption, points=canvas.points)


def its_panels(figure_id: str, panels: list[dict], *, caption: str, ylabel: str) -> Figure:
    """One small panel per service: the observed rate month by month (points), the fitted
    rate (line) and the change (a vertical line). panels: {label, months, fitted, change,
    observed: [(month, rate), ...]}."""
    plt = _pyplot()
    columns = 2 if len(panels) > 1 else 1
    nrows = math.ceil(len(panels) / columns)
    canvas = _Canvas(figure_id, 7.0, 0.4 + 1.7 * nrows)
    plt.close(canvas.fig)
    with plt.rc_context(canvas.style):
        canvas.fig, axes = plt.subplots(nrows, columns, figsize=(7.0, 0.4 + 1.7 * nrows), sharex=True, squeeze=False)
    axes = axes.ravel()
    for ax, panel in zip(axes, panels):
        for month, rate in panel.get("observed") or []:
            canvas.point(ax, month, rate, color=GREY, marker="o", size=2.5)
        ax.plot(panel["months"], panel["fitted"], color=OURS, linewidth=1.4)
        if panel.get("change") is not None:
            ax.axvline(panel["change"], color=PUBLISHED, linewidth=1, linestyle="--")
        ax.set_title(panel["label"], fontsize=9)
        ax.set_ylim(bottom=0)
        ax.spines["top"].set_visible(False)
        ax.spines["right"].set_visible(False)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    canvas.fig.supylabel(ylabel, fontsize=9)
    canvas.fig.supxlabel("months since the start of the series", fontsize=9)
    return Figure(figure_id, canvas.svg(), caption, points=canvas.points)
