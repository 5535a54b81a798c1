"""Initializers written straight to ``model.onnx.data`` as they are made.

The graph proto only holds references (offset, length) into the data file, so emitting a
14B-parameter model keeps one tensor in memory at a time. Large tensors start on 4 KiB
boundaries so ONNX Runtime can memory-map them; small ones on 64 bytes.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

PAGE = 4096
SMALL_ALIGN = 64
LARGE = 1 << 20


class ExternalDataWriter:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = self.path.open("wb")
        self.offset = 0

    def add(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        array = np.ascontiguousarray(array)
        return self.add_rows(name, array.shape, array.dtype, [array])

    def add_rows(self, name: str, shape: tuple[int, ...], dtype: np.dtype, chunks: Iterable[np.ndarray]) -> onnx.TensorProto:
        """A tensor written as consecutive row blocks, so only one block is ever in memory."""
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        align = PAGE if nbytes >= LARGE else SMALL_ALIGN
        pad = (-self.offset) % align
        if pad:
            self._file.write(b"\0" * pad)
            self.offset += pad
        written = 0
        for chunk in chunks:
            data = np.ascontiguousarray(chunk, dtype=dtype).tobytes()
            self._file.write(data)
            written += len(data)
        if written != nbytes:
            raise ValueError(f"{name}: wrote {written} bytes, shape {shape} needs {nbytes}")
        tensor = onnx.TensorProto()
        tensor.name = name
        tensor.data_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        tensor.dims.extend(shape)
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(self.offset)), ("length", str(nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.offset += nbytes
        return tensor

    def close(self) -> None:
        self._file.close()


def inline(name: str, array: np.ndarray) -> onnx.TensorProto:
    """A small constant kept inside model.onnx (shapes, scalars)."""
    return numpy_helper.from_array(np.asarray(array), name)
