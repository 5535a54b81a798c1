"""The Core ML package's interface: names and platform, shared by the exporter, validate, bundles and samples.

Kept apart from program.py so that reading them does not import coremltools.
"""

INPUT_IDS, CAUSAL_MASK, KEY_CACHE, VALUE_CACHE, LOGITS = "inputIds", "causalMask", "keyCache", "valueCache", "logits"
MLPACKAGE = "model.mlpackage"
MINIMUM_OS = {"iOS": "18.0", "macOS": "15.0"}
