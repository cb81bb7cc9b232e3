"""The bench report's figures, laid out for suites of many runs (17 and more).

One legend for 17 runs repeats colours (matplotlib's cycle has 10) and hides the data behind it, so no
figure here has a legend: runs are named on the axis (one dot-plot panel per metric, the runs as rows,
the same order in every panel), next to their point (labels nudged apart so they do not overlap), or in
the title of their own small panel (loss and metric curves, confusion matrices). Colours come from the
Okabe-Ito palette (distinguishable with the common colour-vision deficiencies) and each run also gets a
marker shape; 8 colours x 7 markers give 56 distinct styles before one repeats.

Every function takes the report's `Table` and returns a base64 PNG (or None when the artefacts hold
nothing to draw), and reads only artefacts and their `*.metrics.jsonl` logs.
"""

from __future__ import annotations

import base64
import io
import json
import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from leantune.bench.artefact import metrics_path

#: Okabe & Ito (2008), "Color Universal Design"; yellow last (it is faint on white), black before it
OKABE_ITO = ("#E69F00", "#56B4E9", "#009E73", "#0072B2", "#D55E00", "#CC79A7", "#000000", "#F0E442")
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
MiB = 2**20
DPI = 110


def run_style(index: int) -> tuple[str, str]:
    """(colour, marker) of the run at `index` in suite order: unique for the first 56 runs."""
    return OKABE_ITO[index % len(OKABE_ITO)], MARKERS[index % len(MARKERS)]


def png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _finish(plt, fig) -> str:
    out = png(fig)
    plt.close(fig)
    return out


def _fmt(value: float) -> str:
    a = abs(value)
    return (
        f"{value:.0f}"
        if a >= 100
        else f"{value:.1f}"
        if a >= 10
        else f"{value:.2f}"
        if a >= 1
        else f"{value:.3f}"
    )


# -- one dot-plot panel per metric ------------------------------------------------------------------


def metric_panels(table, plt, panels: list[tuple[str, Callable[[dict], float | None]]]) -> str | None:
    """Small multiples: one panel per metric, the runs as rows (suite order, top to bottom) labelled on
    the axis; each repeat a hollow marker, the median a filled one with its value written beside it."""
    panels = [(t, g) for t, g in panels if any(table.values(i, g) for i in table.ids)]
    if not panels:
        return None
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    height = 0.6 + 0.26 * len(table.ids)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols + 1.5, height * nrows), squeeze=False)
    ys = list(range(len(table.ids)))[::-1]
    for k, (title, get) in enumerate(panels):
        ax = axes[k // ncols][k % ncols]
        for n, (run_id, y) in enumerate(zip(table.ids, ys, strict=True)):
            colour, marker = run_style(n)
            values = table.values(run_id, get)
            if not values:
                continue
            med = statistics.median(values)
            if len(values) > 1:
                ax.scatter(
                    values, [y] * len(values), facecolors="none", edgecolors=colour, marker=marker, s=22
                )
            ax.scatter(
                [med], [y], color=colour, marker=marker, s=36, edgecolors="0.2", linewidths=0.4, zorder=3
            )
            ax.annotate(_fmt(med), (med, y), xytext=(6, -3), textcoords="offset points", fontsize=7)
        ax.set_yticks(ys)
        ax.set_yticklabels(table.ids if k % ncols == 0 else [], fontsize=8)
        ax.set_ylim(-0.7, len(ys) - 0.3)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        ax.margins(x=0.18)
        ax.tick_params(axis="x", labelsize=8)
    for k in range(len(panels), nrows * ncols):
        axes[k // ncols][k % ncols].set_visible(False)
    fig.tight_layout()
    return _finish(plt, fig)


# -- scatter plots with direct labels -----------------------------------------------------------------


def direct_labels(
    ax, points: list[tuple[float, float, str]], fontsize: float = 7, obstacles: list[tuple[float, float]] = ()
) -> None:
    """Write each label beside its point, nudged up or down (with a thin leader line) until it overlaps
    no marker and no label already placed and stays inside the axes: a greedy placement in screen space,
    enough for a few dozen runs (a label that finds no free place keeps the last one tried)."""
    fig = ax.figure
    fig.canvas.draw()
    scale = 72.0 / fig.dpi  # screen pixels -> points (offsets in points survive savefig's dpi)
    x0, y0, x1, y1 = (v * scale for v in ax.get_window_extent().extents)
    height = fontsize * 1.35
    finite = [(x, y, t) for x, y, t in points if math.isfinite(x) and math.isfinite(y)]
    screen = [tuple(v * scale for v in ax.transData.transform((x, y))) for x, y, _ in finite]
    marks = screen + [tuple(v * scale for v in ax.transData.transform(o)) for o in obstacles]
    placed: list[tuple[float, float, float, float]] = [(px - 4, py - 4, px + 4, py + 4) for px, py in marks]
    for (x, y, text), (px, py) in sorted(zip(finite, screen, strict=True), key=lambda p: -p[1][1]):
        width = 0.6 * fontsize * len(text)
        dx = 6.0 if px + 6 + width <= x1 else -6.0 - width  # near the right edge: left of the point
        for step in range(40):
            dy = (1 if step % 2 else -1) * ((step + 1) // 2) * height * 0.8
            box = (px + dx, py + dy - height / 2, px + dx + width, py + dy + height / 2)
            inside = box[1] >= y0 and box[3] <= y1 and box[0] >= x0 and box[2] <= x1
            if inside and not any(_overlap(box, other) for other in placed):
                break
        else:  # no free place: beside the point, where it reads best among the overlaps
            dy = 0.0
            box = (px + dx, py - height / 2, px + dx + width, py + height / 2)
        placed.append(box)
        ax.annotate(
            text,
            (x, y),
            xytext=(dx, dy),
            textcoords="offset points",
            fontsize=fontsize,
            va="center",
            arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "0.55"} if abs(dy) > height / 2 else None,
        )


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


Getter = Callable[[dict], float | None]


def scatter_panels(table, plt, panels: list[tuple[str, Getter, str, Getter]]) -> str | None:
    """One panel per (x label, x, y label, y); each run's repeats in its style, named at its median."""
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.6), squeeze=False)
    drawn = False
    named = []
    for ax, (xlabel, get_x, ylabel, get_y) in zip(axes[0], panels, strict=True):
        labels, marks = [], []
        for n, run_id in enumerate(table.ids):
            colour, marker = run_style(n)
            runs = [a for a in table.by_id[run_id].values() if get_y(a) is not None and get_x(a) is not None]
            if not runs:
                continue
            px, py = [get_x(a) for a in runs], [get_y(a) for a in runs]
            ax.scatter(px, py, color=colour, marker=marker, s=34, edgecolors="0.2", linewidths=0.4)
            # named at its rightmost repeat (the label then sits beside the group, not inside it)
            labels.append((max(px), statistics.median(py), run_id))
            marks += list(zip(px, py, strict=True))
            drawn = True
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.margins(x=0.25, y=0.12)
        named.append((ax, labels, marks))
    if not drawn:
        plt.close(fig)
        return None
    fig.tight_layout()  # first: labels are placed in the final screen positions
    for ax, labels, marks in named:
        direct_labels(ax, labels, obstacles=marks)
    return _finish(plt, fig)


# -- per-run curves -----------------------------------------------------------------------------------


def read_log(folder: Path, key: str) -> list[dict]:
    path = metrics_path(folder, key)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a kill
        if isinstance(rec, dict) and isinstance(rec.get("step"), (int, float)):
            records.append(rec)
    return records


def curve_panels(table, plt, folder: Path) -> str | None:
    """Small multiples, one panel per run: training loss (its colour, left axis; every repeat) and the
    validation metric (black squares, right axis, same range in every panel), titled with the run id."""
    logs = {i: {k: read_log(folder, f"{i}-r{k}") for k in sorted(table.by_id[i])} for i in table.ids}
    ids = [i for i in table.ids if any(logs[i].values())]
    if not ids:
        return None
    metric = table.metric
    vals = [
        r[metric] for i in ids for recs in logs[i].values() for r in recs if r.get("split") and metric in r
    ]
    ncols = min(4, len(ids))
    nrows = math.ceil(len(ids) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 2.5 * nrows), squeeze=False)
    for k, run_id in enumerate(ids):
        ax = axes[k // ncols][k % ncols]
        colour, _ = run_style(table.ids.index(run_id))
        right = ax.twinx() if vals else None
        for rep, recs in logs[run_id].items():
            train = [
                (r["step"], r["loss"])
                for r in recs
                if "split" not in r and isinstance(r.get("loss"), (int, float))
            ]
            evals = [(r["step"], r[metric]) for r in recs if r.get("split") == "validation" and metric in r]
            alpha = 1.0 if rep == min(logs[run_id]) else 0.35
            if train:
                ax.plot(*zip(*train, strict=True), color=colour, alpha=alpha, lw=1.3)
            if evals and right is not None:
                right.plot(
                    *zip(*evals, strict=True), color="black", marker="s", ms=3, lw=0.8, ls="--", alpha=alpha
                )
        if right is not None:
            lo, hi = min(vals), max(vals)
            pad = 0.05 * (hi - lo or 1)
            right.set_ylim(lo - pad, hi + pad)
            right.tick_params(labelsize=7)
            if k % ncols != ncols - 1 and k != len(ids) - 1:
                right.set_yticklabels([])
        ax.set_title(run_id, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for k in range(len(ids), nrows * ncols):
        axes[k // ncols][k % ncols].set_visible(False)
    what = f"; black squares: validation {metric} (right axis)" if vals else ""
    fig.suptitle(f"Per run: training loss (left axis){what}", fontsize=10)
    fig.tight_layout()
    return _finish(plt, fig)


# -- confusion matrices ---------------------------------------------------------------------------------


def confusion_of(artefact: dict) -> tuple[list[str], list[list[int]], bool] | None:
    """(labels, counts[true][pred], derived) of a classification run: recorded by the run, or, for a
    binary run whose artefact predates that, derived exactly from its test accuracy, precision and recall
    of class 1 and the test row count (checked by recomputing all three), else None."""
    recorded = (artefact.get("metrics") or {}).get("confusion")
    if recorded:
        return list(recorded["labels"]), recorded["matrix"], False
    test = artefact["metrics"]["test"]
    names = (artefact.get("config") or {}).get("data", {}).get("label_names") or []
    n = (artefact.get("data") or {}).get("test")
    acc, p, r = test.get("accuracy"), test.get("precision"), test.get("recall")
    if artefact.get("task") != "classification" or len(names) != 2 or not n or None in (acc, p, r):
        return None
    if not (0 < p < 1 and 0 < r < 1):
        return None  # the counts are not determined by these three numbers
    tp = round(n * (1 - acc) / ((1 / p - 1) + (1 / r - 1)))
    fp, fn = round(tp / p) - tp, round(tp / r) - tp
    tn = n - tp - fp - fn
    if min(tp, fp, fn, tn) < 0:
        return None
    again = ((tp + tn) / n, tp / (tp + fp), tp / (tp + fn))
    if any(abs(a - b) > 1e-6 for a, b in zip(again, (acc, p, r), strict=True)):
        return None
    return names, [[tn, fp], [fn, tp]], True


def confusion_panels(table, plt) -> tuple[str | None, bool]:
    """Small multiples of the test confusion matrices (first repeat), rows normalised for the colour,
    counts written in the cells; returns the PNG and whether any matrix was derived rather than recorded."""
    found = [(i, c) for i in table.ids if (c := confusion_of(table.first(i)))]
    if not found:
        return None, False
    size = max(len(c[0]) for _, c in found)
    ncols = min(5 if size <= 3 else 3, len(found))
    nrows = math.ceil(len(found) / ncols)
    side = 1.1 + 0.42 * size
    fig, axes = plt.subplots(nrows, ncols, figsize=(side * ncols + 0.5, (side + 0.4) * nrows), squeeze=False)
    derived_any = False
    for k, (run_id, (labels, matrix, derived)) in enumerate(found):
        ax = axes[k // ncols][k % ncols]
        derived_any |= derived
        rows = [[v / max(sum(row), 1) for v in row] for row in matrix]
        ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
        for t, row in enumerate(matrix):
            for q, count in enumerate(row):
                ax.text(
                    q,
                    t,
                    str(count),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if rows[t][q] > 0.6 else "black",
                )
        short = [lab[:8] for lab in labels]
        ax.set_xticks(range(len(labels)), short, fontsize=6, rotation=45 if len(labels) > 2 else 0)
        ax.set_yticks(range(len(labels)), short, fontsize=6)
        ax.set_title(run_id + (" *" if derived else ""), fontsize=8)
        if k % ncols == 0:
            ax.set_ylabel("true", fontsize=7)
        if k // ncols == nrows - 1:
            ax.set_xlabel("predicted", fontsize=7)
    for k in range(len(found), nrows * ncols):
        axes[k // ncols][k % ncols].set_visible(False)
    fig.tight_layout()
    return _finish(plt, fig), derived_any


def tokens_k(a: dict[str, Any]) -> float:
    """Thousands of tokens a run trained on (its rate times its training time)."""
    return a["tokens_per_s"] * a["train_time_s"] / 1e3
