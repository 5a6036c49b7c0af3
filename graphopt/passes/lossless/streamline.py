"""DeepRebirth streamline slimming: fold the cheap layers next to a tensor layer into its weights (lossless).

A *tensor layer* is a Conv, ConvTranspose, Gemm, or MatMul with a constant 2-D weight (plus the MatMul's
bias ``Add``, when it has one). Its neighbours BatchNormalization, per-channel Mul/Add/Sub/Div and Pad are
linear or affine per channel, so they fold into its weights; two tensor layers with nothing between them
merge into one. Every rewrite is a :class:`~graphopt.core.rewrite.Rule`; the stats count what each rule did
and, for everything left alone, why. All arithmetic is done in float64 and cast back to the weight's dtype.

Notation: a per-channel affine map is ``y = s·x + t`` with ``s``, ``t`` vectors over one channel axis.

``fold_batchnorm``
    BatchNormalization in inference form is that affine map with ``σ = sqrt(var + ε)``, ``s = γ/σ`` and
    ``t = β − μ·s`` over axis 1. It folds *after* a layer (rule ``bn_into_preceding_layer``) or *before*
    the layers that read it (``bn_into_following_layer``), as ``fold_affine`` below describes. Refused when:
    ``training_mode=1``; the running/saved statistics outputs are present before opset 14 (that is the
    training form there) or read at any opset; ``is_test=0`` before opset 7; ``spatial=0``; a parameter is
    not constant or not 1-D; ``var + ε <= 0``. After a MatMul (or before one) BN's channel axis 1 is the
    MatMul's feature axis only for 2-D tensors, so other ranks are refused.

    Who may read what. *After*: BN must be the only reader of the layer's output (another reader needs
    the un-normalized tensor, so the layer could not change); BN's own output may have any number of
    readers, they all read the folded layer. *Before*: BN's input may have other readers (they keep
    reading it); BN's output must be read only by layers that absorb it (or by ``Shape``/``Size``), so BN
    disappears. Folding into some readers only would keep the BN and copy weights for no gain.
    A shift ``t`` within float32 rounding of ``β`` and ``μ·s`` counts as zero (``β = μ·γ/σ`` stored in
    float32), which lets such a BN fold into a padded conv after it.

``fold_affine``
    ``Mul``/``Add``/``Sub``/``Div`` by a constant that broadcasts per channel only (e.g. ``[C,1,1]``,
    ``[1,C,1,1]`` or a scalar on an NCHW conv; ``[N]`` or ``[1,N]`` on a Gemm/MatMul output), without
    changing the tensor's shape. ``x − c = x + (−c)``, ``c − x = (−1)·x + c``, ``x / c = x·(1/c)`` (refused
    when ``c`` has a zero; ``c / x`` is not affine).

    A Mul/Add/Sub/Div that belongs to a decomposed GELU or LayerNorm (:func:`graphopt.core.patterns.protected_role`)
    is never folded: the fold is exact, but onnxruntime would no longer recognise the chain and run it as one
    fused kernel (``BiasGelu``), which is slower.

    *After* a layer (rule ``affine_into_preceding_layer``), when the layer's output has no other reader
    (the affine node's output may have any number)::

        Conv          W'[o] = W[o]·s[o]                       b' = b·s + t     (b = 0 when absent)
        ConvTranspose W[Cin, Cout/g, k..]: W'[i, j] = W[i, j]·s[(i div Cin/g)·Cout/g + j],  b' = b·s + t
        Gemm          B' = B·s per output column (transB aware); C' = β·C·s + t and β' = 1
        MatMul        W'[:, n] = W[:, n]·s[n]; the bias Add's constant b' = b·s + t; a MatMul without a
                      bias becomes Gemm(x, W', t) when its input is 2-D (refused otherwise: no gain)

    *Before* the layers that read its output (rule ``affine_into_following_layer``), folded into every
    reader, so the affine node disappears; refused unless every reader is a foldable layer reading it as
    its data input, or a ``Shape``/``Size`` (which then read the affine's input: same shape), the output is
    not a model output, and broadcasting the constant does not change the input's shape::

        Conv          W'[o, c] = W[o, c]·s[c]    b'[o] = b[o] + Σ_{c,k} W[o, c, k]·t[c]   (groups: c is the
                      input channel of o's group). Exact only without padding, or when t = 0: zero padding
                      of the affine's output is not the affine of zero padding (the border taps would see 0
                      instead of t). Padded conv with t ≠ 0: refused.
        ConvTranspose W'[c] = W[c]·s[c]; only t = 0 (the number of taps reaching an output varies).
        Gemm          transA = 0 only: B' = diag(s)·B; C' = β·C + α·t·B, β' = 1.
        MatMul        W' = diag(s)·W; the shift t·W goes into the bias Add, or the MatMul becomes a Gemm
                      when its input is 2-D (refused otherwise).

``fuse_pad``
    ``Pad`` (constant mode, non-negative pads on spatial axes only; pads/value as attributes before opset 11,
    as constant inputs since, with optional ``axes``) followed by its only reader (rule ``pad_into_layer``):

    * Conv (``auto_pad`` NOTSET or VALID), pad value 0: the Pad's pads are added to the conv's pads.
    * AveragePool, pad value 0: with ``count_include_pad=1`` the pads add up (the zeros are counted either
      way); with ``count_include_pad=0`` only when the pool has no pads of its own, and then it becomes 1
      (every window of the padded tensor is full, so it divides by the kernel size). Otherwise refused.
    * MaxPool, which ignores its own padding: exact only when the pad value can never win, i.e. it is
      ``-inf`` or at most a proven lower bound of the input (Relu, Sigmoid, Softplus, Abs, Exp, Softmax,
      HardSigmoid: 0; Clip: its constant min); and every window keeps a real element (dilation 1) and the
      Indices output is not read. Else refused.
    * Pools: refused with ``ceil_mode=1`` (a last window that would start in the end padding is dropped,
      so moving pads from the tensor into the pool can change the output shape), and when the summed pads
      would not stay below the kernel (onnxruntime rejects such pools).

``merge_linear``
    Consecutive linear layers, the first one's output read by the second only:

    * ``matmul_add_to_gemm``: ``MatMul(A, B) + C`` with 2-D A and B and C broadcast per column → one Gemm.
      Always applied (one node fewer).

    * ``dense_chain``: Gemm/MatMul(+bias) → Gemm/MatMul(+bias), weights ``W1 [K, N1]``, ``W2 [N1, N2]``
      (α, β and transB folded in; transA must be 0): ``W = W1·W2``, ``b = b1·W2 + b2``. Applied when the cost
      model (:mod:`graphopt.measure.cost`) says the merged layer is cheaper; a bottleneck (N1 < K, N2) usually is not.
      The result is a Gemm when the input is 2-D and there is a bias, else a MatMul (+ bias Add).
    * ``conv_chain``: Conv → Conv with ``g`` groups handled by expanding each weight to its dense
      block-diagonal form (the merged conv has one group; the cost model then refuses most depthwise merges)::

          k×k → 1×1 (second: stride 1, no pads)   W[o, i, k] = Σ_c W2[o, c]·W1[c, i, k]   b = W2·b1 + b2
                                                  first conv's strides/pads/dilations
          1×1 → k×k (first: stride 1, no pads)    W[o, i, k] = Σ_c W2[o, c, k]·W1[c, i]   b = b2 + Σ_{c,k} W2·b1
                                                  second conv's strides/pads/dilations

      The second form is exact only when the second conv has no padding or ``b1 = 0``: its zero padding
      of ``W1·x + b1`` is not ``W1·(zero padding of x) + b1`` (border taps would see b1). Refused otherwise.
      Applied when the cost model says it pays (a dynamic batch counts as 1). When shape inference cannot
      give the spatial sizes, applied only when the merged conv has no more weights (= MACs per output
      pixel) than the conv whose geometry it keeps, which makes it cheaper at every size.

``gemm_rows``
    ``matmul_add_to_gemm_rows``: ``MatMul(A, B) + C`` as above for an N-D A ``[d_1 … d_{r-1}, K]`` (the
    transformer's ``[batch, tokens, K]``) becomes ``Reshape(A, [-1, K]) → Gemm → Reshape([d_1 … d_{r-1}, N])``,
    with at most one dynamic ``d_i``, written as ``-1`` (the element count fixes it). onnxruntime aliases the
    Reshapes, and the Gemm adds the bias while it writes its output instead of in a separate pass.
    A separate pass that runs after ``merge_linear``, so that dense chains merge first. Not applied when the
    biased output feeds a GELU: onnxruntime fuses that Add into its BiasGelu kernel.

Common refusals: a weight that is not a constant (initializer or ``Constant`` node) or not floating point;
attributes referring to a function's attributes; a layer output read by other nodes or by a model output
that cannot keep its name. A weight another node also reads is never rewritten in place: the layer gets a
new one (a ``Constant`` node when the old weight was one, or inside a function body). Weights and the
constant inputs of removed nodes that nothing reads any more are removed. Every graph is visited,
subgraphs and function bodies included.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from graphopt.core.ir import Graph, Model, Node, Value, dims_of
from graphopt.core.manager import PassContext, register
from graphopt.core.ops import LAYER_OPS_WITH_TRANSPOSE, is_op, remove_dead, sole_consumer
from graphopt.core.patterns import protected_role
from graphopt.core.rewrite import Match, Rule, RulePass
from graphopt.core.shapes import ShapeView
from graphopt.measure.cost import Cost, cheaper, conv_cost, elementwise_cost, gemm_cost

Shape = tuple  # dims: int, str (symbolic) or None (unknown)


# ---------------------------------------------------------------------------------------------
# shared state of one pass run


class _Env(ShapeView):
    """What the rules of one pass run share: the shape view (inferred once, at the first question that
    needs it; with ``symbolic``, onnxruntime's static sizes where onnx lost them) and the opset."""

    def __init__(self, model: Model, symbolic: bool = False) -> None:
        super().__init__(model, lazy=True, symbolic=symbolic)
        self.opset = model.opset("") or 1


def _dims_by_value(types: dict) -> dict[Value, Shape]:
    """Each value's inferred dims (int, ``dim_param`` or None) from ``{graph: {name: TypeProto}}``."""
    out: dict[Value, Shape] = {}
    for graph, by_name in types.items():
        for value in graph.values():
            dims = dims_of(by_name.get(value.name))
            if dims is not None:
                out[value] = dims
    return out


def _static(dims: Shape, default: int = 1) -> list[int]:
    """Dims as ints, an unknown (symbolic) dim counted as ``default``."""
    return [d if isinstance(d, int) and d > 0 else default for d in dims]


# ---------------------------------------------------------------------------------------------
# small helpers


def _has_attr_refs(node: Node) -> bool:
    return any(proto.ref_attr_name for proto in node.attrs.values())


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _ints(node: Node, name: str, default: list[int]) -> list[int]:
    value = node.attr(name)
    return list(value) if value is not None else list(default)


def _is_float(array: np.ndarray | None) -> bool:
    return array is not None and np.issubdtype(array.dtype, np.floating)


def _input(node: Node, slot: int) -> Value | None:
    return node.inputs[slot] if slot < len(node.inputs) else None


def _const(graph: Graph, node: Node, slot: int) -> np.ndarray | None:
    return graph.constant_array(_input(node, slot))


def _nonzero(t: np.ndarray | None) -> bool:
    return t is not None and bool(np.any(t != 0))


def _read_once(graph: Graph, value: Value, node: Node) -> bool:
    """``node`` reads ``value`` through exactly one input slot (``Mul(x, x)`` is not an affine map of x)."""
    return len([slot for reader, slot in graph.uses(value) if reader is node]) == 1


def _is_function_body(graph: Graph) -> bool:
    return getattr(graph, "function", None) is not None


def _copy_type(graph: Graph, src: Value, dst: Value) -> None:
    """Give a fresh value the dtype and shape of the value it replaces (the rewrites keep shapes).

    Not in function bodies: their types would be written as ``FunctionProto.value_info``, which exists
    only since IR version 10.
    """
    if src.dtype is not None and not _is_function_body(graph):
        dst.set_tensor_type(src.dtype, src.shape)


def _new_const(graph: Graph, array: np.ndarray, hint: str, anchor: Node, as_node: bool) -> Value:
    """A new constant: a ``Constant`` node when the weights of this graph are written so (or in a function
    body, which has no initializers), else an initializer."""
    if as_node or _is_function_body(graph):
        node = graph.add_node("Constant", [], outputs=[hint], attrs={"value": numpy_helper.from_array(array)},
                              name=f"{hint}_const", anchor=anchor)
        out = node.outputs[0]
        if not _is_function_body(graph):  # see _copy_type
            out.set_tensor_type(onnx.helper.np_dtype_to_tensor_dtype(array.dtype), list(array.shape))
        return out
    return graph.add_initializer(array, hint)


def _written_as_node(graph: Graph, value: Value | None) -> bool:
    return value is not None and is_op(graph.producer(value), "Constant")


def _set_const_input(graph: Graph, node: Node, slot: int, array: np.ndarray, hint: str,
                     like: Value | None = None) -> None:
    """Make ``node`` read ``array`` at ``slot``: in place when the old initializer is read by this slot only,
    else as a new constant (the old one stays for its other readers, or is removed when unused)."""
    old = _input(node, slot)
    if (old is not None and graph.initializers.get(old.name) is old and graph.uses(old) == [(node, slot)]
            and not graph.is_graph_output(old) and not graph.is_graph_input(old)):
        graph.set_initializer_array(old, array)
        return
    as_node = _written_as_node(graph, old if old is not None else like)
    new = _new_const(graph, array, old.name if old is not None else hint, node, as_node)
    graph.set_input(node, slot, new)
    _discard(graph, [old])


def _discard(graph: Graph, values: list[Value | None]) -> None:
    """Remove constants nothing reads any more: initializers of this graph and ``Constant`` nodes."""
    for value in values:
        if value is None or value not in graph.nx or graph.uses(value) or graph.is_graph_output(value):
            continue
        producer = graph.producer(value)
        if producer is not None:
            if is_op(producer, "Constant"):
                graph.remove_node(producer)
        elif graph.initializers.get(value.name) is value and not graph.is_graph_input(value):
            graph.remove_initializer(value)


def _remove_with_constants(graph: Graph, nodes: list[Node]) -> None:
    """Remove nodes whose outputs nothing reads, then the constants they alone read."""
    inputs = [v for n in nodes for v in n.inputs]
    remove_dead(graph, nodes)
    _discard(graph, inputs)


def _channel_vector(const: np.ndarray, rank: int | None, axis: int, channels: int) -> np.ndarray | str:
    """``const`` broadcast against a tensor of ``rank`` dims as a float64 ``[channels]`` vector along
    ``axis``, or why it is not per-channel (or would change the tensor's shape)."""
    if rank is None:
        if const.ndim > 1 or (axis != -1 and const.size != 1):
            return "rank of the tensor is unknown"
        rank = max(const.ndim, 1)
    if const.ndim > rank:
        return "the constant has more dims than the tensor (broadcasting would change its shape)"
    ax = axis % rank
    shape = (1,) * (rank - const.ndim) + tuple(const.shape)
    for i, d in enumerate(shape):
        if i == ax:
            if d not in (1, channels):
                return "the constant's channel dim does not match the layer's channels"
        elif d != 1:
            return "the constant is not per-channel (it varies along another axis)"
    return np.broadcast_to(np.asarray(const, np.float64).reshape(-1), (channels,)).copy()


def _vectors(affine: _Affine, rank: int | None, axis: int,
             channels: int) -> tuple[np.ndarray | None, np.ndarray | None] | str:
    """The affine map's ``s`` and ``t`` as ``[channels]`` vectors along the layer's channel axis, or why not."""
    if affine.is_batchnorm:
        if affine.s.shape != (channels,):
            return "BatchNormalization has another channel count than the layer"
        return affine.s, affine.t
    out: list[np.ndarray | None] = []
    for c in (affine.s, affine.t):
        if c is None:
            out.append(None)
            continue
        vec = _channel_vector(c, rank, axis, channels)
        if isinstance(vec, str):
            return vec
        out.append(vec)
    return out[0], out[1]


def _conv_group_index(cout: int, cin_g: int, group: int) -> np.ndarray:
    """``[Cout, Cin/g]`` index of the input channel each weight column of a grouped Conv reads."""
    cout_g = cout // group
    return (np.arange(cout)[:, None] // cout_g) * cin_g + np.arange(cin_g)[None, :]


def _dense_conv_weight(w: np.ndarray, group: int) -> np.ndarray:
    """A grouped Conv weight ``[Cout, Cin/g, k..]`` as its dense block-diagonal ``[Cout, Cin, k..]``."""
    if group == 1:
        return w
    cout, cin_g = w.shape[:2]
    cout_g = cout // group
    dense = np.zeros((cout, cin_g * group) + w.shape[2:], dtype=w.dtype)
    for g in range(group):
        dense[g * cout_g:(g + 1) * cout_g, g * cin_g:(g + 1) * cin_g] = w[g * cout_g:(g + 1) * cout_g]
    return dense


# ---------------------------------------------------------------------------------------------
# the affine maps: BatchNormalization and Mul/Add/Sub/Div by a constant


@dataclass
class _Affine:
    """``y = s·x + t`` (``None`` = identity part), constants as given (not yet checked per channel)."""

    x: Value
    s: np.ndarray | None
    t: np.ndarray | None
    constants: list[Value | None]
    # BatchNormalization: s and t are already [C] vectors along axis 1 (not numpy-broadcast constants),
    # and axis 1 is a Gemm/MatMul's feature axis only for 2-D tensors.
    is_batchnorm: bool = False


def _batchnorm_form_refusal(env: _Env, graph: Graph, node: Node) -> str | None:
    """Why BatchNormalization ``node`` is not in inference form (it would normalise with batch
    statistics, or its statistics outputs are read), or None."""
    if _has_attr_refs(node):
        return "attributes refer to function attributes"
    if node.attr("training_mode", 0):
        return "training mode (batch statistics)"
    stat_outputs = [v for v in node.outputs[1:] if v is not None]
    if env.opset < 14 and stat_outputs:
        return "training outputs present (the training form before opset 14)"
    if any(graph.uses(v) or graph.is_graph_output(v) for v in stat_outputs):
        return "running statistics outputs are read"
    if env.opset < 7 and not node.attr("is_test", 0):
        return "training mode (is_test=0 before opset 7)"
    if node.attr("spatial", 1) == 0:
        return "per-activation statistics (spatial=0)"
    return None


def _batchnorm_affine(env: _Env, graph: Graph, node: Node) -> _Affine | str:
    """``s = γ/σ``, ``t = β − μ·s`` with ``σ = sqrt(var + ε)``, or why BN is not such an affine map."""
    why = _batchnorm_form_refusal(env, graph, node)
    if why:
        return why
    params = [_const(graph, node, i) for i in range(1, 5)]
    if any(p is None for p in params):
        return "scale, bias, mean or variance is not constant"
    if not all(_is_float(p) for p in params) or any(p.ndim != 1 or p.shape != params[0].shape for p in params):
        return "parameters are not 1-D float vectors of one size"
    gamma, beta, mean, var = (np.asarray(p, np.float64) for p in params)
    denom = var + float(node.attr("epsilon", 1e-5))
    if not np.all(np.isfinite(denom)) or np.any(denom <= 0):
        return "variance + epsilon is not positive"
    s = gamma / np.sqrt(denom)
    t = beta - mean * s
    # A shift that is zero up to the float32 rounding of beta and mean·s is zero: exactly the case where
    # BN may fold into a padded conv after it (beta = mean·gamma/sigma, stored in float32).
    t[np.abs(t) <= 4 * np.finfo(np.float32).eps * (np.abs(beta) + np.abs(mean * s))] = 0.0
    return _Affine(node.inputs[0], s, t, list(node.inputs[1:5]), is_batchnorm=True)


def _elementwise_affine(graph: Graph, node: Node) -> _Affine | str:
    if len(node.inputs) != 2 or any(v is None for v in node.inputs):
        return "not a binary op"
    a, b = node.inputs
    ca, cb = graph.constant_array(a), graph.constant_array(b)
    if ca is not None and cb is not None:
        return "both inputs are constant (constant folding's job)"
    if ca is None and cb is None:
        return "no constant operand"
    c = cb if cb is not None else ca
    x, const_value = (a, b) if cb is not None else (b, a)
    if not _is_float(c):
        return "not floating point"
    c64 = np.asarray(c, np.float64)
    op = node.op_type
    if op == "Mul":
        return _Affine(x, c64, None, [const_value])
    if op == "Add":
        return _Affine(x, None, c64, [const_value])
    if op == "Sub":
        if cb is not None:
            return _Affine(x, None, -c64, [const_value])
        return _Affine(x, np.array(-1.0), c64, [const_value])
    if cb is None:  # Div
        return "division by a tensor (c / x is not affine)"
    if np.any(c64 == 0):
        return "the divisor has zeros"
    return _Affine(x, 1.0 / c64, None, [const_value])


# ---------------------------------------------------------------------------------------------
# the layer before an affine map (its producer)


@dataclass
class _Producer:
    """A tensor layer whose output an affine map reads."""

    kind: str
    node: Node
    out: Value
    weight: np.ndarray
    channels: int
    rank: int | None
    axis: int
    bias_add: Node | None = None  # a MatMul's bias Add
    bias_slot: int = 1  # the slot of the bias Add's constant


def _bias_add_of(env: _Env, graph: Graph, add: Node, mm: Node, channels: int) -> int | None:
    """The slot of ``add``'s constant when ``add`` is a per-feature bias of MatMul ``mm``, else None."""
    if not is_op(add, "Add") or len(add.inputs) != 2 or sole_consumer(graph, mm.outputs[0]) is not add:
        return None
    slot = 1 if add.inputs[0] is mm.outputs[0] else 0
    bias = graph.constant_array(add.inputs[slot])
    if add.inputs[1 - slot] is not mm.outputs[0] or not _is_float(bias):
        return None
    vec = _channel_vector(bias, env.rank(mm.outputs[0]), -1, channels)
    return None if isinstance(vec, str) else slot


def _matmul_weight(graph: Graph, node: Node) -> np.ndarray | str:
    w = _const(graph, node, 1)
    if w is None:
        return "the MatMul's second operand is not constant"
    if w.ndim != 2 or not _is_float(w):
        return "the MatMul's weight is not a 2-D float matrix"
    if node.inputs[0] is node.inputs[1]:
        return "the MatMul multiplies its weight by itself"
    return w


_LAYERS = "a Conv, ConvTranspose, Gemm or MatMul"


def _layer_weights(graph: Graph, node: Node) -> tuple[np.ndarray, np.ndarray | None] | str:
    """Constant weight and bias (None when absent) of a Conv/ConvTranspose/Gemm."""
    w = _const(graph, node, 1)
    if w is None:
        return "the layer's weight is not constant"
    if not _is_float(w):
        return "the layer's weight is not floating point"
    if _input(node, 2) is not None:
        b = _const(graph, node, 2)
        if b is None:
            return "the layer's bias is not constant"
        return w, b
    return w, None


def _find_producer(env: _Env, graph: Graph, value: Value) -> _Producer | str:
    node = graph.producer(value)
    if node is None or not is_op(node, *LAYER_OPS_WITH_TRANSPOSE, "Add"):
        return f"its input is not produced by {_LAYERS}"
    if _has_attr_refs(node):
        return "the layer's attributes refer to function attributes"
    if node.op_type == "Add":  # a MatMul's bias Add
        for mm_value in node.inputs:
            mm = graph.producer(mm_value) if mm_value is not None else None
            if is_op(mm, "MatMul") and not _has_attr_refs(mm):
                w = _matmul_weight(graph, mm)
                if isinstance(w, str):
                    continue
                slot = _bias_add_of(env, graph, node, mm, w.shape[1])
                if slot is not None:
                    rank = env.rank(mm.inputs[0])
                    return _Producer("MatMul", mm, value, w, w.shape[1], rank, -1, node, slot)
        return f"its input is not produced by {_LAYERS}"
    if node.op_type == "MatMul":
        w = _matmul_weight(graph, node)
        if isinstance(w, str):
            return w
        return _Producer("MatMul", node, value, w, w.shape[1], env.rank(node.inputs[0]), -1)
    if node.op_type == "Gemm" and env.opset < 7:
        return "Gemm before opset 7 (broadcast attribute)"
    found = _layer_weights(graph, node)
    if isinstance(found, str):
        return found
    w, _ = found
    if node.op_type == "Conv":
        return _Producer("Conv", node, value, w, w.shape[0], w.ndim, 1)
    if node.op_type == "ConvTranspose":
        return _Producer("ConvTranspose", node, value, w, w.shape[1] * node.attr("group", 1), w.ndim, 1)
    if w.ndim != 2:
        return "the Gemm's weight is not 2-D"
    channels = w.shape[0] if node.attr("transB", 0) else w.shape[1]
    return _Producer("Gemm", node, value, w, channels, 2, 1)


def _check_after(p: _Producer, s: np.ndarray | None, t: np.ndarray | None) -> str | None:
    if p.kind == "MatMul":
        if _nonzero(t) and p.bias_add is None and p.rank != 2:
            if s is None:
                return "a MatMul's bias Add (a layer with bias already)"
            return "the MatMul has no bias for the shift and its input is not 2-D (it cannot become a Gemm)"
    return None


def _fold_after(graph: Graph, p: _Producer, s: np.ndarray | None, t: np.ndarray | None) -> Value:
    """Fold ``y = s·out + t`` into the layer; returns the value that now holds ``y``."""
    fold = {"Conv": _fold_after_conv, "ConvTranspose": _fold_after_conv, "Gemm": _fold_after_gemm}
    return fold.get(p.kind, _fold_after_matmul)(graph, p, s, t)


def _fold_after_conv(graph: Graph, p: _Producer, s: np.ndarray | None, t: np.ndarray | None) -> Value:
    """``W'[o] = W[o]·s[o]`` (ConvTranspose: per output channel of each group), ``b' = b·s + t``."""
    node, dtype = p.node, p.weight.dtype
    w = np.asarray(p.weight, np.float64)
    name = node.name or node.op_type
    if s is not None:
        if p.kind == "Conv":
            w = w * s.reshape((-1,) + (1,) * (w.ndim - 1))
        else:
            group = node.attr("group", 1)
            grouped = w.reshape((group, w.shape[0] // group) + w.shape[1:])
            w = (grouped * s.reshape((group, 1, w.shape[1]) + (1,) * (w.ndim - 2))).reshape(w.shape)
        _set_const_input(graph, node, 1, w.astype(dtype), f"{name}_weight")
    b = _const(graph, node, 2)
    if b is not None or t is not None:
        b = np.zeros(p.channels) if b is None else np.asarray(b, np.float64)
        b = b * (1.0 if s is None else s) + (0.0 if t is None else t)
        _set_const_input(graph, node, 2, b.astype(dtype), f"{name}_bias", like=node.inputs[1])
    return p.out


def _fold_after_gemm(graph: Graph, p: _Producer, s: np.ndarray | None, t: np.ndarray | None) -> Value:
    """``B' = B·s`` per output column (transB aware), ``C' = β·C·s + t`` and ``β' = 1``."""
    node, dtype = p.node, p.weight.dtype
    w = np.asarray(p.weight, np.float64)
    name = node.name or node.op_type
    if s is not None:
        w = w * (s[:, None] if node.attr("transB", 0) else s[None, :])
        _set_const_input(graph, node, 1, w.astype(dtype), f"{name}_weight")
    c = _const(graph, node, 2)
    if c is not None or t is not None:
        c = np.zeros(()) if c is None else float(node.attr("beta", 1.0)) * np.asarray(c, np.float64)
        c = c * (1.0 if s is None else s) + (0.0 if t is None else t)
        _set_const_input(graph, node, 2, c.astype(dtype), f"{name}_bias", like=node.inputs[1])
        node.set_attr("beta", 1.0)
    return p.out


def _fold_after_matmul(graph: Graph, p: _Producer, s: np.ndarray | None, t: np.ndarray | None) -> Value:
    """``W'[:, n] = W[:, n]·s[n]``; the shift goes into the bias Add (``b' = b·s + t``), or a bare 2-D
    MatMul that gains one becomes ``Gemm(x, W', t)``."""
    node, dtype = p.node, p.weight.dtype
    w = np.asarray(p.weight, np.float64)
    name = node.name or node.op_type
    if s is not None:
        w = w * s[None, :]
    if p.bias_add is not None:
        if s is not None:
            _set_const_input(graph, node, 1, w.astype(dtype), f"{name}_weight")
        b = np.asarray(graph.constant_array(p.bias_add.inputs[p.bias_slot]), np.float64)
        b = b * (1.0 if s is None else s) + (0.0 if t is None else t)
        _set_const_input(graph, p.bias_add, p.bias_slot, b.astype(dtype), f"{name}_bias")
        return p.out
    if not _nonzero(t):
        if s is not None:
            _set_const_input(graph, node, 1, w.astype(dtype), f"{name}_weight")
        return p.out
    like = node.inputs[1]
    wv = _new_const(graph, w.astype(dtype), like.name, node, _written_as_node(graph, like))
    bv = _new_const(graph, t.astype(dtype), f"{name}_bias", node, _written_as_node(graph, like))
    gemm = graph.add_node("Gemm", [node.inputs[0], wv, bv], outputs=[p.out.name], name=name, anchor=node)
    _copy_type(graph, p.out, gemm.outputs[0])
    return gemm.outputs[0]


class _AffineRule(Rule):
    """Shared by the BN and Mul/Add/Sub/Div rules: how to read the affine map off the root node."""

    def __init__(self, env: _Env) -> None:
        self.env = env

    def affine(self, graph: Graph, node: Node) -> _Affine | str:
        if node.op_type == "BatchNormalization":
            return _batchnorm_affine(self.env, graph, node)
        affine = _elementwise_affine(graph, node)
        if isinstance(affine, str):
            return affine
        role = protected_role(graph, node)
        if role is not None:
            return f"part of a decomposed {role} (kept whole: onnxruntime runs it as one fused kernel)"
        return affine


@dataclass(kw_only=True)
class _AfterMatch(Match):
    """An affine node to fold into the layer that produces its input."""

    producer: _Producer
    s: np.ndarray | None
    t: np.ndarray | None
    constants: list[Value | None]  # the affine node's constant inputs, discarded when unread


class _IntoPreceding(_AffineRule):
    def match(self, graph: Graph, node: Node) -> _AfterMatch | str:
        affine = self.affine(graph, node)
        if isinstance(affine, str):
            return affine
        p = _find_producer(self.env, graph, affine.x)
        if isinstance(p, str):
            return p
        if sole_consumer(graph, p.out) is not node or not _read_once(graph, p.out, node):
            return "the layer's output has other readers"
        if p.kind == "MatMul" and affine.is_batchnorm and p.rank != 2:
            return "BatchNormalization after a MatMul whose output is not 2-D (axis 1 is not the feature axis)"
        vectors = _vectors(affine, p.rank, p.axis, p.channels)
        if isinstance(vectors, str):
            return vectors
        s, t = vectors
        why = _check_after(p, s, t)
        if why:
            return why
        if not graph.can_replace(node.outputs[0], p.out):
            return "the output is a model output that the layer's output cannot take over"
        return _AfterMatch(node, producer=p, s=s, t=t, constants=affine.constants)

    def rewrite(self, graph: Graph, match: _AfterMatch) -> str:
        p = match.producer
        y = match.node.outputs[0]
        out = _fold_after(graph, p, match.s, match.t)
        graph.replace_all_uses(y, out)
        graph.remove_node(match.node)
        if out is not p.out:
            _remove_with_constants(graph, [p.node])
        _discard(graph, match.constants)
        return f"after {p.kind}"


# ---------------------------------------------------------------------------------------------
# the layers after an affine map (its readers)


@dataclass
class _Reader:
    """A tensor layer that reads an affine map's output as its data input."""

    kind: str
    node: Node
    weight: np.ndarray
    channels: int
    rank: int | None
    axis: int
    padded: bool = False
    bias_add: Node | None = None
    bias_slot: int = 1


def _find_reader(env: _Env, graph: Graph, node: Node, slot: int | tuple) -> _Reader | str:
    if not is_op(node, *LAYER_OPS_WITH_TRANSPOSE):
        return f"a reader is not {_LAYERS}"
    if slot != 0 or not _read_once(graph, node.inputs[0], node):
        return "a reader reads it as a weight"
    if _has_attr_refs(node):
        return "a reader's attributes refer to function attributes"
    if node.op_type == "MatMul":
        w = _matmul_weight(graph, node)
        if isinstance(w, str):
            return w
        r = _Reader("MatMul", node, w, w.shape[0], env.rank(node.inputs[0]), -1)
        add = sole_consumer(graph, node.outputs[0])
        bias_slot = _bias_add_of(env, graph, add, node, w.shape[1]) if add is not None else None
        if bias_slot is not None:
            r.bias_add, r.bias_slot = add, bias_slot
        return r
    if node.op_type == "Gemm" and env.opset < 7:
        return "Gemm before opset 7 (broadcast attribute)"
    found = _layer_weights(graph, node)
    if isinstance(found, str):
        return found
    w, _ = found
    if node.op_type == "Conv":
        pads = _ints(node, "pads", [0] * (2 * (w.ndim - 2)))
        padded = any(pads) or _text(node.attr("auto_pad", "NOTSET")).startswith("SAME")
        return _Reader("Conv", node, w, w.shape[1] * node.attr("group", 1), w.ndim, 1, padded)
    if node.op_type == "ConvTranspose":
        return _Reader("ConvTranspose", node, w, w.shape[0], w.ndim, 1)
    if node.attr("transA", 0):
        return "a Gemm reader has transA=1 (the channel axis becomes its output's row axis)"
    if w.ndim != 2:
        return "the Gemm's weight is not 2-D"
    return _Reader("Gemm", node, w, w.shape[1] if node.attr("transB", 0) else w.shape[0], 2, 1)


def _check_before(r: _Reader, t: np.ndarray | None) -> str | None:
    if not _nonzero(t):
        return None
    if r.kind == "Conv" and r.padded:
        return "shift before a padded Conv (zero padding of the shifted input is not the shift of zero padding)"
    if r.kind == "ConvTranspose":
        return "shift before a ConvTranspose (the number of taps reaching an output varies)"
    if r.kind == "MatMul" and r.bias_add is None and r.rank != 2:
        return "the MatMul reader has no bias for the shift and its input is not 2-D (it cannot become a Gemm)"
    return None


def _fold_before(graph: Graph, r: _Reader, x: Value, s: np.ndarray | None, t: np.ndarray | None) -> None:
    """Make reader ``r`` compute its function of ``s·x + t`` from ``x``."""
    node, dtype = r.node, r.weight.dtype
    w = np.asarray(r.weight, np.float64)
    name = node.name or node.op_type
    shift = _nonzero(t)
    if r.kind == "Conv":
        cout, cin_g = w.shape[:2]
        index = _conv_group_index(cout, cin_g, node.attr("group", 1))
        expand = (cout, cin_g) + (1,) * (w.ndim - 2)
        if shift:
            b = _const(graph, node, 2)
            b = np.zeros(cout) if b is None else np.asarray(b, np.float64)
            b = b + (w * t[index].reshape(expand)).sum(axis=tuple(range(1, w.ndim)))
            _set_const_input(graph, node, 2, b.astype(dtype), f"{name}_bias", like=node.inputs[1])
        if s is not None:
            _set_const_input(graph, node, 1, (w * s[index].reshape(expand)).astype(dtype), f"{name}_weight")
    elif r.kind == "ConvTranspose":
        if s is not None:
            w = w * s.reshape((-1,) + (1,) * (w.ndim - 1))
            _set_const_input(graph, node, 1, w.astype(dtype), f"{name}_weight")
    elif r.kind == "Gemm":
        trans_b = node.attr("transB", 0)
        if shift:
            w_eff = w.T if trans_b else w
            c = _const(graph, node, 2)
            c = np.zeros(()) if c is None else float(node.attr("beta", 1.0)) * np.asarray(c, np.float64)
            c = c + float(node.attr("alpha", 1.0)) * (t @ w_eff)
            _set_const_input(graph, node, 2, c.astype(dtype), f"{name}_bias", like=node.inputs[1])
            node.set_attr("beta", 1.0)
        if s is not None:
            w = w * (s[None, :] if trans_b else s[:, None])
            _set_const_input(graph, node, 1, w.astype(dtype), f"{name}_weight")
    else:  # MatMul
        scaled = w * s[:, None] if s is not None else w
        if shift and r.bias_add is None:  # 2-D: becomes Gemm(x, diag(s)·W, t·W)
            like = node.inputs[1]
            as_node = _written_as_node(graph, like)
            wv = _new_const(graph, scaled.astype(dtype), like.name, node, as_node)
            bv = _new_const(graph, (t @ w).astype(dtype), f"{name}_bias", node, as_node)
            gemm = graph.add_node("Gemm", [x, wv, bv], outputs=[node.outputs[0].name], name=name, anchor=node)
            _copy_type(graph, node.outputs[0], gemm.outputs[0])
            graph.replace_all_uses(node.outputs[0], gemm.outputs[0])
            _remove_with_constants(graph, [node])
            return
        if shift:
            bias = graph.constant_array(r.bias_add.inputs[r.bias_slot])
            b = np.asarray(bias, np.float64) + t @ w
            _set_const_input(graph, r.bias_add, r.bias_slot, b.astype(dtype), f"{name}_bias")
        if s is not None:
            _set_const_input(graph, node, 1, scaled.astype(dtype), f"{name}_weight")
    graph.set_input(node, 0, x)


def _broadcast_keeps_shape(env: _Env, affine: _Affine) -> bool:
    """Whether ``x ⊙ c`` has ``x``'s shape for the affine's constants (BN never broadcasts)."""
    if affine.is_batchnorm:
        return True
    for c in (affine.s, affine.t):
        if c is None or c.ndim == 0:
            continue
        shape = env.shape(affine.x)
        if shape is None or len(shape) < c.ndim:
            return False
        if any(dc != 1 and dx != dc for dc, dx in zip(reversed(c.shape), reversed(shape))):
            return False
    return True


@dataclass(kw_only=True)
class _BeforeMatch(Match):
    """An affine node to fold into every layer that reads its output."""

    x: Value  # the affine node's input, which the readers read instead
    readers: list[tuple[_Reader, np.ndarray | None, np.ndarray | None]]  # (layer, s, t along its channels)
    shape_readers: list[tuple[Node, int]]  # Shape/Size readers, moved to x
    constants: list[Value | None]


class _IntoFollowing(_AffineRule):
    def match(self, graph: Graph, node: Node) -> _BeforeMatch | str:
        affine = self.affine(graph, node)
        if isinstance(affine, str):
            return affine
        y = node.outputs[0]
        if graph.is_graph_output(y):
            return "its output is a model output"
        uses = graph.uses(y)
        readers, shape_readers = [], []
        for reader_node, slot in uses:
            if isinstance(slot, tuple):
                return "its output is read inside a subgraph"
            if is_op(reader_node, "Shape", "Size"):  # they read the shape only, which the affine map keeps
                shape_readers.append((reader_node, slot))
                continue
            r = _find_reader(self.env, graph, reader_node, slot)
            if isinstance(r, str):
                return r
            if r.kind == "MatMul" and affine.is_batchnorm and r.rank != 2:
                return "BatchNormalization before a MatMul whose input is not 2-D (axis 1 is not the feature axis)"
            vectors = _vectors(affine, r.rank, r.axis, r.channels)
            if isinstance(vectors, str):
                return vectors
            why = _check_before(r, vectors[1])
            if why:
                return why
            readers.append((r, *vectors))
        if not readers:
            return f"its output is not read by {_LAYERS}"
        if not _broadcast_keeps_shape(self.env, affine):
            return "broadcasting changes the input's shape (or the input's shape is unknown)"
        return _BeforeMatch(node, x=affine.x, readers=readers, shape_readers=shape_readers,
                            constants=affine.constants)

    def rewrite(self, graph: Graph, match: _BeforeMatch) -> list[str]:
        for r, s, t in match.readers:
            _fold_before(graph, r, match.x, s, t)
        for reader, slot in match.shape_readers:
            graph.set_input(reader, slot, match.x)
        graph.remove_node(match.node)
        _discard(graph, match.constants)
        return [f"before {r.kind}" for r, _, _ in match.readers]


class BatchNormIntoPreceding(_IntoPreceding):
    name = "bn_into_preceding_layer"
    root_ops = ("BatchNormalization",)


class BatchNormIntoFollowing(_IntoFollowing):
    name = "bn_into_following_layer"
    root_ops = ("BatchNormalization",)


class AffineIntoPreceding(_IntoPreceding):
    name = "affine_into_preceding_layer"
    root_ops = ("Mul", "Add", "Sub", "Div")


class AffineIntoFollowing(_IntoFollowing):
    name = "affine_into_following_layer"
    root_ops = ("Mul", "Add", "Sub", "Div")


# ---------------------------------------------------------------------------------------------
# Pad into the next layer

# Ops whose output is never below 0 (so a 0-valued pad never wins a max).
_NONNEGATIVE = frozenset({"Relu", "Sigmoid", "Softplus", "Abs", "Exp", "Softmax", "HardSigmoid"})


def _lower_bound(graph: Graph, value: Value) -> float | None:
    """A proven lower bound of every element of ``value``, or None."""
    node = graph.producer(value)
    if is_op(node, *_NONNEGATIVE):
        return 0.0
    if is_op(node, "Clip"):
        low = _const(graph, node, 1) if _input(node, 1) is not None else None
        if low is None and node.attr("min") is not None:
            return float(node.attr("min"))
        return None if low is None or low.size != 1 else float(low.reshape(()))
    return None


@dataclass
class _PadSpec:
    begin: list[int]
    end: list[int]
    value: float


def _pad_spec(graph: Graph, node: Node, rank: int) -> _PadSpec | str:
    if _has_attr_refs(node):
        return "attributes refer to function attributes"
    mode = _text(node.attr("mode", "constant"))
    if mode != "constant":
        return f"{mode} mode"
    if _input(node, 1) is not None:  # opset >= 11: pads, constant_value, axes as inputs
        pads = _const(graph, node, 1)
        if pads is None:
            return "pads are not constant"
        pads = [int(p) for p in pads.reshape(-1)]
        value: Any = 0.0
        if _input(node, 2) is not None:
            value = _const(graph, node, 2)
            if value is None:
                return "the pad value is not constant"
            value = float(np.asarray(value).reshape(-1)[0]) if np.asarray(value).size else 0.0
        axes = list(range(rank))
        if _input(node, 3) is not None:
            given = _const(graph, node, 3)
            if given is None:
                return "axes are not constant"
            axes = [int(a) % rank for a in given.reshape(-1)]
    else:
        pads = list(node.attr("pads", node.attr("paddings", [])))
        value = float(node.attr("value", 0.0))
        axes = list(range(rank))
    if len(pads) != 2 * len(axes):
        return "pads do not match the tensor's rank"
    begin, end = [0] * rank, [0] * rank
    for i, axis in enumerate(axes):
        begin[axis], end[axis] = pads[i], pads[i + len(axes)]
    if min(begin + end) < 0:
        return "negative pads (cropping)"
    if begin[0] or begin[1] or end[0] or end[1]:
        return "pads the batch or channel axis"
    return _PadSpec(begin[2:], end[2:], value)


def _pads_below_kernel(pool: Node, pads: list[int], n: int) -> bool:
    kernel = _ints(pool, "kernel_shape", [])
    return len(kernel) == n and all(pads[i] < kernel[i] and pads[n + i] < kernel[i] for i in range(n))


def _pad_reader(graph: Graph, y: Value) -> Node | str:
    """The Conv or pool that alone reads the Pad's output ``y`` as its data input, or why there is none."""
    reader = sole_consumer(graph, y)
    if reader is None:
        return "its output has other readers or is a model output"
    if not is_op(reader, "Conv", "AveragePool", "MaxPool"):
        return "the reader is not a Conv, AveragePool or MaxPool"
    if reader.inputs[0] is not y or not _read_once(graph, y, reader):
        return "the reader reads it as a weight"
    if _has_attr_refs(reader):
        return "the reader's attributes refer to function attributes"
    return reader


@dataclass(kw_only=True)
class _PadMatch(Match):
    reader: Node  # the Conv or pool that takes the pads over
    attrs: dict[str, Any]  # its new attributes


class PadIntoLayer(Rule):
    name = "pad_into_layer"
    root_ops = ("Pad",)

    def __init__(self, env: _Env) -> None:
        self.env = env

    def match(self, graph: Graph, node: Node) -> _PadMatch | str:
        reader = _pad_reader(graph, node.outputs[0])
        if isinstance(reader, str):
            return reader
        rank = self._spatial_rank(reader)
        if not rank or rank < 3:
            return "the reader's spatial rank is unknown"
        spec = _pad_spec(graph, node, rank)
        if isinstance(spec, str):
            return spec
        auto_pad = _text(reader.attr("auto_pad", "NOTSET"))
        if auto_pad not in ("NOTSET", "VALID"):
            return f"the reader has auto_pad={auto_pad}"
        n = rank - 2
        own = [0] * (2 * n) if auto_pad == "VALID" else _ints(reader, "pads", [0] * (2 * n))
        pads = [own[i] + spec.begin[i] for i in range(n)] + [own[n + i] + spec.end[i] for i in range(n)]
        attrs: dict[str, Any] = {"pads": pads}
        if auto_pad == "VALID":
            attrs["auto_pad"] = "NOTSET"
        why = self._reader_refusal(graph, node, reader, spec, own, pads, attrs)
        if why:
            return why
        return _PadMatch(node, reader=reader, attrs=attrs)

    def _spatial_rank(self, reader: Node) -> int | None:
        if reader.op_type == "Conv":
            w_shape = self.env.shape(_input(reader, 1))
            return len(w_shape) if w_shape is not None else None
        return len(reader.attr("kernel_shape", [])) + 2

    def _reader_refusal(self, graph: Graph, pad: Node, reader: Node, spec: _PadSpec, own: list[int],
                        pads: list[int], attrs: dict[str, Any]) -> str | None:
        """Why ``reader`` cannot take the pads over (an AveragePool may need ``count_include_pad``, set in
        ``attrs``), or None."""
        n = len(spec.begin)
        if reader.op_type in ("Conv", "AveragePool") and spec.value != 0:
            return "the pad value is not zero"
        if reader.op_type != "Conv" and reader.attr("ceil_mode", 0):
            # With ceil_mode a last window starting in the end padding is dropped, and what counts as
            # padding is what changes here: the output shape could change.
            return "pool with ceil_mode=1"
        if reader.op_type == "AveragePool":
            if not reader.attr("count_include_pad", 0):
                if any(own):
                    return "AveragePool with count_include_pad=0 and pads of its own (the divisors would differ)"
                attrs["count_include_pad"] = 1
            if not _pads_below_kernel(reader, pads, n):
                return "pool: the summed pads would not be smaller than the kernel (onnxruntime requires it)"
        if reader.op_type == "MaxPool":
            return self._maxpool_refusal(graph, pad, reader, pads, n, spec)
        return None

    @staticmethod
    def _maxpool_refusal(graph: Graph, pad: Node, pool: Node, pads: list[int], n: int, spec: _PadSpec) -> str | None:
        indices = pool.outputs[1] if len(pool.outputs) > 1 else None
        if indices is not None and (graph.uses(indices) or graph.is_graph_output(indices)):
            return "the MaxPool's Indices output is read"
        if spec.value != -np.inf:
            low = _lower_bound(graph, pad.inputs[0])
            if low is None or spec.value > low:
                return "MaxPool: the pad value is not provably <= the input (MaxPool pads with -inf)"
        if any(d != 1 for d in _ints(pool, "dilations", [1] * n)):
            return "MaxPool with dilation (a window could hold only padding)"
        if not _pads_below_kernel(pool, pads, n):
            return "pool: the summed pads would not be smaller than the kernel (onnxruntime requires it)"
        return None

    def rewrite(self, graph: Graph, match: _PadMatch) -> str:
        pad, reader = match.node, match.reader
        graph.set_input(reader, 0, pad.inputs[0])
        for key, value in match.attrs.items():
            reader.set_attr(key, value)
        _remove_with_constants(graph, [pad])
        return f"into {reader.op_type}"


# ---------------------------------------------------------------------------------------------
# merging consecutive linear layers


@dataclass
class _Dense:
    """A Gemm (transA=0), or a MatMul with a constant 2-D weight plus its bias Add: ``out = x·w + b``."""

    nodes: list[Node]
    x: Value
    w: np.ndarray  # float64 [K, N], alpha folded in
    b: np.ndarray | None  # float64 [N], beta folded in
    out: Value
    dtype: np.dtype
    is_gemm: bool


def _dense(env: _Env, graph: Graph, node: Node, with_bias: bool) -> _Dense | str:
    if _has_attr_refs(node):
        return "attributes refer to function attributes"
    if node.op_type == "MatMul":
        w = _matmul_weight(graph, node)
        if isinstance(w, str):
            return w
        d = _Dense([node], node.inputs[0], np.asarray(w, np.float64), None, node.outputs[0], w.dtype, False)
        add = sole_consumer(graph, node.outputs[0]) if with_bias else None
        slot = _bias_add_of(env, graph, add, node, w.shape[1]) if add is not None else None
        if slot is not None:
            bias = graph.constant_array(add.inputs[slot])
            d.b = np.broadcast_to(np.asarray(bias, np.float64).reshape(-1), (w.shape[1],)).copy()
            d.nodes.append(add)
            d.out = add.outputs[0]
        return d
    if env.opset < 7:
        return "Gemm before opset 7 (broadcast attribute)"
    if node.attr("transA", 0):
        return "Gemm with transA=1"
    found = _layer_weights(graph, node)
    if isinstance(found, str):
        return found
    w, c = found
    if w.ndim != 2:
        return "the Gemm's weight is not 2-D"
    w64 = float(node.attr("alpha", 1.0)) * np.asarray(w, np.float64)
    w64 = w64.T if node.attr("transB", 0) else w64
    b = None
    if c is not None:
        if c.ndim > 2 or (c.ndim == 2 and c.shape[0] != 1) or (c.ndim >= 1 and c.shape[-1] not in (1, w64.shape[1])):
            return "the Gemm's bias varies along rows"
        b = float(node.attr("beta", 1.0)) * np.broadcast_to(np.asarray(c, np.float64).reshape(-1), (w64.shape[1],))
    return _Dense([node], node.inputs[0], w64, b, node.outputs[0], w.dtype, True)


def _dense_ending_at(env: _Env, graph: Graph, value: Value) -> _Dense | str:
    node = graph.producer(value)
    if is_op(node, "Gemm", "MatMul"):
        return _dense(env, graph, node, with_bias=False)
    if is_op(node, "Add"):
        for v in node.inputs:
            mm = graph.producer(v) if v is not None else None
            if is_op(mm, "MatMul"):
                d = _dense(env, graph, mm, with_bias=True)
                if not isinstance(d, str) and d.out is value:
                    return d
    return "its input is not produced by a Gemm or MatMul layer"


def _rows(env: _Env, x: Value) -> int:
    """Rows of the 2-D matrix a MatMul/Gemm sees: the product of the input's leading dims (unknown: 1)."""
    shape = env.shape(x)
    return prod(_static(shape[:-1])) if shape else 1


def _dense_cost(m: int, d: _Dense) -> Cost:
    cost = gemm_cost(m, d.w.shape[0], d.w.shape[1])
    return cost + elementwise_cost(m * d.w.shape[1]) if len(d.nodes) > 1 else cost


@dataclass(kw_only=True)
class _BiasedMatMul(Match):
    """``Add(MatMul(A, B), C)``: the MatMul, the bias value ``C`` and ``B``'s dims ``[K, N]``."""

    matmul: Node
    bias: Value
    k: Any
    n: Any


@dataclass(kw_only=True)
class _BiasedMatMulRows(_BiasedMatMul):
    lead: list[int]  # A's leading dims, the one dynamic dim as -1


class _MatMulAdd(Rule):
    """What the two MatMul + Add -> Gemm rules share: the pattern, the bias check, the Add's replacement."""

    root_ops = ("Add",)

    def __init__(self, env: _Env) -> None:
        self.env = env

    def biased_matmul(self, graph: Graph, node: Node) -> tuple[Node, Value, np.ndarray] | str:
        """The MatMul read by this Add alone, the bias operand and its constant value, or why not."""
        if len(node.inputs) != 2:
            return "not a binary Add"
        for slot in (0, 1):
            mm = graph.producer(node.inputs[slot]) if node.inputs[slot] is not None else None
            if is_op(mm, "MatMul"):
                break
        else:
            return "neither input is produced by a MatMul"
        if sole_consumer(graph, mm.outputs[0]) is not node or not _read_once(graph, mm.outputs[0], node):
            return "the MatMul's output has other readers"
        bias = graph.constant_array(node.inputs[1 - slot])
        if bias is None or not _is_float(bias):
            return "the other operand is not a float constant"
        return mm, node.inputs[1 - slot], bias

    def bias_refusal(self, bias: np.ndarray, n: Any) -> str | None:
        """Why Gemm cannot add ``bias`` (it broadcasts per column only, and since opset 7), or None."""
        if (bias.ndim > 2 or (bias.ndim == 2 and bias.shape[0] != 1)
                or (bias.ndim >= 1 and bias.shape[-1] not in (1, n))):
            return "the bias is not per column"
        if self.env.opset < 7:
            return "Gemm before opset 7 (broadcast attribute)"
        return None

    @staticmethod
    def replace_add(graph: Graph, match: _BiasedMatMul, out: Value) -> None:
        add = match.node
        _copy_type(graph, add.outputs[0], out)
        graph.replace_all_uses(add.outputs[0], out)
        remove_dead(graph, [add, match.matmul])


class MatMulAddToGemm(_MatMulAdd):
    """``MatMul(A, B) + C`` with 2-D A and B -> ``Gemm(A, B, C)``."""

    name = "matmul_add_to_gemm"

    def match(self, graph: Graph, node: Node) -> _BiasedMatMul | str:
        found = self.biased_matmul(graph, node)
        if isinstance(found, str):
            return found
        mm, bias_value, bias = found
        if self.env.rank(mm.inputs[0]) != 2 or self.env.rank(mm.inputs[1]) != 2:
            return "the MatMul is not 2-D x 2-D"
        k, n = self.env.shape(mm.inputs[1])
        why = self.bias_refusal(bias, n)
        if why:
            return why
        return _BiasedMatMul(node, matmul=mm, bias=bias_value, k=k, n=n)

    def rewrite(self, graph: Graph, match: _BiasedMatMul) -> None:
        mm, add = match.matmul, match.node
        gemm = graph.add_node("Gemm", [mm.inputs[0], mm.inputs[1], match.bias], outputs=[add.outputs[0].name],
                              name=mm.name or "Gemm", anchor=mm)
        self.replace_add(graph, match, gemm.outputs[0])


def _feeds_gelu(graph: Graph, value: Value) -> bool:
    return any(r.op_type == "Gelu" or protected_role(graph, r) == "GELU" for r, _ in graph.uses(value))


def _leading_dims(lead: Shape, k: Any, n: Any) -> list[int] | str:
    """``lead`` as a Reshape target (the one dynamic dim as -1), or why it cannot be written back."""
    dynamic = [d for d in lead if not (isinstance(d, int) and d > 0)]
    if len(dynamic) > 1 or not isinstance(n, int) or not isinstance(k, int):
        return "more than one leading dim is dynamic (the result's shape cannot be written back)"
    return [d if isinstance(d, int) and d > 0 else -1 for d in lead]


class MatMulAddToGemmRows(_MatMulAdd):
    """``MatMul(A, B) + C`` with N-D A ``[d.., K]`` -> ``Reshape(A, [-1, K])``, Gemm, Reshape back to
    ``[d.., N]``; refused when more than one ``d`` is dynamic, and before a GELU (see the module doc)."""

    name = "matmul_add_to_gemm_rows"

    def match(self, graph: Graph, node: Node) -> _BiasedMatMulRows | str:
        found = self.biased_matmul(graph, node)
        if isinstance(found, str):
            return found
        mm, bias_value, bias = found
        rank = self.env.rank(mm.inputs[0])
        if rank is None or rank < 2 or self.env.rank(mm.inputs[1]) != 2:
            return "the MatMul is not N-D x 2-D"
        if rank == 2:
            return "2-D (merge_linear's case)"
        k, n = self.env.shape(mm.inputs[1])
        why = self.bias_refusal(bias, n)
        if why:
            return why
        if _feeds_gelu(graph, node.outputs[0]):
            return "feeds a GELU (onnxruntime fuses the bias Add into BiasGelu)"
        lead = _leading_dims(self.env.shape(mm.inputs[0])[:-1], k, n)
        if isinstance(lead, str):
            return lead
        return _BiasedMatMulRows(node, matmul=mm, bias=bias_value, k=k, n=n, lead=lead)

    def rewrite(self, graph: Graph, match: _BiasedMatMulRows) -> None:
        mm, add = match.matmul, match.node
        name = mm.name or "Gemm"
        rows = graph.add_node("Reshape", [mm.inputs[0], graph.add_initializer(np.array([-1, match.k], np.int64),
                                                                               f"{name}_rows_shape")],
                              [f"{name}_rows"], name=f"{name}_rows", anchor=mm)
        gemm = graph.add_node("Gemm", [rows.outputs[0], mm.inputs[1], match.bias], outputs=[f"{name}_gemm"],
                              name=name, anchor=mm)
        back = graph.add_node("Reshape", [gemm.outputs[0], graph.add_initializer(
            np.array([*match.lead, match.n], np.int64), f"{name}_out_shape")], [add.outputs[0].name],
            name=f"{name}_unrows", anchor=mm)
        self.replace_add(graph, match, back.outputs[0])


@dataclass(kw_only=True)
class _DenseChainMatch(Match):
    first: _Dense
    second: _Dense
    as_gemm: bool  # the merged layer is one Gemm (else a MatMul, plus an Add when there is a bias)


class DenseChain(Rule):
    name = "dense_chain"
    root_ops = ("Gemm", "MatMul")

    def __init__(self, env: _Env) -> None:
        self.env = env

    def match(self, graph: Graph, node: Node) -> Match | str:
        second = _dense(self.env, graph, node, with_bias=True)
        if isinstance(second, str):
            return second
        first = _dense_ending_at(self.env, graph, second.x)
        if isinstance(first, str):
            return first
        if sole_consumer(graph, first.out) is not node or not _read_once(graph, first.out, node):
            return "the first layer's output has other readers"
        m = _rows(self.env, first.x)
        bias = first.b is not None or second.b is not None
        as_gemm = bias and (first.is_gemm or self.env.rank(first.x) == 2) and self.env.opset >= 7
        merged = gemm_cost(m, first.w.shape[0], second.w.shape[1])
        if bias and not as_gemm:
            merged = merged + elementwise_cost(m * second.w.shape[1])
        if not cheaper(merged, _dense_cost(m, first) + _dense_cost(m, second)):
            return "cost model: the merged layer costs more than the two layers"
        return _DenseChainMatch(node, first=first, second=second, as_gemm=as_gemm)

    def rewrite(self, graph: Graph, match: _DenseChainMatch) -> None:
        first, second = match.first, match.second
        w = first.w @ second.w
        b = None
        if first.b is not None or second.b is not None:
            b = (first.b @ second.w if first.b is not None else 0.0) + (second.b if second.b is not None else 0.0)
        old_w = first.nodes[0].inputs[1]
        as_node = _written_as_node(graph, old_w)
        name = match.node.name or match.node.op_type
        wv = _new_const(graph, w.astype(first.dtype), old_w.name, match.node, as_node)
        bv = None
        if b is not None:
            bv = _new_const(graph, np.asarray(b).astype(first.dtype), f"{name}_bias", match.node, as_node)
        if match.as_gemm:
            new = graph.add_node("Gemm", [first.x, wv, bv], outputs=[second.out.name], name=name, anchor=match.node)
        else:
            new = graph.add_node("MatMul", [first.x, wv], outputs=[second.out.name], name=name, anchor=match.node)
            if b is not None:
                _copy_type(graph, second.out, new.outputs[0])
                new = graph.add_node("Add", [new.outputs[0], bv], outputs=[second.out.name], name=f"{name}_bias",
                                     anchor=match.node)
        _copy_type(graph, second.out, new.outputs[0])
        graph.replace_all_uses(second.out, new.outputs[0])
        _remove_with_constants(graph, [*first.nodes, *second.nodes])


@dataclass
class _ConvLayer:
    node: Node
    w: np.ndarray  # float64, dense (groups expanded)
    b: np.ndarray  # float64 [Cout], zeros when absent
    dtype: np.dtype
    group: int
    pointwise_unpadded: bool  # 1x1 kernel, stride 1, no pads


def _conv_layer(graph: Graph, node: Node) -> _ConvLayer | str:
    if _has_attr_refs(node):
        return "attributes refer to function attributes"
    found = _layer_weights(graph, node)
    if isinstance(found, str):
        return found
    w, b = found
    auto_pad = _text(node.attr("auto_pad", "NOTSET"))
    if auto_pad not in ("NOTSET", "VALID"):
        return f"auto_pad={auto_pad}"
    n = w.ndim - 2
    pads = [0] * (2 * n) if auto_pad == "VALID" else _ints(node, "pads", [0] * (2 * n))
    group = node.attr("group", 1)
    strides = _ints(node, "strides", [1] * n)
    pointwise = all(k == 1 for k in w.shape[2:]) and not any(pads) and all(s == 1 for s in strides)
    bias = np.zeros(w.shape[0]) if b is None else np.asarray(b, np.float64)
    return _ConvLayer(node, _dense_conv_weight(np.asarray(w, np.float64), group), bias, w.dtype, group, pointwise)


def _conv_cost(env: _Env, node: Node, c_in: int, c_out: int, kernel: tuple, group: int) -> Cost | None:
    x, y = env.shape(node.inputs[0]), env.shape(node.outputs[0])
    if x is None or y is None or not all(isinstance(d, int) for d in (*x[2:], *y[2:])):
        return None
    return conv_cost(_static(x[:1])[0], c_in, c_out, kernel, y[2:], x[2:], group)


@dataclass(kw_only=True)
class _ConvChainMatch(Match):
    first: Node  # the first conv (the matched node is the second)
    kept: _ConvLayer  # the conv whose geometry the merged conv keeps
    w: np.ndarray  # float64 merged weight
    b: np.ndarray  # float64 merged bias
    dtype: np.dtype


class ConvChain(Rule):
    name = "conv_chain"
    root_ops = ("Conv",)

    def __init__(self, env: _Env) -> None:
        self.env = env

    def match(self, graph: Graph, node: Node) -> Match | str:
        first_node = graph.producer(node.inputs[0])
        if not is_op(first_node, "Conv"):
            return "its input is not produced by a Conv"
        if sole_consumer(graph, first_node.outputs[0]) is not node or not _read_once(graph, node.inputs[0], node):
            return "the first conv's output has other readers"
        first, second = _conv_layer(graph, first_node), _conv_layer(graph, node)
        if isinstance(first, str) or isinstance(second, str):
            return first if isinstance(first, str) else second
        if second.pointwise_unpadded:  # k×k -> 1×1
            kept = first
            w = np.tensordot(second.w.reshape(second.w.shape[:2]), first.w, axes=(1, 0))
            b = second.w.reshape(second.w.shape[:2]) @ first.b + second.b
        elif first.pointwise_unpadded:  # 1×1 -> k×k
            if np.any(first.b != 0) and _padded(node):
                return "1x1 conv with bias before a padded conv (the padding would not see the bias)"
            kept = second
            w = np.moveaxis(np.tensordot(second.w, first.w.reshape(first.w.shape[:2]), axes=(1, 0)), -1, 1)
            b = second.b + second.w.sum(axis=tuple(range(2, second.w.ndim))) @ first.b
        else:
            return "neither conv is 1x1 with stride 1 and no padding"
        before = [_conv_cost(self.env, first_node, first.w.shape[1], first.w.shape[0], first.w.shape[2:], first.group),
                  _conv_cost(self.env, node, second.w.shape[1], second.w.shape[0], second.w.shape[2:], second.group)]
        merged_cost = _conv_cost(self.env, kept.node, w.shape[1], w.shape[0], w.shape[2:], 1)
        if merged_cost is None or None in before:
            # A conv's MACs per output pixel equal its weight count. When the merged conv has no more
            # weights than the conv whose geometry it keeps, it is cheaper at any spatial size (one node
            # and one intermediate tensor fewer); otherwise the sizes decide, and they are unknown.
            if w.size > kept.w.size // kept.group:
                return "spatial sizes unknown and the merged conv has more MACs per pixel than the one it replaces"
        elif not cheaper(merged_cost, before[0] + before[1]):
            return "cost model: the merged conv costs more than the two convs"
        return _ConvChainMatch(node, first=first_node, kept=kept, w=w, b=b, dtype=first.dtype)

    def rewrite(self, graph: Graph, match: _ConvChainMatch) -> None:
        first_node, second = match.first, match.node
        kept = match.kept
        dtype = match.dtype
        old_w = first_node.inputs[1]
        as_node = _written_as_node(graph, old_w)
        name = second.name or "Conv"
        wv = _new_const(graph, match.w.astype(dtype), old_w.name, second, as_node)
        bv = _new_const(graph, match.b.astype(dtype), f"{name}_bias", second, as_node)
        attrs = {key: kept.node.attr(key) for key in kept.node.attrs}
        attrs["group"] = 1
        if "kernel_shape" in attrs:
            attrs["kernel_shape"] = list(match.w.shape[2:])
        y = second.outputs[0]
        merged = graph.add_node("Conv", [first_node.inputs[0], wv, bv], outputs=[y.name], attrs=attrs, name=name,
                                anchor=second)
        _copy_type(graph, y, merged.outputs[0])
        graph.replace_all_uses(y, merged.outputs[0])
        _remove_with_constants(graph, [second, first_node])


def _padded(node: Node) -> bool:
    auto_pad = _text(node.attr("auto_pad", "NOTSET"))
    return auto_pad.startswith("SAME") or (auto_pad != "VALID" and any(_ints(node, "pads", [])))


# ---------------------------------------------------------------------------------------------
# the passes


class _StreamlinePass(RulePass):
    """A rule pass whose rules share one :class:`_Env` (shapes inferred once per run)."""

    symbolic_shapes = False

    def rules(self, model: Model, ctx: PassContext) -> list[Rule]:
        return self.rules_for(_Env(model, symbolic=self.symbolic_shapes))

    def rules_for(self, env: _Env) -> list[Rule]:
        raise NotImplementedError


@register
class FoldBatchNorm(_StreamlinePass):
    name = "fold_batchnorm"
    summary = "fold inference BatchNormalization into the Conv/ConvTranspose/Gemm/MatMul before or after it"

    def rules_for(self, env: _Env) -> list[Rule]:
        return [BatchNormIntoPreceding(env), BatchNormIntoFollowing(env)]


@register
class FoldAffine(_StreamlinePass):
    name = "fold_affine"
    summary = "fold per-channel Mul/Add/Sub/Div by constants into the adjacent Conv/Gemm/MatMul weights"

    def rules_for(self, env: _Env) -> list[Rule]:
        return [AffineIntoPreceding(env), AffineIntoFollowing(env)]


@register
class FusePad(_StreamlinePass):
    name = "fuse_pad"
    summary = "fold a zero (or provably harmless) constant Pad into the next Conv/AveragePool/MaxPool's pads"

    def rules_for(self, env: _Env) -> list[Rule]:
        return [PadIntoLayer(env)]


@register
class MergeLinear(_StreamlinePass):
    name = "merge_linear"
    summary = "merge consecutive linear layers (Conv-Conv, Gemm/MatMul chains, MatMul+Add) when the cost model agrees"

    def rules_for(self, env: _Env) -> list[Rule]:
        return [MatMulAddToGemm(env), DenseChain(env), ConvChain(env)]


@register
class GemmRows(_StreamlinePass):
    name = "gemm_rows"
    symbolic_shapes = True  # the leading dims behind an exporter's Expand/Concat are only known symbolically
    summary = "N-D MatMul + bias Add -> Reshape to rows, Gemm, Reshape back (the bias is added inside the Gemm)"

    def rules_for(self, env: _Env) -> list[Rule]:
        return [MatMulAddToGemmRows(env)]
