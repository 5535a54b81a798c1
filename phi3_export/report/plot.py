"""The report's accuracy-vs-size plot: points per artifact and provider, the Pareto front, labels kept inside."""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass

from phi3_export.report.records import Row

# marker and legend text per provider; a float (unquantized) export is drawn as a star whatever its provider
PROVIDER_STYLE = {
    "cpu": ("o", "onnxruntime CPU"),
    "dml": ("s", "onnxruntime DirectML"),
    "xnnpack": ("^", "onnxruntime XNNPACK"),
    "nnapi": ("v", "onnxruntime NNAPI"),
    "qnn": ("P", "onnxruntime QNN"),
    "coreml": ("h", "Core ML on device"),
    "mil-reader": ("D", "Core ML program read in numpy (mil-reader), not Core ML"),
    "coreai": ("p", "Core AI runtime (on Linux: Apple's CPU reference)"),
}
OTHER_PROVIDER = ("X", "other provider")
FLOAT_MARKER = "*"
RED, BLUE = "tab:red", "tab:blue"
LOG_SPAN = 10.0  # an axis goes logarithmic only when its values span more than one decade


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points no other point beats on both axes (smaller x and smaller y are better)."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any((x2 <= x and y2 <= y) and (x2 < x or y2 < y) for j, (x2, y2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return front


# ---- the plot ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlotPoint:
    artifact: str
    provider: str | None
    label: str
    x: float
    y: float
    float_bits: int | None  # 16/32 for an unquantized export, else None


def float_bits(row: Row) -> int | None:
    bits = (row.settings or {}).get("bits")
    return bits if bits in (16, 32) else None


def short_name(row: Row) -> str:
    """The artifact's name without its recipe's (phi-3-mini-4k-rtn-w4g32s-onnx-cpu -> rtn-w4g32s-onnx-cpu)."""
    if row.recipe and row.artifact.startswith(row.recipe + "-") and len(row.artifact) > len(row.recipe) + 1:
        return row.artifact[len(row.recipe) + 1 :]
    return row.artifact


def plot_series(rows: list[Row]) -> list[PlotPoint]:
    """One point per artifact with a mean KLD: its first measured provider by name (cpu before dml, ...)."""
    seen, chosen = set(), []
    for r in sorted(rows, key=lambda r: (r.artifact, r.provider or "")):
        if r.status != "ok" or r.kld_mean is None or r.artifact in seen:
            continue
        seen.add(r.artifact)
        chosen.append(r)
    out = []
    for r in chosen:
        x = r.bits_per_weight if r.bits_per_weight is not None else (r.size_bytes or 0) / 1e6
        label = short_name(r)
        if r.provider and r.provider not in label.split("-"):
            label += f" [{r.provider}]"
        out.append(PlotPoint(r.artifact, r.provider, label, x, r.kld_mean, float_bits(r)))
    return out


@dataclass(frozen=True)
class BudgetCurve:
    """Artifacts that share everything but their size budget (quant/budget.py): one line, by size."""

    label: str  # the method, plus what tells two curves apart when methods repeat
    points: tuple[PlotPoint, ...]  # by x


CURVE_COLOURS = ("tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")


def _curve_key(row: Row) -> str | None:
    settings = row.settings or {}
    if not settings.get("mix"):
        return None
    rest = {k: v for k, v in settings.items() if k != "mix"}
    return json.dumps([row.recipe, row.format, row.target, row.provider, rest], sort_keys=True, default=str)


def budget_curves(rows: list[Row]) -> list[BudgetCurve]:
    """Plotted artifacts whose settings carry a size budget's mix, grouped by everything else in
    their settings (method, bits, symmetry, accuracy level, overrides) and by recipe, format,
    target and provider; groups of two or more are curves."""
    by_artifact = {(r.artifact, r.provider): r for r in rows}
    groups: dict[str, list[PlotPoint]] = {}
    for p in plot_series(rows):
        key = _curve_key(by_artifact[(p.artifact, p.provider)])
        if key is not None:
            groups.setdefault(key, []).append(p)
    curves = [(json.loads(key), sorted(points, key=lambda p: p.x)) for key, points in groups.items() if len(points) >= 2]
    methods = [str(key[4].get("method", "?")) for key, _ in curves]
    out = []
    for (key, points), label in zip(curves, methods):
        recipe, fmt, target, provider, settings = key
        if methods.count(label) > 1:  # the same method twice: say what differs
            extra = [recipe, f"{fmt}-{target}" if target else fmt, provider,
                     None if settings.get("symmetric", True) else "asym", f"level {settings.get('accuracy_level')}"]
            label += " (" + ", ".join(str(e) for e in extra if e) + ")"
        out.append(BudgetCurve(label, tuple(points)))
    return sorted(out, key=lambda c: c.label)


def plot_points(rows: list[Row]) -> list[tuple[str, float, float]]:
    """(artifact, bits/weight or MB, KLD) per plotted artifact (report.json's "plot")."""
    return [(p.artifact, p.x, p.y) for p in plot_series(rows)]


def _limits(values: list[float], pad: float, log: bool) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if log:
        a, b = math.log10(lo), math.log10(hi)
        span = max(b - a, 0.5)
        return 10 ** (a - pad * span), 10 ** (b + pad * span)
    span = hi - lo if hi > lo else max(abs(hi) * 0.2, 1e-12)
    return lo - pad * span, hi + pad * span


def _scaled_formatter(top: float):
    """Linear tick labels without a detached offset text: (formatter, ' (×10⁻³)')."""
    from matplotlib.ticker import FuncFormatter

    exponent = math.floor(math.log10(top)) if top > 0 else 0
    if -2 <= exponent <= 3:
        return FuncFormatter(lambda v, _: f"{v:g}"), ""
    scale = 10.0 ** exponent
    return FuncFormatter(lambda v, _: f"{v / scale:.3g}" if abs(v) > scale * 1e-9 else "0"), f" (×10$^{{{exponent}}}$)"


def _log_formatter():
    from matplotlib.ticker import FuncFormatter

    def fmt(v, _):
        e = math.floor(math.log10(v) + 1e-9)
        m = v / 10**e
        return f"$10^{{{e}}}$" if abs(m - 1) < 1e-6 else f"${m:g}\\times10^{{{e}}}$"

    return FuncFormatter(fmt)


# label offsets (points) tried around a marker, nearest first: (dx, dy, ha, va)
_NEAR = [(8, 0, "left", "center"), (-8, 0, "right", "center"), (0, 9, "center", "bottom"), (0, -9, "center", "top"),
         (7, 7, "left", "bottom"), (7, -7, "left", "top"), (-7, 7, "right", "bottom"), (-7, -7, "right", "top")]
_FAR = [(dx, sign * (9 + 13 * k), ha, "bottom" if sign > 0 else "top")
        for k in range(1, 6) for sign in (1, -1) for dx, ha in ((0, "center"), (8, "left"), (-8, "right"))]


def _inside(box, frame, margin: float = 2.0) -> bool:
    return (box.x0 >= frame.x0 + margin and box.x1 <= frame.x1 - margin and box.y0 >= frame.y0 + margin
            and box.y1 <= frame.y1 - margin)


def _overlap(a, b) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def _outside(box, frame) -> float:
    return (max(0, frame.x0 - box.x0) + max(0, box.x1 - frame.x1)) * box.height + (
        max(0, frame.y0 - box.y0) + max(0, box.y1 - frame.y1)) * box.width


def _place_labels(fig, ax, points: list[PlotPoint], drawn_y: list[float]) -> list[bool]:
    """Annotate every point where its label lies inside the axes, clear of markers and other labels."""
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    centers = [ax.transData.transform((p.x, y)) for p, y in zip(points, drawn_y)]
    markers = [Bbox.from_extents(cx - 8, cy - 8, cx + 8, cy + 8) for cx, cy in centers]
    placed, fits = [], []
    # crowded points first: the ones with the most neighbours get the best spots
    order = sorted(range(len(points)), key=lambda i: (-sum(abs(centers[i][0] - c[0]) < 150 for c in centers), points[i].x))
    for i in order:
        p, y = points[i], drawn_y[i]
        best = None
        for dx, dy, ha, va in _NEAR + _FAR:
            far = (dx, dy, ha, va) in _FAR
            ann = ax.annotate(p.label, (p.x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va, fontsize=8,
                              color="0.1", zorder=5, gid=f"label-{p.artifact}",
                              arrowprops={"arrowstyle": "-", "color": "0.55", "lw": 0.6, "shrinkA": 0, "shrinkB": 5} if far else None,
                              bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8})
            ann.update_positions(renderer)
            box = Text.get_window_extent(ann, renderer)
            clash = sum(_overlap(box, b) for b in placed) + sum(_overlap(box, m) for j, m in enumerate(markers) if j != i)
            cost = (not _inside(box, frame), _outside(box, frame), clash > 0, clash, far)
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, ann, box)
            else:
                ann.remove()
            if not cost[0] and not cost[2]:
                break
        placed.append(best[2])
        fits.append(not best[0][0])
    return fits


def plot_figure(rows: list[Row], subtitle: str | None = None):
    """(figure, axes, facts): the accuracy-vs-size plot, labels inside the frame, legend below it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator

    points = plot_series(rows)
    use_bits = all(r.bits_per_weight is not None for r in rows if r.status == "ok")
    front = set(pareto([(p.x, p.y) for p in points]))
    providers = {p.provider for p in points if not p.float_bits}
    entries = bool(front) + (len(front) < len(points)) + any(p.float_bits for p in points) + len(providers) + len(budget_curves(rows))
    legend_rows = math.ceil(entries / 2) if entries > 2 else entries
    # pixels at 100 dpi: title 70, axes 380, tick labels and x label 50, legend 21 a row
    top, plot, below = 70, 380, 52 + 21 * legend_rows + 8
    height = top + plot + below
    fig = plt.figure(figsize=(9.6, height / 100), dpi=100)
    ax = fig.add_axes((0.085, below / height, 0.895, plot / height))

    ys = [p.y for p in points]
    quantized = [p.y for p in points if p.float_bits is None and p.y > 0]
    y_log = bool(quantized) and max(quantized) / min(quantized) > LOG_SPAN
    floor = None
    if y_log:
        floor = min(quantized) / 10  # a float export's ~1e-13 would squash the quantized points: drawn on the floor
        drawn_y = [max(y, floor) for y in ys]
        ylim = _limits(drawn_y, 0.12, True)
    else:
        top = max(ys, default=0) or 1.0
        drawn_y = ys
        ylim = (-0.06 * top, 1.32 * top)
    xs = [p.x for p in points]
    x_log = bool(xs) and min(xs) > 0 and max(xs) / min(xs) > LOG_SPAN
    xlim = _limits(xs, 0.10, x_log) if xs else (0, 1)

    points = [PlotPoint(p.artifact, p.provider, f"{p.label} (KLD {p.y:.1g})", p.x, p.y, p.float_bits) if y != p.y else p
              for p, y in zip(points, drawn_y)]
    seen_providers = []
    for i, (p, y) in enumerate(zip(points, drawn_y)):
        colour = RED if i in front else BLUE
        if p.float_bits:
            marker, size = FLOAT_MARKER, 190
        else:
            marker, size = PROVIDER_STYLE.get(p.provider, OTHER_PROVIDER)[0], 55
            if p.provider not in seen_providers:
                seen_providers.append(p.provider)
        ax.scatter([p.x], [y], marker=marker, s=size, color=colour, edgecolors="white", linewidths=0.6, zorder=4,
                   gid=f"point-{p.artifact}")
    if len(front) > 1:
        line = sorted((points[i].x, drawn_y[i]) for i in front)
        ax.plot([q[0] for q in line], [q[1] for q in line], color="0.55", linewidth=1, linestyle="--", zorder=2)
    # Size-budget sweeps: each one connected by size, its own colour, named by method in the legend.
    curves = budget_curves(rows)
    drawn_of = {(p.artifact, p.provider): y for p, y in zip(points, drawn_y)}
    curve_handles = []
    for k, curve in enumerate(curves):
        colour = CURVE_COLOURS[k % len(CURVE_COLOURS)]
        xs_c = [p.x for p in curve.points]
        ys_c = [drawn_of[(p.artifact, p.provider)] for p in curve.points]
        ax.plot(xs_c, ys_c, color=colour, linewidth=1.6, zorder=3, gid=f"curve-{curve.label}")
        curve_handles.append(Line2D([], [], color=colour, linewidth=1.6, label=f"size-budget sweep: {curve.label}"))

    if x_log:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    if y_log:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(_log_formatter())
        y_suffix = " (log scale)"
    else:
        ticks = [t for t in MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]).tick_values(0, ylim[1]) if 0 <= t <= ylim[1]]
        ax.yaxis.set_major_locator(FixedLocator(ticks))
        formatter, y_suffix = _scaled_formatter(max(ticks) if ticks else 1.0)
        ax.yaxis.set_major_formatter(formatter)
    if not x_log:
        ax.xaxis.set_major_locator(MaxNLocator(nbins=9, steps=[1, 2, 2.5, 5, 10]))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("bits per weight, whole artifact (8 × size on disk ÷ weights)" if use_bits else "size on disk (MB)",
                  fontsize=9.5)
    ax.set_ylabel("mean KL divergence from the reference" + y_suffix, fontsize=9.5)
    ax.tick_params(labelsize=8.5)
    ax.grid(True, alpha=0.3)
    title = "Accuracy vs size — lower is more accurate, left is smaller"
    fig.text(0.085, 1 - 30 / height, title, fontsize=12, weight="bold", va="bottom")
    if subtitle:
        fig.text(0.085, 1 - 55 / height, subtitle, fontsize=8.5, color="0.3", va="bottom")

    # limits, then labels; widen the frame where a label could not fit and place again
    fits = []
    for _ in range(6):
        ax.set_xlim(*xlim)
        ax.set_ylim(*ylim)
        for t in list(ax.texts):
            t.remove()
        fig.canvas.draw()
        fits = _place_labels(fig, ax, points, drawn_y)
        if all(fits):
            break
        xlim = _widen(xlim, 0.12, x_log)
        ylim = (ylim[0], ylim[1] + 0.15 * (ylim[1] - ylim[0])) if not y_log else (ylim[0], ylim[1] * 10**0.3)
    if not points:
        ax.text(0.5, 0.5, "nothing to plot: no artifact has a measured KLD here (see the results below)", ha="center",
                va="center", transform=ax.transAxes, fontsize=10, color="0.35", gid="empty")
        ax.set_xticks([])
        ax.set_yticks([])
    if floor is not None and any(p.float_bits and p.y < floor for p in points):
        ax.axhline(floor, color="0.6", linewidth=0.6, linestyle=":", zorder=1)

    handles = []
    if front:
        handles.append(Line2D([], [], color="0.55", linestyle="--" if len(front) > 1 else "", marker="o", markerfacecolor=RED, markeredgecolor=RED,
                              markersize=6, label="Pareto front (red): nothing else is smaller and more accurate"))
    if len(front) < len(points):
        handles.append(Line2D([], [], color=BLUE, linestyle="", marker="o", markersize=6, label="beaten on both size and KLD"))
    floats = sorted({p.float_bits for p in points if p.float_bits})
    if floats:
        below = ", drawn on the dotted floor" if floor is not None else ""
        handles.append(Line2D([], [], color="0.35", linestyle="", marker=FLOAT_MARKER, markersize=11,
                              label="/".join(f"fp{b}" for b in floats) + f" export: unquantized, KLD ≈ 0{below}"))
    for provider in seen_providers:
        marker, text = PROVIDER_STYLE.get(provider, OTHER_PROVIDER)
        handles.append(Line2D([], [], color="0.35", linestyle="", marker=marker, markersize=6.5,
                              label=f"run by {text}" if provider in PROVIDER_STYLE else f"run by {provider}"))
    handles += curve_handles
    legend = None
    if handles:
        legend = fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.53, 6 / height), ncol=2 if len(handles) > 2 else 1,
                            fontsize=8.5, frameon=False, handletextpad=0.5, columnspacing=1.6, borderaxespad=0.2)
    fig.canvas.draw()
    frame = ax.get_window_extent(fig.canvas.get_renderer())
    pixels_high = fig.get_figheight() * fig.dpi
    facts = {
        # the axes' frame in the PNG's pixels (left, top, right, bottom; origin top left)
        "frame_px": [round(frame.x0), round(pixels_high - frame.y1), round(frame.x1), round(pixels_high - frame.y0)],
        "x": {"label": ax.get_xlabel(), "scale": ax.get_xscale(), "limits": list(ax.get_xlim())},
        "y": {"label": ax.get_ylabel(), "scale": ax.get_yscale(), "limits": list(ax.get_ylim())},
        "labels_inside": all(fits), "legend": [h.get_label() for h in handles], "legend_artist": legend,
        # size-budget sweeps drawn as lines: their label and (artifact, x, KLD) points by size
        "curves": [{"label": c.label, "points": [[p.artifact, p.x, p.y] for p in c.points]} for c in curves],
    }
    return fig, ax, facts


def _widen(lim: tuple[float, float], frac: float, log: bool) -> tuple[float, float]:
    if log:
        a, b = math.log10(lim[0]), math.log10(lim[1])
        return 10 ** (a - frac * (b - a)), 10 ** (b + frac * (b - a))
    span = lim[1] - lim[0]
    return lim[0] - frac * span, lim[1] + frac * span


def render_plot(rows: list[Row], subtitle: str | None = None) -> tuple[bytes, dict]:
    """(PNG bytes, the plot's axes and legend entries for report.json)."""
    import matplotlib.pyplot as plt

    fig, _, facts = plot_figure(rows, subtitle)
    buf = io.BytesIO()
    # no timestamps in the PNG: the same records give the same bytes
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue(), {k: v for k, v in facts.items() if k != "legend_artist"}


def plot_png(rows: list[Row], subtitle: str | None = None) -> bytes:
    return render_plot(rows, subtitle)[0]


# ---- words shared by report.md and report.html -----------------------------------------------


def plot_subtitle(head: dict, rows: list[Row]) -> str | None:
    plotted = {p.artifact for p in plot_series(rows)}
    recipes = sorted({r.recipe for r in rows if r.artifact in plotted and r.recipe and short_name(r) != r.artifact})
    parts = []
    if recipes:
        parts.append(", ".join(recipes) + "-… artifacts")
    ppl = head.get("reference_perplexity") or []
    if len(ppl) == 1 and ppl[0].get("positions"):
        parts.append(f"KLD over {ppl[0]['positions']:,} positions of {ppl[0].get('eval_text')}"[:90])
    parts.append("marker shape = what ran it")
    return " · ".join(parts)
