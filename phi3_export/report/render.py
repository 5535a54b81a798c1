"""report.md (for a pull request), the accuracy-vs-size plot, report.html (self-contained, no scripts)."""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass

from phi3_export.report.context import FAIL, NOT_RUN, PASS, greedy_summary, settings_line
from phi3_export.report.gate import Finding
from phi3_export.report.records import Row

COLUMNS = (
    ("artifact", "artifact"), ("provider", "provider"), ("bits/w linear", "linear_bits_per_weight"),
    ("bits/w whole", "bits_per_weight"), ("size MB", "size_bytes"), ("ppl", "perplexity"),
    ("Δppl vs ref", "perplexity_change_pct"), ("KLD mean", "kld_mean"), ("KLD p99", "kld_p99"), ("top-1", "top1_agreement"),
    ("prefill tok/s", "prefill_tps"), ("decode tok/s", "decode_tps"), ("TTFT s", "ttft_s"), ("peak anon MB", "peak_rss_anon_mb"),
)
FIRST_MEASURED = 2  # COLUMNS[2:] are figures: a "not run" row says why there instead

BITS_NOTE = ("bits/w linear: the quantized linear weights alone, from the settings: the code bits plus one scale "
             "(fp32 on ONNX cpu/mobile, fp16 on dml and Core ML) and, when asymmetric (always on Core ML), one zero point "
             "per block. bits/w whole: 8 × size on disk ÷ all weights of the model, so the float embedding table, norms, "
             "RoPE tables, tokenizer and config files count too. Rows shorter than a block are padded to a whole block, "
             "which the linear figure does not count (tiny test models only).")
SMALL_MODEL_NOTE = ("On this {weights}-weight test model those float tensors and files dominate, so the whole-artifact "
                    "figure of a {bits}-bit artifact reads {low:.1f}–{high:.1f}; on a full-size model the linears are most "
                    "of the weights and it comes close to the linear figure.")
PPL_NOTE = "Δppl vs ref: the artifact's perplexity against the unquantized checkpoint's on the same ids."

# marker and legend text per provider; a float (unquantized) export is drawn as a star whatever its provider
PROVIDER_STYLE = {
    "cpu": ("o", "onnxruntime CPU"),
    "dml": ("s", "onnxruntime DirectML"),
    "xnnpack": ("^", "onnxruntime XNNPACK"),
    "nnapi": ("v", "onnxruntime NNAPI"),
    "qnn": ("P", "onnxruntime QNN"),
    "coreml": ("h", "Core ML on device"),
    "mil-reader": ("D", "Core ML program read in numpy (mil-reader), not Core ML"),
}
OTHER_PROVIDER = ("X", "other provider")
FLOAT_MARKER = "*"
RED, BLUE = "tab:red", "tab:blue"
LOG_SPAN = 10.0  # an axis goes logarithmic only when its values span more than one decade


def _cell(field: str, value) -> str:
    if value is None:
        return "-"
    formats = {
        "bits_per_weight": "{:.2f}", "linear_bits_per_weight": "{:.2f}", "perplexity": "{:.3f}",
        "perplexity_change_pct": "{:+.2f}%", "kld_mean": "{:.2e}", "kld_p99": "{:.2e}", "top1_agreement": "{:.3f}",
        "prefill_tps": "{:.1f}", "decode_tps": "{:.1f}", "ttft_s": "{:.3f}", "peak_rss_anon_mb": "{:.0f}",
    }
    if field == "size_bytes":
        return f"{value / 1e6:.2f}"
    return formats.get(field, "{}").format(value)


def _ordered(rows: list[Row]) -> list[Row]:
    """Artifacts by size, each artifact's measured providers first, its "not run" ones after."""
    size = {}
    for r in rows:
        size.setdefault(r.artifact, r.size_bytes or 0)
    return sorted(rows, key=lambda r: (size[r.artifact], r.artifact, r.status != "ok", r.provider or ""))


def table_rows(rows: list[Row]) -> list[list[str]]:
    """The measured rows' cells, smallest artifact first (report.md's and report.html's table)."""
    return [[_cell(f, getattr(r, f)) for _, f in COLUMNS] for r in _ordered(rows) if r.status == "ok"]


def not_run(rows: list[Row]) -> list[str]:
    return [f"{r.artifact} [{r.provider or '-'}]: {r.status}: {r.reason}" for r in rows if r.status != "ok"]


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


def _float_bits(row: Row) -> int | None:
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
        out.append(PlotPoint(r.artifact, r.provider, label, x, r.kld_mean, _float_bits(r)))
    return out


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
    entries = bool(front) + (len(front) < len(points)) + any(p.float_bits for p in points) + len(providers)
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


def bits_notes(rows: list[Row], weights: list) -> list[str]:
    notes = [BITS_NOTE]
    quantized = [r for r in rows if r.linear_bits_per_weight and r.bits_per_weight and _float_bits(r) is None]
    high = [r for r in quantized if r.bits_per_weight > 1.5 * r.linear_bits_per_weight]
    if high and weights:
        bits = sorted({(r.settings or {}).get("bits") for r in high})
        notes.append(SMALL_MODEL_NOTE.format(weights=f"{min(weights):,}", bits="/".join(map(str, bits)),
                                             low=min(r.bits_per_weight for r in high), high=max(r.bits_per_weight for r in high)))
    return notes


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


def header_items(head: dict) -> list[tuple[str, str]]:
    """(label, text) pairs for the report's header, in reading order."""
    def joined(values, empty="not recorded"):
        return "; ".join(map(str, values)) if values else empty

    models = [f"{m.get('checkpoint')} (sha256 {str(m.get('sha256') or '?')[:12]}…)" for m in head["model"]]
    weights = ", ".join(f"{w:,}" for w in head["weights"] if isinstance(w, int))
    model = joined(models) + (f", {weights} weights" if weights else "")
    ppl = [f"{p['perplexity']:.3f} on {p.get('eval_text')} ({p.get('eval_tokens'):,} tokens, window {p.get('window')}, "
           f"stride {p.get('stride')})" for p in head["reference_perplexity"]]
    return [
        ("Model", model),
        ("Recipe", joined(head["recipes"])),
        ("Settings", joined(head["settings"])),
        ("Reference perplexity", joined(ppl, "not measured (no artifact ran)")),
        ("Date", head.get("date") or "not recorded"),
        ("Machine", joined(head["machines"])),
        ("Versions", joined(head["versions"])),
        ("Records", joined(head["files"])),
    ]


def _fmt(value, spec: str, unit: str = "") -> str:
    return "-" if value is None else format(value, spec) + unit


def accuracy_line(record: dict) -> str | None:
    acc = record.get("accuracy")
    if not acc:
        return None
    line = (f"perplexity {_fmt(acc.get('perplexity_artifact'), '.3f')} vs reference {_fmt(acc.get('perplexity_reference'), '.3f')}"
            f" ({_fmt(acc.get('perplexity_change_pct'), '+.2f', '%')}); KLD mean {_fmt(acc.get('kld_mean'), '.3g')}, "
            f"p99 {_fmt(acc.get('kld_p99'), '.3g')}; top-1 agreement {_fmt(acc.get('top1_agreement'), '.3f')} "
            f"over {_fmt(acc.get('positions'), ',')} positions")
    if acc.get("how"):
        line += f" — {acc['how']}"
    return line


def speed_lines(record: dict) -> list[str]:
    speed = record.get("speed")
    if not isinstance(speed, dict):
        return []
    if speed.get("status") == "not run":
        return [f"speed: not run: {speed.get('reason')}"]
    out = []
    for length, s in sorted(((k, v) for k, v in speed.items() if isinstance(v, dict)), key=lambda kv: int(kv[0]) if kv[0].isdigit() else 0):
        if s.get("status") == "not run":
            out.append(f"speed at {length}-token prompts: not run: {s.get('reason')}")
            continue
        med = {k: (s.get(k) or {}).get("median") for k in ("prefill_tokens_per_s", "decode_tokens_per_s", "time_to_first_token_s")}
        runs = (s.get("decode_tokens_per_s") or {}).get("runs")
        out.append(f"speed at {length}-token prompts: prefill {_fmt(med['prefill_tokens_per_s'], '.1f')} tok/s, decode "
                   f"{_fmt(med['decode_tokens_per_s'], '.1f')} tok/s, time to first token "
                   f"{_fmt(med['time_to_first_token_s'], '.4f')} s" + (f" (median of {runs} runs)" if runs else ""))
    return out


def resource_line(record: dict) -> str | None:
    parts = []
    mem = record.get("memory") or {}
    if mem.get("peak_rss_anon_mb") is not None:
        parts.append(f"peak anonymous RSS {mem['peak_rss_anon_mb']:.1f} MB (VmHWM {_fmt(mem.get('peak_rss_mb'), '.1f')} MB)")
    kv = record.get("kv_cache_bytes") or {}
    if kv.get("per_token"):
        parts.append(f"KV cache {kv['per_token']:,} B/token, {_fmt(kv.get('at_max_length'), ',')} B at max length "
                     f"{_fmt(kv.get('max_length'), ',')}")
    if record.get("threads"):
        parts.append(f"{record['threads']} threads")
    return "; ".join(parts) or None


def long_context_rows(record: dict) -> list[list[str]] | str:
    """[probe, threshold, mode, KLD before, KLD past, top-1 before, top-1 past] rows, or a sentence."""
    probes = record.get("long_context")
    if probes is None:
        return "not measured for this provider"
    if not probes:
        return "no context threshold in this model (no sliding window, no LongRoPE switch)"
    out = []
    for p in probes:
        if p.get("status") != "ok":
            out.append([p.get("probe"), str(p.get("threshold")), f"not run: {p.get('reason')}"])
            continue
        for mode in ("prefill", "decode"):
            before, past = p.get(f"{mode}_before") or {}, p.get(f"{mode}_past") or {}
            out.append([p.get("probe"), str(p.get("threshold")), mode, _fmt(before.get("kld_mean"), ".3g"),
                        _fmt(past.get("kld_mean"), ".3g"), _fmt(before.get("top1_agreement"), ".3f"),
                        _fmt(past.get("top1_agreement"), ".3f")])
    return out


# a check's "passed": True, False, or None for a finding validate reports without passing judgement on it
CHECK_WORD = {True: "✓ pass", False: "✗ FAIL", None: "– info"}
CHECK_CLASS = {True: "ok", False: "bad", None: "muted"}
CHECK_MD = {True: "✅", False: "❌", None: "ℹ️"}

LONG_HEAD = ["probe", "threshold", "mode", "KLD before", "KLD past", "top-1 before", "top-1 past"]


def _size_line(result: dict, rows_by_key: dict) -> str:
    row = next((r for (a, _), r in rows_by_key.items() if a == result["artifact"]), None)
    parts = []
    if result.get("size_bytes"):
        parts.append(f"{result['size_bytes'] / 1e6:.2f} MB on disk")
    if row is not None and row.linear_bits_per_weight is not None:
        parts.append(f"{row.linear_bits_per_weight:.3g} bits/weight in the linear weights")
    if row is not None and row.bits_per_weight is not None:
        parts.append(f"{row.bits_per_weight:.2f} bits/weight for the whole artifact")
    return ", ".join(parts)


def _facts_line(res: dict, rows_by_key: dict) -> str:
    parts = [f"format {res['format']}" if res.get("format") else None, f"target {res['target']}" if res.get("target") else None,
             f"recipe {res['recipe']}" if res.get("recipe") else None,
             settings_line(res.get("settings")) if res.get("settings") else None, _size_line(res, rows_by_key) or None]
    return " · ".join(p for p in parts if p)


def _by_size(results: list[dict]) -> list[dict]:
    """The summary table's order: smallest artifact first."""
    return sorted(results, key=lambda r: (r.get("size_bytes") or 0, r["artifact"]))


def _verdict_word(v: str) -> str:
    return {PASS: "PASS", FAIL: "FAIL", NOT_RUN: "NOT RUN"}.get(v, v.upper())


# ---- report.md ---------------------------------------------------------------------------------


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(rows: list[Row], findings: list[Finding], notes: list[str], baseline: str | None, head: dict | None = None,
             results: list[dict] | None = None, verdict: dict | None = None, records: dict | None = None) -> str:
    head, results, records = head or {}, results or [], records or {}
    lines = ["# phi3-export accuracy-vs-size report", ""]
    if verdict:
        lines += [f"**Verdict: {verdict['line']}**", ""]
    if head:
        lines += [f"- **{label}:** {_md_escape(text)}" for label, text in header_items(head)] + [""]
    verdict_of = {(r["artifact"], p["provider"]): p for r in results for p in r["providers"]}
    header = [name for name, _ in COLUMNS[:FIRST_MEASURED]] + ["verdict"] + [name for name, _ in COLUMNS[FIRST_MEASURED:]]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in _ordered(rows):
        cells = [_cell(f, getattr(r, f)) for _, f in COLUMNS]
        v = verdict_of.get(r.key, {})
        if r.status == "ok":
            word = _verdict_word(v.get("verdict", PASS))
            measured = cells[FIRST_MEASURED:]
        else:
            word = _verdict_word(v.get("verdict", NOT_RUN))
            measured = [f"not run: {r.reason}"] + [""] * (len(COLUMNS) - FIRST_MEASURED - 1)
        lines.append("| " + " | ".join(_md_escape(c) for c in cells[:FIRST_MEASURED] + [word] + measured) + " |")
    lines += [""] + bits_notes(rows, head.get("weights") or []) + [PPL_NOTE]
    if results:
        lines += ["", "## Results per artifact"]
        rows_by_key = {r.key: r for r in rows}
        for res in _by_size(results):
            lines += ["", f"### {res['artifact']}", "", f"**{res['summary']}**", ""]
            lines.append(f"- {_facts_line(res, rows_by_key)}")
            for c in res["checks"]:
                lines.append(f"- {CHECK_MD.get(c.get('passed'), 'ℹ️')} check `{c.get('name')}`: {_md_escape(c.get('detail'))}")
            for p in res["providers"]:
                record = records.get((res["artifact"], p["provider"]), {})
                if p["status"] != "ok":
                    lines.append(f"- **[{p['provider'] or '-'}] not run:** {_md_escape(p['reason'])}")
                    continue
                lines.append(f"- **[{p['provider']}] {_verdict_word(p['verdict'])}**")
                acc = accuracy_line(record)
                sub = [acc and f"accuracy: {acc}", greedy_summary(record.get("generation"))]
                if record.get("generation") is not None:
                    sub[1] = "greedy generation: " + (sub[1] or "no prompts")
                lc = long_context_rows(record)
                if isinstance(lc, str):
                    sub.append(f"long context: {lc}")
                else:
                    sub += [f"long context `{r[0]}` at {r[1]}: " + (r[2] if len(r) == 3 else
                            f"{r[2]} KLD {r[3]} before → {r[4]} past, top-1 {r[5]} → {r[6]}") for r in lc]
                sub += speed_lines(record) + [resource_line(record)]
                lines += [f"  - {_md_escape(s)}" for s in sub if s]
    if baseline:
        regressions = [f for f in findings if f.regression]
        lines += ["", f"## Against baseline `{baseline}`", ""]
        lines += [f"- **{f.line()}**" if f.regression else f"- {f.line()}" for f in findings]
        lines += [f"- {n}" for n in notes]
        lines += ["", f"**{len(regressions)} regression(s)**" if regressions else "No regressions."]
    return "\n".join(lines) + "\n"


# ---- report.html -------------------------------------------------------------------------------

CSS = """
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#1d232a;margin:0;background:#f6f7f9}
main{max-width:1240px;margin:0 auto;padding:24px 28px 48px}
h1{font-size:22px;margin:0 0 12px}h2{font-size:18px;margin:32px 0 10px;border-bottom:1px solid #dde1e6;padding-bottom:4px}
h3{font-size:15px;margin:0 0 6px;font-family:ui-monospace,"DejaVu Sans Mono",monospace}h4{font-size:13px;margin:14px 0 4px}
.card{background:#fff;border:1px solid #dde1e6;border-radius:8px;padding:14px 18px;margin:12px 0}
.verdict{font-size:15px;font-weight:600;padding:10px 14px;border-radius:6px;margin:0 0 14px}
.verdict.pass{background:#e6f4ea;color:#0d5b26;border:1px solid #a8d5b5}.verdict.fail{background:#fdecea;color:#8a1c12;border:1px solid #f1b3ac}
.verdict.notrun{background:#eef0f3;color:#444;border:1px solid #cfd4da}
.badge{display:inline-block;font:600 11px/1 system-ui,sans-serif;padding:4px 7px;border-radius:4px;margin-right:8px;vertical-align:2px;letter-spacing:.03em}
.badge.pass{background:#1e7e34;color:#fff}.badge.fail{background:#c62828;color:#fff}.badge.notrun{background:#8a939c;color:#fff}
dl.meta{display:grid;grid-template-columns:190px 1fr;gap:5px 16px;margin:0}dl.meta dt{font-weight:600;color:#4a535c}dl.meta dd{margin:0;overflow-wrap:anywhere}
figure{margin:0}figure img{width:100%;max-width:960px;display:block;margin:0 auto}figcaption{color:#4a535c;font-size:13px;margin-top:8px}
table{border-collapse:collapse;width:100%;font-size:12.5px;background:#fff}
th,td{border:1px solid #dde1e6;padding:4px 7px;text-align:right;vertical-align:top;white-space:nowrap}th{background:#f0f2f5;font-weight:600}
td.l,th.l{text-align:left}td.name{font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:12px;text-align:left;white-space:normal;overflow-wrap:anywhere}
td.why,td.wrap{text-align:left;white-space:normal}td.why{color:#555;font-style:italic}th{white-space:normal}tr.notrun td{background:#fafafa}
.ok{color:#1e7e34;font-weight:600}.bad{color:#c62828;font-weight:700}.muted{color:#5f6870}
ul.facts{margin:6px 0 0;padding-left:18px}ul.facts li{margin:2px 0}
table.checks td:first-child{width:64px;text-align:center}table.checks{margin:8px 0}table.probes{width:auto;min-width:60%}
p.note{color:#4a535c;font-size:12.5px;margin:6px 0}
"""


def _e(text) -> str:
    return html.escape(str(text))


def _badge(verdict: str) -> str:
    cls = {PASS: "pass", FAIL: "fail"}.get(verdict, "notrun")
    return f'<span class="badge {cls}">{_verdict_word(verdict)}</span>'


def _summary_table(rows: list[Row], results: list[dict]) -> str:
    verdict_of = {(r["artifact"], p["provider"]): p for r in results for p in r["providers"]}
    head = "".join(f'<th class="l">{_e(n)}</th>' for n, _ in COLUMNS[:FIRST_MEASURED]) + '<th class="l">verdict</th>'
    head += "".join(f"<th>{_e(n)}</th>" for n, _ in COLUMNS[FIRST_MEASURED:])
    body = []
    for r in _ordered(rows):
        cells = [_cell(f, getattr(r, f)) for _, f in COLUMNS]
        v = verdict_of.get(r.key, {})
        word = v.get("verdict", PASS if r.status == "ok" else NOT_RUN)
        first = f'<td class="name">{_e(cells[0])}</td><td class="l">{_e(cells[1])}</td><td class="l">{_badge(word)}</td>'
        if r.status == "ok":
            body.append(f"<tr>{first}" + "".join(f"<td>{_e(c)}</td>" for c in cells[FIRST_MEASURED:]) + "</tr>")
        else:
            body.append(f'<tr class="notrun">{first}<td class="why" colspan="{len(COLUMNS) - FIRST_MEASURED}">'
                        f"not run: {_e(r.reason)}</td></tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _artifact_section(res: dict, rows_by_key: dict, records: dict) -> str:
    parts = [f'<section class="card"><h3>{_badge(res["verdict"])}{_e(res["artifact"])}</h3>']
    cls = {PASS: "ok", FAIL: "bad"}.get(res["verdict"], "muted")
    parts.append(f'<div class="{cls}">{_e(res["summary"])}</div>')
    parts.append(f'<div class="muted">{_e(_facts_line(res, rows_by_key))}</div>')
    if res["checks"]:
        rows = "".join(
            f'<tr><td class="{CHECK_CLASS.get(c.get("passed"), "muted")}">{CHECK_WORD.get(c.get("passed"), "– info")}</td>'
            f'<td class="l"><code>{_e(c.get("name"))}</code></td><td class="wrap">{_e(c.get("detail"))}</td></tr>'
            for c in res["checks"])
        parts.append(f'<table class="checks"><tr><th>result</th><th class="l">check</th><th class="l">detail</th></tr>{rows}</table>')
    for p in res["providers"]:
        record = records.get((res["artifact"], p["provider"]), {})
        if p["status"] != "ok":
            parts.append(f'<h4>{_badge(p["verdict"])}{_e(p["provider"] or "-")}</h4><p class="note">not run: {_e(p["reason"])}</p>')
            continue
        parts.append(f'<h4>{_badge(p["verdict"])}{_e(p["provider"])}</h4><ul class="facts">')
        acc = accuracy_line(record)
        if acc:
            parts.append(f"<li><b>accuracy:</b> {_e(acc)}</li>")
        if record.get("generation") is not None:
            parts.append(f"<li><b>greedy generation:</b> {_e(greedy_summary(record.get('generation')) or 'no prompts')}</li>")
        lc = long_context_rows(record)
        if isinstance(lc, str):
            parts.append(f"<li><b>long context:</b> {_e(lc)}</li>")
        for s in speed_lines(record):
            parts.append(f"<li><b>{_e(s.split(':', 1)[0])}:</b>{_e(s.split(':', 1)[1])}</li>")
        res_line = resource_line(record)
        if res_line:
            parts.append(f"<li><b>resources:</b> {_e(res_line)}</li>")
        parts.append("</ul>")
        if not isinstance(lc, str):
            head = "".join(f'<th class="{"l" if i < 1 else ""}">{_e(h)}</th>' for i, h in enumerate(LONG_HEAD))
            body = ""
            for r in lc:
                if len(r) == 3:
                    body += f'<tr><td class="l">{_e(r[0])}</td><td>{_e(r[1])}</td><td class="why" colspan="5">{_e(r[2])}</td></tr>'
                else:
                    body += "<tr>" + "".join(f'<td class="{"l" if i < 1 else ""}">{_e(c)}</td>' for i, c in enumerate(r)) + "</tr>"
            parts.append(f'<p class="note"><b>long-context probes</b> (artifact vs reference logits either side of the '
                         f"threshold, by prefill and by decode through the KV cache):</p><table class=\"probes\">{head and '<tr>' + head + '</tr>'}{body}</table>")
    parts.append("</section>")
    return "".join(parts)


def html_page(md_rows: list[Row], png: bytes, findings: list[Finding], notes: list[str], baseline: str | None,
              head: dict | None = None, results: list[dict] | None = None, verdict: dict | None = None,
              records: dict | None = None) -> str:
    head, results, records = head or {}, results or [], records or {}
    parts = ["<h1>phi3-export accuracy-vs-size report</h1>"]
    if verdict:
        cls = {PASS: "pass", FAIL: "fail"}.get(verdict["verdict"], "notrun")
        parts.append(f'<div class="verdict {cls}">{_e(verdict["line"])}</div>')
    if head:
        items = "".join(f"<dt>{_e(k)}</dt><dd>{'<br>'.join(_e(x) for x in v.split('; '))}</dd>" for k, v in header_items(head))
        parts.append(f'<div class="card"><dl class="meta">{items}</dl></div>')
    image = base64.b64encode(png).decode()
    caption = ("Each point is one artifact, measured on the provider its marker shape names; red points form the Pareto "
               "front. Lower is closer to the reference, left is smaller.")
    if any(p.float_bits for p in plot_series(md_rows)):
        caption += " The star is the unquantized export."
    parts.append(f'<h2>Accuracy vs size</h2><div class="card"><figure><img alt="accuracy vs size plot" '
                 f'src="data:image/png;base64,{image}"><figcaption>{_e(caption)}</figcaption></figure></div>')
    parts.append("<h2>Summary</h2>" + _summary_table(md_rows, results))
    parts += [f'<p class="note">{_e(n)}</p>' for n in bits_notes(md_rows, head.get("weights") or []) + [PPL_NOTE]]
    if results:
        rows_by_key = {r.key: r for r in md_rows}
        parts.append("<h2>Results per artifact</h2>")
        parts += [_artifact_section(res, rows_by_key, records) for res in _by_size(results)]
    if baseline:
        items = "".join(f"<li class={'bad' if f.regression else 'ok'}>{_e(f.line())}</li>" for f in findings)
        items += "".join(f"<li>{_e(n)}</li>" for n in notes)
        regressions = [f for f in findings if f.regression]
        parts.append(f"<h2>Against baseline {_e(baseline)}</h2><div class=\"card\"><ul>{items}</ul><p><b>"
                     + (f"{len(regressions)} regression(s)" if regressions else "No regressions.") + "</b></p></div>")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>phi3-export report</title>
<style>{CSS}</style></head>
<body><main>
{chr(10).join(parts)}
</main></body></html>
"""
