"""report.md (for a pull request), the accuracy-vs-size plot, report.html (self-contained, no scripts)."""

from __future__ import annotations

import base64
import html

from phi3_export.report.context import FAIL, NOT_RUN, PASS, greedy_summary, settings_line
from phi3_export.report.gate import Finding
from phi3_export.report.plot import budget_curves, float_bits, plot_series
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
             "per block (a size budget's mix: the mean over its layer linears' choices, weighted by their weights). bits/w whole: 8 × size on disk ÷ all weights of the model, so the float embedding table, norms, "
             "RoPE tables, tokenizer and config files count too. Rows shorter than a block are padded to a whole block, "
             "which the linear figure does not count (tiny test models only).")
SMALL_MODEL_NOTE = ("On this {weights}-weight test model those float tensors and files dominate, so the whole-artifact "
                    "figure of a {bits}-bit artifact reads {low:.1f}–{high:.1f}; on a full-size model the linears are most "
                    "of the weights and it comes close to the linear figure.")
PPL_NOTE = "Δppl vs ref: the artifact's perplexity against the unquantized checkpoint's on the same ids."



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


CURVE_HEAD = ["artifact", "size MB", "bits/w whole", "KLD mean", "mix"]
CURVE_NOTE = ("Artifacts that share everything but their size budget (quantize --size-budget / --bits-per-weight), "
              "smallest first: the plot draws each set as one line.")


def curve_tables(rows: list[Row]) -> list[tuple[str, list[list[str]]]]:
    """(label, cells per point) of every size-budget curve the plot draws."""
    by_key = {r.key: r for r in rows}
    out = []
    for curve in budget_curves(rows):
        cells = []
        for p in curve.points:
            r = by_key[(p.artifact, p.provider)]
            counts: dict[str, int] = {}
            for label in ((r.settings or {}).get("mix") or {}).values():
                counts[label] = counts.get(label, 0) + 1
            cells.append([r.artifact, _cell("size_bytes", r.size_bytes), _cell("bits_per_weight", r.bits_per_weight),
                          _cell("kld_mean", r.kld_mean), ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))])
        out.append((curve.label, cells))
    return out


def not_run(rows: list[Row]) -> list[str]:
    return [f"{r.artifact} [{r.provider or '-'}]: {r.status}: {r.reason}" for r in rows if r.status != "ok"]


def bits_notes(rows: list[Row], weights: list) -> list[str]:
    notes = [BITS_NOTE]
    quantized = [r for r in rows if r.linear_bits_per_weight and r.bits_per_weight and float_bits(r) is None]
    high = [r for r in quantized if r.bits_per_weight > 1.5 * r.linear_bits_per_weight]
    if high and weights:
        bits = sorted({(r.settings or {}).get("bits") for r in high})
        notes.append(SMALL_MODEL_NOTE.format(weights=f"{min(weights):,}", bits="/".join(map(str, bits)),
                                             low=min(r.bits_per_weight for r in high), high=max(r.bits_per_weight for r in high)))
    return notes


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
    curves = curve_tables(rows)
    if curves:
        lines += ["", "## Size-budget curves", "", CURVE_NOTE]
        for label, cells in curves:
            lines += ["", f"**{_md_escape(label)}**", "", "| " + " | ".join(CURVE_HEAD) + " |", "|" + "---|" * len(CURVE_HEAD)]
            lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in cells]
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
    curves = curve_tables(md_rows)
    if curves:
        parts.append(f'<h2>Size-budget curves</h2><p class="note">{_e(CURVE_NOTE)}</p>')
        head_cells = "".join(f'<th class="{"l" if i in (0, 4) else ""}">{_e(h)}</th>' for i, h in enumerate(CURVE_HEAD))
        for label, cells in curves:
            body = "".join("<tr>" + "".join(f'<td class="{"name" if i == 0 else "l" if i == 4 else ""}">{_e(c)}</td>'
                                            for i, c in enumerate(row)) + "</tr>" for row in cells)
            parts.append(f"<h4>{_e(label)}</h4><table><tr>{head_cells}</tr>{body}</table>")
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
