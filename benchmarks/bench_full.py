"""`make bench-full`: full-size Phi-3 and Phi-3.5-MoE shapes exported on this machine, memory and speed.

For each shape (random bf16 checkpoints with the recipe's real dimensions, written by
`phi3-export fixture --full-size --random`; speed and memory do not depend on weight values):
  - int4 ONNX export (RTN) for the recipe's targets: wall time, peak anonymous RSS of the
    process tree (sampled RssAnon) and peak total RSS (VmHWM, includes mapped shard pages);
  - optionally AWQ (mini shape): the same figures;
  - the CPU artifact's prefill/decode tokens/s and time to first token through
    onnxruntime-genai (its own process, one warm-up then median/min/max), and decode tok/s as a
    fraction of the ceiling `memory bandwidth / bytes read per decoded token`, with the
    bandwidth measured in the same run on all cores (the best of the run's start, just before
    and just after the speed run). A mixture of experts reads only its routed experts per
    token (top-2 of 16 for Phi-3.5-MoE): only those count.
A shape given decoder-layer counts in --layers (Phi-3.5-MoE: all 32 layers would be 84 GB
of bf16) is run at full widths on the first count; step `flat` exports it --flat-runs times
at every count and reports how the export's peak anonymous memory (lowest of the runs) grows
with the layer count (the issue's targets: peak <= 3 GB, 4 layers / 2 layers <= 1.3).
Then the ORT-GenAI builder beside ours on a shape it can finish (Phi-3-mini widths, fewer
layers): export time and peak memory ratios, decode/prefill ratios (runs interleaved).

Not part of CI: it needs tens of GB of disk (the Phi-3-medium fixture alone is 28 GB) and
takes tens of minutes. A shape is skipped, with the reason in the JSON, when the disk lacks
room. Fixtures are kept under --work and reused (they are deterministic).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import onnx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from phi3_export.fixtures.full_size import parameter_count
from phi3_export.machine import machine
from phi3_export.memory import run_measured
from phi3_export.recipes import load_recipe
from phi3_export.versions import library_versions, tool_version

GB = 1e9
# The targets for a layered (--layers) shape: peak anonymous RSS of the export, and its growth.
PEAK_ANON_TARGET_MB = 3000
FLATNESS_TARGET = 1.3
# Core AI (issue 18): coreai-core holds every constant of the asset in memory until it is written.
COREAI_PEAK_ANON_TARGET_MB = 4000
# Ops that run each token through k of the experts stacked along dim 0 of their weight inputs
# (every initializer input from this index on: QMoE's fc1/fc2/fc3 codes, scales, zero points, biases).
ROUTED_EXPERT_OPS = {"QMoE": 2, "MoE": 2}


def measured(cmd: list[str]) -> dict:
    r = run_measured(cmd)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd[:4])}...: {r.stderr[-2000:]}")
    return {"wall_s": round(r.wall_s, 1), "peak_rss_anon_mb": round(r.peak_rss_anon_mb), "peak_rss_mb": round(r.peak_rss_mb)}


def folder_mb(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) / 1e6, 1)


def memory_bandwidth_gbs(gib: float = 2.0, repeats: int = 11) -> float:
    """Read bandwidth of this machine on all cores: best of ``repeats`` sums over a ``gib`` GiB buffer.

    A sum is memory-bound (one add per 4 bytes read), and torch splits it over all cores.
    """
    import torch

    torch.set_num_threads(machine()["cores"])
    buf = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    buf.sum()  # touch every page first
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t0)
    del buf
    return round(gib * 2**30 / best / GB, 2)


def bytes_per_decoded_token(model_path: Path) -> dict:
    """Bytes of weights one decode step reads: every initializer, except gathered tables (one row)
    and routed experts (k of them).

    A Gather/GatherBlockQuantized table read by nothing else contributes one row (the token's
    embedding); a table also used as a MatMulNBits weight (tied LM head) is read whole. An
    expert-stacked weight [experts, ...] of a QMoE/MoE node that picks ``k`` experts per token
    contributes k of its experts (the router, norms, attention and LM head are read whole). The KV
    cache is reported apart: it grows with the context and the ceiling is defined on weights.
    """
    graph = onnx.load(str(model_path), load_external_data=False).graph
    consumers: dict[str, set[str]] = {}
    routed: dict[str, int] = {}  # expert-stacked initializer -> experts a token is routed to
    for node in graph.node:
        for j, name in enumerate(node.input):
            consumers.setdefault(name, set()).add(node.op_type)
            if name and node.op_type in ROUTED_EXPERT_OPS and j >= ROUTED_EXPERT_OPS[node.op_type]:
                routed[name] = next((a.i for a in node.attribute if a.name == "k"), 1)
    total = gathered = experts_all = experts_read = 0
    for init in graph.initializer:
        size = next((int(e.value) for e in init.external_data if e.key == "length"), len(init.raw_data))
        users = consumers.get(init.name, set())
        if users <= {"Gather", "GatherBlockQuantized"} and init.dims:
            gathered += size
            size //= init.dims[0]
        elif init.name in routed and users <= set(ROUTED_EXPERT_OPS):
            experts_all += size
            size = size * routed[init.name] // init.dims[0]
            experts_read += size
        total += size
    figures = {"bytes": total, "gathered_tables_bytes": gathered}
    if routed:
        figures |= {"routed_expert_bytes_all": experts_all, "routed_expert_bytes_read": experts_read,
                    "experts_per_token": sorted(set(routed.values()))}
    return figures


def kv_bytes_per_token(recipe_name: str, layers: int | None = None) -> int:
    m = load_recipe(recipe_name).model
    return (layers or m.num_layers) * 2 * m.num_kv_heads * m.head_dim * 4  # fp32 cache on CPU


def speed(artifact: Path, work: Path, prompt_len: int, new_tokens: int, runs: int, vocab: int, threads: int = 0) -> dict:
    import numpy as np

    ids = work / "prompt-ids.json"
    ids.write_text(json.dumps(np.random.RandomState(0).randint(100, min(vocab, 30000), prompt_len).tolist()))
    result = work / "speed.json"
    figures = measured([sys.executable, "-m", "phi3_export.validate.speed", str(artifact), "--prompt-ids", str(ids),
                        "--prompt-lengths", str(prompt_len), "--new-tokens", str(new_tokens), "--runs", str(runs),
                        "--threads", str(threads), "--json", str(result)])
    timed = json.loads(result.read_text())[str(prompt_len)]
    pick = lambda s: {k: round(s[k], 3) for k in ("median", "min", "max")}
    return {"prompt_tokens": prompt_len, "new_tokens": new_tokens, "runs": runs,
            "prefill_tps": pick(timed["prefill_tokens_per_s"]), "decode_tps": pick(timed["decode_tokens_per_s"]),
            "ttft_s": pick(timed["time_to_first_token_s"]), "process_peak_rss_anon_mb": figures["peak_rss_anon_mb"]}


def disk_needed(recipe_name: str, fixture: Path, n_artifacts: int, layers: int | None = None) -> int:
    params = parameter_count(load_recipe(recipe_name), layers)
    have_fixture = (fixture / "model.safetensors.index.json").is_file()
    # int4 g32 with fp32 scales is ~0.63 bytes/weight; the quantized checkpoint is staged too.
    return (0 if have_fixture else 2 * params) + int(0.7 * params * (n_artifacts + 1))


def fixture(recipe_name: str, path: Path, layers: int | None = None) -> dict:
    if (path / "model.safetensors.index.json").is_file():
        return {"reused": True}
    count = ["--layers", str(layers)] if layers else []
    figures = measured([sys.executable, "-m", "phi3_export", "fixture", "--recipe", recipe_name, "--full-size", "--random",
                        *count, "--out", str(path), "--force", "--quiet"])
    return {**figures, "reused": False}


def checkpoint_gb(ckpt: Path) -> float:
    return round(sum(p.stat().st_size for p in ckpt.glob("*.safetensors")) / GB, 2)


def quantize(ckpt: Path, out: Path, targets: list[str], *flags: str) -> dict:
    target = ["--target", ",".join(targets)] if targets else []
    figures = measured([sys.executable, "-m", "phi3_export", "quantize", "--checkpoint", str(ckpt), "--out", str(out),
                        "--bits", "4", *target, "--quiet", "--force", *flags])
    manifest = json.loads((out / "manifest.json").read_text())
    return {**figures, "artifacts_mb": {a["name"]: folder_mb(out / a["path"]) for a in manifest["artifacts"]}}


def run_shape(name: str, args, bandwidth: float) -> dict:
    recipe = load_recipe(name)
    targets = list(recipe.export.targets) if name in args.all_targets else ["cpu"]
    counts = args.layers.get(name, [None])  # None: the recipe's own layer count
    layers = counts[0]
    ckpt = args.work / (f"{name}-{layers}-layers" if layers else name)
    needed = disk_needed(name, ckpt, len(targets) if "rtn" in args.steps else 2, layers)
    free = shutil.disk_usage(args.work).free
    if free < needed:
        msg = f"skipped: needs about {needed / GB:.0f} GB free disk, {free / GB:.0f} GB free at {args.work}"
        print(f"{name}: {msg}", flush=True)
        return {"status": msg}
    result: dict = {"status": "ran", "layers": layers or recipe.model.num_layers, "parameters": parameter_count(recipe, layers),
                    "fixture": fixture(name, ckpt, layers), "checkpoint_gb": checkpoint_gb(ckpt)}
    if layers:
        result["parameters_all_layers"] = parameter_count(recipe)
    print(f"{name}: fixture {result['fixture']}", flush=True)
    if "rtn" in args.steps:
        out = args.work / f"{name}-int4"
        result["export_rtn"] = {"targets": targets, **quantize(ckpt, out, targets)}
        print(f"{name}: RTN export {result['export_rtn']}", flush=True)
        if "speed" in args.steps:
            cpu = out / next(a["path"] for a in json.loads((out / "manifest.json").read_text())["artifacts"] if a["target"] == "cpu")
            per_token = bytes_per_decoded_token(cpu / "model.onnx")
            runs, new_tokens = ((args.repeats, args.new_tokens) if name in args.all_targets
                                else (args.repeats_large, args.new_tokens_large))
            # On a shared machine a measurement undershoots while others load the memory bus: the
            # ceiling takes the best of the run's first one and those just before and after this speed run.
            near = [memory_bandwidth_gbs()]
            result["speed_cpu"] = speed(cpu, args.work, args.prompt_len, new_tokens, runs, recipe.model.vocab_size, args.threads)
            near.append(memory_bandwidth_gbs())
            best = max(bandwidth, *near)
            ceiling = best * GB / per_token["bytes"]
            context = args.prompt_len + new_tokens
            result["bandwidth_ceiling"] = {
                "weight_bytes_per_token": per_token.pop("bytes"), **per_token, "memory_read_bandwidth_gbs": best,
                "bandwidth_measurements_gbs": {"run_start": bandwidth, "before_speed": near[0], "after_speed": near[1]},
                "kv_cache_bytes_read_at_end": kv_bytes_per_token(name, layers) * context, "ceiling_tps": round(ceiling, 3),
                "decode_fraction_of_ceiling": round(result["speed_cpu"]["decode_tps"]["median"] / ceiling, 3)}
            print(f"{name}: speed {result['speed_cpu']} ceiling {result['bandwidth_ceiling']}", flush=True)
        shutil.rmtree(out)
    if "awq" in args.steps and name in args.awq:
        result["export_awq"] = awq(name, args)
        print(f"{name}: AWQ export {result['export_awq']}", flush=True)
    if "coreml" in args.steps and name in args.coreml:
        out = args.work / f"{name}-coreml"
        result["export_coreml"] = quantize(ckpt, out, [], "--format", "coreml")
        result["export_coreml"]["context_length"] = load_recipe(name).export.coreml.context_length
        print(f"{name}: Core ML export {result['export_coreml']}", flush=True)
        shutil.rmtree(out)
    if "coreai" in args.steps and name in args.coreai:
        out = args.work / f"{name}-coreai"
        result["export_coreai"] = quantize(ckpt, out, [], "--format", "coreai")
        result["export_coreai"]["context_length"] = load_recipe(name).export.coreai.context_length
        result["export_coreai"]["peak_anon_target_mb"] = COREAI_PEAK_ANON_TARGET_MB
        print(f"{name}: Core AI export {result['export_coreai']}", flush=True)
        shutil.rmtree(out)
    if "flat" in args.steps and "rtn" in args.steps and len(counts) > 1:
        first = result["export_rtn"] if targets == ["cpu"] else None  # else a run of its own at the first count
        result["flatness"] = flatness(name, counts, first, ckpt, args)
        print(f"{name}: flatness {result['flatness']}", flush=True)
    if name not in args.keep_fixtures:
        shutil.rmtree(ckpt)
    return result


def flatness(name: str, counts: list[int], first: dict | None, first_ckpt: Path, args) -> dict:
    """The RTN cpu export at each layer count, ``--flat-runs`` times: peak anonymous RSS against the first count's.

    The exporter streams a layer (an expert) at a time, so the peak should not grow with the
    layer count. Its highest point is a transient late in the export (the tables), whose height
    varies from run to run by hundreds of MB whatever the layer count, so each count keeps the
    lowest peak of its runs (as the memory-flatness tests do). The first count's run from step
    rtn is one of its runs; each further fixture is written, exported and (unless kept) deleted in turn.
    """
    keys = ("wall_s", "peak_rss_anon_mb", "peak_rss_mb")
    rows = []
    for layers in counts:
        ckpt, out = (first_ckpt if layers == counts[0] else args.work / f"{name}-{layers}-layers"), args.work / f"{name}-flat-int4"
        reuse = first is not None and layers == counts[0]
        runs = [{k: first[k] for k in keys}] if reuse else []
        row: dict = {"layers": layers, **({"artifact_mb": sum(first["artifacts_mb"].values())} if reuse else {})}
        if layers != counts[0]:
            needed = disk_needed(name, ckpt, 1, layers)
            free = shutil.disk_usage(args.work).free
            if free < needed:
                rows.append({**row, "status": f"skipped: needs about {needed / GB:.0f} GB free disk, {free / GB:.0f} GB free"})
                continue
            row |= {"fixture": fixture(name, ckpt, layers), "checkpoint_gb": checkpoint_gb(ckpt)}
        while len(runs) < args.flat_runs:
            figures = quantize(ckpt, out, ["cpu"])
            row["artifact_mb"] = sum(figures["artifacts_mb"].values())
            runs.append({k: figures[k] for k in keys})
            shutil.rmtree(out)
            print(f"{name}: {layers} layers, export {len(runs)}: {runs[-1]}", flush=True)
        if layers != counts[0] and name not in args.keep_fixtures:
            shutil.rmtree(ckpt)
        rows.append({**row, "runs": runs, "peak_rss_anon_mb": min(r["peak_rss_anon_mb"] for r in runs),
                     "wall_s": min(r["wall_s"] for r in runs)})
    peaks = [r["peak_rss_anon_mb"] for r in rows if "peak_rss_anon_mb" in r]
    highest = max(r["peak_rss_anon_mb"] for row in rows for r in row.get("runs", []))
    ratio = round(peaks[-1] / peaks[0], 3) if len(peaks) > 1 else None
    return {"layer_counts": rows, "peak_anon_ratio_last_over_first": ratio, "ratio_target": FLATNESS_TARGET,
            "highest_peak_rss_anon_mb_of_any_run": highest, "peak_anon_target_mb": PEAK_ANON_TARGET_MB,
            "meets_ratio_target": ratio is not None and ratio <= FLATNESS_TARGET,
            "meets_peak_target": highest <= PEAK_ANON_TARGET_MB}


def awq(name: str, args) -> dict:
    """AWQ at the shape's full widths and vocabulary, on ``--awq-layers`` decoder layers.

    AWQ calibrates one layer at a time, so its peak memory does not grow with the layer count
    (tests/test_awq.py checks 24 vs 4 layers); at full widths one layer takes minutes on two
    cores, so all 32 layers would take hours. Time per layer is reported for extrapolation.
    """
    ckpt = args.work / f"{name}-{args.awq_layers}-layers"
    if not (ckpt / "model.safetensors.index.json").is_file():
        measured([sys.executable, "-m", "phi3_export", "fixture", "--recipe", name, "--full-size", "--random",
                  "--layers", str(args.awq_layers), "--out", str(ckpt), "--force"])
    out = args.work / f"{name}-awq"
    flags = ["--method", "awq", "--calib-samples", str(args.awq_samples), "--calib-seqlen", str(args.awq_seqlen)]
    figures = quantize(ckpt, out, ["cpu"], *flags)
    shutil.rmtree(out)
    shutil.rmtree(args.work / f".{out.name}.awq-work", ignore_errors=True)
    shutil.rmtree(ckpt)
    return {"layers": args.awq_layers, "targets": ["cpu"], "calib_samples": args.awq_samples, "calib_seqlen": args.awq_seqlen,
            **figures, "wall_s_per_layer_upper_bound": round(figures["wall_s"] / args.awq_layers, 1),
            "note": f"full widths and vocabulary, {args.awq_layers} decoder layers; peak memory is per layer"}


def decode_sweep(args, bandwidth: float) -> dict:
    """Why decode is where it is: MatMulNBits variants and thread counts on Phi-3-mini widths, fewer layers.

    If decode were bound by memory bandwidth, a second thread would add little and fewer bytes
    per token (block 128: fewer scales) would speed it up in proportion.
    """
    from bench_export import export_ours

    from phi3_export.fixtures.full_size import write_full_size

    work = args.work / "decode-sweep"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ckpt = work / "mini-width"
    write_full_size(load_recipe("phi-3-mini-4k"), ckpt, layers=args.builder_layers)
    rows = []
    for block, level in ((32, 4), (32, 1), (128, 4), (128, 1)):
        out = work / f"g{block}-a{level}"
        export_ours(ckpt, out, block, level)
        artifact = out / "onnx-cpu"
        per_token = bytes_per_decoded_token(artifact / "model.onnx")["bytes"]
        for threads in ((1, 2) if (block, level) == (32, 4) else (2,)):
            timed = speed(artifact, work, args.prompt_len, args.new_tokens, args.repeats, 32064, threads)
            decode = timed["decode_tps"]["median"]
            rows.append({"block_size": block, "accuracy_level": level, "threads": threads, "weight_bytes_per_token": per_token,
                         "decode_tps": timed["decode_tps"], "prefill_tps": timed["prefill_tps"],
                         "effective_gbs": round(decode * per_token / GB, 2),
                         "decode_fraction_of_ceiling": round(decode / (bandwidth * GB / per_token), 3)})
            print(f"decode sweep: {rows[-1]}", flush=True)
        shutil.rmtree(out)
    shutil.rmtree(work)
    return {"shape": f"phi-3-mini-4k widths, {args.builder_layers} layers", "rows": rows}


def builder_comparison(args) -> dict:
    """Ours vs the ORT-GenAI builder on Phi-3-mini widths with fewer layers (the builder holds the whole model)."""
    from bench_export import export_builder, export_ours, size_mb, speeds

    from phi3_export.fixtures.full_size import write_full_size

    work = args.work / "builder-comparison"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ckpt = work / "mini-width"
    write_full_size(load_recipe("phi-3-mini-4k"), ckpt, layers=args.builder_layers)
    ours = export_ours(ckpt, work / "ours", 32, 4)
    builder = export_builder(ckpt, work / "builder", 32, 4)
    speed_both = speeds({"ours": ours["artifact"], "builder": builder["artifact"]}, args.prompt_len, args.new_tokens, args.repeats,
                        args.threads)
    for tool in (ours, builder):
        tool["size_mb"] = size_mb(Path(tool["artifact"]))
        del tool["artifact"]

    def ratio(key: str) -> float:
        return round(speed_both["ours"][key]["median"] / speed_both["builder"][key]["median"], 3)

    shutil.rmtree(work)
    return {"shape": f"phi-3-mini-4k widths, {args.builder_layers} layers", "block_size": 32, "symmetric": True,
            "accuracy_level": 4, "export": {"ours": ours, "builder": builder,
                                            "ratio_wall_ours_over_builder": round(ours["wall_s"] / builder["wall_s"], 3),
                                            "ratio_peak_anon_ours_over_builder": round(ours["peak_rss_anon_mb"] / builder["peak_rss_anon_mb"], 3)},
            "speed": {**speed_both, "ratio_ours_over_builder": {k: ratio(k) for k in ("prefill_tps", "decode_tps")}}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "build" / "bench")
    ap.add_argument("--work", type=Path, default=REPO / "build" / "full", help="fixtures and artifacts (tens of GB)")
    ap.add_argument("--shapes", default="phi-3-mini-4k,phi-3-medium-4k,phi-3.5-moe")
    ap.add_argument("--layers", action="append", metavar="SHAPE=N,N",
                    help="run SHAPE at full widths with N decoder layers (the first count; step flat: each further count "
                         "too) instead of the recipe's; repeatable [default: phi-3.5-moe=2,4]")
    ap.add_argument("--all-targets", default="phi-3-mini-4k", help="shapes exported for every recipe target (others: cpu)")
    ap.add_argument("--awq", default="phi-3-mini-4k", help="shapes also quantized with AWQ ('' for none)")
    ap.add_argument("--awq-samples", type=int, default=32)
    ap.add_argument("--coreml", default="phi-3-mini-4k", help="shapes also exported to Core ML ('' for none)")
    ap.add_argument("--coreai", default="phi-3-mini-4k", help="shapes also exported to Core AI ('' for none)")
    ap.add_argument("--steps", default="rtn,speed,flat,awq,coreml,coreai,sweep,builder",
                    help="which measurements to run: per shape rtn, speed, flat (--layers shapes), awq, coreml, coreai; "
                         "then sweep, builder")
    ap.add_argument("--flat-runs", type=int, default=2,
                    help="exports per layer count in step flat; each count keeps its lowest peak (a transient late "
                         "in the export varies from run to run)")
    ap.add_argument("--json", default="bench_full.json", help="result file name under --out")
    ap.add_argument("--awq-seqlen", type=int, default=256)
    ap.add_argument("--awq-layers", type=int, default=2, help="decoder layers of the AWQ run (full widths)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens-large", type=int, default=32, help="decode tokens for shapes not in --all-targets")
    ap.add_argument("--repeats-large", type=int, default=3)
    ap.add_argument("--threads", type=int, default=machine()["cores"],
                    help="intra_op_num_threads for speed runs (default: all cores; 0 = onnxruntime's default, "
                         "which used one thread on this 2-core VM)")
    ap.add_argument("--builder-layers", type=int, default=8, help="layers of the mini-width model both tools export (0: skip)")
    ap.add_argument("--keep-fixtures", default="", help="shapes whose full-size checkpoints are kept for the next run")
    args = ap.parse_args()
    args.all_targets = set(filter(None, args.all_targets.split(",")))
    args.awq = set(filter(None, args.awq.split(",")))
    args.coreml = set(filter(None, args.coreml.split(",")))
    args.coreai = set(filter(None, args.coreai.split(",")))
    args.steps = set(filter(None, args.steps.split(",")))
    args.keep_fixtures = set(filter(None, args.keep_fixtures.split(",")))
    args.layers = {shape: [int(n) for n in counts.split(",")]
                   for shape, counts in (item.split("=", 1) for item in (args.layers or ["phi-3.5-moe=2,4"]))}
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)

    bandwidth = memory_bandwidth_gbs()
    print(f"memory read bandwidth: {bandwidth} GB/s", flush=True)
    result = {"schema_version": 1, "tool_version": tool_version(), "versions": library_versions(), "machine": machine(),
              "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "memory_read_bandwidth_gbs": bandwidth,
              "settings": {"bits": 4, "block_size": 32, "symmetric": True, "accuracy_level": 4, "prompt_len": args.prompt_len,
                           "intra_op_num_threads": args.threads},
              "shapes": {}}
    path = args.out / args.json
    for name in filter(None, args.shapes.split(",")):
        result["shapes"][name] = run_shape(name, args, bandwidth)
        path.write_text(json.dumps(result, indent=2) + "\n")  # partial results survive a later failure
    if args.builder_layers and "sweep" in args.steps:
        result["decode_sweep"] = decode_sweep(args, bandwidth)
        path.write_text(json.dumps(result, indent=2) + "\n")
    if args.builder_layers and "builder" in args.steps:
        result["builder_comparison"] = builder_comparison(args)
        print(f"builder comparison: {result['builder_comparison']}", flush=True)
    # Measured again at the end: on a shared VM it moves between runs; the ceiling above used the first.
    result["memory_read_bandwidth_gbs_at_end"] = memory_bandwidth_gbs()
    print(f"memory read bandwidth at the end: {result['memory_read_bandwidth_gbs_at_end']} GB/s", flush=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
