"""App bundles: package -> verify passes; verify names each kind of damage; the android bundle generates."""

import json
import shutil
import zipfile

import onnxruntime_genai as og
import pytest
from click.testing import CliRunner

from phi3_export.cli import main
from phi3_export.package import package, verify_bundle
from phi3_export.package.bundle import size_budget
from phi3_export.package.targets import TARGETS


@pytest.fixture(scope="module")
def out_folder(exported):
    return exported("phi-3-mini-4k", fixture_kwargs={"train_steps": 150}, bits=4, formats=("onnx", "coreml"),
                    targets=("cpu", "mobile"))


@pytest.fixture()
def android(out_folder, tmp_path):
    package(out_folder, "android", tmp_path / "bundle")
    return tmp_path / "bundle"


def test_android_bundle_verifies_and_generates_from_its_path(android, tmp_path):
    result = verify_bundle(android)
    assert result.ok, result.problems
    manifest = json.loads((android / "manifest.json").read_text())
    assert manifest["target"] == "android" and manifest["runtimes"]["onnx"]["runtime"] == "onnxruntime-genai"
    model_facts = manifest["models"][0]
    assert model_facts["target"] == "mobile" and model_facts["max_length"] == 2048 and model_facts["accuracy_level"] == 4
    assert model_facts["kv_cache_bytes_at_max_length"] > 0 and model_facts["bits_per_weight"] > 0
    assert {f["path"] for f in manifest["files"]} >= {"onnx/model.onnx", "onnx/model.onnx.data", "onnx/genai_config.json",
                                                        "onnx/tokenizer.json", "onnx/LICENSE"}
    # an app opens it by folder path, as ai.onnxruntime.genai.Model(path) does
    model = og.Model(str(android / "onnx"))
    tokenizer = og.Tokenizer(model)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=24)
    generator = og.Generator(model, params)
    generator.append_tokens(tokenizer.encode("def f():"))
    while not generator.is_done():
        generator.generate_next_token()
    assert len(generator.get_sequence(0)) == 24


def _damage(bundle, kind):
    data = bundle / "onnx" / "model.onnx.data"
    if kind == "deleted":
        (bundle / "onnx" / "tokenizer.json").unlink()
        return "missing: onnx/tokenizer.json"
    if kind == "truncated":
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
        return "truncated: onnx/model.onnx.data"
    if kind == "lfs":
        data.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 1048576\n")
        return "Git LFS pointer instead of the file: onnx/model.onnx.data"
    if kind == "flipped":
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        data.write_bytes(bytes(raw))
        return "altered: onnx/model.onnx.data"
    if kind == "no_genai_config":
        (bundle / "onnx" / "genai_config.json").unlink()
        return "missing: onnx/genai_config.json"
    if kind == "manifest_hash":
        manifest = json.loads((bundle / "manifest.json").read_text())
        entry = next(f for f in manifest["files"] if f["path"] == "onnx/genai_config.json")
        entry["sha256"] = "0" * 64
        (bundle / "manifest.json").write_text(json.dumps(manifest))
        return "altered: onnx/genai_config.json"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["deleted", "truncated", "lfs", "flipped", "no_genai_config", "manifest_hash"])
def test_verify_names_each_damage_and_fails(android, kind):
    expected = _damage(android, kind)
    result = verify_bundle(android)
    assert not result.ok
    assert any(expected in p for p in result.problems), result.problems
    run = CliRunner().invoke(main, ["verify", str(android)])
    assert run.exit_code == 1 and expected in run.output


def test_ios_bundle_reloads_with_swift_transformers_io(out_folder, tmp_path):
    import coremltools as ct

    manifest, _ = package(out_folder, "ios", tmp_path / "ios", with_onnx=True)
    assert verify_bundle(tmp_path / "ios").ok
    spec = ct.models.MLModel(str(tmp_path / "ios" / "coreml" / "model.mlpackage"), skip_model_load=True).get_spec()
    assert {i.name for i in spec.description.input} == {"inputIds", "causalMask"}
    assert {s.name for s in spec.description.state} == {"keyCache", "valueCache"}
    assert [o.name for o in spec.description.output] == ["logits"]
    assert manifest["runtimes"]["coreml"]["minimum_os"] == {"iOS": "18.0", "macOS": "15.0"}
    assert {m["folder"] for m in manifest["models"]} == {"coreml", "onnx"}
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):  # what LanguageModel reads offline
        assert (tmp_path / "ios" / "coreml" / name).is_file()


def test_zip_is_deterministic_and_complete(out_folder, tmp_path):
    digests = []
    for k in (0, 1):
        package(out_folder, "android", tmp_path / f"b{k}" / "bundle", make_zip=True)
        digests.append((tmp_path / f"b{k}" / "bundle.zip").read_bytes())
    assert digests[0] == digests[1]
    with zipfile.ZipFile(tmp_path / "b0" / "bundle.zip") as z:
        names = set(z.namelist())
    assert "bundle/manifest.json" in names and "bundle/onnx/model.onnx.data" in names


def test_damaged_source_is_refused_and_nothing_written(exported, tmp_path):
    src = tmp_path / "out"
    shutil.copytree(exported("phi-3-mini-4k", bits=4, targets=("mobile",)), src)
    (src / "onnx-mobile" / "model.onnx.data").write_text("version https://git-lfs.github.com/spec/v1\n")
    run = CliRunner().invoke(main, ["package", str(src), "--target", "android", "--out", str(tmp_path / "bundle")])
    assert run.exit_code == 2 and "Git LFS pointer" in run.output and "model.onnx.data" in run.output
    assert not (tmp_path / "bundle").exists()


def test_missing_artifact_names_the_fix(exported, tmp_path):
    run = CliRunner().invoke(main, ["package", str(exported("phi-3-mini-4k", bits=4, targets=("cpu",))), "--target", "ios",
                                    "--out", str(tmp_path / "b")])
    assert run.exit_code == 2 and "--format coreml" in run.output


def test_size_budget_warns_with_numbers():
    models = [{"folder": "onnx", "max_length": 4096, "kv_cache_bytes_at_max_length": 3 << 30, "settings": {"block_size": 32}}]
    checks, warnings = size_budget(2_700_000_000, TARGETS["android"].limits, models)
    assert all(c["over"] for c in checks)
    assert any("2,700 MB" in w and "asset pack" in w for w in warnings)
    assert any("KV cache" in w and "--max-length" in w for w in warnings)
    assert any("--block-size 128" in w for w in warnings)
    checks, warnings = size_budget(2_700_000_000, TARGETS["ios"].limits, [])
    assert not checks[0]["over"] and not warnings


def test_ios_bundle_with_core_ai_verifies_and_loads_in_the_runtime(exported, tmp_path):
    out = exported("phi-3-mini-4k", bits=4, formats=("coreml", "coreai"), max_length=256)
    manifest, _ = package(out, "ios", tmp_path / "ios", with_coreai=True)
    assert {m["folder"] for m in manifest["models"]} == {"coreml", "coreai"}
    assert manifest["runtimes"]["coreai"]["minimum_os"] == {"iOS": "27.0", "macOS": "27.0"}
    coreai = next(m for m in manifest["models"] if m["folder"] == "coreai")
    assert coreai["context_length"] == 256 and coreai["kv_cache_bytes_at_max_length"] > 0
    result = verify_bundle(tmp_path / "ios")
    assert result.ok, result.problems
    assert any("model.aimodel loads in the Core AI runtime" in c for c in result.checks), result.checks
    # Damage the program bytes: verify fails (by size and hash, and the runtime refuses it).
    blob = tmp_path / "ios" / "coreai" / "model.aimodel" / "main.mlirb"
    blob.write_bytes(blob.read_bytes()[:1000])
    assert not verify_bundle(tmp_path / "ios").ok


def test_with_coreai_without_the_artifact_names_the_fix(exported, tmp_path):
    from phi3_export.errors import Phi3ExportError

    out = exported("phi-3-mini-4k", bits=4, formats=("coreml",))
    with pytest.raises(Phi3ExportError, match="no coreai artifact.*--format coreai"):
        package(out, "ios", tmp_path / "ios", with_coreai=True)
    with pytest.raises(Phi3ExportError, match="--with-coreai: a android bundle has no coreai"):
        package(out, "android", tmp_path / "android", with_coreai=True)
    assert not (tmp_path / "ios").exists() and not (tmp_path / "android").exists()
