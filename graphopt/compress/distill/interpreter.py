"""Run an IR graph in torch, its float weights as parameters keyed by initializer name.

Why an interpreter (not a converter such as onnx2torch): parameters are the model's own initializers,
by name, so writing trained values back is a lookup, and an initializer that several nodes read is
one parameter (a shared weight stays shared, a tie stays tied). The nodes run in the IR's
topological order through :data:`graphopt.compress.distill.ops.OPS`.

Which initializers train (:func:`plan`)
---------------------------------------
A float32/float64 initializer trains when *every* read of it is a weight slot:

* Conv / ConvTranspose inputs 1-2, Gemm inputs 0-2 and MatMul inputs 0-1 (the constant operand),
  LayerNormalization / InstanceNormalization scale and bias, PRelu's slope;
* Gather's data (embedding tables, and the codebook of a compact weight-sharing decoder, whose
  integer codes stay fixed: training the codebook moves every weight of a code together);
* the constant operand of an Add (a bias) or a Mul (a scale) with more than one element.

Everything else is frozen: scalars (GELU's 0.5, attention's 1/√d), Sub/Div operands (input
normalisation), BatchNormalization's statistics and affine (inference semantics: frozen, as if
folded), Clip bounds, Resize scales, Pad values, shapes and every integer tensor, initializers that
are graph inputs or are read inside a subgraph. ``left`` names what was frozen and why.

How a trained initializer is parametrised (the structure the lossy passes left is kept)
-------------------------------------------------------------------------------------
``dense``   ``W = P``.
``masked``  ``W = P ⊙ M`` with ``M = (W₀ ≠ 0)``: exact zeros (pruned weights, the zero code of a
            codebook) stay zero, their gradient is masked. Biases are dense: a zero bias is a value
            (prune writes zero biases for re-fitted convs), not structure.
``shared``  ``W = c[k]``, ``c = [0, v₁, …, v_K]`` the distinct nonzero values, ``k`` the fixed code of
            each weight: a weight of rank ≥ 2 with at most 256 distinct nonzero values, at least 4
            weights per value (a snapped weight-sharing layer), trains its K values, not free weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from onnx import TensorProto

from graphopt.compress.distill.ops import OPS, Unsupported
from graphopt.core.ir import Graph, Model, Node, Value
from graphopt.core.ledger import LeftAlone

WEIGHT_SLOTS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (0, 1, 2), "MatMul": (0, 1),
                "LayerNormalization": (1, 2), "InstanceNormalization": (1, 2), "PRelu": (1,), "Gather": (0,)}
BIAS_SLOTS = {("Conv", 2), ("ConvTranspose", 2), ("Gemm", 2), ("LayerNormalization", 2),
              ("InstanceNormalization", 2)}
#: Element-wise ops whose multi-element constant operand trains: Add is a bias, Mul a scale.
TRAINED_ELEMENTWISE = {"Add": "bias", "Mul": "weight"}
#: A snapped shared weight has at most this many distinct nonzero values (8-bit codes) ...
SHARED_MAX_VALUES = 256
#: ... and at least this many weights per value (a dense float weight has about one).
SHARED_MIN_PER_VALUE = 4
FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.DOUBLE)


class EngineError(Exception):
    """A node failed in torch: names the node and why (the pass refuses with it, never crashes)."""


def plan(graph: Graph, left: LeftAlone) -> dict[str, str]:
    """``initializer name -> kind`` (``dense``/``masked``/``shared``) of what trains; see the module docstring."""
    out: dict[str, str] = {}
    for name, value in sorted(graph.initializers.items()):
        if value.dtype not in FLOAT_TYPES:
            if value.dtype in (TensorProto.FLOAT16, TensorProto.BFLOAT16):
                left.add("float16 weight (the engine trains float32 / float64 only)", name)
            continue
        roles = [_role(graph, node, slot, value) for node, slot in graph.uses(value)]
        if not roles:
            continue
        frozen = next((r for r in roles if r not in ("weight", "bias")), None)
        if graph.is_graph_input(value):
            frozen = "also a graph input (the caller may override it)"
        if frozen is not None:
            left.add(frozen, name)
            continue
        array = value.array
        if all(r == "bias" for r in roles) or not (array == 0).any():
            out[name] = "dense"
        else:
            out[name] = "masked"
        if all(r == "weight" for r in roles) and array.ndim >= 2:
            distinct = np.unique(array[array != 0]).size
            if distinct <= SHARED_MAX_VALUES and array.size >= SHARED_MIN_PER_VALUE * max(distinct, 1):
                out[name] = "shared"
    return out


def _role(graph: Graph, node: Node, slot: int | tuple[str, str], value: Value) -> str:
    """``weight`` / ``bias`` for a trained read, else why the read freezes the initializer."""
    if isinstance(slot, tuple):
        return "read inside a subgraph"
    if node.domain not in ("", "ai.onnx"):
        return f"read by {node.domain}:{node.op_type}"
    if node.op_type in TRAINED_ELEMENTWISE:
        if value.array.size <= 1:
            return "a scalar constant"
        return TRAINED_ELEMENTWISE[node.op_type]
    if slot in WEIGHT_SLOTS.get(node.op_type, ()):
        return "bias" if (node.op_type, slot) in BIAS_SLOTS else "weight"
    if node.op_type == "BatchNormalization":
        return "BatchNormalization parameter (frozen: inference statistics)"
    return f"a non-weight constant ({node.op_type} input {slot})"


@dataclass
class _Trained:
    index: int                      # into TorchGraph.params
    kind: str                       # dense | masked | shared
    dtype: np.dtype                 # the initializer's dtype, restored on write-back
    shape: tuple[int, ...]
    extra: torch.Tensor | None      # masked: the 0/1 mask; shared: the int64 codes


class TorchGraph(torch.nn.Module):
    """The main graph of ``model`` as a torch module; ``kinds`` (from :func:`plan`) says what trains.

    ``forward(feeds)`` takes ``input name -> tensor`` and returns ``name -> tensor`` for the graph
    outputs and any ``extra`` value names (intermediate tensors to match).
    """

    def __init__(self, model: Model, kinds: Mapping[str, str]) -> None:
        super().__init__()
        graph = model.graph
        self.opset = model.opset("") or 1
        self.nodes = graph.toposort()
        self.input_names = [v.name for v in graph.inputs if v.name not in graph.initializers]
        self.output_names = [v.name for v in graph.outputs]
        self.params = torch.nn.ParameterList()
        self.trained: dict[str, _Trained] = {}
        self.constants: dict[str, torch.Tensor] = {}
        for name, value in list(graph.initializers.items()) + list(graph.sparse_initializers.items()):
            array = np.array(value.array)   # a writable copy: torch shares its memory
            if name not in kinds:
                self.constants[name] = torch.from_numpy(array)
                continue
            self._add_trained(name, array, kinds[name])

    def _add_trained(self, name: str, array: np.ndarray, kind: str) -> None:
        extra = None
        start = array
        if kind == "masked":
            extra = torch.from_numpy((array != 0).astype(array.dtype))
        elif kind == "shared":
            values, codes = np.unique(array, return_inverse=True)
            nonzero = values != 0
            book = values[nonzero]
            # code 0 is the zero; value j of ``book`` is code j + 1
            remap = np.where(nonzero, np.cumsum(nonzero), 0)
            extra = torch.from_numpy(remap[codes.reshape(array.shape)].astype(np.int64))
            start = book
        self.trained[name] = _Trained(len(self.params), kind, array.dtype, array.shape, extra)
        self.params.append(torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(start))))

    def weight(self, name: str) -> torch.Tensor:
        """The initializer ``name`` as the graph reads it, from its parameter."""
        t = self.trained[name]
        p = self.params[t.index]
        if t.kind == "masked":
            return p * t.extra
        if t.kind == "shared":
            return torch.cat([p.new_zeros(1), p])[t.extra]
        return p

    def forward(self, feeds: Mapping[str, torch.Tensor], extra: Sequence[str] = ()) -> dict[str, torch.Tensor]:
        env: dict[str, torch.Tensor] = dict(self.constants)
        env.update({name: self.weight(name) for name in self.trained})
        env.update(feeds)
        for node in self.nodes:
            args = [None if v is None else env[v.name] for v in node.inputs]
            try:
                outs = OPS[node.op_type](node, args, self.opset)
            except Unsupported as exc:
                raise EngineError(f"{node.op_type} node {node.name!r}: {exc}") from None
            except (RuntimeError, ValueError, TypeError, IndexError) as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise EngineError(f"{node.op_type} node {node.name!r} failed in torch: {first}") from None
            for value, tensor in zip(node.outputs, outs):
                if value is not None:
                    env[value.name] = tensor
        missing = [n for n in extra if n not in env]
        if missing:
            raise EngineError(f"no tensor named {missing[0]!r} in the graph")
        return {name: env[name] for name in [*self.output_names, *extra]}

    def arrays(self) -> dict[str, np.ndarray]:
        """The trained initializers' values, in their own dtypes and shapes (what is written back)."""
        with torch.no_grad():
            return {name: self.weight(name).detach().numpy().astype(t.dtype).reshape(t.shape)
                    for name, t in self.trained.items()}

    def trained_count(self) -> int:
        """Free numbers training moves (a masked weight's zeros and a shared weight's copies excluded)."""
        total = 0
        for t in self.trained.values():
            p = self.params[t.index]
            total += int(t.extra.sum()) if t.kind == "masked" else p.numel()
        return total
