"""`phi3-export package`: a folder an app developer copies into an iOS or Android app as is.

    BUNDLE/
      manifest.json      every file (size, sha256), runtime and minimum OS, model facts,
                         size budget, validate figures when given
      onnx/              android (and ios with --with-onnx): the mobile ONNX artifact folder,
                         genai_config.json included, loaded by path with onnxruntime-genai
      coreml/            ios: model.mlpackage + config.json + tokenizer files (swift-transformers)
      coreai/            ios with --with-coreai: model.aimodel (iOS/macOS 27) + coreai_config.json + tokenizer files

The source artifacts are checked against their own manifest first, so a truncated
`.onnx.data` or a Git LFS pointer in OUT never gets packaged. The bundle is staged and
renamed into place whole.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

from phi3_export.errors import Phi3ExportError
from phi3_export.jsonfile import read_json
from phi3_export.manifest import Artifact, find_artifacts, weight_count
from phi3_export.output import file_entries, staged_output
from phi3_export.package.targets import RUNTIMES, TARGETS, BundleTarget, SizeLimit
from phi3_export.package.verify import problems_against
from phi3_export.paths import symlinks_in
from phi3_export.versions import library_versions, tool_version

BUNDLE_FORMAT = "phi3-export-bundle"
BUNDLE_VERSION = 1
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed: the same bundle gives the same zip


def _pick(artifacts: list[Artifact], fmt: str, target: str | None) -> Artifact | None:
    return next((a for a in artifacts if a.entry.get("format") == fmt and a.entry.get("target") == target), None)


def _vision_model(artifacts: list[Artifact]) -> bool:
    """An image + text model (Phi-3-vision): its ONNX artifacts carry a vision model."""
    from phi3_export.validate.images import is_vision

    return any(a.entry.get("format") == "onnx" and is_vision(a.genai_config) for a in artifacts)


def _choose(src: Path, bundle: BundleTarget, extras: tuple[str, ...]) -> list[tuple[str, Artifact]]:
    artifacts = find_artifacts(src)
    chosen = []
    required = list(bundle.required)
    for extra in extras:
        if extra == "onnx" and any(fmt == "onnx" for _, fmt, _ in required):
            continue  # android: the ONNX artifact is the bundle already
        if extra not in bundle.optional:
            raise Phi3ExportError(f"--with-{extra}: a {bundle.name} bundle has no {extra} artifact "
                                  f"(options: {', '.join('--with-' + k for k in bundle.optional) or 'none'})")
    if _vision_model(artifacts):
        # Core ML / Core AI programs of the image encoder do not exist (the plan refuses them at
        # quantize): an image + text bundle is the ONNX artifact with its vision and embedding models.
        required = [entry for entry in required if entry[1] == "onnx"]
        if not required and "onnx" not in extras:
            raise Phi3ExportError(f"{src}: an image + text model has no Core ML program (the image encoder has none); "
                                  f"its {bundle.name} bundle is the ONNX artifact: add --with-onnx")
    wanted = required + [bundle.optional[extra] for extra in extras if extra in bundle.optional]
    for folder, fmt, target in wanted:
        artifact = _pick(artifacts, fmt, target)
        if artifact is None:
            have = ", ".join(a.entry.get("path", a.name) for a in artifacts) or "none"
            how = f"--target {target}" if fmt == "onnx" else f"--format {fmt}"
            raise Phi3ExportError(f"{src}: no {fmt}{'-' + target if target else ''} artifact for a {bundle.name} bundle "
                                  f"(has: {have}); run quantize with {how}")
        chosen.append((folder, artifact))
    return chosen


def _check_source(artifact: Artifact) -> None:
    root = artifact.folder.parent
    problems = problems_against(root, artifact.entry.get("files") or [])
    if problems:
        raise Phi3ExportError(f"{artifact.folder}: does not match {root / 'manifest.json'}: {problems[0]}"
                              + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))


def _model_facts(folder: str, artifact: Artifact) -> dict:
    from phi3_export.export.onnx.targets import TARGETS as ONNX_TARGETS

    entry, manifest = artifact.entry, artifact.manifest
    size = entry.get("size_bytes") or sum(f["size"] for f in entry.get("files", []))
    weights = weight_count(manifest)
    facts = {"artifact": artifact.name, "folder": folder, "format": entry.get("format"), "target": entry.get("target"),
             "recipe": (manifest.get("recipe") or {}).get("name"), "settings": manifest.get("settings"),
             "size_bytes": size, "bits_per_weight": round(8 * size / weights, 3) if weights else None, "weights": weights}
    if entry.get("format") in ("coreml", "coreai"):
        config = read_json(artifact.folder / f"{entry['format']}_config.json")
        facts.update(context_length=config["context_length"], max_length=config["context_length"],
                     kv_cache_bytes_at_max_length=config["kv_cache_bytes"])
    else:
        kv = artifact.kv_cache_bytes(ONNX_TARGETS[entry["target"]].io_dtype, [])
        facts.update(context_length=artifact.genai_config["model"].get("context_length"), max_length=kv["max_length"],
                     accuracy_level=entry.get("accuracy_level"), providers=entry.get("providers"),
                     kv_cache_bytes_at_max_length=kv["at_max_length"])
        genai = artifact.genai_config["model"]
        if "vision" in genai:  # image + text: the three models and the processor config travel together
            from phi3_export.validate.images import processor_facts

            proc = processor_facts(artifact.folder)
            facts["image_input"] = {
                "models": {name: genai[name]["filename"] for name in ("vision", "embedding", "decoder")},
                "processor_config": genai["vision"].get("config_filename", "processor_config.json"),
                "num_crops": proc.num_crops, "num_img_tokens": proc.num_img_tokens,
                "note": "onnxruntime-genai 0.18's own image processor uses 16 crops whatever num_crops says",
            }
    return facts


def _runtime(fmt: str) -> dict:
    runtime = dict(RUNTIMES[fmt])
    if fmt == "onnx":
        runtime["version"] = library_versions().get("onnxruntime-genai")
    return runtime


def _validation(path: Path, names: set[str]) -> list[dict]:
    doc = read_json(Path(path), "a validate result")
    records = doc.get("records")
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise Phi3ExportError(f"{path}: not a validate result (no 'records' list of objects)")
    out = []
    for r in records:
        if r.get("artifact") not in names or r.get("status") != "ok":
            continue
        acc = r.get("accuracy") or {}
        speed = next((v for v in (r.get("speed") or {}).values() if isinstance(v, dict) and "decode_tokens_per_s" in v), {})
        out.append({
            "artifact": r["artifact"], "provider": r.get("provider"), "machine": r.get("machine"),
            "perplexity_reference": acc.get("perplexity_reference"), "perplexity": acc.get("perplexity_artifact"),
            "kld_mean": acc.get("kld_mean"), "top1_agreement": acc.get("top1_agreement"),
            "decode_tokens_per_s": (speed.get("decode_tokens_per_s") or {}).get("median"),
            "prefill_tokens_per_s": (speed.get("prefill_tokens_per_s") or {}).get("median"),
            "time_to_first_token_s": (speed.get("time_to_first_token_s") or {}).get("median"),
        })
        image = (r.get("vision") or {}).get("speed") or {}
        if "image_encode_s" in image:  # an image + text model: its one-image figures too
            out[-1]["image"] = {"size": image["image"], "image_tokens": image["image_tokens"],
                                "image_encode_s": image["image_encode_s"]["median"],
                                "time_to_first_token_s": image["time_to_first_token_s"]["median"],
                                "decode_tokens_per_s": (image.get("decode_tokens_per_s") or {}).get("median")}
    return out


def size_budget(total: int, limits: tuple[SizeLimit, ...], models: list[dict]) -> tuple[list[dict], list[str]]:
    checks, warnings = [], []
    for limit in limits:
        over = total > limit.bytes
        checks.append({"limit": limit.name, "limit_bytes": limit.bytes, "bundle_bytes": total, "over": over})
        if over:
            warnings.append(f"bundle is {total / 1e6:,.0f} MB, over the {limit.name} ({limit.bytes / 1e6:,.0f} MB): {limit.fix}")
    for m in models:
        kv = m.get("kv_cache_bytes_at_max_length") or 0
        if kv > 1 << 30:
            warnings.append(f"{m['folder']}: the KV cache at max_length {m['max_length']} takes {kv / 1e6:,.0f} MB of device memory; "
                            f"quantize with a smaller --max-length (it scales linearly) for phones")
        settings = m.get("settings") or {}
        if settings.get("block_size") == 32 and any(c["over"] for c in checks):
            warnings.append(f"{m['folder']}: block size 32 spends ~0.6 bits/weight on scales and zero points; "
                            "--block-size 128 makes the weights about 10% smaller (at some accuracy cost: see the report)")
    return checks, warnings


def _zip(folder: Path, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    with zipfile.ZipFile(tmp, "w", allowZip64=True) as z:
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            info = zipfile.ZipInfo(str(file.relative_to(folder.parent)), ZIP_DATE)
            info.external_attr = 0o644 << 16
            # Weights are incompressible: store them; compress the JSON and tokenizer files.
            info.compress_type = zipfile.ZIP_STORED if file.stat().st_size > 64 << 20 else zipfile.ZIP_DEFLATED
            with file.open("rb") as src, z.open(info, "w", force_zip64=True) as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    tmp.replace(path)


def package(src: Path, target: str, out: Path, *, with_onnx: bool = False, with_coreai: bool = False,
            validate_json: Path | None = None, make_zip: bool = False, force: bool = False) -> tuple[dict, list[str]]:
    """Build the bundle; returns its manifest and the size-budget warnings."""
    try:
        bundle = TARGETS[target]
    except KeyError:
        raise Phi3ExportError(f"--target: unknown bundle target {target!r}; choose from {', '.join(TARGETS)}") from None
    chosen = _choose(Path(src), bundle, ("onnx",) * with_onnx + ("coreai",) * with_coreai)
    out = Path(out)
    for _, artifact in chosen:
        _check_source(artifact)
        links = symlinks_in(artifact.folder)
        if links:  # copying would put the link's target (anything on this machine) into the bundle
            raise Phi3ExportError(f"{links[0]}: a symlink in the artifact; bundles hold plain files (copy the file in instead)")
        source = artifact.folder.parent.resolve()
        if out.resolve().is_relative_to(source) or source.is_relative_to(out.resolve()):
            raise Phi3ExportError(f"--out {out}: overlaps the source folder {artifact.folder.parent}; write the bundle elsewhere")
    with staged_output(out, force) as staging:
        models = []
        for folder, artifact in chosen:
            shutil.copytree(artifact.folder, staging / folder)
            models.append(_model_facts(folder, artifact))
        files = file_entries(staging, staging)
        total = sum(f["size"] for f in files)
        checks, warnings = size_budget(total, bundle.limits, models)
        manifest = {
            "format": BUNDLE_FORMAT, "schema_version": BUNDLE_VERSION, "target": target,
            "tool": {"name": "phi3-export", "version": tool_version()},
            "source_manifest_sha256": hashlib.sha256((chosen[0][1].folder.parent / "manifest.json").read_bytes()).hexdigest(),
            "runtimes": {folder: _runtime(fmt) for folder, fmt, _ in (*bundle.required, *bundle.optional.values())
                         if any(f == folder for f, _ in chosen)},
            "models": models, "size_bytes": total, "size_budget": checks,
            "validation": _validation(validate_json, {a.name for _, a in chosen}) if validate_json else None,
            "files": files,
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    if make_zip:
        _zip(out, out.with_name(out.name + ".zip"))
    return manifest, warnings
