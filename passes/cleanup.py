"""Graph cleanup: dead code and no-op nodes.

``dead_code``
    A node is live when one of its outputs reaches a graph output (through data edges or a subgraph
    capture); everything else is removed, together with initializers nothing reads. Graph inputs are
    the model's interface and stay. Nodes of domains whose semantics graphopt does not know (custom
    ops) may have side effects and are never removed; the stats name them.

``identity``
    ``Identity`` and inference-mode ``Dropout`` (no mask output read, training mode absent or a
    constant false) compute ``y = x``: readers of ``y`` read ``x`` instead. When ``y`` is a model output
    and ``x`` cannot take over its name (``x`` is a graph input, an initializer or another output), the
    node stays — renaming the model's interface is not ours to do — and the stats say so.

Both passes walk every graph, subgraphs and function bodies included.
"""

from __future__ import annotations

from collections import Counter

import networkx as nx
import numpy as np

from graphopt.ir import Graph, Model, Node
from graphopt.manager import Pass, PassContext, PassResult, register

# Domains whose ops are pure functions of their inputs: unused results can be dropped.
PURE_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})


def _is_pure(node: Node, model: Model) -> bool:
    if node.domain in PURE_DOMAINS:
        return True
    return any(fn.extras.domain == node.domain and fn.extras.name == node.op_type for fn in model.functions)


@register
class DeadCode(Pass):
    name = "dead_code"
    summary = "remove nodes and initializers that no graph output depends on"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        removed_nodes: Counter[str] = Counter()
        removed_inits = 0
        kept_impure: list[str] = []
        for graph in list(model.graphs()):
            live = _live_items(graph)
            dead = [n for n in reversed(graph.toposort()) if n not in live]
            for node in dead:
                if not _is_pure(node, model):
                    kept_impure.append(f"{node.domain}:{node.op_type} {node.name!r}")
                    continue
                if any(graph.uses(v) for v in node.outputs if v is not None):
                    continue  # read by a kept impure node
                graph.remove_node(node)
                removed_nodes[node.op_type] += 1
            for value in list(graph.initializers.values()) + list(graph.sparse_initializers.values()):
                if not graph.uses(value) and not graph.is_graph_output(value) and not graph.is_graph_input(value):
                    graph.remove_initializer(value)
                    removed_inits += 1
        stats = {"removed_nodes": sum(removed_nodes.values()), "removed_by_op": dict(sorted(removed_nodes.items())),
                 "removed_initializers": removed_inits}
        if kept_impure:
            stats["kept_unknown_domain"] = kept_impure
        return PassResult(bool(removed_nodes) or removed_inits > 0, stats)


def _live_items(graph: Graph) -> set:
    live: set = set()
    for out in graph.outputs:
        if out in live:
            continue
        live.add(out)
        live |= nx.ancestors(graph.nx, out)
    return live


def _dropout_is_identity(node: Node, graph: Graph) -> bool:
    if len(node.outputs) > 1 and node.outputs[1] is not None and (graph.uses(node.outputs[1])
                                                                  or graph.is_graph_output(node.outputs[1])):
        return False  # the mask is read
    if node.attr("is_test", 1) == 0:  # opset < 7 training flag
        return False
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        mode = graph.constant_array(node.inputs[2])
        return mode is not None and not bool(np.asarray(mode).item())
    return True


@register
class EliminateIdentity(Pass):
    name = "identity"
    summary = "remove Identity and inference-mode Dropout (readers read the input directly)"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        removed: Counter[str] = Counter()
        refused: list[dict[str, str]] = []
        for graph in list(model.graphs()):
            for node in graph.toposort():
                if node.domain not in ("", "ai.onnx") or node.op_type not in ("Identity", "Dropout"):
                    continue
                if node.op_type == "Dropout" and not _dropout_is_identity(node, graph):
                    refused.append({"node": node.name, "op": node.op_type, "why": "training mode or mask is read"})
                    continue
                x, y = node.inputs[0], node.outputs[0]
                if x is None or y is None:
                    continue
                if not graph.can_replace(y, x):
                    refused.append({"node": node.name, "op": node.op_type,
                                    "why": f"output {y.name!r} is a model output and {x.name!r} cannot take its name"})
                    continue
                graph.replace_all_uses(y, x)
                graph.remove_node(node)
                removed[node.op_type] += 1
        stats: dict = {"removed": dict(sorted(removed.items()))}
        if refused:
            stats["left_alone"] = refused
        return PassResult(bool(removed), stats)
