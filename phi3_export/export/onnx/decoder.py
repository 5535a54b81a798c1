"""Emits the decoder graph from a quantized checkpoint, one layer at a time.

Each layer becomes (node names are hierarchical, as in the ORT-GenAI builder):

    residual ──► SkipSimplifiedLayerNorm ──► qkv_proj ──► GroupQueryAttention ──► o_proj ─┐
        ▲          (input_layernorm)          (MatMulNBits)  (rotary, KV cache)           │
        │                                                                                  ▼
        └─────── down_proj ◄── gate*sigmoid(gate)*up ◄── Split ◄── gate_up_proj ◄── SkipSimplifiedLayerNorm
                                                                                   (post_attention_layernorm)

Weights go to ``model.onnx.data`` as each is read from the quantized checkpoint; the
graph itself holds only references. LongRoPE picks its short or long cos/sin table with
a ``Where`` on the total sequence length (no ``If``: DirectML graph capture cannot run
control flow), and the tables are sized to the artifact's max_length, not 131072.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from phi3_export.arch.base import Architecture
from phi3_export.errors import Phi3ExportError
from phi3_export.export.onnx.external_data import ExternalDataWriter, inline
from phi3_export.export.onnx.rotary import cos_sin
from phi3_export.export.onnx.targets import ResolvedTarget
from phi3_export.quant.qcheckpoint import QuantizedCheckpoint, pack_codes, unpack_codes

OPSET = 21
MS = "com.microsoft"
CONTROL_FLOW = {"If", "Loop", "Scan"}


@dataclass(frozen=True)
class DecoderShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    eps: float
    rotary_dim: int
    theta: float
    original_context: int
    sliding_window: int | None
    tied: bool

    @classmethod
    def from_config(cls, config: dict, facts) -> DecoderShape:
        rotary_dim = int(facts.head_dim * facts.rope.partial_rotary_factor)
        if (rotary_dim // 2) % 8:
            raise Phi3ExportError(
                f"config.json: rotary dims {rotary_dim} (head_dim {facts.head_dim} x partial_rotary_factor "
                f"{facts.rope.partial_rotary_factor}): GroupQueryAttention needs half of them to be a multiple of 8"
            )
        return cls(
            layers=facts.num_layers, hidden=facts.hidden_size, heads=facts.num_heads, kv_heads=facts.num_kv_heads,
            head_dim=facts.head_dim, intermediate=facts.intermediate_size, vocab=facts.vocab_size,
            eps=float(config.get("rms_norm_eps", 1e-5)),
            rotary_dim=rotary_dim, theta=facts.rope.theta,
            original_context=facts.original_context_length,
            sliding_window=None if facts.sliding_window == "none" else facts.sliding_window,
            tied=facts.tie_word_embeddings is True,
        )


class DecoderEmitter:
    def __init__(self, qckpt: QuantizedCheckpoint, arch: type[Architecture], shape: DecoderShape,
                 rope_tables: dict, target: ResolvedTarget, out_dir: Path):
        self.q, self.arch, self.s, self.rope, self.t = qckpt, arch, shape, rope_tables, target
        self.out_dir = Path(out_dir)
        self.io = target.target.io_dtype
        self.io_onnx = helper.np_dtype_to_tensor_dtype(np.dtype(self.io))
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.consts: dict[str, str] = {}
        self.data = ExternalDataWriter(self.out_dir / "model.onnx.data")

    # ---- small helpers -------------------------------------------------------------
    def node(self, op: str, inputs: list[str], name: str, n_out: int = 1, domain: str = "", outputs: list[str] | None = None, **attrs) -> list[str]:
        outputs = outputs or [f"{name}/output_{k}" for k in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs

    def const(self, values, dtype=np.int64) -> str:
        array = np.asarray(values, dtype=dtype)
        key = f"/model/constants/{np.dtype(dtype).name}/{array.tolist()}"
        if key not in self.consts:
            self.initializers.append(inline(key, array))
            self.consts[key] = key
        return key

    def weight(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(self.data.add(name, array))
        return name

    def float_param(self, tensor_name: str, onnx_name: str) -> str:
        """A float tensor in the target's dtype, copied over in row blocks."""
        shape = tuple(self.q.info(tensor_name)["shape"])
        rows_per_block = max(1, (1 << 22) // max(1, int(np.prod(shape[1:]))))
        blocks = (b.numpy() for b in self.q.float_row_blocks(tensor_name, torch.float32, rows_per_block))
        self.initializers.append(self.data.add_rows(onnx_name, shape, np.dtype(self.io), blocks))
        return onnx_name

    # ---- building blocks --------------------------------------------------------------
    def matmul_nbits_inputs(self, tensor: str, base: str, explicit_zero_points: bool = False) -> tuple[list[str], dict]:
        info = self.q.info(tensor)
        bits, block = info["bits"], info["block_size"]
        rows, cols = info["shape"]
        n_blocks = -(-cols // block)
        packed, scales, zeros = self.q.packed(tensor)
        if cols % block:
            # MatMulNBits wants whole blocks: pad the last one with its zero point (dequantizes to 0).
            codes = unpack_codes(packed, bits, cols)
            codes = torch.cat([codes, zeros[:, -1:].expand(rows, n_blocks * block - cols)], dim=1)
            packed = pack_codes(codes, bits)
        # Our packing (low nibble = even column) is MatMulNBits' own: only the shape changes.
        blob = packed.numpy().reshape(rows, n_blocks, block * bits // 8)
        inputs = [
            self.weight(f"{base}.weight_Q{bits}", blob),
            self.weight(f"{base}.weight_scales", scales.numpy().astype(self.io)),
        ]
        # MatMulNBits' default zero point is 2**(bits-1): omit the input when every block uses it.
        if explicit_zero_points or not torch.all(zeros == 2 ** (bits - 1)):
            zp = zeros if bits == 8 else pack_codes(zeros, 4)
            inputs.append(self.weight(f"{base}.weight_zp", zp.numpy()))
        return inputs, {"K": cols, "N": rows, "bits": bits, "block_size": block}

    def linear(self, x: str, tensor: str, path: str, output: str | None = None) -> str:
        base = path.strip("/").replace("/", ".")
        outputs = [output] if output else None
        if self.q.is_quantized(tensor):
            inputs, attrs = self.matmul_nbits_inputs(tensor, f"{base}.MatMul")
            return self.node("MatMulNBits", [x] + inputs, f"{path}/MatMulNBits", domain=MS, outputs=outputs,
                             accuracy_level=self.t.accuracy_level, **attrs)[0]
        w = self.weight(f"{base}.MatMul.weight", self.q.float(tensor).T.contiguous().numpy().astype(self.io))
        return self.node("MatMul", [x, w], f"{path}/MatMul", outputs=outputs)[0]

    # ---- graph sections ---------------------------------------------------------------------------
    def attention_mask_inputs(self) -> tuple[str, str]:
        base = "/model/attn_mask_reformat"
        total = self.node("ReduceSum", ["attention_mask", self.const([1])], f"{base}/ReduceSum", keepdims=0)[0]
        seqlens = self.node("Sub", [total, self.const(1)], f"{base}/Sub")[0]
        seqlens = self.node("Cast", [seqlens], f"{base}/Sub/Cast", to=TensorProto.INT32)[0]
        shape = self.node("Shape", ["attention_mask"], f"{base}/Shape")[0]
        length = self.node("Gather", [shape, self.const(1)], f"{base}/Gather", axis=0)[0]
        length = self.node("Cast", [length], f"{base}/Gather/Cast", to=TensorProto.INT32)[0]
        return seqlens, length

    def rotary_caches(self, total_length: str) -> tuple[str, str]:
        length, dim, scale = self.t.max_length, self.s.rotary_dim, self.rope["attention_factor"]
        if self.rope["short_factor"] is None:
            cos, sin = cos_sin(self.s.theta, dim, length, None, scale)
            return self.weight("cos_cache", cos.astype(self.io)), self.weight("sin_cache", sin.astype(self.io))
        caches = {}
        for kind in ("short", "long"):
            cos, sin = cos_sin(self.s.theta, dim, length, self.rope[f"{kind}_factor"], scale)
            caches[kind] = (self.weight(f"cos_cache_{kind}", cos.astype(self.io)), self.weight(f"sin_cache_{kind}", sin.astype(self.io)))
        # transformers switches every position to the long factors once the sequence
        # outgrows the original context; so does this Where.
        use_long = self.node("Greater", [total_length, self.const(self.s.original_context, np.int32)], "/model/rotary/Greater")[0]
        cos = self.node("Where", [use_long, caches["long"][0], caches["short"][0]], "/model/rotary/cos/Where")[0]
        sin = self.node("Where", [use_long, caches["long"][1], caches["short"][1]], "/model/rotary/sin/Where")[0]
        return cos, sin

    def embedding(self) -> str:
        name = self.arch.embed
        if self.q.is_quantized(name):
            # Tied: the LM head's MatMulNBits table (4 or 8 bits), gathered row-wise. Zero points
            # are always given: GatherBlockQuantized's default differs from MatMulNBits' for 8 bits.
            inputs, attrs = self.matmul_nbits_inputs(name, "lm_head.MatMul", explicit_zero_points=True)
            self.tied_lm_head_inputs = (inputs, attrs)
            flat = self.node("Reshape", [inputs[0], self.const([self.s.vocab, -1])], "/model/embed_tokens/Reshape")[0]
            gather_inputs = [flat, "input_ids", inputs[1]] + inputs[2:]
            out = self.node("GatherBlockQuantized", gather_inputs, "/model/embed_tokens/GatherBlockQuantized", domain=MS,
                            bits=attrs["bits"], block_size=attrs["block_size"], gather_axis=0, quantize_axis=1)[0]
            if attrs["K"] % attrs["block_size"]:
                out = self.node("Slice", [out, self.const([0]), self.const([self.s.hidden]), self.const([-1])], "/model/embed_tokens/Slice")[0]
            return out
        table = self.float_param(name, "model.embed_tokens.weight")
        self.tied_table = table
        return self.node("Gather", [table, "input_ids"], "/model/embed_tokens/Gather")[0]

    def lm_head(self, x: str) -> str:
        if not self.s.tied:
            return self.linear(x, self.arch.lm_head, "/lm_head", output="logits")
        if self.q.is_quantized(self.arch.embed):
            inputs, attrs = self.tied_lm_head_inputs
            return self.node("MatMulNBits", [x] + inputs, "/lm_head/MatMulNBits", domain=MS, outputs=["logits"],
                             accuracy_level=self.t.accuracy_level, **attrs)[0]
        table_t = self.node("Transpose", [self.tied_table], "/lm_head/Transpose", perm=[1, 0])[0]
        return self.node("MatMul", [x, table_t], "/lm_head/MatMul", outputs=["logits"])[0]

    def layer(self, i: int, residual: str, pending: str | None, seqlens: str, total: str, cos: str, sin: str) -> tuple[str, str]:
        s, a, p = self.s, self.arch, f"/model/layers.{i}"
        norm_w = self.float_param(a.layer_tensor("input_layernorm", i), f"model.layers.{i}.input_layernorm.weight")
        if pending is None:
            h = self.node("SimplifiedLayerNormalization", [residual, norm_w], f"{p}/input_layernorm/LayerNorm",
                          axis=-1, epsilon=s.eps, stash_type=1)[0]
        else:
            h, _, _, residual = self.node("SkipSimplifiedLayerNormalization", [residual, pending, norm_w],
                                          f"{p}/input_layernorm/SkipLayerNorm", n_out=4, domain=MS, epsilon=s.eps)
        qkv = self.linear(h, a.layer_tensor("qkv_proj", i), f"{p}/attn/qkv_proj")
        window = s.sliding_window if s.sliding_window and s.sliding_window < self.t.max_length else -1
        attn, _, _ = self.node(
            "GroupQueryAttention",
            [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens, total, cos, sin],
            f"{p}/attn/GroupQueryAttention", domain=MS,
            outputs=[f"{p}/attn/GroupQueryAttention/output_0", f"present.{i}.key", f"present.{i}.value"],
            num_heads=s.heads, kv_num_heads=s.kv_heads, scale=float(s.head_dim**-0.5), do_rotary=1,
            rotary_interleaved=0, local_window_size=int(window),
        )
        o = self.linear(attn, a.layer_tensor("o_proj", i), f"{p}/attn/o_proj")
        post_w = self.float_param(a.layer_tensor("post_attention_layernorm", i), f"model.layers.{i}.post_attention_layernorm.weight")
        h2, _, _, residual = self.node("SkipSimplifiedLayerNormalization", [residual, o, post_w],
                                       f"{p}/post_attention_layernorm/SkipLayerNorm", n_out=4, domain=MS, epsilon=s.eps)
        gate_up = self.linear(h2, a.layer_tensor("gate_up_proj", i), f"{p}/mlp/gate_up_proj")
        gate, up = self.node("Split", [gate_up, self.const([s.intermediate, s.intermediate])], f"{p}/mlp/Split", n_out=2, axis=-1)
        sig = self.node("Sigmoid", [gate], f"{p}/mlp/act_fn/Sigmoid")[0]
        act = self.node("Mul", [gate, sig], f"{p}/mlp/act_fn/Mul")[0]
        prod = self.node("Mul", [act, up], f"{p}/mlp/Mul")[0]
        down = self.linear(prod, a.layer_tensor("down_proj", i), f"{p}/mlp/down_proj")
        return residual, down

    def io_values(self) -> tuple[list, list]:
        s, io = self.s, self.io_onnx
        kv = ["batch_size", s.kv_heads, "past_sequence_length", s.head_dim]
        kv_out = ["batch_size", s.kv_heads, "total_sequence_length", s.head_dim]
        inputs = [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
        ]
        outputs = [helper.make_tensor_value_info("logits", io, ["batch_size", "sequence_length", s.vocab])]
        for i in range(s.layers):
            for kind in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", io, kv))
                outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", io, kv_out))
        return inputs, outputs

    def emit(self, progress_task=None) -> Path:
        try:
            seqlens, total = self.attention_mask_inputs()
            cos, sin = self.rotary_caches(total)
            residual, pending = self.embedding(), None
            for i in range(self.s.layers):
                residual, pending = self.layer(i, residual, pending, seqlens, total, cos, sin)
                self.q.close()  # unmap this layer's quantized file once its tensors are written out
                if progress_task is not None:
                    progress_task.advance(f"layer {i}")
            final_w = self.float_param(self.arch.final_norm, "model.norm.weight")
            h = self.node("SkipSimplifiedLayerNormalization", [residual, pending, final_w], "/model/norm/SkipLayerNorm",
                          n_out=1, domain=MS, epsilon=self.s.eps)[0]
            self.lm_head(h)
        finally:
            self.data.close()
        if not self.t.target.control_flow_allowed:
            bad = sorted({n.op_type for n in self.nodes} & CONTROL_FLOW)
            assert not bad, f"target {self.t.name} forbids control flow, graph has {bad}"
        inputs, outputs = self.io_values()
        graph = helper.make_graph(self.nodes, "phi3_export_decoder", inputs, outputs, initializer=self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                                  producer_name="phi3-export")
        model.ir_version = 10
        path = self.out_dir / "model.onnx"
        path.write_bytes(model.SerializeToString(deterministic=True))
        return path
