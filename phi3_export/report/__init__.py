"""`phi3-export report`: validate records -> report.json, report.md, report.html, and a CI gate."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from phi3_export.errors import Phi3ExportError
from phi3_export.output import staged_output
from phi3_export.recipes.schema import ReportThresholds
from phi3_export.report.context import artifact_results, header, overall
from phi3_export.report.gate import compare
from phi3_export.report.plot import plot_points, plot_subtitle, render_plot
from phi3_export.report.records import latest_records, read_records, row_from_record
from phi3_export.report.render import html_page, markdown

REPORT_SCHEMA = 1
REPORT_FILES = {"report.json", "report.md", "report.html", "report.png"}


def thresholds_for(rows, records: list[dict], overrides: dict) -> dict[str, ReportThresholds]:
    """Per artifact: the recipe's thresholds, with any given on the command line on top."""
    from phi3_export.recipes import load_recipe

    recipe_of = {r["artifact"]: r.get("recipe") for r in records}
    out = {}
    for row in rows:
        base = ReportThresholds()
        name = recipe_of.get(row.artifact)
        if name:
            try:
                base = load_recipe(name).report
            except Phi3ExportError:
                pass  # generic or user recipe not at hand: the defaults
        out[row.artifact] = base.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    return out


def build_report(record_files: list[Path], out: Path, baseline: Path | None = None, overrides: dict | None = None,
                 force: bool = True) -> dict:
    """Write the three report files into ``out``; returns report.json's content."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(p.name not in REPORT_FILES for p in out.iterdir())):
        raise Phi3ExportError(f"{out}: exists and is not a report folder; give a new or report-only --out")
    read = {Path(path): read_records(path) for path in record_files}
    pairs = latest_records(read)
    rows = [row_from_record(record, str(path)) for path, record in pairs]
    records = [r for file_records in read.values() for r in file_records]
    findings, notes = [], []
    if baseline is not None:
        base_rows = [row_from_record(r, str(baseline)) for r in read_records(baseline)]
        thresholds = thresholds_for(rows, records, overrides or {})
        findings, notes = compare(rows, base_rows, thresholds)
    regressed: dict[tuple, list[str]] = {}
    for f in findings:
        if f.regression:
            regressed.setdefault((f.artifact, f.provider), []).append(f.metric)
    head = header(pairs)
    results = artifact_results(pairs, regressed)
    verdict = overall(results)
    subtitle = plot_subtitle(head, rows)
    png, axes = render_plot(rows, subtitle)
    by_key = {(r["artifact"], r.get("provider")): r for _, r in pairs}
    row_verdicts = {(res["artifact"], p["provider"]): p for res in results for p in res["providers"]}
    doc = {
        "schema_version": REPORT_SCHEMA,
        "kind": "phi3-export report",
        "rows": [{k: v for k, v in asdict(r).items() if k != "machine"} | {"machine": r.machine}
                 | {"verdict": row_verdicts[r.key]["verdict"], "failed_checks": row_verdicts[r.key]["failed_checks"]}
                 for r in rows],
        "plot": [{"artifact": a, "x": x, "kld_mean": y} for a, x, y in plot_points(rows)],
        "baseline": str(baseline) if baseline else None,
        "findings": [asdict(f) for f in findings],
        "notes": notes,
        "regressions": [f.line() for f in findings if f.regression],
        # added within schema 1 (nothing above is renamed): the header, per-artifact results and the verdict
        "header": head,
        "plot_axes": axes,
        "artifacts": results,
        "verdict": verdict,
        # the records themselves, so this file can be the next run's --baseline
        "records": records,
    }
    with staged_output(out, force=force) as tmp:
        (tmp / "report.json").write_text(json.dumps(doc, indent=1) + "\n")
        (tmp / "report.md").write_text(markdown(rows, findings, notes, doc["baseline"], head, results, verdict, by_key))
        (tmp / "report.png").write_bytes(png)
        (tmp / "report.html").write_text(html_page(rows, png, findings, notes, doc["baseline"], head, results, verdict, by_key))
    return doc
