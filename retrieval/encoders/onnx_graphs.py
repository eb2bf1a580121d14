"""ONNX graphs of open_clip's plain transformer towers, written operator by operator.

Torch's exporters hold a tower's weights several times over (tracing folds them into constants,
writes them, parses them back) or spend tens of seconds tracing (dynamo), and either needs every
weight paged in at once. open_clip's ViT image tower and its causal text transformer are a few
operators repeated per block, so they are written here from the live model: each weight is
copied once, from the mapped checkpoint into the graph's `.data` file, and its pages are given
back to the page cache at once (`give_back_pages`). The export's process then holds torch and
about one weight at a time instead of torch and the whole model: ViT-B-32's took 0.86 GB and
8-9 s against 1.64 GB and 21.5 s with torch's exporters, for graphs as fast in ONNX Runtime
(image 19.5-20.0 against 18.5-20.1 images/s; text 95 against 94 captions/s batched, 12.9
against 12.1 ms a caption alone) whose vectors differ from those graphs' by 2e-6.

Only the towers this module knows are written: `Unsupported` names what it met otherwise, and
torch's exporters take that tower. Every graph is still checked against open_clip's own
vectors before it is kept (`onnx_checks`).
"""

from __future__ import annotations

import ctypes
import functools
import math
import mmap
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from open_clip.transformer import QuickGELU, ResidualAttentionBlock, Transformer, VisionTransformer

from .clip import can_trim_padding

OPSET = 17  # LayerNormalization is one operator from opset 17
ALIGNMENT = 65536  # offsets of weights in `.data`, so that ONNX Runtime can map them
CHUNK = 16 * 2**20  # bytes of a large weight read (then given back) at a time
_MADV_DONTNEED = 4
_MADV_PAGEOUT = 21  # Linux 5.4+


class Unsupported(Exception):
    """The tower is not one this module writes; the message says what differs."""


def write_image_graph(visual: torch.nn.Module, path: Path, twin: Path | None = None) -> None:
    """Write `visual` (an open_clip `VisionTransformer` pooled on its class token) as the graph
    `path` (weights in `path.data`): float32 pixels (batch, 3, height, width) -> features.
    With `twin`, also its 8-bit twin there (see `_Graph`)."""
    _require(type(visual) is VisionTransformer, "its image tower is not open_clip's VisionTransformer")
    _require(visual.attn_pool is None and visual.pool_type == "tok" and not visual.output_tokens,
             "its image tower is not pooled on its class token")
    conv = visual.conv1
    _require(type(conv) is torch.nn.Conv2d and conv.padding_mode == "zeros"
             and isinstance(conv.padding, tuple), "its patch embedding is not a plain convolution")
    with _Graph(path, twin) as graph:
        _write_image_graph(graph, visual)


def _write_image_graph(graph: _Graph, visual: VisionTransformer) -> None:
    conv = visual.conv1
    pixels = "pixels"
    x = graph.op("Conv", pixels, graph.weight(conv.weight),
                 *([graph.weight(conv.bias)] if conv.bias is not None else []),
                 kernel_shape=list(conv.kernel_size), strides=list(conv.stride),
                 pads=[*conv.padding, *conv.padding], dilations=list(conv.dilation), group=conv.groups)
    width = conv.out_channels
    x = graph.op("Transpose", graph.op("Reshape", x, graph.constant([0, width, -1])), perm=[0, 2, 1])
    batch = graph.op("Shape", pixels, start=0, end=1)
    expand_to = graph.op("Concat", batch, graph.constant([1, width]), axis=0)
    class_token = graph.op("Expand", graph.weight(visual.class_embedding.reshape(1, 1, width)), expand_to)
    x = graph.op("Concat", class_token, x, axis=1)
    x = graph.op("Add", x, graph.weight(visual.positional_embedding))
    x = _norm(graph, visual.ln_pre, x)
    x = _transformer(graph, visual.transformer, x, None)
    pooled = graph.op("Gather", x, graph.constant(0), axis=1)  # the class token
    pooled = _norm(graph, visual.ln_post, pooled)  # per token, so before or after pooling alike
    if visual.proj is not None:
        pooled = graph.matmul(pooled, visual.proj)
    image_size = [int(s) for s in np.broadcast_to(visual.image_size, 2)]
    graph.save(helper.make_tensor_value_info(pixels, TensorProto.FLOAT, ["batch", 3, *image_size]),
               _feature_count(visual.proj, width))


def write_text_graph(model: torch.nn.Module, path: Path, twin: Path | None = None) -> None:
    """Write the text tower of `model` (an open_clip `CLIP` whose causal text transformer is
    pooled at its end token or first token) as the graph `path`: int64 token ids (batch,
    length), cut after the batch's longest text, -> features. With `twin`, also its 8-bit twin
    there (see `_Graph`): made in the same pass, where ONNX Runtime's quantiser would hold
    the whole fp32 graph several times over (ViT-B-32: 0.9 GB)."""
    _require(can_trim_padding(model) and isinstance(model.token_embedding, torch.nn.Embedding),
             "its text tower is not open_clip's causal text transformer pooled at its end or first token")
    _require(model.transformer.get_cast_dtype() == torch.float32, "its text tower computes in low precision")
    with _Graph(path, twin) as graph:
        _write_text_graph(graph, model, model.text_pool_type)


def _write_text_graph(graph: _Graph, model: torch.nn.Module, pool: str) -> None:
    tokens = "tokens"
    length = graph.op("Shape", tokens, start=1, end=2)
    x = graph.op("Gather", graph.weight(model.token_embedding.weight), tokens, axis=0)
    zero = graph.constant([0])
    positions = graph.op("Slice", graph.weight(model.positional_embedding), zero, length, zero)
    x = graph.op("Add", x, positions)
    square = graph.op("Concat", length, length, axis=0)
    mask = graph.op("Slice", graph.weight(model.attn_mask), graph.constant([0, 0]), square,
                    graph.constant([0, 1]))
    x = _transformer(graph, model.transformer, x, mask)
    x = _norm(graph, model.ln_final, x)
    if pool == "first":
        pooled = graph.op("Gather", x, graph.constant(0), axis=1)
    else:
        ids = graph.op("Cast", tokens, to=TensorProto.INT32)
        if pool == "eos":
            ids = graph.op("Cast", graph.op("Equal", ids, graph.constant(np.int32(model.text_eos_id))),
                           to=TensorProto.INT32)
        # the first position holding the largest id: torch's argmax
        position = graph.op("ArgMax", ids, axis=1, keepdims=1)  # (batch, 1)
        rows = graph.op("Concat", graph.op("Shape", position), graph.op("Shape", x, start=2, end=3), axis=0)
        # (batch, 1, width): the position, once per feature
        index = graph.op("Expand", graph.op("Unsqueeze", position, graph.constant([2])), rows)
        pooled = graph.op("Squeeze", graph.op("GatherElements", x, index, axis=1), graph.constant([1]))
    projection = model.text_projection
    if isinstance(projection, torch.nn.Linear):
        pooled = _linear(graph, projection, pooled)
    elif projection is not None:
        pooled = graph.matmul(pooled, projection)
    width = model.token_embedding.embedding_dim
    graph.save(helper.make_tensor_value_info(tokens, TensorProto.INT64, ["batch", "length"]),
               _feature_count(projection, width))


def give_back_pages(tensors: Iterable[torch.Tensor | None]) -> None:
    """Hand the pages under `tensors` back to the page cache, so that they stop counting in this
    process's memory. Pages of a mapped file are mapped again from the page cache if the tensor
    is used again; memory of the process's own (no file under it) stays as it is. Nothing
    happens where the kernel cannot (not Linux).

    Where every page in the range is the file's own, the process just lets go of them
    (MADV_DONTNEED), and they stay cached: ViT-B-32's probes, encoded after its graph was
    written, took 0.4 s instead of 2.8-6.7 s. Elsewhere (a page the process wrote or owns, which
    DONTNEED would zero), MADV_PAGEOUT keeps such pages and evicts the file's, which are then
    read again from disk."""
    madvise = _madvise()
    if madvise is None:
        return
    page = mmap.PAGESIZE
    for tensor in tensors:
        if tensor is None or tensor.device.type != "cpu" or tensor.numel() == 0:
            continue
        start = tensor.data_ptr() // page * page
        end = -(-(tensor.data_ptr() + tensor.numel() * tensor.element_size()) // page) * page
        advice = _MADV_DONTNEED if _file_pages_only(start, end) else _MADV_PAGEOUT
        madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), advice)


def _file_pages_only(start: int, end: int) -> bool:
    """Whether no page in [start, end) is the process's own: every page is absent, or present
    as a page of a mapped file (/proc/self/pagemap: bit 63 present, 62 swapped, 61 file page)."""
    try:
        with open("/proc/self/pagemap", "rb") as pagemap:
            pagemap.seek(start // mmap.PAGESIZE * 8)
            entries = np.frombuffer(pagemap.read((end - start) // mmap.PAGESIZE * 8), np.uint64)
    except (OSError, ValueError):  # no pagemap to read (not Linux, a restricted /proc)
        return False
    present, swapped, file_page = ((entries >> np.uint64(bit)) & np.uint64(1) for bit in (63, 62, 61))
    return len(entries) == (end - start) // mmap.PAGESIZE and not swapped.any() \
        and bool(np.all(file_page[present == 1] == 1))


@functools.cache
def _madvise():
    try:
        function = ctypes.CDLL(None, use_errno=True).madvise
    except (AttributeError, OSError):  # no C library to ask (not Linux)
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return function


# -- the blocks ---------------------------------------------------------------------------------

def _transformer(graph: _Graph, transformer: torch.nn.Module, x: str, mask: str | None) -> str:
    _require(type(transformer) is Transformer and len(transformer.resblocks) > 0,
             "its transformer is not open_clip's plain one")
    for block in transformer.resblocks:
        x = _block(graph, block, x, mask)
    return x


def _block(graph: _Graph, block: torch.nn.Module, x: str, mask: str | None) -> str:
    """open_clip's `ResidualAttentionBlock` on self-attention: pre-norm attention and MLP, each
    added back through an optional layer scale."""
    _require(type(block) is ResidualAttentionBlock and not hasattr(block, "ln_1_kv"),
             "its blocks are not open_clip's plain residual attention blocks")
    mlp = block.mlp
    parts = [name for name, _ in mlp.named_children()] if isinstance(mlp, torch.nn.Sequential) else []
    _require(parts == ["c_fc", "gelu", "c_proj"],
             "its blocks' MLP is not open_clip's")
    attended = _scaled(graph, block.ls_1, _attention(graph, block.attn, _norm(graph, block.ln_1, x), mask))
    x = graph.op("Add", x, attended)
    hidden = _activation(graph, mlp.gelu, _linear(graph, mlp.c_fc, _norm(graph, block.ln_2, x)))
    return graph.op("Add", x, _scaled(graph, block.ls_2, _linear(graph, mlp.c_proj, hidden)))


def _attention(graph: _Graph, attention: torch.nn.Module, x: str, mask: str | None) -> str:
    """torch's `MultiheadAttention` of `x` (batch, length, width) with itself."""
    _require(type(attention) is torch.nn.MultiheadAttention  # one in_proj_weight: q, k, v of one width
             and attention.in_proj_weight is not None and attention.bias_k is None
             and not attention.add_zero_attn, "its attention is not one projection for q, k and v")
    heads, width = attention.num_heads, attention.embed_dim
    projected = graph.matmul(x, attention.in_proj_weight, transpose=True)
    if attention.in_proj_bias is not None:
        projected = graph.op("Add", projected, graph.weight(attention.in_proj_bias))
    # (batch, length, 3 * width) -> (3, batch, heads, length, head width)
    split = graph.op("Transpose", graph.op("Reshape", projected, graph.constant([0, 0, 3, heads, -1])),
                     perm=[2, 0, 3, 1, 4])
    query, key, value = (graph.op("Gather", split, graph.constant(i), axis=0) for i in range(3))
    scale = graph.constant(np.float32(1 / math.sqrt(width // heads)))
    scores = graph.op("MatMul", graph.op("Mul", query, scale), graph.op("Transpose", key, perm=[0, 1, 3, 2]))
    if mask is not None:
        scores = graph.op("Add", scores, mask)
    mixed = graph.op("MatMul", graph.op("Softmax", scores, axis=-1), value)
    joined = graph.op("Reshape", graph.op("Transpose", mixed, perm=[0, 2, 1, 3]),
                      graph.constant([0, 0, width]))
    return _linear(graph, attention.out_proj, joined)


def _linear(graph: _Graph, linear: torch.nn.Module, x: str) -> str:
    _require(isinstance(linear, torch.nn.Linear),
             f"it has a {type(linear).__name__} where a linear layer was expected")
    y = graph.matmul(x, linear.weight, transpose=True)
    return graph.op("Add", y, graph.weight(linear.bias)) if linear.bias is not None else y


def _norm(graph: _Graph, norm: torch.nn.Module, x: str) -> str:
    if type(norm) is torch.nn.Identity:
        return x
    _require(isinstance(norm, torch.nn.LayerNorm) and len(norm.normalized_shape) == 1
             and norm.elementwise_affine and norm.weight is not None,
             f"it has a {type(norm).__name__} where a layer norm was expected")
    bias = graph.weight(norm.bias) if norm.bias is not None else graph.constant(
        np.zeros(norm.normalized_shape, np.float32))
    return graph.op("LayerNormalization", x, graph.weight(norm.weight), bias, axis=-1, epsilon=norm.eps)


def _activation(graph: _Graph, activation: torch.nn.Module, x: str) -> str:
    if type(activation) is QuickGELU:
        return graph.op("Mul", x, graph.op("Sigmoid", graph.op("Mul", x, graph.constant(np.float32(1.702)))))
    _require(type(activation) is torch.nn.GELU, f"its MLP activation is {type(activation).__name__}")
    if activation.approximate == "tanh":  # 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))
        cube = graph.op("Mul", graph.op("Mul", x, x), x)
        inner = graph.op("Add", x, graph.op("Mul", cube, graph.constant(np.float32(0.044715))))
        tanh = graph.op("Tanh", graph.op("Mul", inner, graph.constant(np.float32(math.sqrt(2 / math.pi)))))
    else:  # 0.5 x (1 + erf(x / sqrt(2))): ONNX Runtime fuses it into one Gelu
        tanh = graph.op("Erf", graph.op("Div", x, graph.constant(np.float32(math.sqrt(2)))))
    half = graph.op("Mul", x, graph.constant(np.float32(0.5)))
    return graph.op("Mul", half, graph.op("Add", tanh, graph.constant(np.float32(1))))


def _scaled(graph: _Graph, scale: torch.nn.Module, x: str) -> str:
    if type(scale) is torch.nn.Identity:
        return x
    _require(type(scale).__name__ == "LayerScale" and isinstance(getattr(scale, "gamma", None), torch.Tensor),
             f"it has a {type(scale).__name__} where a layer scale was expected")
    return graph.op("Mul", x, graph.weight(scale.gamma))


def _feature_count(projection, width: int) -> onnx.ValueInfoProto:
    if isinstance(projection, torch.nn.Linear):
        width = projection.out_features
    elif projection is not None:
        width = int(projection.shape[-1])
    return helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", width])


def _require(condition: bool, reason: str) -> None:
    if not condition:
        raise Unsupported(reason)


class _Graph:
    """A graph being written: its nodes, and its weights appended to `<path>.data` as they come.

    With a `twin` path, the twin graph is written alongside: the same nodes, but for each
    matrix product by a weight (`matmul`), which it computes with 8-bit weights, per output
    channel, kept in `<twin>.data`; its other weights are read from `<path>.data`."""

    def __init__(self, path: Path, twin: Path | None = None) -> None:
        self.path, self.twin = path, twin
        self.nodes: list[onnx.NodeProto] = []
        self.twin_nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.twin_initializers: list[TensorProto] = []
        self._data = open(f"{path}.data", "wb")
        self._twin_data = open(f"{twin}.data", "wb") if twin is not None else None
        self._names = 0

    def __enter__(self) -> _Graph:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        for data in (self._data, self._twin_data):
            if data is not None:
                data.close()
        if error is not None:  # nothing half-written stays behind
            for path in (self.path, self.twin):
                if path is not None:
                    Path(f"{path}.data").unlink(missing_ok=True)
                    path.unlink(missing_ok=True)

    def op(self, op_type: str, *inputs: str, **attributes) -> str:
        """Add one node (to both graphs); the name of its output."""
        output = self._name(op_type)
        node = helper.make_node(op_type, list(inputs), [output], name=output, **attributes)
        self.nodes.append(node)
        self.twin_nodes.append(node)
        return output

    def constant(self, value) -> str:
        """A small constant, kept in the graph: int64 for Python ints and lists, else as given."""
        array = np.asarray(value, np.int64) if isinstance(value, (int, list)) else np.asarray(value)
        name = self._name("constant")
        self._add(numpy_helper.from_array(array, name))
        return name

    def weight(self, tensor: torch.Tensor) -> str:
        """A weight of the model, for both graphs, written to the fp32 data file; a large one a
        slice at a time, each slice's pages given back once written (the token embedding is 100 MB)."""
        source = tensor.detach()
        if source.dtype == torch.float32 and source.is_contiguous() and source.dim() > 0:
            rows = max(1, CHUNK // (source[0].numel() * source.element_size()))
            parts = [source[start:start + rows] for start in range(0, len(source), rows)]
            given_back = parts
        else:  # cast or strided: a copy, whole (none of those is large)
            parts, given_back = [source.to(torch.float32).contiguous()], [source]
        proto = self._fp32(parts, given_back, source.shape)
        self._add(proto)
        return proto.name

    def matmul(self, x: str, tensor: torch.Tensor, transpose: bool = False) -> str:
        """`x` times weight `tensor` (transposed first if `transpose`): in the twin, with the
        weight in 8 bits per output channel and `x` quantised to 8 bits as it comes, the
        pattern ONNX Runtime fuses into one integer kernel. The weight is read once for both."""
        source = tensor.detach()
        weights = (source.t() if transpose else source).to(torch.float32).contiguous()  # (in, out)
        proto = self._fp32([weights], [], weights.shape)
        self.initializers.append(proto)  # the twin has its own
        output = self._name("MatMul")
        self.nodes.append(helper.make_node("MatMul", [x, proto.name], [output]))
        if self.twin is not None:
            self._integer_matmul(x, weights.numpy(), output)
        give_back_pages([source])
        return output

    def _integer_matmul(self, x: str, weights: np.ndarray, output: str) -> None:
        """The twin's `output` = `x` times `weights` (in, out), in 8 bits."""
        scales = np.abs(weights).max(axis=0) / 127  # (output channels,)
        scales[scales == 0] = 1
        quantised = np.clip(np.rint(weights / scales), -127, 127).astype(np.int8)
        name = self._name("int8")
        offset = self._append(self._twin_data, [quantised], [])
        self.twin_initializers += [
            _external(name, TensorProto.INT8, quantised.shape, f"{self.twin.name}.data", offset,
                      quantised.nbytes),
            numpy_helper.from_array(scales.astype(np.float32), f"{name}_scale"),
            numpy_helper.from_array(np.zeros(len(scales), np.int8), f"{name}_zero")]
        x_q, x_scale, x_zero, product, real, scale = (
            f"{output}_{part}" for part in ("xq", "xs", "xz", "int", "float", "scale"))
        self.twin_nodes += [
            helper.make_node("DynamicQuantizeLinear", [x], [x_q, x_scale, x_zero]),
            helper.make_node("MatMulInteger", [x_q, name, x_zero, f"{name}_zero"], [product]),
            helper.make_node("Cast", [product], [real], to=TensorProto.FLOAT),
            helper.make_node("Mul", [x_scale, f"{name}_scale"], [scale]),
            helper.make_node("Mul", [real, scale], [output])]

    def save(self, input_info: onnx.ValueInfoProto, output_info: onnx.ValueInfoProto) -> None:
        """Write the graph (and its twin) with the given input and output; the last node's
        output becomes the output."""
        last = self.nodes[-1].output[0]
        for nodes, initializers, path in ((self.nodes, self.initializers, self.path),
                                          (self.twin_nodes, self.twin_initializers, self.twin)):
            if path is None:
                continue
            for node in nodes:
                node.output[:] = [output_info.name if name == last else name for name in node.output]
            graph = helper.make_graph(nodes, "tower", [input_info], [output_info], initializers)
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                      producer_name="retrieval")
            model.ir_version = 8
            onnx.save_model(model, str(path))

    def _add(self, proto: TensorProto) -> None:
        self.initializers.append(proto)
        self.twin_initializers.append(proto)

    def _fp32(self, parts: list[torch.Tensor], given_back: list[torch.Tensor], shape) -> TensorProto:
        """A float32 weight written to the data file from `parts` one after another (see `_append`)."""
        offset = self._append(self._data, [part.numpy() for part in parts], given_back)
        return _external(self._name("weight"), TensorProto.FLOAT, shape, f"{self.path.name}.data", offset,
                         math.prod(shape) * 4)

    def _append(self, data, arrays: list[np.ndarray], given_back: list[torch.Tensor]) -> int:
        """Write `arrays` one after another at the next aligned offset of file `data`, giving
        back the pages of `given_back[i]` once `arrays[i]` is written; the offset."""
        offset = -(-data.tell() // ALIGNMENT) * ALIGNMENT
        data.seek(offset)
        for index, array in enumerate(arrays):
            data.write(memoryview(np.ascontiguousarray(array).reshape(-1)).cast("B"))
            if index < len(given_back):
                give_back_pages([given_back[index]])
        return offset

    def _name(self, kind: str) -> str:
        self._names += 1
        return f"{kind}_{self._names}"


def _external(name: str, data_type: int, shape, location: str, offset: int, length: int) -> TensorProto:
    """An initializer whose bytes are in file `location` (beside the graph) at `offset`."""
    proto = TensorProto(name=name, data_type=data_type, dims=list(shape),
                        data_location=TensorProto.EXTERNAL)
    for key, value in {"location": location, "offset": offset, "length": length}.items():
        proto.external_data.add(key=key, value=str(value))
    return proto
