"""`make bench` (Core ML part): one quantization, two formats, on real weights.

SmolLM2-135M-Instruct in Phi-3 layout (built by phi3_export.fixtures.smollm2's `smollm2_checkpoint`). For
RTN and AWQ at int4 g32 symmetric: the Core ML export's wall time and peak memory
(sampled RssAnon), the `.mlpackage` size beside the ONNX CPU artifact's, and `validate` on
both: the ONNX artifact through ONNX Runtime, the Core ML one as its saved ML program
evaluated op by op (fp16 activations; Core ML prediction itself needs macOS 15 and is
reported "not run" here). JSON in build/bench/bench_coreml.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_full import folder_mb

from phi3_export.fixtures.smollm2 import smollm2_checkpoint
from phi3_export.memory import run_measured


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "build" / "bench")
    ap.add_argument("--window", type=int, default=512)
    args = ap.parse_args()
    ckpt = smollm2_checkpoint(REPO / "build" / "fixtures")
    work = args.out / "coreml-work"
    rows = {}
    for method in ("rtn", "awq"):
        out = work / method
        base = [sys.executable, "-m", "phi3_export", "quantize", "--checkpoint", str(ckpt), "--bits", "4", "--block-size", "32",
                "--symmetric", "--method", method, "--quiet", "--force"]
        # Both formats from one quantization; for RTN also Core ML alone, whose figures are the export's
        # (AWQ's calibration, minutes, would dominate them).
        both = run_measured([*base, "--out", str(out), "--format", "onnx,coreml", "--target", "cpu"])
        alone = run_measured([*base, "--out", str(work / f"{method}-coreml-only"), "--format", "coreml"]) if method == "rtn" else None
        for run in (both, alone):
            if run is not None and run.returncode:
                raise RuntimeError(run.stderr[-2000:])
        result = work / f"validate-{method}.json"
        subprocess.run([sys.executable, "-m", "phi3_export", "validate", str(out), "--reference", str(ckpt), "--json", str(result),
                        "--window", str(args.window), "--no-speed", "--cache-dir", str(args.out / "reference-cache"), "--quiet"],
                       check=False)
        records = json.loads(result.read_text())["records"]
        accuracy = {f"{r['format']}:{r['provider']}": ({k: r["accuracy"][k] for k in ("perplexity_reference", "perplexity_artifact",
                                                                                        "kld_mean", "kld_p99", "top1_agreement")}
                                                         if r["status"] == "ok" else {"status": r["status"], "reason": r.get("reason")})
                    for r in records}
        rows[method] = {
            "quantize_and_both_formats": {"wall_s": round(both.wall_s, 1), "peak_rss_anon_mb": round(both.peak_rss_anon_mb)},
            "coreml_only": {"wall_s": round(alone.wall_s, 1), "peak_rss_anon_mb": round(alone.peak_rss_anon_mb),
                            "peak_rss_mb": round(alone.peak_rss_mb)} if alone else None,
            "size_mb": {"coreml_mlpackage": folder_mb(out / "coreml" / "model.mlpackage"),
                        "onnx_cpu_model": round(sum(p.stat().st_size for p in (out / "onnx-cpu").glob("model.onnx*")) / 1e6, 1)},
            "accuracy": accuracy,
        }
        print(method, json.dumps(rows[method]), flush=True)
    path = args.out / "bench_coreml.json"
    path.write_text(json.dumps({"schema_version": 1, "checkpoint": "SmolLM2-135M-Instruct in Phi-3 layout",
                                "settings": "int4, block 32, symmetric; tied table int8 (generic recipe)",
                                "window": args.window, "runs": rows}, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
