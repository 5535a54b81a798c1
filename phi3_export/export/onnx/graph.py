"""What every ONNX graph phi3-export writes shares: nodes, deduplicated constants, and
initializers streamed to an external-data file as they are made (export/onnx/external_data.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from phi3_export.export.onnx.external_data import ExternalDataWriter, inline

OPSET = 21
MS = "com.microsoft"


class GraphBuilder:
    """Nodes, deduplicated constants and external-data initializers of one ONNX graph."""

    def __init__(self, data_path: Path, io_dtype: type, const_prefix: str = "/constants"):
        self.const_prefix = const_prefix  # the decoder's are "/model/constants/...", as the ORT-GenAI builder names them
        self.io = np.dtype(io_dtype)
        self.io_onnx = helper.np_dtype_to_tensor_dtype(self.io)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.consts: dict[str, str] = {}
        self.data = ExternalDataWriter(data_path)

    def node(self, op: str, inputs: list[str], name: str, n_out: int = 1, domain: str = "",
             outputs: list[str] | None = None, **attrs) -> list[str]:
        outputs = outputs or [f"{name}/output_{k}" for k in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs

    def op(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        return self.node(op, inputs, name, **attrs)[0]

    def const(self, values, dtype=np.int64) -> str:
        array = np.asarray(values, dtype=dtype)
        key = f"{self.const_prefix}/{np.dtype(dtype).name}/{array.tolist()}"
        if key not in self.consts:
            self.initializers.append(inline(key, array))
            self.consts[key] = key
        return key

    def weight(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(self.data.add(name, array))
        return name

    def model(self, graph_name: str, inputs: list, outputs: list) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, graph_name, inputs, outputs, initializer=self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                                  producer_name="phi3-export")
        model.ir_version = 10
        return model
