"""The Core AI asset's interface: names and platform, shared by the exporter, validate and bundles.

Kept apart from the exporter so that reading them does not import coreai-torch.

Two functions in one ``model.aimodel``, sharing the KV-cache state and one copy of the weights:

    prefill  inputIds int32 [1, chunk], position int32 [1] -> logits float32 [1, chunk, vocab]
    decode   inputIds int32 [1, 1],     position int32 [1] -> logits float32 [1, 1, vocab]
    state    keyCache, valueCache [layers, 1, kv_heads, context_length, head_dim]

``position`` is the number of tokens the cache already holds (the first new token's
position); the function writes its tokens' keys and values at position..position+q-1.
"""

AIMODEL = "model.aimodel"
INPUT_IDS, POSITION, KEY_CACHE, VALUE_CACHE, LOGITS = "inputIds", "position", "keyCache", "valueCache", "logits"
PREFILL, DECODE = "prefill", "decode"
# Core AI assets need iOS/macOS 27 (coreai-core writes dialect versions for OS 27 and later).
MINIMUM_OS = {"iOS": "27.0", "macOS": "27.0"}
CONFIG = "coreai_config.json"
