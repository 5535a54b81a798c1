"""report.md (a table for a pull request), the accuracy-vs-size plot, report.html (self-contained)."""

from __future__ import annotations

import base64
import html
import io

from phi3_export.report.gate import Finding
from phi3_export.report.records import Row

COLUMNS = (
    ("artifact", "artifact"), ("provider", "provider"), ("bits/weight", "bits_per_weight"), ("size MB", "size_bytes"),
    ("ppl", "perplexity"), ("Δppl vs ref", "perplexity_change_pct"), ("KLD mean", "kld_mean"), ("KLD p99", "kld_p99"),
    ("top-1", "top1_agreement"), ("prefill tok/s", "prefill_tps"), ("decode tok/s", "decode_tps"), ("TTFT s", "ttft_s"),
    ("peak anon MB", "peak_rss_anon_mb"),
)


def _cell(field: str, value) -> str:
    if value is None:
        return "-"
    formats = {
        "bits_per_weight": "{:.2f}", "perplexity": "{:.3f}", "perplexity_change_pct": "{:+.2f}%", "kld_mean": "{:.2e}",
        "kld_p99": "{:.2e}", "top1_agreement": "{:.3f}", "prefill_tps": "{:.1f}", "decode_tps": "{:.1f}", "ttft_s": "{:.3f}",
        "peak_rss_anon_mb": "{:.0f}",
    }
    if field == "size_bytes":
        return f"{value / 1e6:.1f}"
    return formats.get(field, "{}").format(value)


def table_rows(rows: list[Row]) -> list[list[str]]:
    ok = sorted((r for r in rows if r.status == "ok"), key=lambda r: (r.size_bytes or 0, r.artifact, r.provider or ""))
    return [[_cell(f, getattr(r, f)) for _, f in COLUMNS] for r in ok]


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


def plot_points(rows: list[Row]) -> list[tuple[str, float, float]]:
    """(label, bits/weight or MB, KLD) per artifact with both figures (one per artifact: its first provider)."""
    seen, out = set(), []
    for r in sorted(rows, key=lambda r: (r.artifact, r.provider or "")):
        if r.status != "ok" or r.kld_mean is None or r.artifact in seen:
            continue
        x = r.bits_per_weight if r.bits_per_weight is not None else (r.size_bytes or 0) / 1e6
        seen.add(r.artifact)
        out.append((r.artifact, x, r.kld_mean))
    return out


def plot_png(rows: list[Row]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = plot_points(rows)
    use_bits = all(r.bits_per_weight is not None for r in rows if r.status == "ok")
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    front = set(pareto([(x, y) for _, x, y in points]))
    for i, (label, x, y) in enumerate(points):
        ax.scatter([x], [y], marker="o", s=40, color="tab:red" if i in front else "tab:blue", zorder=3, gid=f"point-{i}")
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 6 if i % 2 else -10), fontsize=7)
    if len(front) > 1:
        line = sorted((points[i][1], points[i][2]) for i in front)
        ax.plot([p[0] for p in line], [p[1] for p in line], color="0.55", linewidth=1, linestyle="--", zorder=2,
                label="Pareto front (red: not beaten on both size and KLD)")
        ax.legend(fontsize=8)
    ax.set_xlabel("bits per weight (whole artifact, scales and zero points included)" if use_bits else "size on disk (MB)")
    ax.set_ylabel("mean KL divergence from the reference")
    if points and min(p[2] for p in points) > 0:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.set_title("accuracy vs size")
    fig.tight_layout()
    buf = io.BytesIO()
    # no timestamps in the PNG: the same records give the same bytes
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def markdown(rows: list[Row], findings: list[Finding], notes: list[str], baseline: str | None) -> str:
    header = [name for name, _ in COLUMNS]
    lines = ["# phi3-export accuracy-vs-size report", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(rows)]
    lines += ["", "bits/weight: 8 × size on disk ÷ weights in the model (scales, zero points and float tensors included).",
              "Δppl vs ref: the artifact's perplexity against the unquantized checkpoint's on the same ids."]
    skipped = not_run(rows)
    if skipped:
        lines += ["", "## Not run", ""] + [f"- {s}" for s in skipped]
    if baseline:
        regressions = [f for f in findings if f.regression]
        lines += ["", f"## Against baseline `{baseline}`", ""]
        lines += [f"- **{f.line()}**" if f.regression else f"- {f.line()}" for f in findings]
        lines += [f"- {n}" for n in notes]
        lines += ["", f"**{len(regressions)} regression(s)**" if regressions else "No regressions."]
    return "\n".join(lines) + "\n"


def html_page(md_rows: list[Row], png: bytes, findings: list[Finding], notes: list[str], baseline: str | None) -> str:
    header = "".join(f"<th>{html.escape(name)}</th>" for name, _ in COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>" for cells in table_rows(md_rows))
    skipped = "".join(f"<li>{html.escape(s)}</li>" for s in not_run(md_rows))
    gate = ""
    if baseline:
        items = "".join(f"<li class={'bad' if f.regression else 'ok'}>{html.escape(f.line())}</li>" for f in findings)
        items += "".join(f"<li>{html.escape(n)}</li>" for n in notes)
        gate = f"<h2>Against baseline {html.escape(baseline)}</h2><ul>{items}</ul>"
    image = base64.b64encode(png).decode()
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>phi3-export report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
td:first-child,th:first-child{{text-align:left}}.bad{{color:#b00;font-weight:bold}}</style></head>
<body><h1>phi3-export accuracy-vs-size report</h1>
<img alt="accuracy vs size" src="data:image/png;base64,{image}">
<table><tr>{header}</tr>{body}</table>
<p>bits/weight: 8 × size on disk ÷ weights in the model (scales, zero points and float tensors included). Pareto front in red.</p>
{"<h2>Not run</h2><ul>" + skipped + "</ul>" if skipped else ""}{gate}
</body></html>
"""
