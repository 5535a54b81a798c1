"""Emits ``embedding.onnx`` of an image + text plan, and the runtime files that go with it.

    input_ids [batch, seq] (image k's placeholders are the id -k), image_features [T, hidden]
      -> text rows: the decoder's embedding table gathered at max(id, 0) (times the plan's
         embedding scale), at the decoder's precision (the quantized checkpoint's table)
      -> placeholder rows: image_features rows in order (the n-th negative id in the flattened
         ids takes row n), whatever image number the id names, as the published model does
      -> inputs_embeds [batch, seq, hidden]

On decode steps onnxruntime-genai passes image_features of shape [0, hidden]: the rows are
gathered from ``Concat(zeros[1, hidden], image_features)`` at the placeholder's running count
(text positions at row 0), so no Gather ever indexes an empty tensor.

``processor_config.json`` is onnxruntime-extensions' image pipeline. DecodeImage emits BGR and
ConvertRGB swaps it to RGB (DecodeImage's own RGB output followed by ConvertRGB would swap red
and blue). Phi3ImageTransform's attributes record the model's crop count, but onnxruntime-genai
0.18 ignores them and always makes 16 crops (onnxruntime-extensions hard-codes max_crops = 16).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from phi3_export.arch.plan import ModelPlan
from phi3_export.export.onnx.decoder import DecoderEmitter
from phi3_export.export.onnx.targets import ResolvedTarget
from phi3_export.quant.qcheckpoint import QuantizedCheckpoint

EXTENSIONS = "com.microsoft.extensions"


class EmbeddingEmitter(DecoderEmitter):
    """The decoder's embedding lookup (float Gather, or GatherBlockQuantized of a tied int table) plus the image rows."""

    def __init__(self, qckpt: QuantizedCheckpoint, plan: ModelPlan, target: ResolvedTarget, out_dir: Path):
        super().__init__(qckpt, plan, target, out_dir, data_file="embedding.onnx.data")

    def emit(self, progress_task=None) -> Path:
        d, p = self.decoder, "/embedding"
        try:
            zero = self.const(0)
            is_image = self.node("Less", ["input_ids", zero], f"{p}/is_image")[0]
            text_ids = self.node("Max", ["input_ids", zero], f"{p}/text_ids")[0]
            text = self.scaled_embedding_of(text_ids)
            flat = self.node("Reshape", [self.node("Cast", [is_image], f"{p}/is_image/Cast", to=TensorProto.INT64)[0], self.const([-1])],
                             f"{p}/is_image/Reshape")[0]
            count = self.node("CumSum", [flat, zero], f"{p}/CumSum")[0]
            count = self.node("Reshape", [count, self.node("Shape", ["input_ids"], f"{p}/Shape")[0]], f"{p}/CumSum/Reshape")[0]
            rows = self.node("Where", [is_image, count, zero], f"{p}/rows")[0]
            zeros = self.node("ConstantOfShape", [self.const([1, d.hidden])], f"{p}/zero_row",
                              value=numpy_helper.from_array(np.zeros(1, self.io)))[0]
            features = self.node("Concat", [zeros, "image_features"], f"{p}/features/Concat", axis=0)[0]
            image = self.node("Gather", [features, rows], f"{p}/features/Gather", axis=0)[0]
            mask = self.node("Unsqueeze", [is_image, self.const([-1])], f"{p}/is_image/Unsqueeze")[0]
            self.node("Where", [mask, image, text], f"{p}/Where", outputs=["inputs_embeds"])
        finally:
            self.data.close()
        inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
                  helper.make_tensor_value_info("image_features", self.io_onnx, ["num_image_tokens", d.hidden])]
        outputs = [helper.make_tensor_value_info("inputs_embeds", self.io_onnx, ["batch_size", "sequence_length", d.hidden])]
        model = self.model("phi3_export_embedding", inputs, outputs)
        path = self.out_dir / "embedding.onnx"
        path.write_bytes(model.SerializeToString(deterministic=True))
        return path

    def scaled_embedding_of(self, ids: str) -> str:
        out = self.embedding(ids)
        scale = self.decoder.embedding_scale
        if scale == 1.0:
            return out
        return self.node("Mul", [out, self.const(scale, self.io)], "/model/embed_tokens/Mul")[0]


def processor_config(num_crops: int, tokens_per_crop: int) -> dict[str, Any]:
    ops = [
        {"name": "decode_image", "domain": EXTENSIONS, "type": "DecodeImage", "attrs": {"color_space": "BGR"}},
        {"name": "convert_to_rgb", "domain": EXTENSIONS, "type": "ConvertRGB"},
        {"name": "phi3_image_transform", "domain": EXTENSIONS, "type": "Phi3ImageTransform",
         "attrs": {"num_crops": num_crops, "num_img_tokens": tokens_per_crop}},
    ]
    return {"processor": {"name": "image_processing", "transforms": [{"operation": op} for op in ops]}}
