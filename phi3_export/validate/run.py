"""`phi3-export validate`: one record per (artifact, execution provider).

Accuracy runs the artifact through ONNX Runtime and the unquantized checkpoint through
torch (streamed, see reference.py) on the same ids; speed and memory run in a separate
process through onnxruntime-genai. A provider this onnxruntime lacks gets a record with
"status": "not run" and the reason, never a number; the structural checks that need no
provider are in every record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from phi3_export.checkpoint.reader import Checkpoint
from phi3_export.errors import Phi3ExportError
from phi3_export.machine import machine
from phi3_export.manifest import Artifact, find_artifacts, weight_count
from phi3_export.memory import run_measured
from phi3_export.progress import Progress
from phi3_export.validate import accuracy, structure, tokenizer_parity
from phi3_export.validate.cache import LogitsCache, checkpoint_hash, default_cache_dir
from phi3_export.validate.images import is_vision
from phi3_export.validate.ort_decoder import OrtDecoder
from phi3_export.validate.reference import StreamedReference
from phi3_export.versions import library_versions, tool_version

SCHEMA_VERSION = 1
ORT_PROVIDERS = {
    "cpu": "CPUExecutionProvider", "dml": "DmlExecutionProvider", "xnnpack": "XnnpackExecutionProvider",
    "coreml": "CoreMLExecutionProvider", "nnapi": "NnapiExecutionProvider", "qnn": "QNNExecutionProvider",
}
WHY_MISSING = {
    "dml": "DirectML needs Windows and the onnxruntime-directml package",
    "coreml": "the Core ML EP needs macOS/iOS and an onnxruntime build with it",
    "nnapi": "NNAPI needs an Android device and the onnxruntime Android build",
    "xnnpack": "this onnxruntime build has no XNNPACK EP (it ships in the mobile builds)",
    "qnn": "QNN needs a Qualcomm NPU and the onnxruntime-qnn package",
}
# Mobile artifacts are meant for these too; validate says for each whether it could run here.
TARGET_PROVIDERS = {"mobile": ("cpu", "xnnpack", "nnapi", "coreml", "qnn")}
CHAT_PROMPTS = (
    "What does the for statement do in Python?",
    "Explain what a dictionary is, in one sentence.",
    "How do I read a file line by line?",
)
PROBE_MARGIN = 64  # positions compared on each side of a long-context threshold


@dataclass
class ValidateOptions:
    providers: tuple[str, ...] | None = None  # None: the artifact's own (manifest), plus mobile EPs for mobile
    eval_text: Path | None = None
    window: int = 512
    stride: int | None = None  # default: window (non-overlapping)
    prompt_lengths: tuple[int, ...] = (128, 1024)
    new_tokens: int = 128
    runs: int = 3
    threads: int = 0
    speed: bool = True
    generation_tokens: int = 32
    chat_prompts: tuple[str, ...] = CHAT_PROMPTS
    # Windows of the eval text a Core AI artifact runs through Apple's runtime, and tokens of
    # each (the runtime on Linux is a slow single-threaded reference interpreter).
    coreai_windows: int = 1
    coreai_tokens: int = 32
    cache_dir: Path = field(default_factory=default_cache_dir)
    tiktoken_file: Path | None = None  # the reference's tokenizer, where it has no tokenizer.json (--tiktoken-file)


class Reference:
    """The reference checkpoint, its eval ids, and its cached window logits."""

    def __init__(self, folder: Path, text: str, text_name: str, options: ValidateOptions):
        self.folder = Path(folder)
        self.ckpt = Checkpoint(self.folder, tiktoken_file=options.tiktoken_file)
        self.model = StreamedReference(self.ckpt)
        self.text, self.text_name = text, text_name
        self.tokenizer = tokenizer_parity.reference_tokenizer(self.ckpt.tokenizer_folder)  # after StreamedReference built it
        self.ids = list(self.tokenizer(text, add_special_tokens=False).input_ids)
        self.window = min(options.window, len(self.ids) - 1)
        self.stride = min(options.stride or options.window, self.window)
        self.windows = accuracy.windows(len(self.ids), self.window, self.stride)
        self.sha = checkpoint_hash(self.folder, options.cache_dir)
        self.text_sha = hashlib.sha256(text.encode()).hexdigest()
        # The ids, not only the text: the same text gives other ids under another tokenizer (--tiktoken-file).
        ids_sha = hashlib.sha256(np.asarray(self.ids, np.int64).tobytes()).hexdigest()
        self.cache = LogitsCache(options.cache_dir, self.sha, f"{self.text_sha}:{ids_sha}", self.window, self.stride)
        self._probes: dict[int, np.ndarray] = {}

    def sequences(self) -> list[np.ndarray]:
        arr = np.asarray(self.ids)
        return [arr[s : s + self.window + 1] for s, _ in self.windows]

    def window_logits(self, progress: Progress):
        if not self.cache.complete(len(self.windows)):
            progress.message(f"reference: {len(self.windows)} windows of {self.window} tokens through the fp32 checkpoint")
            seqs = torch.tensor(np.stack([s[:-1] for s in self.sequences()]))
            hidden = self.model.hidden_states(seqs)
            for k, logits in enumerate(self.model.logits(hidden)):
                self.cache.write(k, logits)
            self.cache.finish(len(self.windows))
        return (self.cache.read(k) for k in range(len(self.windows)))

    def next_tokens(self, ids: list[int]) -> np.ndarray:
        """Greedy next token after every prefix of ``ids``."""
        hidden = self.model.hidden_states(torch.tensor([ids]))
        return next(iter(self.model.logits(hidden))).argmax(-1)

    def probe_logits(self, ids: list[int], first: int) -> np.ndarray:
        key = hash((tuple(ids), first))
        if key not in self._probes:
            hidden = self.model.hidden_states(torch.tensor([ids]))[:, first:]
            self._probes[key] = next(iter(self.model.logits(hidden)))
        return self._probes[key]

    def describe(self) -> dict:
        return {"checkpoint": str(self.folder), "sha256": self.sha}


def _eval_text(options: ValidateOptions) -> tuple[str, str]:
    if options.eval_text is None:
        from phi3_export.fixtures.corpus import corpus_text

        return corpus_text("eval"), "default corpus, eval part"
    try:
        text = Path(options.eval_text).read_bytes().decode("utf-8")
    except OSError as exc:
        raise Phi3ExportError(f"{options.eval_text}: cannot read eval text ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise Phi3ExportError(f"{options.eval_text}: eval text is not UTF-8 (byte {exc.start})") from None
    if not text.strip():
        raise Phi3ExportError(f"{options.eval_text}: eval text is empty")
    return text, str(options.eval_text)


def _providers_for(artifact: Artifact, options: ValidateOptions) -> tuple[str, ...]:
    if options.providers:
        return options.providers
    return TARGET_PROVIDERS.get(artifact.entry.get("target"), tuple(artifact.entry.get("providers") or ("cpu",)))


def _accuracy(decoder: OrtDecoder, ref: Reference, progress: Progress) -> dict:
    def artifact_logits():
        for seq in ref.sequences():
            logits, _ = decoder.step(seq[None, :-1], decoder.empty_cache())
            yield logits[0]

    summary = accuracy.compare_windows(ref.ids, ref.window_logits(progress), artifact_logits(), ref.window, ref.stride)
    return {**summary, "eval_text": ref.text_name, "eval_sha256": ref.text_sha, "eval_tokens": len(ref.ids),
            "window": ref.window, "stride": ref.stride}


def _generation(artifact: Artifact, provider: str, ref: Reference, options: ValidateOptions) -> list[dict]:
    import onnxruntime_genai as og

    from phi3_export.validate.speed import GENAI_PROVIDER

    config = og.Config(str(artifact.folder))
    config.clear_providers()
    if provider != "cpu":
        config.append_provider(GENAI_PROVIDER[provider])
    model = og.Model(config)
    tokenizer = og.Tokenizer(model)
    out = []
    for prompt in options.chat_prompts:
        text = tokenizer.apply_chat_template(json.dumps([{"role": "user", "content": prompt}]), add_generation_prompt=True)
        ids = [int(t) for t in tokenizer.encode(text)]
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + options.generation_tokens)
        generator = og.Generator(model, params)
        generator.append_tokens(ids)
        new: list[int] = []
        while not generator.is_done():
            generator.generate_next_token()
            new.append(int(generator.get_next_tokens()[0]))
        del generator
        reference_next = ref.next_tokens(ids + new[:-1])[len(ids) - 1 :]
        out.append({"prompt": prompt, "prompt_tokens": len(ids), "generated_tokens": len(new),
                    "first_divergence": accuracy.first_divergence(new, reference_next),
                    "text": tokenizer.decode(new)[:200]})
    return out


def _probes(ref: Reference) -> list[tuple[str, int, int]]:
    """(name, threshold, first decoded position) for each context threshold the model has."""
    facts = ref.model.facts
    found = []
    if facts.rope.kind == "longrope" and facts.original_context_length < facts.context_length:
        # The long factors apply once the sequence is longer than the original context; a
        # KV cache filled before that keeps short-factor keys (as in transformers), so the
        # decode probe starts past the threshold.
        t = facts.original_context_length
        found.append(("longrope_past_original_context", t, t + 1))
    if isinstance(facts.sliding_window, int) and facts.sliding_window < facts.context_length:
        t = facts.sliding_window  # decode across the window edge: where mini-4k users saw gibberish
        found.append(("past_sliding_window", t, t - PROBE_MARGIN))
    return found


def _long_context(decoder: OrtDecoder, artifact: Artifact, ref: Reference) -> list[dict]:
    """Artifact vs reference logits around each threshold, by prefill and by decode through the KV cache."""
    max_length = artifact.max_length
    out = []
    for kind, threshold, decode_from in _probes(ref):
        length = threshold + PROBE_MARGIN + 1
        if length > max_length:
            out.append({"probe": kind, "threshold": threshold, "status": "not run",
                        "reason": f"artifact max_length {max_length} < probe length {length}"})
            continue
        ids = np.asarray((ref.ids * (length // len(ref.ids) + 1))[:length])
        first = threshold - PROBE_MARGIN  # positions first..length-2 are compared, each predicting the next id
        expected = ref.probe_logits(ids[:-1].tolist(), first)
        prefill, _ = decoder.step(ids[None, :-1], decoder.empty_cache())
        _, cache = decoder.step(ids[None, :decode_from], decoder.empty_cache())
        decoded = []
        for p in range(decode_from, length - 1):
            logits, cache = decoder.step(ids[None, p : p + 1], cache)
            decoded.append(logits[0, 0])
        result = {"probe": kind, "threshold": threshold, "length": length, "status": "ok"}
        for mode, got, start in (("prefill", prefill[0, first:], first), ("decode", np.stack(decoded), decode_from)):
            positions = np.arange(start, length - 1)
            for side, keep in (("before", positions < threshold), ("past", positions >= threshold)):
                if not keep.any():
                    continue
                cmp = accuracy.Comparison()
                cmp.add(expected[positions[keep] - first], got[keep], ids[positions[keep] + 1])
                s = cmp.summary()
                result[f"{mode}_{side}"] = {"positions": s["positions"], "kld_mean": s["kld_mean"], "kld_max": s["kld_max"],
                                            "top1_agreement": s["top1_agreement"]}
        out.append(result)
    return out


def _memory(run) -> dict:
    return {"peak_rss_anon_mb": round(run.peak_rss_anon_mb, 1), "peak_rss_mb": round(run.peak_rss_mb, 1),
            "note": "speed process only: sampled RssAnon; peak_rss_mb is VmHWM (what ru_maxrss reports)"}


def _image_speed(artifact: Artifact, provider: str, options: ValidateOptions) -> dict:
    """Image encode, TTFT of a one-image prompt and decode after it (validate/vision.py), in a process of its own."""
    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "image_speed.json"
        cmd = [sys.executable, "-m", "phi3_export.validate.speed", str(artifact.folder), "--provider", provider, "--image",
               "--new-tokens", str(options.new_tokens), "--runs", str(options.runs), "--threads", str(options.threads),
               "--json", str(result_file)]
        run = run_measured(cmd)
        if run.returncode:
            last = (run.stderr.strip().splitlines() or ["no output"])[-1]
            raise Phi3ExportError(f"{artifact.folder}: image speed run on {provider} failed: {last}")
        return {**json.loads(result_file.read_text()), "memory": _memory(run)}


def _speed(artifact: Artifact, provider: str, ref: Reference, options: ValidateOptions) -> tuple[dict, dict]:
    max_length = artifact.max_length
    lengths = [n for n in options.prompt_lengths if n + options.new_tokens <= max_length]
    skipped = [n for n in options.prompt_lengths if n not in lengths]
    with tempfile.TemporaryDirectory() as tmp:
        ids_file, result_file = Path(tmp) / "ids.json", Path(tmp) / "speed.json"
        ids_file.write_text(json.dumps(ref.ids))
        cmd = [sys.executable, "-m", "phi3_export.validate.speed", str(artifact.folder), "--provider", provider,
               "--prompt-ids", str(ids_file), "--prompt-lengths", ",".join(map(str, lengths)),
               "--new-tokens", str(options.new_tokens), "--runs", str(options.runs), "--threads", str(options.threads),
               "--json", str(result_file)]
        run = run_measured(cmd)
        if run.returncode:
            last = (run.stderr.strip().splitlines() or ["no output"])[-1]
            raise Phi3ExportError(f"{artifact.folder}: speed run on {provider} failed: {last}")
        speed = json.loads(result_file.read_text())
    for n in skipped:
        speed[str(n)] = {"status": "not run", "reason": f"{n} + {options.new_tokens} tokens exceed max_length {max_length}"}
    return speed, _memory(run)


def validate_artifacts(path: Path, reference: Path, options: ValidateOptions, progress: Progress) -> dict:
    import onnxruntime as ort

    unknown = [p for p in options.providers or () if p not in ORT_PROVIDERS]
    if unknown:
        raise Phi3ExportError(f"--providers: unknown provider {unknown[0]!r}; choose from {', '.join(ORT_PROVIDERS)}")
    artifacts = find_artifacts(path)
    if not options.threads:
        # Explicitly all logical cores: onnxruntime's own default ran one thread on a 2-core VM.
        options = dataclasses.replace(options, threads=machine()["cores"])
    text, text_name = _eval_text(options)
    ref = Reference(reference, text, text_name, options)
    available = set(ort.get_available_providers())
    common = {"machine": machine(), "versions": {"phi3-export": tool_version(), **library_versions()},
              "reference": ref.describe()}
    records = []
    for artifact in artifacts:
        manifest = artifact.manifest
        base = {"artifact": artifact.name, "path": str(artifact.folder), "format": artifact.entry.get("format"),
                "target": artifact.entry.get("target"), "size_bytes": artifact.entry.get("size_bytes"),
                "recipe": (manifest.get("recipe") or {}).get("name"), "settings": manifest.get("settings"),
                "weights": weight_count(manifest),
                **({"mix_linear_weights": manifest["mix_linear_weights"]} if manifest.get("mix_linear_weights") else {})}
        if artifact.entry.get("format") == "coreml":
            from phi3_export.validate.coreml import validate_coreml

            records.extend(validate_coreml(artifact, ref, base, common, progress))
            continue
        if artifact.entry.get("format") == "coreai":
            from phi3_export.validate.coreai import validate_coreai

            records.extend(validate_coreai(artifact, ref, base, common, progress, options.coreai_windows,
                                           options.coreai_tokens))
            continue
        if artifact.entry.get("format") != "onnx":
            records.append({**base, "provider": None, "status": "not run",
                            "reason": f"format {artifact.entry.get('format')!r}: validate runs ONNX, Core ML and Core AI artifacts", **common})
            continue
        progress.message(f"validate: {artifact.name}")
        checks = structure.structural_checks(artifact.folder, artifact.genai_config, artifact.entry)
        parity = tokenizer_parity.check(artifact.folder, ref.tokenizer, ref.text)
        checks.append({"name": "tokenizer_parity", "passed": parity["passed"],
                       "detail": "ids and chat template identical" if parity["passed"] else parity["detail"]})
        vision = None
        if is_vision(artifact.genai_config):  # an image + text artifact: the image checks (validate/vision.py)
            from phi3_export.validate.vision import validate_vision

            progress.message(f"validate: {artifact.name}: image features, token counts, crops, image-prompt logits")
            vision_checks, vision = validate_vision(artifact, ref, options.threads)
            checks += vision_checks
        for provider in _providers_for(artifact, options):
            ep = ORT_PROVIDERS.get(provider, provider)  # a manifest may name one we do not know: "not run" below
            record = {**base, "provider": provider, "execution_provider": ep, "checks": checks, "tokenizer": parity}
            if ep not in available:
                reason = WHY_MISSING.get(provider, f"{ep} is not in this onnxruntime build")
                records.append({**record, "status": "not run", "reason": f"{reason} (available here: {', '.join(sorted(available))})",
                                **common})
                continue
            decoder = OrtDecoder(artifact.folder, threads=options.threads, providers=[ep])
            with progress.task(f"{artifact.name} [{provider}]", 4 if options.speed else 3) as task:
                record["accuracy"] = _accuracy(decoder, ref, progress)
                task.advance("accuracy")
                record["generation"] = _generation(artifact, provider, ref, options)
                task.advance("generation")
                record["long_context"] = _long_context(decoder, artifact, ref)
                task.advance("long context")
                contexts = [n + options.new_tokens for n in options.prompt_lengths]
                record["kv_cache_bytes"] = artifact.kv_cache_bytes(decoder.dtype, contexts)
                if options.speed:
                    record["speed"], record["memory"] = _speed(artifact, provider, ref, options)
                    task.advance("speed")
                else:
                    record["speed"] = {"status": "not run", "reason": "--no-speed"}
                if vision is not None:
                    image_speed = (_image_speed(artifact, provider, options) if options.speed and vision
                                   else {"status": "not run", "reason": "--no-speed" if not options.speed else "no image checks"})
                    record["vision"] = {**vision, "speed": image_speed}
            record["threads"] = options.threads
            records.append({**record, "status": "ok", **common})
            del decoder
    return {"schema_version": SCHEMA_VERSION, "records": records}


def failed_checks(result: dict) -> list[str]:
    seen, failed = set(), []
    for record in result["records"]:
        for check in record.get("checks", []):
            key = (record["artifact"], check["name"])
            if check["passed"] is False and key not in seen:
                seen.add(key)
                failed.append(f"{record['artifact']}: {check['name']}: {check['detail']}")
    return failed


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(result: dict) -> str:
    header = ("artifact", "provider", "status", "ppl ref", "ppl", "Δppl %", "KLD mean", "KLD p99", "top-1", "prefill tok/s",
              "decode tok/s", "TTFT s", "peak anon MB")
    rows = [header]
    for r in result["records"]:
        acc = r.get("accuracy") or {}
        speed = r.get("speed") or {}
        first = next((v for v in speed.values() if isinstance(v, dict) and "prefill_tokens_per_s" in v), {})
        rows.append((
            r["artifact"], r.get("provider") or "-", r["status"],
            _fmt(acc.get("perplexity_reference"), ".3f"), _fmt(acc.get("perplexity_artifact"), ".3f"),
            _fmt(acc.get("perplexity_change_pct"), "+.2f"), _fmt(acc.get("kld_mean"), ".2e"), _fmt(acc.get("kld_p99"), ".2e"),
            _fmt(acc.get("top1_agreement"), ".3f"),
            _fmt((first.get("prefill_tokens_per_s") or {}).get("median"), ".1f"),
            _fmt((first.get("decode_tokens_per_s") or {}).get("median"), ".1f"),
            _fmt((first.get("time_to_first_token_s") or {}).get("median"), ".3f"),
            _fmt((r.get("memory") or {}).get("peak_rss_anon_mb"), ".0f"),
        ))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    if any(r.get("vision") for r in result["records"]):
        from phi3_export.validate.vision import speed_lines

        lines += speed_lines(result["records"])
    return "\n".join(lines)
