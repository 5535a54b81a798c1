"""`make bench` (validate part): `phi3-export validate` on the SmolLM2-as-Phi3 artifacts.

Runs after bench_awq.py, which builds the checkpoint and its fp32 / RTN / AWQ artifacts
under build/bench/awq-work/. Records accuracy against the fp32 checkpoint, prefill/decode
tokens/s, time to first token and peak memory of each artifact on this machine, in
build/bench/bench_validate.json (the validate records themselves).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = ("fp32", "rtn_g128a", "awq_g128a", "rtn_g32s", "awq_g32s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "build" / "bench")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    ckpt = REPO / "build" / "fixtures" / "smollm2-135m-phi3"
    records = []
    for name in ARTIFACTS:
        folder = args.out / "awq-work" / name
        if not (folder / "manifest.json").is_file():
            sys.exit(f"{folder}: missing; run benchmarks/bench_awq.py first")
        result = args.out / f"validate-{name}.json"
        cmd = [sys.executable, "-m", "phi3_export", "validate", str(folder), "--reference", str(ckpt), "--json", str(result),
               "--runs", str(args.runs), "--cache-dir", str(args.out / "reference-cache"), "--quiet"]
        done = subprocess.run(cmd, check=False, capture_output=True, text=True)
        print(done.stdout, flush=True)
        if done.returncode:
            print(done.stderr, file=sys.stderr)
        records += json.loads(result.read_text())["records"]
    path = args.out / "bench_validate.json"
    path.write_text(json.dumps({"schema_version": 1, "records": records}, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
