"""What a report says besides the figures: where they come from (header) and whether each artifact passed.

Everything here is read from the validate records; nothing is measured or guessed. The
verdict is validate's own rule (every check holds; a "not run" record is neither a pass nor
a failure and says why), plus, with --baseline, no regression for the artifact.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

PASS, FAIL, NOT_RUN = "pass", "fail", "not run"
MACHINE_ORDER = ("cpu", "cores", "ram_gb", "os", "python")


def _distinct(values) -> list:
    out = []
    for v in values:
        if v is not None and v not in out:
            out.append(v)
    return out


def machine_line(m: dict) -> str:
    if not m:
        return "not recorded"
    parts = [str(m.get("cpu") or "unknown CPU")]
    if m.get("cores"):
        parts.append(f"{m['cores']} cores")
    if m.get("ram_gb"):
        parts.append(f"{m['ram_gb']:g} GB RAM")
    if m.get("os"):
        parts.append(str(m["os"]))
    if m.get("python"):
        parts.append(f"Python {m['python']}")
    parts += [f"{k} {v}" for k, v in m.items() if k not in MACHINE_ORDER]
    return ", ".join(parts)


def versions_line(v: dict) -> str:
    return ", ".join(f"{k} {val}" for k, val in v.items()) if v else "not recorded"


def settings_line(s: dict | None) -> str:
    """rtn int4, blocks of 32, symmetric, accuracy_level 4 (overrides: lm_head int8)."""
    if not isinstance(s, dict) or "bits" not in s:
        return "not recorded"
    bits = s["bits"]
    if bits in (16, 32):
        return f"unquantized fp{bits}"
    mix = s.get("mix")
    if isinstance(mix, dict) and mix:  # a size budget's choice per tensor
        counts: dict[str, int] = {}
        for label in mix.values():
            counts[str(label)] = counts.get(str(label), 0) + 1
        line = f"{s.get('method', '?')} size-budget mix ({', '.join(f'{n} {k}' for k, n in sorted(counts.items()))}), "
    else:
        line = f"{s.get('method', '?')} int{bits}, blocks of {s.get('block_size', '?')}, "
    line += "symmetric" if s.get("symmetric") else "asymmetric"
    if s.get("accuracy_level") is not None:
        line += f", accuracy_level {s['accuracy_level']}"
    if s.get("overrides"):
        line += " (overrides: " + ", ".join(f"{k} {v}" for k, v in s["overrides"].items()) + ")"
    return line


def _date(record: dict, path: Path | None) -> dict | None:
    """When the record was made: its own date when validate writes one, else its file's modification time."""
    for key in ("date", "timestamp", "created"):
        if isinstance(record.get(key), str):
            return {"date": record[key], "from": f"record {key}"}
    try:
        stamp = datetime.fromtimestamp(Path(path).stat().st_mtime, tz=UTC)
    except (OSError, TypeError):
        return None
    return {"date": f"{stamp:%Y-%m-%d %H:%M} UTC", "from": f"{Path(path).name} modified"}


def date_line(dates: list[dict]) -> str | None:
    if not dates:
        return None
    values = sorted({d["date"] for d in dates})
    span = values[0] if len(values) == 1 else f"{values[0]} – {values[-1]}"
    first, last = values[0].split(" "), values[-1].split(" ")
    if len(values) > 1 and len(first) == len(last) == 3 and first[0] == last[0] and first[2] == last[2]:
        span = f"{first[0]} {first[1]}–{last[1]} {first[2]}"  # one day: 2025-01-02 10:00–10:05 UTC
    sources = {d["from"] for d in dates}
    how = "as recorded" if all(s.startswith("record") for s in sources) else (
        "when the validate file was written" if len(dates) == 1 else "when the validate files were written")
    return f"{span} ({how})"


def reference_ppl(records: list[dict]) -> list[dict]:
    """The reference checkpoint's perplexity per distinct eval setup (text, window, stride)."""
    seen, out = set(), []
    for r in records:
        acc = r.get("accuracy") or {}
        if acc.get("perplexity_reference") is None:
            continue
        key = (acc.get("eval_sha256"), acc.get("window"), acc.get("stride"), (r.get("reference") or {}).get("sha256"))
        if key in seen:
            continue
        seen.add(key)
        out.append({"perplexity": acc["perplexity_reference"], "eval_text": acc.get("eval_text"),
                    "eval_tokens": acc.get("eval_tokens"), "positions": acc.get("positions"),
                    "window": acc.get("window"), "stride": acc.get("stride")})
    return out


def header(pairs: list[tuple[Path, dict]]) -> dict:
    """Model, recipe, settings, dates, machines, versions and the reference's perplexity, as recorded."""
    records = [r for _, r in pairs]
    references = _distinct(r.get("reference") for r in records)
    return {
        "model": [{"checkpoint": ref.get("checkpoint"), "sha256": ref.get("sha256")} for ref in references],
        "weights": _distinct(r.get("weights") for r in records),
        "recipes": _distinct(r.get("recipe") for r in records),
        "settings": _distinct(settings_line(r.get("settings")) for r in records if r.get("settings")),
        "dates": _distinct(_date(r, p) for p, r in pairs),
        "date": date_line(_distinct(_date(r, p) for p, r in pairs)),
        "machines": _distinct(machine_line(r.get("machine") or {}) for r in records),
        "versions": _distinct(versions_line(r.get("versions") or {}) for r in records),
        "reference_perplexity": reference_ppl(records),
        "files": _distinct(str(p) for p, _ in pairs),
    }


def greedy_summary(generation) -> str | None:
    """'3/3 prompts match the reference for all 32 tokens' or where each diverged."""
    if not isinstance(generation, list) or not generation:
        return None
    same = [g for g in generation if g.get("first_divergence") is None]
    line = f"{len(same)}/{len(generation)} prompts identical to the reference's greedy tokens"
    parted = [f"token {g['first_divergence']} of {g.get('generated_tokens')}" for g in generation
              if g.get("first_divergence") is not None]
    return line + (f" (diverged at {', '.join(parted)})" if parted else "")


def record_verdict(record: dict, regressions: list[str]) -> dict:
    failed = [c for c in record.get("checks") or [] if c.get("passed") is False]
    if record.get("status") != "ok":
        verdict = FAIL if failed else NOT_RUN
    else:
        verdict = FAIL if failed or regressions else PASS
    return {"verdict": verdict, "failed_checks": [c["name"] for c in failed], "regressions": regressions,
            "reason": record.get("reason") if record.get("status") != "ok" else None}


def artifact_results(pairs: list[tuple[Path, dict]], regressions: dict[tuple, list[str]] | None = None) -> list[dict]:
    """One entry per artifact: its facts, every check once, one result per provider, and a verdict."""
    regressions = regressions or {}
    by_artifact: dict[str, list[dict]] = {}
    for _, record in pairs:
        by_artifact.setdefault(record["artifact"], []).append(record)
    out = []
    for name, records in by_artifact.items():
        first = records[0]
        checks, seen = [], set()
        for r in records:
            for c in r.get("checks") or []:
                if c.get("name") not in seen:
                    seen.add(c.get("name"))
                    checks.append(c)
        providers = []
        for r in records:
            v = record_verdict(r, regressions.get((name, r.get("provider")), []))
            providers.append({"provider": r.get("provider"), "status": r.get("status"), **v})
        failed = [c["name"] for c in checks if c.get("passed") is False]
        regressed = _distinct(m for p in providers for m in p["regressions"])
        ran = [p for p in providers if p["status"] == "ok"]
        if failed or regressed:
            verdict = FAIL
        elif ran:
            verdict = PASS
        else:
            verdict = NOT_RUN
        reasons = _distinct(p["reason"] for p in providers if p["reason"])
        out.append({
            "artifact": name, "format": first.get("format"), "target": first.get("target"), "recipe": first.get("recipe"),
            "settings": first.get("settings"), "size_bytes": first.get("size_bytes"), "weights": first.get("weights"),
            "verdict": verdict, "failed_checks": failed, "regressions": regressed, "not_run_reasons": reasons,
            "checks": checks, "providers": providers, "summary": verdict_line(verdict, failed, regressed, reasons, providers),
        })
    return out


def verdict_line(verdict: str, failed: list[str], regressed: list[str], reasons: list[str], providers: list[dict]) -> str:
    if verdict == FAIL:
        parts = []
        if failed:
            parts.append("failed check" + ("s" if len(failed) > 1 else "") + ": " + ", ".join(failed))
        if regressed:
            parts.append("regressed vs baseline: " + ", ".join(regressed))
        return "FAIL — " + "; ".join(parts)
    if verdict == NOT_RUN:
        return "NOT RUN — " + "; ".join(reasons)
    ran = [p["provider"] or "-" for p in providers if p["status"] == "ok"]
    skipped = [p["provider"] or "-" for p in providers if p["status"] != "ok"]
    line = "PASS — every check holds; measured on " + ", ".join(ran)
    return line + (f" (not run on {', '.join(skipped)}: see below)" if skipped else "")


def overall(results: list[dict]) -> dict:
    failing = [r["artifact"] for r in results if r["verdict"] == FAIL]
    passing = [r["artifact"] for r in results if r["verdict"] == PASS]
    if failing:
        verdict, line = FAIL, f"FAIL — {len(failing)} of {len(results)} artifacts fail: " + ", ".join(failing)
    elif passing:
        not_run = len(results) - len(passing)
        verdict = PASS
        line = f"PASS — all {len(passing)} measured artifacts pass every check" + (
            f"; {not_run} not run here (reasons below)" if not_run else "")
    else:
        verdict, line = NOT_RUN, "NOT RUN — no artifact could be measured here (reasons below)"
    return {"verdict": verdict, "line": line, "failing": failing}
