"""Tokens/sec and time to first token through onnxruntime-genai, in a process of its own.

Run as ``python -m phi3_export.validate.speed ARTIFACT --provider cpu ...`` by `validate`,
which samples that process's anonymous RSS from outside: the memory figure is the
artifact's, not the validating process's reference model or caches.

Measured the way onnxruntime-genai's benchmark does: prompt processing is the
``append_tokens`` call on a prompt of N tokens; decode is each later
``generate_next_token``; time to first token is both up to the first new token. One
warm-up run, then the median, min and max of ``runs`` runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

# onnxruntime-genai's names for execution providers (config.append_provider)
GENAI_PROVIDER = {"dml": "dml", "coreml": "coreml", "qnn": "QNN", "xnnpack": "XNNPACK", "nnapi": "nnapi", "cuda": "cuda"}


def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


def timed_generation(model, prompt: list[int], new_tokens: int) -> dict:
    """One generation of exactly ``new_tokens`` after ``prompt``: prefill and decode rates, TTFT."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new_tokens, min_length=len(prompt) + new_tokens)
    generator = og.Generator(model, params)
    t0 = time.perf_counter()
    generator.append_tokens(prompt)
    t1 = time.perf_counter()
    generator.generate_next_token()
    t2 = time.perf_counter()
    steps = 0
    while not generator.is_done() and steps < new_tokens - 1:
        generator.generate_next_token()
        steps += 1
    t3 = time.perf_counter()
    return {"prefill_tps": len(prompt) / (t1 - t0), "ttft_s": t2 - t0, "decode_tps": steps / (t3 - t2) if steps else None}


def load_model(artifact: Path, provider: str, threads: int):
    """The artifact in onnxruntime-genai on ``provider``, every model of it (decoder; embedding and
    vision where it has them) on ``threads`` intra-op threads."""
    import onnxruntime_genai as og

    config = og.Config(str(artifact))
    config.clear_providers()
    if provider != "cpu":
        config.append_provider(GENAI_PROVIDER[provider])
    if threads:
        sections = json.loads((Path(artifact) / "genai_config.json").read_text())["model"]
        options = {"session_options": {"intra_op_num_threads": threads}}
        config.overlay(json.dumps({"model": {name: options for name in ("decoder", "embedding", "vision") if name in sections}}))
    return og.Model(config)


def measure(artifact: Path, provider: str, prompt_ids: list[int], prompt_lengths: list[int], new_tokens: int, runs: int,
            threads: int) -> dict:
    model = load_model(artifact, provider, threads)
    out = {}
    for length in prompt_lengths:
        prompt = (prompt_ids * (length // max(len(prompt_ids), 1) + 1))[:length]
        timed = [timed_generation(model, prompt, new_tokens) for _ in range(runs + 1)][1:]  # the first warms up
        decode = [t["decode_tps"] for t in timed if t["decode_tps"] is not None]
        out[str(length)] = {
            "prompt_tokens": length,
            "prefill_tokens_per_s": _stats([t["prefill_tps"] for t in timed]),
            "time_to_first_token_s": _stats([t["ttft_s"] for t in timed]),
            "decode_tokens_per_s": _stats(decode) if decode else None,
            "decode_tokens": new_tokens,
        }
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--provider", default="cpu")
    ap.add_argument("--prompt-ids", type=Path, help="JSON list of token ids the prompts are cut from")
    ap.add_argument("--prompt-lengths", default="128,1024")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--image", action="store_true", help="image prompt speed instead (validate/vision.py: image_speed)")
    args = ap.parse_args(argv)
    if args.image:
        from phi3_export.validate.vision import image_speed

        model = load_model(args.artifact, args.provider, args.threads)
        args.json.write_text(json.dumps(image_speed(args.artifact, model, args.threads, args.new_tokens, args.runs)))
        return
    ids = json.loads(args.prompt_ids.read_text())
    lengths = [int(x) for x in args.prompt_lengths.split(",") if x]
    result = measure(args.artifact, args.provider, ids, lengths, args.new_tokens, args.runs, args.threads)
    args.json.write_text(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
