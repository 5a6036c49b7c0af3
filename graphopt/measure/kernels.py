"""What onnxruntime's CPU kernels do on this machine: which 2-D convs run blocked (NCHWc), in blocks of how many.

The latency model and the channel prices depend on onnxruntime's NCHWc layout: which convs its graph
optimizer (``ORT_ENABLE_ALL``) moves to the blocked kernels, and the channel block those pad to. Both
come from the installed onnxruntime on the CPU at hand (a build without the NCHWc kernels, an x86 CPU
whose operating system does not save AVX-512 state, an ARM64 build with them turned on), so they are
read off onnxruntime itself, never assumed from the CPU's name:

* :func:`block`: one single-output Conv put through the optimizer; a blocked conv's reordered weight
  is padded to one whole block of output channels, so its first dimension *is* the block. No blocked
  conv means no NCHWc kernels: block 1, onnxruntime's own value for that.
* :func:`nchwc_rule`: the smallest ``input_multiple`` consistent with a fixed set of conv shapes around
  the block (group 1, depthwise, grouped): which convs :meth:`graphopt.measure.latency.Nchwc.nchwc`
  says are blocked must be the ones onnxruntime blocks.

Each probe builds tiny sessions (a few milliseconds each, in a scratch folder of the run) and is cached
for the process: the installed onnxruntime does not change while it runs.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graphopt.measure import ort as gort
from graphopt.measure.latency import Nchwc

__all__ = ["NCHWC_DOMAIN", "block", "blocked", "conv_model", "nchwc_rule", "probe_cases"]

NCHWC_DOMAIN = "com.microsoft.nchwc"


def conv_model(cin: int, cout: int, group: int = 1, hw: int = 8, kernel: int = 3) -> onnx.ModelProto:
    """A model of one Conv (``cin`` -> ``cout`` channels, ``group`` groups, ``kernel`` x ``kernel``, same
    padding) on a ``1 x cin x hw x hw`` input, with constant weights."""
    w = numpy_helper.from_array(np.ones((cout, cin // group, kernel, kernel), np.float32), "W")
    pad = kernel // 2
    node = helper.make_node("Conv", ["x", "W"], ["y"], group=group, kernel_shape=[kernel, kernel],
                            pads=[pad, pad, pad, pad])
    graph = helper.make_graph([node], "probe", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                             [1, cin, hw, hw])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _blocked_graph(cin: int, cout: int, group: int) -> onnx.GraphProto | None:
    """The optimized graph of :func:`conv_model` when onnxruntime blocks the conv, else ``None``."""
    graph = gort.optimized(conv_model(cin, cout, group)).graph
    if any(n.domain == NCHWC_DOMAIN and n.op_type == "Conv" for n in graph.node):
        return graph
    return None


@lru_cache(maxsize=None)
def blocked(cin: int, cout: int, group: int = 1) -> bool:
    """Whether onnxruntime here runs a 3x3 Conv of these channels on its blocked (NCHWc) kernels."""
    return _blocked_graph(cin, cout, group) is not None


@lru_cache(maxsize=1)
def block() -> int:
    """onnxruntime's NCHWc channel block here: 8 with AVX2, 16 with AVX-512; 1 without NCHWc kernels."""
    graph = _blocked_graph(16, 1, 1)
    if graph is None:
        return 1
    conv = next(n for n in graph.node if n.domain == NCHWC_DOMAIN and n.op_type == "Conv")
    weight = next(t for t in graph.initializer if t.name == conv.input[1])
    return int(weight.dims[0])  # one output channel, padded to a whole block


def probe_cases(b: int) -> list[tuple[int, int, int]]:
    """``(cin, cout, group)`` shapes that tell the input multiples of a ``b``-channel block apart: group-1
    convs with fewer and more input channels than a block, depthwise convs, and grouped convs with whole
    and partial blocks per group."""
    group1 = sorted({3, max(b - 1, 1), b, b + 1, b + 2, b + 4, 2 * b - 4, 2 * b + 1, 2 * b + 4})
    cases = [(c, 2 * b, 1) for c in group1]
    cases += [(c, c, c) for c in sorted({b + 1, b + 2, b + 4, 2 * b, 2 * b + 2})]
    cases += [(4 * b, 4 * b, 4), (4 * b, 2 * b, 4), (6 * b, 6 * b, 4), (8 * b, 8 * b, 2), (3 * b, 3 * b, 2)]
    return cases


@lru_cache(maxsize=1)
def nchwc_rule() -> tuple[Nchwc, bool]:
    """The NCHWc rule of onnxruntime here and whether it matched every probe.

    Returns the rule with the smallest ``input_multiple`` (1, 2, 4, 8, 16, at most the block) that
    predicts every case of :func:`probe_cases`; when none does, the block with ``input_multiple`` 4 (what
    onnxruntime 1.31-1.32 does with AVX2) and ``False``, so the caller can say the rule is assumed.
    """
    b = block()
    if b <= 1:
        return Nchwc(1, 1), True
    seen = {case: blocked(*case) for case in probe_cases(b)}
    for multiple in (m for m in (1, 2, 4, 8, 16) if m <= b):
        rule = Nchwc(b, multiple)
        if all(seen[case] == rule.nchwc(*case, 2) for case in seen):
            return rule, True
    return Nchwc(b, 4), False
