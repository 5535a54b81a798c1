"""int4 artifacts: exactly our codes, the dequantized model's logits, onnxruntime-genai runs them."""

import json

import numpy as np
import onnx
import onnxruntime_genai as og
import pytest
import torch
from onnx import numpy_helper
from transformers import AutoModelForCausalLM, AutoTokenizer

from phi3_export.fixtures.corpus import corpus_text
from phi3_export.quant.qcheckpoint import QuantizedCheckpoint, unpack_codes
from phi3_export.quant.rtn import dequantize
from phi3_export.validate.ort_decoder import OrtDecoder

CASES = [("phi-3-mini-4k", True, 32), ("phi-3-medium-4k", False, 16), ("phi-4-mini", False, 32), ("phi-4-mini", True, 64)]


def _onnx_weights(artifact):
    model = onnx.load(str(artifact / "model.onnx"))  # external data is read from beside it
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return model, inits


@pytest.mark.parametrize("recipe,symmetric,block", CASES)
def test_matmulnbits_holds_exactly_our_codes(recipe, symmetric, block, exported):
    out = exported(recipe, bits=4, targets=("cpu",), symmetric=symmetric, block_size=block, keep_quantized=True)
    q = QuantizedCheckpoint(out / "quantized")
    model, inits = _onnx_weights(out / "onnx-cpu")
    checked = 0
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        blob, scales = inits[node.input[1]], inits[node.input[2]]
        n, k, bs = attrs["N"], attrs["K"], attrs["block_size"]
        codes = unpack_codes(torch.from_numpy(blob.reshape(n, -1).copy()), 4, k)
        if len(node.input) > 3:
            zeros = unpack_codes(torch.from_numpy(inits[node.input[3]].copy()), 4, scales.shape[1])
        else:
            zeros = torch.full(scales.shape, 8, dtype=torch.uint8)
        onnx_w = dequantize(codes, torch.from_numpy(scales.copy()), zeros, bs)
        # Which of our tensors is this? The one whose dequantized weight it equals bit for bit.
        name = node.name.removesuffix("/MatMulNBits").strip("/").replace("/attn/", "/self_attn/").replace("/", ".")
        name = {"lm_head": "model.embed_tokens" if "model.embed_tokens.weight" in q.tensors and
                q.is_quantized("model.embed_tokens.weight") else "lm_head"}.get(name, name)
        ours = q.quantized(f"{name}.weight")
        assert torch.equal(codes, ours.codes) and torch.equal(zeros, ours.zeros)
        assert torch.equal(onnx_w, ours.dequantize())
        checked += 1
    assert checked == 4 * 2 + 1  # four linears in each of two layers, plus the LM head


@pytest.mark.parametrize("recipe,symmetric,block", CASES)
def test_int4_graph_computes_the_dequantized_model(recipe, symmetric, block, fixture_dir, exported):
    # accuracy_level 1 keeps activations in fp32, so the graph should equal transformers
    # running on our dequantized weights (tied tables included: GatherBlockQuantized).
    out = exported(recipe, bits=4, targets=("cpu",), symmetric=symmetric, block_size=block, accuracy_level=1, keep_quantized=True)
    q = QuantizedCheckpoint(out / "quantized")
    model = AutoModelForCausalLM.from_pretrained(fixture_dir(recipe)).eval()
    state = model.state_dict()
    with torch.no_grad():
        for name in q.tensors:
            state[name].copy_(q.weight(name))
    ids = np.random.RandomState(1).randint(0, model.config.vocab_size, (1, 32))
    with torch.no_grad():
        ref = model(torch.tensor(ids)).logits.numpy()
    decoder = OrtDecoder(out / "onnx-cpu")
    logits, cache = decoder.step(ids[:, :30], decoder.empty_cache())
    assert np.abs(logits - ref[:, :30]).max() < 1e-4
    logits, cache = decoder.step(ids[:, 30:31], cache)
    assert np.abs(logits[:, 0] - ref[:, 30]).max() < 1e-4


@pytest.mark.parametrize("recipe", ["phi-3-mini-4k", "phi-4-mini"])
def test_onnxruntime_genai_loads_tokenizes_and_chats(recipe, fixture_dir, exported):
    out = exported(recipe, fixture_kwargs={"train_steps": 150}, bits=4, targets=("cpu",))
    model = og.Model(str(out / "onnx-cpu"))
    tokenizer = og.Tokenizer(model)
    reference = AutoTokenizer.from_pretrained(fixture_dir(recipe, train_steps=150))
    text = corpus_text("eval")
    assert list(tokenizer.encode(text)) == reference(text).input_ids
    messages = [{"role": "user", "content": "What does the for statement do?"}]
    prompt = tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
    assert prompt == reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=80)
    generator = og.Generator(model, params)
    prompt_ids = tokenizer.encode(prompt)
    generator.append_tokens(prompt_ids)
    new = []
    while not generator.is_done():
        generator.generate_next_token()
        new.append(int(generator.get_next_tokens()[0]))
    assert 0 < len(new) <= 80 - len(prompt_ids)
    assert tokenizer.decode(new)  # a trained fixture produces text, not nothing


def test_target_specifics(exported):
    out = exported("phi-3-mini-128k", bits=4)  # the recipe's default targets: cpu, dml, mobile
    manifest = json.loads((out / "manifest.json").read_text())
    by_target = {a["target"]: a for a in manifest["artifacts"]}
    assert set(by_target) == {"cpu", "dml", "mobile"}
    assert by_target["cpu"]["name"] == "phi-3-mini-128k-rtn-w4g32s-onnx-cpu"
    dml = onnx.load(str(out / "onnx-dml" / "model.onnx"), load_external_data=False)
    assert not {n.op_type for n in dml.graph.node} & {"If", "Loop", "Scan"}
    assert dml.graph.input[2].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    dml_config = json.loads((out / "onnx-dml" / "genai_config.json").read_text())
    assert dml_config["model"]["decoder"]["session_options"]["provider_options"] == [{"dml": {}}]
    mobile = onnx.load(str(out / "onnx-mobile" / "model.onnx"), load_external_data=False)
    levels = {a.i for n in mobile.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {4}
    for target in ("cpu", "dml", "mobile"):
        config = json.loads((out / f"onnx-{target}" / "genai_config.json").read_text())
        assert config["search"]["max_length"] <= 8192  # never a 131072-token KV cache
        assert (out / f"onnx-{target}" / "LICENSE").is_file()
        for entry in by_target[target]["files"]:
            assert (out / entry["path"]).stat().st_size == entry["size"]
