"""Emits ``vision.onnx`` from the plan's image embedding (arch/vision.py), weights streamed from the checkpoint.

    pixel_values [images, crops, 3, 336, 336], image_sizes [images, 2] (HD height, width)
      -> crops past the widest image's sub-crop count are sliced off (the runtime always sends
         17 slots, zero-padded) -> [images * c, 3, 336, 336]
      -> patch Conv, class token, positions, pre-LayerNorm, the plan's encoder layers
         (MultiHeadAttention with biases, quick_gelu MLP), class token dropped
      -> 2 x 2 merge: [images * c * 144, 4 * width]
      -> one Gather from [sub_GN, glb_GN, merged tokens] by an index computed from image_sizes
         (each image: its sub-crop grid rows each closed by sub_GN, glb_GN, then the global
         image's rows each closed by sub_GN; images one after another): no Loop, no If
      -> projector Linear -> GELU (erf) -> Linear -> image_features [T, hidden]

Weights are read from the original checkpoint one encoder layer at a time (the quantized
checkpoint holds the decoder only) and written straight to ``vision.onnx.data``. The recipe's
``export.vision.precision`` picks their form: fp32 / fp16 (stored so, cast to the target's
compute dtype where it differs) or int8 / int4 block-wise MatMulNBits for the encoder's and
projector's linears (our RTN quantizer, symmetric, ``BLOCK`` columns per block); norms,
biases, the patch Conv, class token, positions and separators stay float.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from onnx import TensorProto, helper

from phi3_export.arch.plan import Linear, Norm
from phi3_export.arch.vision import ClipLayer, ImageEmbedding
from phi3_export.checkpoint.reader import Checkpoint
from phi3_export.checkpoint.stream import stream_layers
from phi3_export.export.onnx.blocks import MS
from phi3_export.export.onnx.graph import GraphBuilder
from phi3_export.quant.qcheckpoint import pack_codes
from phi3_export.quant.rtn import quantize_rtn
from phi3_export.quant.store import check_finite

BLOCK = 32  # MatMulNBits block size of int8 / int4 vision weights
FLOAT_STORAGE = {"fp32": np.float32, "fp16": np.float16}


class VisionEmitter(GraphBuilder):
    def __init__(self, ckpt: Checkpoint, image: ImageEmbedding, precision: str, io_dtype: type, accuracy_level: int,
                 out_dir: Path):
        super().__init__(Path(out_dir) / "vision.onnx.data", io_dtype)
        self.ckpt, self.image, self.precision, self.accuracy_level = ckpt, image, precision, accuracy_level
        self.out_dir = Path(out_dir)
        # Float tensors are stored in the precision's float type (int8 / int4: the compute dtype).
        self.storage = np.dtype(FLOAT_STORAGE.get(precision, self.io))

    # ---- weights --------------------------------------------------------------------------
    def tensor(self, name: str) -> torch.Tensor:
        return check_finite(name, self.ckpt.tensor(name))

    def float_param(self, name: str, array: np.ndarray | None = None, onnx_name: str | None = None) -> str:
        """A float tensor stored in the storage dtype, cast to the compute dtype in the graph if they differ."""
        onnx_name = onnx_name or name
        array = self.tensor(name).numpy() if array is None else array
        stored = self.weight(onnx_name, array.astype(self.storage))
        if self.storage == self.io:
            return stored
        return self.op("Cast", [stored], f"/vision/cast/{onnx_name}", to=self.io_onnx)

    def linear(self, x: str, linear: Linear, path: str) -> str:
        """x W^T + b: MatMulNBits of our RTN codes (int8 / int4), else MatMul by the stored float weight."""
        base = path.strip("/").replace("/", ".")
        weight = self.tensor(linear.weight)
        if self.precision in ("int4", "int8"):
            y = self.op("MatMulNBits", [x, *self.nbits_inputs(weight, int(self.precision[3:]), base)], f"{path}/MatMulNBits",
                        domain=MS, **self.nbits_attrs(weight, int(self.precision[3:])))
        else:
            w = self.float_param(linear.weight, weight.T.contiguous().numpy(), f"{base}.MatMul.weight")
            y = self.op("MatMul", [x, w], f"{path}/MatMul")
        del weight
        if linear.bias:
            y = self.op("Add", [y, self.float_param(linear.bias, onnx_name=f"{base}.bias")], f"{path}/Add")
        return y

    def nbits_attrs(self, weight: torch.Tensor, bits: int) -> dict:
        rows, cols = weight.shape
        return {"K": cols, "N": rows, "bits": bits, "block_size": BLOCK, "accuracy_level": self.accuracy_level}

    def nbits_inputs(self, weight: torch.Tensor, bits: int, base: str) -> list[str]:
        """Symmetric RTN codes in MatMulNBits' layout; a short last block is padded with the zero point
        (dequantizes to 0), so no zero-point input is needed (the default, 2**(bits-1), is ours)."""
        q = quantize_rtn(weight, bits, BLOCK, symmetric=True)
        rows, cols = weight.shape
        n_blocks = -(-cols // BLOCK)
        codes = q.codes
        if cols % BLOCK:
            codes = torch.cat([codes, torch.full((rows, n_blocks * BLOCK - cols), 2 ** (bits - 1), dtype=torch.uint8)], dim=1)
        blob = pack_codes(codes, bits).numpy().reshape(rows, n_blocks, BLOCK * bits // 8)
        return [self.weight(f"{base}.MatMul.weight_Q{bits}", blob), self.weight(f"{base}.MatMul.weight_scales", q.scales.numpy().astype(self.io))]

    def layer_norm(self, x: str, norm: Norm, path: str) -> str:
        weight, bias = self.float_param(norm.weight), self.float_param(norm.bias)
        return self.op("LayerNormalization", [x, weight, bias], f"{path}/LayerNorm", axis=-1, epsilon=norm.eps, stash_type=1)

    # ---- the encoder ------------------------------------------------------------------------
    def embeddings(self, pixels: str) -> str:
        """[N, 3, S, S] -> [N, 1 + grid^2, width]: patch Conv, class token first, positions, pre-LayerNorm."""
        enc, p = self.image.encoder, "/vision/embeddings"
        conv = self.op("Conv", [pixels, self.float_param(enc.patch_embedding)], f"{p}/patch_embedding/Conv",
                       kernel_shape=[enc.patch, enc.patch], strides=[enc.patch, enc.patch])
        flat = self.op("Reshape", [conv, self.const([0, enc.hidden, -1])], f"{p}/Reshape")
        patches = self.op("Transpose", [flat], f"{p}/Transpose", perm=[0, 2, 1])
        cls = self.op("Reshape", [self.float_param(enc.class_embedding), self.const([1, 1, enc.hidden])], f"{p}/class/Reshape")
        n = self.op("Slice", [self.op("Shape", [patches], f"{p}/Shape"), self.const([0]), self.const([1])], f"{p}/Shape/Slice")
        shape = self.op("Concat", [n, self.const([1, enc.hidden])], f"{p}/class/Concat", axis=0)
        cls = self.op("Expand", [cls, shape], f"{p}/class/Expand")
        x = self.op("Concat", [cls, patches], f"{p}/Concat", axis=1)
        x = self.op("Add", [x, self.float_param(enc.position_embedding)], f"{p}/position/Add")
        return self.layer_norm(x, enc.pre_norm, "/vision/pre_layrnorm")

    def encoder_layer(self, x: str, layer: ClipLayer) -> str:
        enc, p = self.image.encoder, f"/vision/layers.{layer.index}"
        h = self.layer_norm(x, layer.norm1, f"{p}/layer_norm1")
        q, k, v = (self.linear(h, lin, f"{p}/self_attn/{part}_proj") for part, lin in (("q", layer.q), ("k", layer.k), ("v", layer.v)))
        attn = self.op("MultiHeadAttention", [q, k, v], f"{p}/self_attn/MultiHeadAttention", domain=MS, num_heads=enc.heads,
                       scale=float(enc.head_dim ** -0.5))
        x = self.op("Add", [x, self.linear(attn, layer.o, f"{p}/self_attn/out_proj")], f"{p}/attn/Add")
        h = self.layer_norm(x, layer.norm2, f"{p}/layer_norm2")
        h = self.linear(h, layer.fc1, f"{p}/mlp/fc1")
        # quick_gelu(x) = x * sigmoid(1.702 x)
        gate = self.op("Sigmoid", [self.op("Mul", [h, self.const(1.702, self.io)], f"{p}/mlp/act/Mul_alpha")], f"{p}/mlp/act/Sigmoid")
        h = self.op("Mul", [h, gate], f"{p}/mlp/act/Mul")
        return self.op("Add", [x, self.linear(h, layer.fc2, f"{p}/mlp/fc2")], f"{p}/mlp/Add")

    def merged(self, x: str) -> str:
        """[N, 1 + grid^2, C] -> [N * side^2, merge^2 * C]: class token dropped, merge x merge patches per token,
        channels ordered (row, col) of the patch within its square."""
        enc, img, p = self.image.encoder, self.image, "/vision/merge"
        x = self.op("Slice", [x, self.const([1]), self.const([1 + enc.grid ** 2]), self.const([1])], f"{p}/Slice")
        x = self.op("Reshape", [x, self.const([-1, img.side, img.merge, img.side, img.merge, enc.hidden])], f"{p}/Reshape")
        x = self.op("Transpose", [x], f"{p}/Transpose", perm=[0, 1, 3, 2, 4, 5])
        return self.op("Reshape", [x, self.const([-1, img.merged_width])], f"{p}/Reshape_out")

    # ---- the HD layout --------------------------------------------------------------------------
    def crop_counts(self) -> tuple[str, str, str]:
        """(rows [n], cols [n], c [1]): each image's sub-crop grid and the crop slots kept (1 + the most sub-crops)."""
        p, size = "/vision/layout", self.image.crop_size
        hc = self.op("Div", [self.op("Gather", ["image_sizes", self.const(0)], f"{p}/height", axis=1), self.const(size)], f"{p}/rows")
        wc = self.op("Div", [self.op("Gather", ["image_sizes", self.const(1)], f"{p}/width", axis=1), self.const(size)], f"{p}/cols")
        most = self.op("ReduceMax", [self.op("Mul", [hc, wc], f"{p}/crops"), self.const([0])], f"{p}/ReduceMax", keepdims=1)
        return hc, wc, self.op("Add", [most, self.const(1)], f"{p}/slots")

    def token_index(self, hc: str, wc: str, slots: str) -> str:
        """[T] rows of [sub_GN, glb_GN, merged tokens] in output order, all images one after another."""
        p, s = "/vision/layout", self.image.side
        c = lambda v: self.const(v)
        op = self.op
        row = op("Add", [op("Mul", [wc, c(s)], f"{p}/row_tokens"), c(1)], f"{p}/row_width")  # [n]: a grid row and its sub_GN
        sub_len = op("Mul", [op("Mul", [hc, c(s)], f"{p}/grid_rows"), row], f"{p}/sub_len")  # [n]
        tokens = op("Add", [sub_len, c(1 + s * (s + 1))], f"{p}/tokens")  # [n]: + glb_GN + the global image
        ends = op("CumSum", [tokens, c(0)], f"{p}/ends")
        total = op("ReduceSum", [tokens, c([0])], f"{p}/total", keepdims=0)
        pos = op("Range", [c(0), total, c(1)], f"{p}/positions")  # [T]
        # image of each position: how many images end at or before it
        past = op("GreaterOrEqual", [op("Unsqueeze", [pos, c([1])], f"{p}/pos_col"), ends], f"{p}/past")  # [T, n]
        img = op("ReduceSum", [op("Cast", [past], f"{p}/past/Cast", to=TensorProto.INT64), c([1])], f"{p}/image", keepdims=0)
        at = lambda v, name: op("Gather", [v, img], f"{p}/{name}/at", axis=0)
        q = op("Sub", [pos, op("Sub", [at(ends, "ends"), at(tokens, "tokens")], f"{p}/start")], f"{p}/local")
        cols_i, row_i, sub_i = at(wc, "cols"), at(row, "row_width"), at(sub_len, "sub_len")
        first = op("Mul", [img, slots], f"{p}/first_crop")  # pixel slot of the image's global crop
        # sub-crop grid: token (r, col) of the grid; col == wc * s is the row's sub_GN
        r, col = op("Div", [q, row_i], f"{p}/sub/r"), op("Mod", [q, row_i], f"{p}/sub/col")
        crop = op("Add", [op("Mul", [op("Div", [r, c(s)], f"{p}/sub/crop_r"), cols_i], f"{p}/sub/crop_base"),
                          op("Div", [col, c(s)], f"{p}/sub/crop_c")], f"{p}/sub/crop")
        within = op("Add", [op("Mul", [op("Mod", [r, c(s)], f"{p}/sub/rr"), c(s)], f"{p}/sub/rr_s"), op("Mod", [col, c(s)], f"{p}/sub/cc")],
                    f"{p}/sub/within")
        sub_src = op("Add", [op("Mul", [op("Add", [first, op("Add", [crop, c(1)], f"{p}/sub/slot")], f"{p}/sub/crop_slot"),
                                        c(s * s)], f"{p}/sub/crop_first"), within], f"{p}/sub/src")
        sub_at = op("Where", [op("Equal", [op("Add", [col, c(1)], f"{p}/sub/col1"), row_i], f"{p}/sub/is_sep"), c(0),
                              op("Add", [sub_src, c(2)], f"{p}/sub/row")], f"{p}/sub/at")
        # global image: glb_GN, then s rows of s tokens each closed by sub_GN
        g = op("Sub", [op("Sub", [q, sub_i], f"{p}/glb/q0"), c(1)], f"{p}/glb/q")
        g = op("Max", [g, c(0)], f"{p}/glb/q_pos")
        g_r, g_c = op("Div", [g, c(s + 1)], f"{p}/glb/r"), op("Mod", [g, c(s + 1)], f"{p}/glb/c")
        glb_src = op("Add", [op("Mul", [first, c(s * s)], f"{p}/glb/first"),
                             op("Add", [op("Mul", [g_r, c(s)], f"{p}/glb/r_s"), g_c], f"{p}/glb/within")], f"{p}/glb/src")
        glb_at = op("Where", [op("Equal", [g_c, c(s)], f"{p}/glb/is_sep"), c(0), op("Add", [glb_src, c(2)], f"{p}/glb/row")], f"{p}/glb/at")
        glb_at = op("Where", [op("Equal", [q, sub_i], f"{p}/glb/is_glb"), c(1), glb_at], f"{p}/glb/at_all")
        return op("Where", [op("Less", [q, sub_i], f"{p}/in_sub"), sub_at, glb_at], f"{p}/index")

    def separators(self) -> tuple[str, str]:
        width = self.image.merged_width
        sub = self.float_param(self.image.sub_separator, self.tensor(self.image.sub_separator).numpy().reshape(1, width))
        glb = self.float_param(self.image.global_separator, self.tensor(self.image.global_separator).numpy().reshape(1, width))
        return sub, glb

    # ---- the model ------------------------------------------------------------------------------
    def emit(self, progress_task=None) -> Path:
        enc, img = self.image.encoder, self.image
        try:
            hc, wc, slots = self.crop_counts()
            p = "/vision/pixels"
            kept = self.op("Slice", ["pixel_values", self.const([0]), slots, self.const([1])], f"{p}/Slice")
            pixels = self.op("Reshape", [kept, self.const([-1, 3, enc.image_size, enc.image_size])], f"{p}/Reshape")
            x = self.embeddings(pixels)
            self.ckpt.close()
            for layer in stream_layers(self.ckpt, enc.layers, progress_task):  # unmaps the shards after each layer
                x = self.encoder_layer(x, layer)
            tokens = self.merged(x)
            sub, glb = self.separators()
            table = self.op("Concat", [sub, glb, tokens], "/vision/table/Concat", axis=0)
            features = self.op("Gather", [table, self.token_index(hc, wc, slots)], "/vision/hd/Gather", axis=0)
            first, second = img.projector
            h = self.linear(features, first, "/vision/img_projection.0")
            h = self.op("Gelu", [h], "/vision/img_projection.1/Gelu", approximate="none")
            h = self.linear(h, second, "/vision/img_projection.2")
            self.node("Identity", [h], "/vision/output/Identity", outputs=["image_features"])
            self.ckpt.close()
        finally:
            self.data.close()
        size = enc.image_size
        inputs = [helper.make_tensor_value_info("pixel_values", self.io_onnx, ["num_images", "max_num_crops", 3, size, size]),
                  helper.make_tensor_value_info("image_sizes", TensorProto.INT64, ["num_images", 2])]
        outputs = [helper.make_tensor_value_info("image_features", self.io_onnx, ["num_image_tokens", img.projector[1].shape[0]])]
        path = self.out_dir / "vision.onnx"
        path.write_bytes(self.model("phi3_export_vision", inputs, outputs).SerializeToString(deterministic=True))
        return path
