"""Core ML export of Phi-3-small: the saved ML program computes the published model (blocksparse
attention, GEGLU, LayerNorm, muP, masked dummy ids), holds our quantizer's codes, is deterministic."""

import numpy as np
import pytest
import torch

from phi3_export.arch import architecture
from phi3_export.arch.phi3small_layer import Phi3SmallModel
from phi3_export.quant.qcheckpoint import QuantizedCheckpoint, unpack_codes
from phi3_export.validate.coreml_program import CoreMLDecoder, MilProgram

PACKAGE = "coreml/model.mlpackage"
LOWEST = np.finfo(np.float32).min
CONTEXT = 256  # Core ML context of these exports: 16 blocks of the fixture's 16 tokens


def _reference(q: QuantizedCheckpoint, ids: list[int], **config_changes) -> np.ndarray:
    """Phi3SmallModel on the weights the program holds: our codes with float16 scales, float tensors in float16."""
    model = Phi3SmallModel({**q.config, **config_changes}).eval()
    state = model.state_dict()
    with torch.no_grad():
        for name in q.tensors:
            if q.is_quantized(name):
                t = q.quantized(name)
                t.scales = t.scales.half().float()
                state[name].copy_(t.dequantize())
            else:
                state[name].copy_(q.float(name).half().float())
        return model(torch.tensor([ids]))[0].numpy()


def _export(exported, recipe: str, fixture_kwargs: dict | None = None):
    return exported(recipe, fixture_kwargs=fixture_kwargs, bits=4, formats=("coreml",), keep_quantized=True, max_length=CONTEXT)


# 8k: 212 tokens = 13 blocks of 16 (the fixture's local window is 3 blocks, so the vertical stripes
# decide most of what a query sees), trained so that attention is sharp enough for the pattern to
# show in the logits; 128k within its original 8192 context (short factors), untrained.
@pytest.mark.parametrize("recipe,fixture_kwargs,n", [("phi-3-small-8k", {"train_steps": 100}, 212), ("phi-3-small-128k", {}, 100)])
def test_program_matches_reference_with_cached_decode(recipe, fixture_kwargs, n, exported):
    out = _export(exported, recipe, fixture_kwargs)
    q = QuantizedCheckpoint(out / "quantized")
    ids = np.random.RandomState(3).randint(0, 1000, n).tolist()  # the fixture tokenizer's learned ids
    ref = _reference(q, ids)
    masked = np.zeros(ref.shape[-1], bool)
    masked[q.config["dummy_token_indices"]] = True
    assert masked.any() and (ref[:, masked] == LOWEST).all() and (ref[:, ~masked] > -1e4).all()
    scale = max(1.0, np.abs(ref[:, ~masked]).max())
    # The Phi-3 tolerances (tests/test_coreml.py), relative to the largest logit. Measured on the
    # trained 8k fixture (150 steps): fp32 reading 1.3e-4, fp16 4.3e-4.
    for precision, tolerance in (("fp32", 5e-4), ("fp16", 1.5e-3)):
        decoder = CoreMLDecoder(out / PACKAGE, precision)
        prefill = n - 8  # then a 4-token chunk and single steps across the block boundary at 208
        got = np.concatenate([decoder(ids[:prefill]), decoder(ids[prefill : prefill + 4])] + [decoder([t]) for t in ids[prefill + 4 :]])
        assert decoder.length == n
        assert (got[:, masked] == LOWEST).all()  # set to float32's lowest, as the reference does
        err = np.abs(got - ref).max()  # masked columns are equal: 0 there
        assert err < tolerance * scale, (precision, err / scale)
        top2 = np.sort(ref, axis=-1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 2 * err
        assert clear.any() and np.array_equal(got.argmax(-1)[clear], ref.argmax(-1)[clear])
    if recipe == "phi-3-small-8k":
        # The stripes matter on this prompt: an all-dense (causal) model is far outside the tolerance
        # (measured on the fixture trained 100 steps: 0.12, 17x the fp16 bound).
        dense = _reference(q, ids, dense_attention_every_n_layers=1)
        assert np.abs(dense - ref).max() > 10 * 1.5e-3 * scale


def test_blocksparse_mask_is_a_small_block_table(exported):
    """One constant holds the pattern: [layouts, context / block, context / block] fp16 of 0 / -inf."""
    out = _export(exported, "phi-3-small-8k")
    q = QuantizedCheckpoint(out / "quantized")
    plan = architecture(q.config["architectures"][0]).plan(q.config)
    pattern = next(layer.attention.blocksparse for layer in plan.decoder.layers if layer.attention.kind == "blocksparse")
    program = MilProgram(out / PACKAGE)
    table = next(program.value(op.attributes["val"], "fp32") for op in program.block.operations
                 if op.type == "const" and op.outputs[0].name == "blocksparse_block_bias")
    layouts = pattern.layouts(plan.decoder.heads)
    assert table.shape == (layouts, CONTEXT // pattern.block, CONTEXT // pattern.block) and layouts == 4
    expected = pattern.block_mask(plan.decoder.heads, CONTEXT // pattern.block)[:layouts]
    assert np.array_equal(table == 0, expected) and np.isneginf(table[~expected]).all()
    histogram = [op.type for op in program.block.operations]
    assert histogram.count("layer_norm") == 2 * len(plan.decoder.layers) + 1 and histogram.count("gelu") == len(plan.decoder.layers)
    assert sum(op.type == "const" and op.outputs[0].name == "blocksparse_block_bias" for op in program.block.operations) == 1


def _coreml_weights(package):
    program = MilProgram(package)
    found = {}
    for op in program.block.operations:
        if op.type == "constexpr_blockwise_shift_scale":
            consts = program.constant_inputs(op)
            found[op.outputs[0].name.removesuffix("_weight")] = tuple(consts[k] for k in ("data", "offset", "scale"))
    return found


def test_int4_weights_are_the_quantizers_codes_in_parts_order(exported):
    """Each linear's codes, zero points and (float16) scales are the quantized checkpoint's, rows in
    the plan's row_order (head-group-major qkv -> q|k|v, interleaved GEGLU -> gate|linear)."""
    out = _export(exported, "phi-3-small-8k")
    q = QuantizedCheckpoint(out / "quantized")
    plan = architecture(q.config["architectures"][0]).plan(q.config)
    coreml = _coreml_weights(out / PACKAGE)
    names = {"query_key_value": "qkv_proj", "dense": "o_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj"}
    expected = {f"layers_{layer.index}_{names[lin.role]}": lin for layer in plan.decoder.layers for lin in layer.linears()}
    assert set(coreml) == {*expected, "embed_tokens"}  # the tied LM head reads the embedding's constant
    permuted = 0
    for key, lin in [*expected.items(), ("embed_tokens", plan.decoder.lm_head)]:
        packed, scales, zeros = q.packed(lin.weight)
        order = lin.row_order()
        permuted += order is not None
        index = slice(None) if order is None else order
        data, offset, scale = coreml[key]
        assert np.array_equal(data, unpack_codes(packed, 4, lin.shape[1]).numpy()[index]), key
        assert np.array_equal(offset, zeros.numpy()[index]), key
        assert np.array_equal(scale, scales.numpy()[index].astype(np.float16)), key
    assert permuted == 2 * len(plan.decoder.layers)  # qkv and up_proj of every layer


def test_int4_weights_and_biases_are_the_onnx_artifacts(exported):
    """The same bytes as the ONNX artifact's MatMulNBits (which permutes rows the same way): codes and
    zero points identical, scales and biases its float32 values rounded to float16."""
    import onnx
    from onnx import numpy_helper

    out = exported("phi-3-small-8k", bits=4, formats=("onnx", "coreml"), targets=("cpu",), symmetric=False, max_length=CONTEXT)
    model = onnx.load(out / "onnx-cpu" / "model.onnx")
    init = {t.name: numpy_helper.to_array(t, base_dir=str(out / "onnx-cpu")) for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    program = MilProgram(out / PACKAGE)
    consts = {op.outputs[0].name: op for op in program.block.operations if op.type == "const"}
    coreml = _coreml_weights(out / PACKAGE)
    paths = {"qkv_proj": "attn/qkv_proj", "o_proj": "attn/o_proj", "gate_up_proj": "mlp/up_proj", "down_proj": "mlp/down_proj"}
    checked = 0
    for key, (data, offset, scale) in coreml.items():
        if key == "embed_tokens":  # the tied table: one constant for the lookup and the LM head, as in ONNX
            path = "/lm_head"
        else:
            layer, proj = key.removeprefix("layers_").split("_", 1)
            path = f"/model/layers.{layer}/{paths[proj]}"
        node = nodes[f"{path}/MatMulNBits"]
        codes, scales, zp = (np.array(init[node.input[k]]) for k in (1, 2, 3))
        rows, cols = data.shape
        assert np.array_equal(data, unpack_codes(torch.from_numpy(codes.reshape(rows, -1).copy()), 4, cols).numpy()), key
        assert np.array_equal(offset, unpack_codes(torch.from_numpy(zp.copy()), 4, scale.shape[1]).numpy().reshape(offset.shape)), key
        assert np.array_equal(scale, scales.reshape(scale.shape).astype(np.float16)), key
        if key != "embed_tokens":
            bias = program.value(consts[f"{key}_bias"].attributes["val"], "fp16")
            assert np.array_equal(bias, init[nodes[f"{path}/Add"].input[1]].astype(np.float16)), key
        checked += 1
    assert checked == 4 * 2 + 1  # 4 linears x 2 layers + the tied table


def test_two_exports_are_byte_identical(fixture_dir, tmp_path):
    from phi3_export.api import quantize

    digests = []
    for k in (0, 1):
        manifest = quantize(fixture_dir("phi-3-small-8k"), tmp_path / f"out{k}", bits=4, formats=("coreml",), max_length=CONTEXT)
        digests.append({f["path"]: f["sha256"] for a in manifest["artifacts"] for f in a["files"]})
    assert digests[0] == digests[1] and any(p.endswith("weight.bin") for p in digests[0])


def test_validate_reports_program_accuracy_next_to_onnx(fixture_dir, exported, tmp_path):
    from phi3_export.progress import Progress
    from phi3_export.validate.run import ValidateOptions, failed_checks, validate_artifacts

    fixture = fixture_dir("phi-3-small-8k", train_steps=100)
    out = exported("phi-3-small-8k", fixture_kwargs={"train_steps": 100}, bits=4, formats=("onnx", "coreml"), targets=("cpu",),
                   max_length=CONTEXT)
    result = validate_artifacts(out, fixture, ValidateOptions(window=128, speed=False, chat_prompts=("Hi",),
                                                              cache_dir=tmp_path / "cache"), Progress(enabled=False))
    records = {(r["format"], r["provider"]): r for r in result["records"]}
    program, onnx_cpu = records[("coreml", "mil-reader")], records[("onnx", "cpu")]
    assert not failed_checks(result)
    assert program["status"] == "ok" and 0 < program["accuracy"]["kld_mean"] < 0.05
    # Same codes as the ONNX artifact: the two accuracies agree closely (fp16 vs fp32 activations apart).
    assert abs(program["accuracy"]["kld_mean"] - onnx_cpu["accuracy"]["kld_mean"]) < 0.2 * onnx_cpu["accuracy"]["kld_mean"]


def test_128k_long_factor_tables_are_the_references(exported):
    """Past 8192 tokens (too long for the numpy reader here) every position takes the long factors and
    the published mscale: the program's long tables hold the reference's values. The switch itself
    (on the cache's end position) is the Phi-3-mini-128k program's, tested past 4096 in test_coreml."""
    from phi3_export.arch.phi3small_layer import rotary_embedding

    out = _export(exported, "phi-3-small-128k")
    q = QuantizedCheckpoint(out / "quantized")
    program = MilProgram(out / PACKAGE)
    ops = {o.name: op for op in program.block.operations for o in op.outputs}
    original = q.config["rope_scaling"]["original_max_position_embeddings"]
    # Positions 0..CONTEXT-1 in long mode: the reference picks the mode from the longest position.
    long_mode = [t[0, :CONTEXT].numpy() for t in rotary_embedding(q.config, torch.cat([torch.arange(CONTEXT), torch.tensor([original])]))]
    short_mode = [t[0].numpy() for t in rotary_embedding(q.config, torch.arange(CONTEXT))]
    assert np.abs(long_mode[0] - short_mode[0]).max() > 0.01  # the two factor sets differ on these positions
    for kind, tables in (("long", long_mode), ("short", short_mode)):
        for part, want in zip(("cos", "sin"), tables):
            gather = ops[ops[f"rope_{part}_{kind}"].inputs["x"].arguments[0].name]
            got = program.value(program.consts[gather.inputs["x"].arguments[0].name].attributes["val"], "fp32")
            assert got.shape == (CONTEXT, want.shape[1] // 2)  # halves: the program rotates halves
            assert np.abs(got - want[:, : got.shape[1]]).max() < 1e-3, (kind, part)  # fp16 rounding of values <= mscale
