"""Reads a saved ``.mlpackage`` and evaluates its ML program with numpy, op by op.

Core ML prediction needs macOS 15. On any other OS this is how `validate` measures a Core
ML artifact honestly: it runs the program exactly as saved (the ops and weights in
``model.mlmodel`` and ``weight.bin``, states included), not a re-creation of it. Each op's
result is rounded to the dtype the program declares for it, so fp16 activations are
fp16 here too (arithmetic in float32, as GPUs accumulate); ``precision="fp32"`` keeps
every float in float32 to check the program's structure separately from fp16 rounding.

Only the ops the phi3-export program uses are implemented; any other op raises.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np

SPEC = Path("Data/com.apple.CoreML/model.mlmodel")
WEIGHTS_DIR = Path("Data/com.apple.CoreML/weights")


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def _index(x_shape, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    rank = len(x_shape)
    stride = stride if stride is not None else [1] * rank
    out = []
    for d in range(rank):
        b = None if begin_mask is not None and begin_mask[d] else int(begin[d])
        e = None if end_mask is not None and end_mask[d] else int(end[d])
        if squeeze_mask is not None and squeeze_mask[d]:
            out.append(int(begin[d]))
        else:
            out.append(slice(b, e, int(stride[d])))
    return tuple(out)


class MilProgram:
    """One function of a saved ML program, ready to run."""

    def __init__(self, package: Path, function: str = "main"):
        from phi3_export.export.coreml.ct import coremltools

        coremltools()
        from coremltools.proto import MIL_pb2, Model_pb2

        self.package = Path(package)
        self.spec = Model_pb2.Model()
        self.spec.ParseFromString((self.package / SPEC).read_bytes())
        fn = self.spec.mlProgram.functions[function]
        self.block = fn.block_specializations[fn.opset]
        self.inputs = {i.name: i for i in fn.inputs}
        self.types = MIL_pb2.DataType
        self._readers: dict[str, object] = {}
        self._constants: dict[str, np.ndarray] = {}
        self.state_shapes = {s.name: tuple(s.type.stateType.arrayType.shape) for s in self.spec.description.state}

    # ---- values --------------------------------------------------------------------------
    def np_dtype(self, data_type: int, precision: str) -> np.dtype:
        t = self.types
        table = {t.FLOAT16: np.float16 if precision == "fp16" else np.float32, t.FLOAT32: np.float32, t.INT32: np.int32,
                 t.INT64: np.int64, t.BOOL: np.bool_, t.UINT8: np.uint8, t.INT8: np.int8, t.UINT4: np.uint8,
                 t.INT4: np.int8, t.UINT16: np.uint16, t.INT16: np.int16}
        return np.dtype(table[data_type])

    def _reader(self, file_name: str):
        from coremltools import libmilstoragepython

        path = self.package / WEIGHTS_DIR / Path(file_name).name
        if file_name not in self._readers:
            self._readers[file_name] = libmilstoragepython._BlobStorageReader(str(path))
        return self._readers[file_name]

    def value(self, value, precision: str):
        t = self.types
        tensor_type = value.type.tensorType
        dtype = tensor_type.dataType
        shape = tuple(d.constant.size for d in tensor_type.dimensions)
        if value.HasField("blobFileValue"):
            reader = self._reader(value.blobFileValue.fileName)
            read = {t.FLOAT16: reader.read_fp16_data, t.FLOAT32: reader.read_float_data, t.UINT4: reader.read_uint4_data,
                    t.INT4: reader.read_int4_data, t.UINT8: reader.read_uint8_data, t.INT8: reader.read_int8_data,
                    t.INT32: reader.read_int32_data}[dtype]
            array = np.asarray(read(value.blobFileValue.offset))
            if dtype == t.FLOAT16:
                array = array.view(np.float16)
            return array.reshape(shape).astype(self.np_dtype(dtype, precision))
        tensor = value.immediateValue.tensor
        if dtype == t.STRING:
            items = list(tensor.strings.values)
            return items[0] if not shape and len(items) == 1 else items
        if dtype == t.BOOL:
            data = list(tensor.bools.values)
        elif dtype in (t.FLOAT32, t.FLOAT16) and tensor.floats.values:
            data = list(tensor.floats.values)
        elif tensor.bytes.values:
            raw = np.frombuffer(tensor.bytes.values, dtype={t.FLOAT16: np.float16, t.UINT8: np.uint8, t.INT8: np.int8,
                                                           t.UINT4: np.uint8, t.INT4: np.int8}[dtype])
            data = raw
        elif tensor.longInts.values:
            data = list(tensor.longInts.values)
        else:
            data = list(tensor.ints.values)
        array = np.asarray(data, dtype=self.np_dtype(dtype, precision)).reshape(shape)
        return array

    @cached_property
    def consts(self) -> dict[str, object]:
        """const ops by output name."""
        return {o.outputs[0].name: o for o in self.block.operations if o.type == "const"}

    def _constant(self, op, key: str):
        """The proto Value of ``op``'s input ``key`` when it is constant (a const op's, or given inline), else None."""
        arg = op.inputs[key].arguments[0]
        if not arg.name:
            return arg.value
        const = self.consts.get(arg.name)
        return None if const is None else const.attributes["val"]

    def constant_inputs(self, op, precision: str = "fp16") -> dict[str, np.ndarray]:
        """The values of ``op``'s constant inputs."""
        values = {key: self._constant(op, key) for key in op.inputs}
        return {key: self.value(v, precision) for key, v in values.items() if v is not None}

    def constant_dtype(self, op, key: str) -> int | None:
        """MIL data type of ``op``'s constant input ``key`` (None if it is not constant)."""
        value = self._constant(op, key)
        return None if value is None else value.type.tensorType.dataType

    # ---- running ---------------------------------------------------------------------------
    def run(self, feeds: dict[str, np.ndarray], states: dict[str, np.ndarray], precision: str = "fp16") -> dict[str, np.ndarray]:
        """Run once; ``states`` are updated in place (as Core ML's MLState is)."""
        env: dict[str, object] = {}
        for name in self.inputs:
            if name in states:
                env[name] = ("state", name)
            else:
                env[name] = np.asarray(feeds[name])
        for op in self.block.operations:
            self._run_op(op, env, states, precision)
        return {name: env[name] for name in self.block.outputs}

    def _args(self, op, env, precision) -> dict[str, object]:
        args = {}
        for key, binding in op.inputs.items():
            values = []
            for arg in binding.arguments:
                values.append(env[arg.name] if arg.name else self.value(arg.value, precision))
            args[key] = values if key == "values" else values[0]
        return args

    def _run_op(self, op, env, states, precision) -> None:
        cache_key = (op.outputs[0].name if op.outputs else None, precision)
        if op.type in ("const", "constexpr_blockwise_shift_scale") and cache_key in self._constants:
            env[op.outputs[0].name] = self._constants[cache_key]
            return
        if op.type == "const":
            result = self.value(op.attributes["val"], precision)
        else:
            args = self._args(op, env, precision)
            attrs = {k: self.value(v, precision) for k, v in op.attributes.items() if k != "name"}
            result = getattr(self, f"op_{op.type}", None)
            if result is None:
                raise NotImplementedError(f"MIL op {op.type} is not implemented by this reader")
            result = result(states=states, **args, **attrs)
        results = result if isinstance(result, tuple) else (result,)
        for out, value in zip(op.outputs, results):
            tensor_type = out.type.tensorType
            if tensor_type.dataType != self.types.STRING and (isinstance(value, np.ndarray) or np.isscalar(value)):
                value = np.asarray(value).astype(self.np_dtype(tensor_type.dataType, precision), copy=False)
            env[out.name] = value
        if op.type in ("const", "constexpr_blockwise_shift_scale"):
            self._constants[cache_key] = env[op.outputs[0].name]

    # ---- ops (arithmetic in float32 or int; the caller rounds to the declared dtype) ----------
    @staticmethod
    def _f(x):
        return np.asarray(x, dtype=np.float32) if np.asarray(x).dtype.kind == "f" else np.asarray(x)

    def op_constexpr_blockwise_shift_scale(self, data, scale, offset=None, **_):
        data = data.astype(np.float32)
        reps = [d // s for d, s in zip(data.shape, scale.shape)]
        full_scale = np.kron(scale.astype(np.float32), np.ones(reps, np.float32)) if any(r > 1 for r in reps) else scale.astype(np.float32)
        if offset is not None:
            full_offset = np.kron(offset.astype(np.float32), np.ones(reps, np.float32)) if any(r > 1 for r in reps) else offset.astype(np.float32)
            data = data - full_offset
        return full_scale * data

    def op_add(self, x, y, **_):
        return self._f(x) + self._f(y)

    def op_sub(self, x, y, **_):
        return self._f(x) - self._f(y)

    def op_mul(self, x, y, **_):
        return self._f(x) * self._f(y)

    def op_concat(self, values, axis, interleave=False, **_):
        return np.concatenate([np.atleast_1d(v) for v in values], axis=int(axis))

    def op_expand_dims(self, x, axes, **_):
        return np.expand_dims(x, tuple(int(a) for a in np.atleast_1d(axes)))

    def op_squeeze(self, x, axes=None, **_):
        return np.squeeze(x, axis=None if axes is None else tuple(int(a) for a in np.atleast_1d(axes)))

    def op_shape(self, x, **_):
        return np.asarray(np.shape(x), dtype=np.int32)

    def op_slice_by_index(self, x, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None, **_):
        return np.asarray(x)[_index(np.shape(x), begin, end, stride, begin_mask, end_mask, squeeze_mask)]

    def op_slice_update(self, x, update, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None, **_):
        out = np.array(x, copy=True)
        out[_index(out.shape, begin, end, stride, begin_mask, end_mask, squeeze_mask)] = update
        return out

    def op_reshape(self, x, shape, **_):
        return np.reshape(x, [int(s) for s in shape])

    def op_transpose(self, x, perm, **_):
        return np.transpose(x, [int(p) for p in perm])

    def op_cast(self, x, dtype, **_):
        return np.asarray(x).astype({"fp32": np.float32, "fp16": np.float16, "int32": np.int32, "bool": np.bool_}[str(dtype)])

    def op_reduce_mean(self, x, axes, keep_dims=False, **_):
        return self._f(x).mean(axis=tuple(int(a) for a in np.atleast_1d(axes)), keepdims=bool(keep_dims))

    def op_rsqrt(self, x, epsilon=1e-12, **_):
        return 1.0 / np.sqrt(self._f(x) + np.float32(epsilon))

    def op_split(self, x, axis, split_sizes=None, num_splits=None, **_):
        if split_sizes is None:
            return tuple(np.split(x, int(num_splits), axis=int(axis)))
        cuts = np.cumsum([int(s) for s in split_sizes])[:-1]
        return tuple(np.split(x, cuts, axis=int(axis)))

    def op_gather(self, x, indices, axis=0, batch_dims=0, validate_indices=False, **_):
        return np.take(x, np.asarray(indices, dtype=np.int64), axis=int(axis))

    def op_range_1d(self, start, end, step, **_):
        return np.arange(int(start), int(end), int(step), dtype=np.int32)

    def op_linear(self, x, weight, bias=None, **_):
        out = self._f(x) @ self._f(weight).T
        return out if bias is None else out + self._f(bias)

    def op_silu(self, x, **_):
        x = self._f(x)
        return x / (1.0 + np.exp(-x))

    def op_gelu(self, x, mode="EXACT", **_):
        if str(mode) != "SIGMOID_APPROXIMATION":
            raise NotImplementedError(f"MIL gelu mode {mode} is not implemented by this reader")
        x = self._f(x)
        return x / (1.0 + np.exp(-1.702 * x))

    def op_minimum(self, x, y, **_):
        return np.minimum(self._f(x), self._f(y))

    def op_clip(self, x, alpha, beta, **_):
        return np.clip(self._f(x), self._f(alpha), self._f(beta))

    def op_floor_div(self, x, y, **_):
        return np.floor_divide(self._f(x), self._f(y))

    def op_layer_norm(self, x, axes, gamma=None, beta=None, epsilon=1e-5, **_):
        x = self._f(x)
        axes = tuple(int(a) for a in np.atleast_1d(axes))
        centred = x - x.mean(axis=axes, keepdims=True)
        out = centred / np.sqrt((centred * centred).mean(axis=axes, keepdims=True) + np.float32(epsilon))
        out = out if gamma is None else out * self._f(gamma)
        return out if beta is None else out + self._f(beta)

    def op_tile(self, x, reps, **_):
        return np.tile(x, [int(r) for r in reps])

    def op_greater(self, x, y, **_):
        return np.greater(x, y)

    def op_greater_equal(self, x, y, **_):
        return np.greater_equal(x, y)

    def op_less(self, x, y, **_):
        return np.less(x, y)

    def op_logical_and(self, x, y, **_):
        return np.logical_and(x, y)

    def op_select(self, cond, a, b, **_):
        return np.where(cond, self._f(a), self._f(b))

    def op_scaled_dot_product_attention(self, query, key, value, attn_mask=None, **_):
        q, k, v = self._f(query), self._f(key), self._f(value)
        scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(np.float32(q.shape[-1]))
        if attn_mask is not None:
            scores = np.where(attn_mask, scores, -np.inf) if attn_mask.dtype == np.bool_ else scores + self._f(attn_mask)
        return _softmax(scores) @ v

    def op_read_state(self, input, states, **_):
        return np.array(states[input[1]], copy=True)

    def op_write_state(self, input, data, states, **_):
        states[input[1]][...] = data


class CoreMLDecoder:
    """Token-in, logits-out over a ``MilProgram`` with its KV states (a Python stand-in for MLState)."""

    def __init__(self, package: Path | MilProgram, precision: str = "fp16"):
        self.program = package if isinstance(package, MilProgram) else MilProgram(package)
        self.precision = precision
        self.reset()

    def reset(self) -> None:
        self.states = {name: np.zeros(shape, np.float16 if self.precision == "fp16" else np.float32)
                       for name, shape in self.program.state_shapes.items()}
        self.length = 0

    @property
    def context_length(self) -> int:
        return next(iter(self.program.state_shapes.values()))[3]

    def __call__(self, ids: list[int] | np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int32).reshape(1, -1)
        end = self.length + ids.shape[1]
        mask = np.zeros((1, 1, ids.shape[1], end), np.float16)
        out = self.program.run({"inputIds": ids, "causalMask": mask}, self.states, self.precision)
        self.length = end
        return np.asarray(out["logits"], dtype=np.float32)[0]
