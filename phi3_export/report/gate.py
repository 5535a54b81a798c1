"""Compare a run with a baseline: which artifacts got worse, by how much, beyond which threshold.

Accuracy and size are compared whatever the machine. Speed is a ratio and is gated only
between records from the same machine description (CPU model, cores, RAM); otherwise it
is reported as not gated, because a different or shared machine is not a regression.
"""

from __future__ import annotations

from dataclasses import dataclass

from phi3_export.recipes.schema import ReportThresholds
from phi3_export.report.records import Row

MACHINE_KEYS = ("cpu", "cores", "ram_gb", "os")


@dataclass(frozen=True)
class Finding:
    artifact: str
    provider: str | None
    metric: str
    baseline: float
    current: float
    limit: str
    regression: bool

    def line(self) -> str:
        where = f"{self.artifact} [{self.provider}]" if self.provider else self.artifact
        verdict = "REGRESSION" if self.regression else "ok"
        return f"{where}: {self.metric} {self.baseline:.6g} -> {self.current:.6g} ({self.limit}) {verdict}"


def same_machine(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in MACHINE_KEYS) and bool(a)


def _metrics(row: Row, old: Row, t: ReportThresholds) -> list[tuple[str, float | None, float | None, str, bool]]:
    """(metric, baseline, current, limit, crossed) for the metrics compared on every machine."""
    out = []
    if old.kld_mean is not None and row.kld_mean is not None:
        out.append(("kld_mean", old.kld_mean, row.kld_mean, f"may rise by {t.max_kld_increase}",
                    row.kld_mean - old.kld_mean > t.max_kld_increase))
    if old.perplexity and row.perplexity:
        out.append(("perplexity", old.perplexity, row.perplexity, f"may rise by {t.max_ppl_increase_pct}%",
                    100 * (row.perplexity / old.perplexity - 1) > t.max_ppl_increase_pct))
    if old.size_bytes and row.size_bytes:
        out.append(("size_bytes", old.size_bytes, row.size_bytes, f"may grow by {t.max_size_increase_pct}%",
                    100 * (row.size_bytes / old.size_bytes - 1) > t.max_size_increase_pct))
    return out


def compare(current: list[Row], baseline: list[Row], thresholds: dict[str, ReportThresholds]) -> tuple[list[Finding], list[str]]:
    """Findings for every comparable metric, and notes (unmatched artifacts, ungated speed)."""
    base = {row.key: row for row in baseline}
    findings, notes = [], []
    for row in current:
        if row.status != "ok":
            continue
        old = base.get(row.key)
        if old is None or old.status != "ok":
            notes.append(f"{row.artifact} [{row.provider}]: no baseline record to compare with")
            continue
        t = thresholds.get(row.artifact) or ReportThresholds()
        metrics = _metrics(row, old, t)
        if old.decode_tps and row.decode_tps:
            if same_machine(row.machine, old.machine):
                metrics.append(("decode_tokens_per_s", old.decode_tps, row.decode_tps, f"may fall to {t.min_decode_tps_ratio}x",
                                row.decode_tps / old.decode_tps < t.min_decode_tps_ratio))
            else:
                notes.append(f"{row.artifact} [{row.provider}]: decode tok/s {old.decode_tps:.1f} -> {row.decode_tps:.1f} "
                             "not gated (baseline from another machine)")
        findings += [Finding(row.artifact, row.provider, *m) for m in metrics]
    return findings, notes
