"""`phi3-export verify BUNDLE`: is this exactly the bundle that was packaged, and does it load?

Meant for app CI before shipping: it names every missing, truncated, altered or Git LFS
pointer file (a ~130-byte text starting ``version https://git-lfs`` where the weights
should be, what a clone without LFS gives you), then loads what can be loaded here:
genai_config.json and the tokenizer, the ONNX model through onnxruntime-genai from the
bundle path (an image + text model also answers one image prompt: vision, embedding and
decoder models and processor_config.json), the Core ML package's spec (prediction needs macOS).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from phi3_export.errors import Phi3ExportError
from phi3_export.jsonfile import read_json
from phi3_export.output import sha256
from phi3_export.paths import inside

LFS_PREFIX = b"version https://git-lfs"


def _is_lfs_pointer(path: Path) -> bool:
    if path.stat().st_size > 1024:
        return False
    with path.open("rb") as f:
        return f.read(len(LFS_PREFIX)) == LFS_PREFIX


def problems_against(root: Path, files: list[dict]) -> list[str]:
    """One line per file under ``root`` that does not match its manifest entry."""
    problems = []
    for entry in files:
        try:
            if not isinstance(entry, dict) or not isinstance(entry.get("size"), int) or not isinstance(entry.get("sha256"), str):
                raise Phi3ExportError(f"manifest.json: a files entry lacks path, size or sha256: {str(entry)[:80]}")
            path = inside(root, entry.get("path"), "manifest.json: file")
        except Phi3ExportError as exc:
            problems.append(str(exc))
            continue
        if path.is_symlink():
            problems.append(f"symlink instead of the file: {entry['path']} (a bundle holds plain files)")
        elif not path.is_file():
            problems.append(f"missing: {entry['path']}")
        elif _is_lfs_pointer(path):
            problems.append(f"Git LFS pointer instead of the file: {entry['path']} ({path.stat().st_size} bytes; "
                            f"run `git lfs pull`, the real file is {entry['size']:,} bytes)")
        elif path.stat().st_size < entry["size"]:
            problems.append(f"truncated: {entry['path']} ({path.stat().st_size:,} of {entry['size']:,} bytes)")
        elif path.stat().st_size != entry["size"]:
            problems.append(f"wrong size: {entry['path']} ({path.stat().st_size:,} bytes, manifest says {entry['size']:,})")
        elif sha256(path) != entry["sha256"]:
            problems.append(f"altered: {entry['path']} (sha256 differs from the manifest)")
    return problems


@dataclass
class VerifyResult:
    problems: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)  # what was checked and held

    @property
    def ok(self) -> bool:
        return not self.problems


def _load_onnx(folder: Path, result: VerifyResult, rel: str) -> None:
    config = folder / "genai_config.json"
    if not config.is_file():
        result.problems.append(f"missing: {rel}/genai_config.json (onnxruntime-genai cannot open the model without it)")
        return
    try:
        read_json(config)
    except Phi3ExportError as exc:
        result.problems.append(f"{rel}/genai_config.json: {str(exc).removeprefix(str(config) + ': ')}")
        return
    try:
        import onnxruntime_genai as og

        model = og.Model(str(folder))
        tokenizer = og.Tokenizer(model)
        ids = tokenizer.encode("Hello")
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + 2)
        generator = og.Generator(model, params)
        generator.append_tokens(ids)
        generator.generate_next_token()
        result.checks.append(f"{rel}: onnxruntime-genai opened the model from the bundle path and generated a token")
    except Exception as exc:  # noqa: BLE001 - any load failure is the finding: report it, exit non-zero
        result.problems.append(f"{rel}: onnxruntime-genai could not load it: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
        return
    if "vision" in (read_json(config).get("model") or {}):
        _image_prompt(og, model, tokenizer, folder, result, rel)


def _image_prompt(og, model, tokenizer, folder: Path, result: VerifyResult, rel: str) -> None:
    """One image prompt (a small generated PNG) through the runtime's own processor, as an app
    sends it: vision, embedding and decoder run, then decode steps."""
    import json

    from phi3_export.validate.images import ImagePrompts, sample_image

    try:
        prompts = ImagePrompts(og, model, folder)
        text = tokenizer.apply_chat_template(json.dumps([{"role": "user", "content": "<|image_1|>\nWhat is this?"}]),
                                             add_generation_prompt=True)
        inputs = prompts.runtime(text, [sample_image(64, 48)])
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=inputs.ids.shape[1] + 3, min_length=inputs.ids.shape[1] + 3)
        generator = og.Generator(model, params)
        generator.set_inputs(inputs.tensors)
        steps = 0
        while not generator.is_done():
            generator.generate_next_token()
            steps += 1
    except Exception as exc:  # noqa: BLE001 - a missing processor config or a broken vision model is the finding
        result.problems.append(f"{rel}: an image prompt failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
        return
    if steps != 3:
        result.problems.append(f"{rel}: an image prompt decoded {steps} tokens, not 3")
        return
    result.checks.append(f"{rel}: an image prompt (64x48 PNG, {inputs.image_tokens[0]} image tokens, "
                         f"{inputs.crops - 1} crop slots from the runtime's processor) ran through vision, embedding and "
                         f"decoder and decoded {steps} tokens")


def _load_coreml(folder: Path, result: VerifyResult, rel: str) -> None:
    from phi3_export.export.coreml.contract import CAUSAL_MASK, INPUT_IDS, KEY_CACHE, LOGITS, VALUE_CACHE

    package = folder / "model.mlpackage"
    try:
        from phi3_export.export.coreml.ct import coremltools

        ct = coremltools()
        spec = ct.models.MLModel(str(package), skip_model_load=True).get_spec()
    except Exception as exc:  # noqa: BLE001 - a damaged package: report what coremltools said
        result.problems.append(f"{rel}/model.mlpackage: coremltools could not read it: {str(exc).splitlines()[0]}")
        return
    names = ({i.name for i in spec.description.input}, {o.name for o in spec.description.output},
             {s.name for s in spec.description.state})
    if names != ({INPUT_IDS, CAUSAL_MASK}, {LOGITS}, {KEY_CACHE, VALUE_CACHE}):
        result.problems.append(f"{rel}/model.mlpackage: IO {names} is not what swift-transformers' LanguageModel expects")
    else:
        result.checks.append(f"{rel}: model.mlpackage reloads (spec {spec.specificationVersion}) with inputIds, causalMask, "
                             "keyCache/valueCache states, logits; prediction not run: needs macOS 15 / iOS 18")


def _load_coreai(folder: Path, result: VerifyResult, rel: str) -> None:
    """Load the asset with Apple's runtime (on Linux its CPU reference) and check both functions' IO."""
    from phi3_export.errors import Phi3ExportError
    from phi3_export.export.coreai.contract import DECODE, PREFILL

    try:
        from phi3_export.export.coreai.lib import check_installed

        check_installed()
    except Phi3ExportError as exc:
        result.checks.append(f"{rel}: model.aimodel not loaded: {str(exc).removeprefix('--format coreai needs ')}")
        return
    from phi3_export.validate.coreai_runtime import describe_in_subprocess

    try:
        functions = describe_in_subprocess(folder)
    except Exception as exc:  # noqa: BLE001 - a damaged asset: report what the runtime said
        result.problems.append(f"{rel}/model.aimodel: the Core AI runtime could not load it: {str(exc).splitlines()[0]}")
        return
    for name in (PREFILL, DECODE):
        io = functions.get(name)
        if io != {"inputs": ["inputIds", "position"], "outputs": ["logits"], "states": ["keyCache", "valueCache"]}:
            result.problems.append(f"{rel}/model.aimodel: function {name} has IO {io}, not what coreai_config.json states")
            return
    result.checks.append(f"{rel}: model.aimodel loads in the Core AI runtime with {PREFILL} and {DECODE} "
                         "(inputIds, position -> logits; keyCache/valueCache states)")


def _load_tokenizer(folder: Path, result: VerifyResult, rel: str) -> None:
    path = folder / "tokenizer.json"
    if not path.is_file():
        result.problems.append(f"missing: {rel}/tokenizer.json")
        return
    try:
        from tokenizers import Tokenizer

        Tokenizer.from_file(str(path)).encode("Hello")
        result.checks.append(f"{rel}: tokenizer.json loads and encodes")
    except Exception as exc:  # noqa: BLE001 - a broken tokenizer file is the finding
        result.problems.append(f"{rel}/tokenizer.json: does not load: {str(exc).splitlines()[0]}")


def verify_bundle(bundle: Path) -> VerifyResult:
    bundle = Path(bundle)
    result = VerifyResult()
    manifest_path = bundle / "manifest.json"
    if not manifest_path.is_file():
        result.problems.append(f"missing: manifest.json ({bundle} is not a phi3-export bundle, or the manifest was left out)")
        return result
    try:
        manifest = read_json(manifest_path)
    except Phi3ExportError as exc:
        result.problems.append(f"manifest.json: {str(exc).removeprefix(str(manifest_path) + ': ')}")
        return result
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list) or not manifest["files"]:
        result.problems.append("manifest.json: not a phi3-export bundle manifest (no 'files' list)")
        return result
    files = manifest["files"]
    result.problems += problems_against(bundle, files)
    if not result.problems:
        result.checks.append(f"{len(files)} files match the manifest (size and sha256)")
    models = manifest.get("models")
    for model in models if isinstance(models, list) else []:
        try:
            if not isinstance(model, dict):
                raise Phi3ExportError(f"manifest.json: a models entry is not an object: {str(model)[:80]}")
            folder = inside(bundle, model.get("folder"), "manifest.json: model folder")
        except Phi3ExportError as exc:
            result.problems.append(str(exc))
            continue
        if not folder.is_dir():
            continue  # already named file by file above
        _load_tokenizer(folder, result, model["folder"])
        if model["format"] == "onnx":
            _load_onnx(folder, result, model["folder"])
        elif model["format"] == "coreml":
            _load_coreml(folder, result, model["folder"])
        elif model["format"] == "coreai":
            _load_coreai(folder, result, model["folder"])
    return result
