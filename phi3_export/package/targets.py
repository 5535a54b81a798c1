"""What an app bundle holds per platform, and the store size limits it is checked against (data, not code)."""

from __future__ import annotations

from dataclasses import dataclass

ONNX_DIR, COREML_DIR, COREAI_DIR = "onnx", "coreml", "coreai"
GB, MiB = 1_000_000_000, 1 << 20


@dataclass(frozen=True)
class SizeLimit:
    name: str
    bytes: int
    fix: str  # what to do when the bundle is over it


@dataclass(frozen=True)
class BundleTarget:
    name: str
    # (folder in the bundle, artifact format, artifact target) in order
    required: tuple[tuple[str, str, str | None], ...]
    # the same, each added by its flag (--with-onnx, --with-coreai): {flag's format: entry}
    optional: dict[str, tuple[str, str, str | None]]
    limits: tuple[SizeLimit, ...]


# Store limits (App Store: uncompressed app size, as the issue states it; Google Play Asset
# Delivery: per-pack and cumulative download sizes as documented in 2021, possibly raised since). A model over them ships as a
# first-launch download, or split across packs where the format allows.
APP_STORE = SizeLimit("App Store uncompressed app size", 4 * GB,
                      "download the model at first launch (Background Assets) instead of shipping it in the app")
PLAY_PACK = SizeLimit("Play fast-follow/on-demand asset pack", 512 * MiB,
                      "split the files across several asset packs, or download the model at first launch")
PLAY_INSTALL_TIME = SizeLimit("Play install-time asset packs, total", 1024 * MiB,
                              "deliver the model in fast-follow/on-demand packs or download it at first launch")
PLAY_ALL_PACKS = SizeLimit("Play asset packs per app bundle, total", 2048 * MiB,
                           "download the model at first launch instead of through Play Asset Delivery")

TARGETS: dict[str, BundleTarget] = {
    "android": BundleTarget("android", required=((ONNX_DIR, "onnx", "mobile"),), optional={},
                            limits=(PLAY_PACK, PLAY_INSTALL_TIME, PLAY_ALL_PACKS)),
    "ios": BundleTarget("ios", required=((COREML_DIR, "coreml", None),),
                        optional={"onnx": (ONNX_DIR, "onnx", "mobile"), "coreai": (COREAI_DIR, "coreai", None)},
                        limits=(APP_STORE,)),
}

RUNTIMES = {
    "coreml": {"runtime": "Core ML", "minimum_os": {"iOS": "18.0", "macOS": "15.0"},
               "why": "stateful KV cache (MLState) and int4 blockwise weights need iOS 18 / macOS 15",
               "load_with": "swift-transformers LanguageModel, or MLModel + makeState()"},
    "coreai": {"runtime": "Core AI", "minimum_os": {"iOS": "27.0", "macOS": "27.0"},
               "why": "Core AI assets (.aimodel) load on iOS/macOS 27 and later; Core ML covers iOS 18 / macOS 15",
               "load_with": "AIModel.load(url), then the prefill and decode functions with one shared keyCache/valueCache "
                            "(coreai/coreai_config.json)"},
    "onnx": {"runtime": "onnxruntime-genai", "load_with": "ai.onnxruntime.genai.Model(folder path) / OGAModel(path:)"},
}
