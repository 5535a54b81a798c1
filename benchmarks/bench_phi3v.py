"""Phi-3-vision at full size (random bf16 weights: CLIP ViT-L/14-336 + the Phi-3-mini-128k decoder).

Not part of CI (~10 GB of disk, ~15 min). JSON to --out (build/bench/bench_phi3v.json):

  export  int4 RTN cpu export of the whole model (vision.onnx fp32 by the recipe, embedding.onnx,
          the 32-layer decoder): wall time, peak anonymous RSS of the process tree (sampled
          RssAnon; the issue's target <= 3 GB), peak total RSS (includes mapped shard pages),
          the size of each model file.
  flat    the same export at --flat-layers decoder layers (vision tower at full size each time):
          peak anonymous RSS growth with the decoder's depth.
  image   in its own process (phi3_export.validate.speed --image): the vision model alone on a
          1344x1008 image (12 sub-crops + the global one: 1921 image tokens), time to first token
          of a one-image prompt through onnxruntime-genai, decode tokens/s after it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_full import checkpoint_gb, fixture, measured, quantize

from phi3_export.fixtures.full_size import parameter_count
from phi3_export.machine import machine
from phi3_export.recipes import load_recipe
from phi3_export.versions import library_versions, tool_version

RECIPE = "phi-3-vision-128k"
PEAK_ANON_TARGET_MB = 3000


def file_mb(folder: Path) -> dict[str, float]:
    return {p.name: round(p.stat().st_size / 1e6, 1) for p in sorted(folder.iterdir()) if p.suffix in (".onnx", ".data")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", default="export,flat,image")
    ap.add_argument("--work", type=Path, default=REPO / "build" / "full")
    ap.add_argument("--out", type=Path, default=REPO / "build" / "bench" / "bench_phi3v.json")
    ap.add_argument("--flat-layers", default="2,8")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--runs", type=int, default=2)
    # onnxruntime's default ran one intra-op thread on this VM: every core unless told otherwise.
    ap.add_argument("--threads", type=int, default=machine()["cores"])
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    steps = set(args.steps.split(","))
    result: dict = {"recipe": RECIPE, "machine": machine(), "versions": library_versions(), "tool": tool_version(),
                    "peak_anon_target_mb": PEAK_ANON_TARGET_MB}

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")

    ckpt, out = args.work / RECIPE, args.work / f"{RECIPE}-int4"
    if steps & {"export", "image"}:
        fx = fixture(RECIPE, ckpt)
        result["export"] = {"layers": load_recipe(RECIPE).model.num_layers, "parameters": parameter_count(load_recipe(RECIPE)),
                            "fixture": fx, "checkpoint_gb": checkpoint_gb(ckpt), **quantize(ckpt, out, ["cpu"])}
        result["export"]["files_mb"] = file_mb(out / "onnx-cpu")
        print(f"export: {result['export']}", flush=True)
        save()
    if "image" in steps:
        speed_json = args.work / "image-speed.json"
        figures = measured([sys.executable, "-m", "phi3_export.validate.speed", str(out / "onnx-cpu"), "--image",
                            "--new-tokens", str(args.new_tokens), "--runs", str(args.runs), "--threads", str(args.threads),
                            "--json", str(speed_json)])
        result["image"] = {**json.loads(speed_json.read_text()), "threads": args.threads,
                           "process_peak_rss_anon_mb": figures["peak_rss_anon_mb"]}
        print(f"image: {result['image']}", flush=True)
        save()
    if out.exists():
        shutil.rmtree(out)
    if ckpt.exists():
        shutil.rmtree(ckpt)
    if "flat" in steps:
        rows = []
        for layers in (int(x) for x in args.flat_layers.split(",")):
            folder = args.work / f"{RECIPE}-{layers}-layers"
            fixture(RECIPE, folder, layers)
            rows.append({"layers": layers, **quantize(folder, args.work / f"{RECIPE}-flat", ["cpu"])})
            print(f"flat: {rows[-1]}", flush=True)
            shutil.rmtree(args.work / f"{RECIPE}-flat")
            shutil.rmtree(folder)
        result["flatness"] = {"rows": rows, "ratio_last_over_first": round(rows[-1]["peak_rss_anon_mb"] / rows[0]["peak_rss_anon_mb"], 3)}
        save()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
