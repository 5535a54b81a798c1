"""Phi-3-small-8k at full widths (random bf16 weights): export cost, speed, and what blocksparse saves.

Not part of CI (needs ~20 GB of disk and ~30 min). JSON to --out (build/bench/bench_phi3small.json).

  export  the whole 32-layer model (7.4B parameters) exported int4 RTN for cpu: wall time, peak
          anonymous RSS of the process tree (sampled RssAnon; the issue's target <= 3 GB) and
          peak total RSS (includes mapped shard pages), artifact size.
  flat    the same export at --flat-layers (2 and 4 decoder layers): peak anonymous RSS growth.
  speed   a --speed-layers model at full widths (4 layers: a whole-model 4k prefill would take
          tens of minutes on two cores) exported twice, with the published pattern (layers 0, 2
          blocksparse; 1, 3 dense) and with every layer dense (dense_attention_every_n_layers 1,
          through a copy of the recipe that says so): prefill tok/s and time to first token at
          --prompt-lens (1k, 4k), decode tok/s after them, through onnxruntime-genai in its own
          process on every core (onnxruntime's default ran one thread on this VM), the two artifacts' runs interleaved (load on a shared machine drifts); decode against the ceiling `memory read bandwidth / weight bytes read per
          decoded token` with the bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_full import (
    GB,
    bytes_per_decoded_token,
    checkpoint_gb,
    fixture,
    folder_mb,
    memory_bandwidth_gbs,
    quantize,
    speed,
)

from phi3_export.fixtures.full_size import parameter_count
from phi3_export.machine import machine
from phi3_export.recipes import load_recipe
from phi3_export.versions import library_versions, tool_version

RECIPE = "phi-3-small-8k"
PEAK_ANON_TARGET_MB = 3000
FLATNESS_TARGET = 1.3


def export(ckpt: Path, out: Path, *flags: str) -> dict:
    figures = quantize(ckpt, out, ["cpu"], *flags)
    figures["artifact_mb"] = folder_mb(out / "onnx-cpu")
    return figures


def dense_variant(ckpt: Path, work: Path) -> tuple[Path, Path]:
    """The checkpoint with every layer dense (weights hard-linked, config edited) and a recipe that says so."""
    dense = work / f"{ckpt.name}-dense"
    shutil.rmtree(dense, ignore_errors=True)
    dense.mkdir()
    for f in ckpt.iterdir():
        if f.suffix == ".safetensors":
            os.link(f, dense / f.name)
        else:
            shutil.copy(f, dense / f.name)
    config = json.loads((dense / "config.json").read_text())
    config["dense_attention_every_n_layers"] = 1
    (dense / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    recipe = yaml.safe_load((REPO / "recipes" / f"{RECIPE}.yaml").read_text())
    recipe["model"]["blocksparse"]["dense_attention_every_n_layers"] = 1  # same name: the fixture scales it down
    path = work / f"{RECIPE}-dense.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return dense, path


def interleaved_speeds(artifacts: dict[str, Path], args, bandwidth: float) -> dict:
    """Prefill/decode of every artifact at each prompt length, runs interleaved (A, B, A, B, ...):
    on a shared machine load drifts, and a ratio is only fair between runs taken side by side."""
    import statistics

    vocab = load_recipe(RECIPE).model.vocab_size
    runs: dict[str, dict[str, list[dict]]] = {name: {str(n): [] for n in args.prompt_lens} for name in artifacts}
    for length in args.prompt_lens:
        for run in range(args.runs):
            for name, artifact in artifacts.items():
                row = speed(artifact, args.work, length, args.new_tokens, 1, vocab, threads=machine()["cores"])
                runs[name][str(length)].append(row)
                print(f"  {name} prompt {length} run {run}: {row}", flush=True)
    best = max(bandwidth, memory_bandwidth_gbs())
    out: dict = {"memory_read_bandwidth_gbs": best}
    for name, artifact in artifacts.items():
        per_token = bytes_per_decoded_token(artifact / "model.onnx")["bytes"]
        ceiling = best * GB / per_token
        rows = {}
        for length, samples in runs[name].items():
            med = {key: statistics.median(r[key]["median"] for r in samples) for key in ("prefill_tps", "decode_tps", "ttft_s")}
            rows[length] = {**{k: round(v, 3) for k, v in med.items()}, "runs": len(samples),
                            "process_peak_rss_anon_mb": max(r["process_peak_rss_anon_mb"] for r in samples),
                            "decode_fraction_of_ceiling": round(med["decode_tps"] / ceiling, 3)}
        out[name] = {"weight_bytes_per_token": per_token, "ceiling_decode_tps": round(ceiling, 2), "by_prompt_tokens": rows}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", default="export,flat,speed")
    ap.add_argument("--work", type=Path, default=REPO / "build" / "full")
    ap.add_argument("--out", type=Path, default=REPO / "build" / "bench" / "bench_phi3small.json")
    ap.add_argument("--flat-layers", default="2,4")
    ap.add_argument("--speed-layers", type=int, default=4)
    ap.add_argument("--prompt-lens", default="1024,4096", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    steps = set(args.steps.split(","))
    bandwidth = memory_bandwidth_gbs()
    result: dict = {"recipe": RECIPE, "machine": machine(), "versions": library_versions(), "tool": tool_version(),
                    "memory_read_bandwidth_gbs_at_start": bandwidth, "peak_anon_target_mb": PEAK_ANON_TARGET_MB}

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")

    if "export" in steps:
        ckpt = args.work / RECIPE
        fx = fixture(RECIPE, ckpt)
        result["export"] = {"layers": 32, "parameters": parameter_count(load_recipe(RECIPE)), "fixture": fx,
                            "checkpoint_gb": checkpoint_gb(ckpt), **export(ckpt, args.work / f"{RECIPE}-int4")}
        print(f"export: {result['export']}", flush=True)
        shutil.rmtree(args.work / f"{RECIPE}-int4")
        shutil.rmtree(ckpt)
        save()
    if "flat" in steps:
        rows = []
        for layers in (int(x) for x in args.flat_layers.split(",")):
            ckpt = args.work / f"{RECIPE}-{layers}-layers"
            fixture(RECIPE, ckpt, layers)
            rows.append({"layers": layers, **export(ckpt, args.work / f"{RECIPE}-flat")})
            print(f"flat: {rows[-1]}", flush=True)
            shutil.rmtree(args.work / f"{RECIPE}-flat")
            if layers != args.speed_layers:
                shutil.rmtree(ckpt)
        result["flatness"] = {"rows": rows, "ratio_last_over_first": round(rows[-1]["peak_rss_anon_mb"] / rows[0]["peak_rss_anon_mb"], 3),
                              "target": FLATNESS_TARGET}
        save()
    if "speed" in steps:
        ckpt = args.work / f"{RECIPE}-{args.speed_layers}-layers"
        fixture(RECIPE, ckpt, args.speed_layers)
        dense, dense_recipe = dense_variant(ckpt, args.work)
        result["speed"] = {"layers": args.speed_layers, "new_tokens": args.new_tokens, "runs": args.runs, "exports": {}}
        artifacts = {}
        for name, folder, flags in (("blocksparse", ckpt, ()), ("dense", dense, ("--recipe", str(dense_recipe)))):
            out = args.work / f"{RECIPE}-speed-{name}"
            result["speed"]["exports"][name] = export(folder, out, *flags)
            artifacts[name] = out / "onnx-cpu"
        result["speed"] |= interleaved_speeds(artifacts, args, bandwidth)
        sparse, full = result["speed"]["blocksparse"]["by_prompt_tokens"], result["speed"]["dense"]["by_prompt_tokens"]
        result["speed"]["blocksparse_over_dense"] = {
            n: {"prefill_tps": round(sparse[n]["prefill_tps"] / full[n]["prefill_tps"], 3),
                "decode_tps": round(sparse[n]["decode_tps"] / full[n]["decode_tps"], 3)} for n in sparse}
        for artifact in artifacts.values():
            shutil.rmtree(artifact.parent)
        shutil.rmtree(dense)
        shutil.rmtree(ckpt)
    save()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
