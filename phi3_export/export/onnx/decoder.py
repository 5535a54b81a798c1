"""Emits the decoder graph from a quantized checkpoint, walking the model plan one layer at a time.

A Phi-3 layer becomes (node names are hierarchical, as in the ORT-GenAI builder):

    residual ──► SkipSimplifiedLayerNorm ──► qkv_proj ──► GroupQueryAttention ──► o_proj ─┐
        ▲          (input_layernorm)          (MatMulNBits)  (rotary, KV cache)           │
        │                                                                                  ▼
        └─────── down_proj ◄── gate*sigmoid(gate)*up ◄── Split ◄── gate_up_proj ◄── SkipSimplifiedLayerNorm
                                                                                   (post_attention_layernorm)

Each block of the plan is emitted by the function ``blocks.BLOCK_EMITTERS`` holds for its
kind; this module holds what every block shares (weights, linears, constants, the graph's
inputs and outputs). Weights go to ``model.onnx.data`` as each is read from the quantized
checkpoint; the graph itself holds only references. LongRoPE picks its short or long cos/sin
table with a ``Where`` on the total sequence length (no ``If``: DirectML graph capture cannot
run control flow), and the tables are sized to the artifact's max_length, not 131072.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from onnx import TensorProto, helper

from phi3_export.arch.plan import Linear, ModelPlan
from phi3_export.arch.rotary import rotary_tables
from phi3_export.checkpoint.stream import stream_layers
from phi3_export.errors import Phi3ExportError
from phi3_export.export.onnx.blocks import BLOCK_EMITTERS, MS, NORM_EMITTERS, emitter_for
from phi3_export.export.onnx.graph import GraphBuilder
from phi3_export.export.onnx.sizes import matmul_nbits_bytes
from phi3_export.export.onnx.targets import ResolvedTarget
from phi3_export.quant.qcheckpoint import QuantizedCheckpoint, pack_codes, unpack_codes

CONTROL_FLOW = {"If", "Loop", "Scan"}


class DecoderEmitter(GraphBuilder):
    def __init__(self, qckpt: QuantizedCheckpoint, plan: ModelPlan, target: ResolvedTarget, out_dir: Path,
                 data_file: str = "model.onnx.data"):
        self.qckpt, self.plan, self.decoder, self.target = qckpt, plan, plan.decoder, target
        # An image + text plan: the decoder takes inputs_embeds (embedding.onnx gathers the table).
        self.inputs_embeds = plan.image is not None
        rotary = self.decoder.rotary
        if (rotary.dim // 2) % 8:
            raise Phi3ExportError(
                f"config.json: rotary dims {rotary.dim}: GroupQueryAttention needs half of them to be a multiple of 8"
            )
        self.out_dir = Path(out_dir)
        super().__init__(self.out_dir / data_file, target.target.io_dtype, const_prefix="/model/constants")
        self.layouts: dict[tuple, tuple[str, str]] = {}  # blocksparse CSR layouts by (pattern, heads)
        self.tied_lm_head_inputs: tuple[list[str], dict] | None = None
        self.tied_table: str | None = None

    # ---- small helpers -------------------------------------------------------------
    def weight_rows(self, name: str, shape: tuple[int, ...], dtype, blocks) -> str:
        """An initializer written as consecutive blocks (one expert at a time)."""
        self.initializers.append(self.data.add_rows(name, shape, np.dtype(dtype), blocks))
        return name

    def float_param(self, tensor_name: str, onnx_name: str | None = None, scale: float = 1.0) -> str:
        """A float tensor in the target's dtype (times ``scale``), copied over in row blocks."""
        onnx_name = onnx_name or tensor_name
        shape = tuple(self.qckpt.info(tensor_name)["shape"])
        rows_per_block = max(1, (1 << 22) // max(1, int(np.prod(shape[1:]))))
        blocks = (b.numpy() * np.float32(scale) if scale != 1.0 else b.numpy()
                  for b in self.qckpt.float_row_blocks(tensor_name, torch.float32, rows_per_block))
        self.initializers.append(self.data.add_rows(onnx_name, shape, np.dtype(self.io), blocks))
        return onnx_name

    # ---- linears ----------------------------------------------------------------------------
    def matmul_nbits_arrays(self, tensor: str, order: list[int] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, dict]:
        """(blob [rows, blocks, block bytes], scales, zero points, attrs): MatMulNBits' layout of our codes.

        Zero points are None when every block uses MatMulNBits' default, 2**(bits-1). ``order``
        permutes the rows (a fused linear in parts order): blocks run along a row, so every code,
        scale and zero point moves with its row unchanged.
        """
        info = self.qckpt.info(tensor)
        bits, block = info["bits"], info["block_size"]
        rows, cols = info["shape"]
        n_blocks = -(-cols // block)
        packed, scales, zeros = self.qckpt.packed(tensor)
        if order is not None:
            packed, scales, zeros = packed[order], scales[order], zeros[order]
        if cols % block:
            # MatMulNBits wants whole blocks: pad the last one with its zero point (dequantizes to 0).
            codes = unpack_codes(packed, bits, cols)
            codes = torch.cat([codes, zeros[:, -1:].expand(rows, n_blocks * block - cols)], dim=1)
            packed = pack_codes(codes, bits)
        # Our packing (low nibble = even column) is MatMulNBits' own: only the shape changes.
        blob = packed.numpy().reshape(rows, n_blocks, block * bits // 8)
        zp = None if torch.all(zeros == 2 ** (bits - 1)) else (zeros if bits == 8 else pack_codes(zeros, 4)).numpy()
        return blob, scales.numpy(), zp, {"K": cols, "N": rows, "bits": bits, "block_size": block}

    def matmul_nbits_inputs(self, tensor: str, base: str, explicit_zero_points: bool = False,
                            order: list[int] | None = None) -> tuple[list[str], dict]:
        blob, scales, zp, attrs = self.matmul_nbits_arrays(tensor, order)
        bits = attrs["bits"]
        inputs = [
            self.weight(f"{base}.weight_Q{bits}", blob),
            self.weight(f"{base}.weight_scales", scales.astype(self.io)),
        ]
        # MatMulNBits' default zero point is 2**(bits-1): omit the input when every block uses it.
        if explicit_zero_points and zp is None:
            zeros = self.qckpt.packed(tensor)[2] if order is None else self.qckpt.packed(tensor)[2][order]
            zp = (zeros if bits == 8 else pack_codes(zeros, 4)).numpy()
        if zp is not None:
            inputs.append(self.weight(f"{base}.weight_zp", zp))
        # The size budget predicts these bytes with sizes.matmul_nbits_bytes: the layout and the count agree.
        written = blob.nbytes + scales.size * self.io.itemsize + (zp.nbytes if zp is not None else 0)
        assert written == matmul_nbits_bytes((attrs["N"], attrs["K"]), bits, attrs["block_size"], self.io, zp is not None), tensor
        return inputs, attrs

    def linear(self, x: str, linear: Linear, path: str, output: str | None = None) -> str:
        """x W^T (+ b): MatMulNBits when the checkpoint holds codes, MatMul otherwise.

        A fused linear whose parts are not stored in order (Phi-3-small's head-group-major qkv,
        GEGLU's interleaved gate|linear) is emitted with its rows, and its bias, in parts order,
        so its output splits into the parts by size.
        """
        base = path.strip("/").replace("/", ".")
        outputs = [output] if output and not linear.bias else None
        tensor, order = linear.weight, linear.row_order()
        if self.qckpt.is_quantized(tensor):
            inputs, attrs = self.matmul_nbits_inputs(tensor, f"{base}.MatMul", order=order)
            y = self.node("MatMulNBits", [x] + inputs, f"{path}/MatMulNBits", domain=MS, outputs=outputs,
                          accuracy_level=self.target.accuracy_level, **attrs)[0]
        else:
            weight = self.qckpt.float(tensor)
            weight = weight if order is None else weight[order]
            w = self.weight(f"{base}.MatMul.weight", weight.T.contiguous().numpy().astype(self.io))
            y = self.node("MatMul", [x, w], f"{path}/MatMul", outputs=outputs)[0]
        if linear.bias:
            if order is None:
                bias = self.float_param(linear.bias, f"{base}.bias")
            else:
                bias = self.weight(f"{base}.bias", self.qckpt.float(linear.bias)[order].numpy().astype(self.io))
            y = self.node("Add", [y, bias], f"{path}/Add", outputs=[output] if output else None)[0]
        return y

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
        rotary = self.decoder.rotary
        tables = rotary_tables(rotary, self.target.max_length)
        if not rotary.longrope:
            cos, sin = tables[""]
            return self.weight("cos_cache", cos.astype(self.io)), self.weight("sin_cache", sin.astype(self.io))
        caches = {kind: (self.weight(f"cos_cache_{kind}", cos.astype(self.io)), self.weight(f"sin_cache_{kind}", sin.astype(self.io)))
                  for kind, (cos, sin) in tables.items()}
        # transformers switches every position to the long factors once the sequence
        # outgrows the original context; so does this Where.
        use_long = self.node("Greater", [total_length, self.const(rotary.original_context, np.int32)], "/model/rotary/Greater")[0]
        cos = self.node("Where", [use_long, caches["long"][0], caches["short"][0]], "/model/rotary/cos/Where")[0]
        sin = self.node("Where", [use_long, caches["long"][1], caches["short"][1]], "/model/rotary/sin/Where")[0]
        return cos, sin

    def embedding(self, ids: str = "input_ids") -> str:
        name, d = self.decoder.embedding, self.decoder
        if self.qckpt.is_quantized(name):
            # Tied: the LM head's MatMulNBits table (4 or 8 bits), gathered row-wise; untied (a size
            # budget's choice), the lookup's own table. Zero points are always given:
            # GatherBlockQuantized's default differs from MatMulNBits' for 8 bits.
            base = "lm_head.MatMul" if d.tied else "model.embed_tokens"
            inputs, attrs = self.matmul_nbits_inputs(name, base, explicit_zero_points=True)
            self.tied_lm_head_inputs = (inputs, attrs)
            flat = self.node("Reshape", [inputs[0], self.const([d.vocab, -1])], "/model/embed_tokens/Reshape")[0]
            gather_inputs = [flat, ids, inputs[1]] + inputs[2:]
            out = self.node("GatherBlockQuantized", gather_inputs, "/model/embed_tokens/GatherBlockQuantized", domain=MS,
                            bits=attrs["bits"], block_size=attrs["block_size"], gather_axis=0, quantize_axis=1)[0]
            if attrs["K"] % attrs["block_size"]:
                out = self.node("Slice", [out, self.const([0]), self.const([d.hidden]), self.const([-1])], "/model/embed_tokens/Slice")[0]
            return out
        self.tied_table = self.float_param(name)
        return self.node("Gather", [self.tied_table, ids], "/model/embed_tokens/Gather")[0]

    def lm_head(self, x: str, output: str = "logits") -> str:
        if not self.decoder.tied:
            return self.linear(x, self.decoder.lm_head, "/lm_head", output=output)
        if self.tied_lm_head_inputs is None and self.tied_table is None:  # inputs_embeds: no lookup in this graph
            name = self.decoder.embedding
            if self.qckpt.is_quantized(name):
                self.tied_lm_head_inputs = self.matmul_nbits_inputs(name, "lm_head.MatMul")
            else:
                self.tied_table = self.float_param(name)
        if self.tied_lm_head_inputs is not None:
            inputs, attrs = self.tied_lm_head_inputs
            return self.node("MatMulNBits", [x] + inputs, "/lm_head/MatMulNBits", domain=MS, outputs=[output],
                             accuracy_level=self.target.accuracy_level, **attrs)[0]
        table_t = self.node("Transpose", [self.tied_table], "/lm_head/Transpose", perm=[1, 0])[0]
        return self.node("MatMul", [x, table_t], "/lm_head/MatMul", outputs=[output])[0]

    # ---- muP scales and masked ids (Phi-3-small); a plan without them emits none of this ----------
    def scaled_embedding(self) -> str:
        out = self.embedding()
        scale = self.decoder.embedding_scale
        if scale == 1.0:
            return out
        return self.node("Mul", [out, self.const(scale, self.io)], "/model/embed_tokens/Mul")[0]

    def folded_logits_scale(self) -> float:
        """The logits scale when it folds exactly into the final norm's weight and bias, else 1.0.

        A power of two scales every product and sum of the LM head exactly (barring overflow), so
        logits_scale * (norm(x) W^T) == (logits_scale * norm(x)) W^T bit for bit; a bias on the
        LM head would need scaling too, so a head with one keeps the Mul.
        """
        scale = self.decoder.logits_scale
        exact = scale > 0 and math.frexp(scale)[0] == 0.5
        return scale if exact and not self.decoder.lm_head.bias else 1.0

    def logits(self, h: str, folded: float) -> str:
        d = self.decoder
        scale = d.logits_scale / folded
        if scale == 1.0 and not d.masked_ids:
            return self.lm_head(h)
        out = self.lm_head(h, "/lm_head/output_0")
        if scale != 1.0:
            last = None if d.masked_ids else "logits"
            out = self.node("Mul", [out, self.const(scale, self.io)], "/lm_head/Mul", outputs=[last] if last else None)[0]
        if d.masked_ids:
            # Ids no token uses get the lowest finite logit (float32's in fp32 graphs), as the model masks them.
            mask = np.zeros(d.vocab, np.bool_)
            mask[list(d.masked_ids)] = True
            lowest = self.const(np.finfo(self.io).min, self.io)
            out = self.node("Where", [self.weight("lm_head.masked_ids", mask), lowest, out], "/lm_head/Where", outputs=["logits"])[0]
        return out

    def io_values(self) -> tuple[list, list]:
        d, io = self.decoder, self.io_onnx
        kv = ["batch_size", d.kv_heads, "past_sequence_length", d.head_dim]
        kv_out = ["batch_size", d.kv_heads, "total_sequence_length", d.head_dim]
        first = (helper.make_tensor_value_info("inputs_embeds", io, ["batch_size", "sequence_length", d.hidden])
                 if self.inputs_embeds else helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]))
        inputs = [
            first,
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
        ]
        outputs = [helper.make_tensor_value_info("logits", io, ["batch_size", "sequence_length", d.vocab])]
        for i in range(len(d.layers)):
            for kind in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", io, kv))
                outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", io, kv_out))
        return inputs, outputs

    def emit(self, progress_task=None) -> Path:
        d = self.decoder
        try:
            seqlens, total = self.attention_mask_inputs()
            cos, sin = self.rotary_caches(total)
            # mask_sum: the attention mask's row sums (int64), for blocks that want them (SparseAttention).
            attention_inputs = {"seqlens": seqlens, "total": total, "cos": cos, "sin": sin,
                                "mask_sum": "/model/attn_mask_reformat/ReduceSum/output_0"}
            # inputs_embeds come scaled: embedding.onnx applies the embedding scale to text rows.
            residual, pending = ("inputs_embeds" if self.inputs_embeds else self.scaled_embedding()), None
            for layer in stream_layers(self.qckpt, d.layers, progress_task):  # unmaps each layer's quantized file after it
                p = f"/model/layers.{layer.index}"
                h, residual = emitter_for(NORM_EMITTERS, layer.attn_norm.kind)(self, layer.attn_norm, residual, pending, f"{p}/{layer.attn_norm.module}")
                attn = emitter_for(BLOCK_EMITTERS, layer.attention.kind)(self, layer.attention, h, layer.index, attention_inputs)
                h, residual = emitter_for(NORM_EMITTERS, layer.mlp_norm.kind)(self, layer.mlp_norm, residual, attn, f"{p}/{layer.mlp_norm.module}")
                pending = emitter_for(BLOCK_EMITTERS, layer.mlp.kind)(self, layer.mlp, h, layer.index, attention_inputs)
            folded = self.folded_logits_scale()
            scale = {"scale": folded} if folded != 1.0 else {}
            h, _ = emitter_for(NORM_EMITTERS, d.final_norm.kind)(self, d.final_norm, residual, pending, "/model/norm", final=True, **scale)
            self.logits(h, folded)
        finally:
            self.data.close()
        if not self.target.target.control_flow_allowed:
            bad = sorted({n.op_type for n in self.nodes} & CONTROL_FLOW)
            assert not bad, f"target {self.target.name} forbids control flow, graph has {bad}"
        inputs, outputs = self.io_values()
        model = self.model("phi3_export_decoder", inputs, outputs)
        path = self.out_dir / "model.onnx"
        path.write_bytes(model.SerializeToString(deterministic=True))
        return path
