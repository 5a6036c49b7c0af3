#!/usr/bin/env python3
"""Synthetic ONNX models for benchmarks: built with onnx + numpy only.

These models are too big (or too odd) to commit, so benchmarks build them on
demand from a seed. Weights are random (He-initialised), so the outputs mean
nothing, but the graphs have the shapes, node counts and sizes of real
workloads:

* ``resnet18``: the ResNet-18 topology at 224x224 with BatchNormalization
  nodes and 1000 classes (~11.7 M parameters, ~47 MB).
* ``vgg16``: VGG-16 convolutions with a narrowed classifier, ~100 MB.
* ``chain``: ~10,000 small nodes (Conv/BatchNormalization/Relu/Sigmoid/Mul/
  Add) on 4x8x8 tensors, to stress per-node costs of graph passes.

Every builder returns an ``onnx.ModelProto`` (opset 17, IR version 8) that
passes ``onnx.checker.check_model(full_check=True)`` and runs in onnxruntime.

    python tools/synthetic_models.py resnet18 /tmp/resnet18.onnx
    python tools/synthetic_models.py chain /tmp/chain.onnx --nodes 20000

``--data FILE.npz --samples N`` also writes N seeded random inputs (``graphopt.measure.calibration.random_data``,
what ``graphopt optimize`` draws without ``--data``) to a file for ``--data``, e.g. to time a prune
with least-squares re-fits on ResNet-18 at 224x224:

    python tools/synthetic_models.py resnet18 /tmp/r18.onnx --data /tmp/r18.npz --samples 64
"""

from __future__ import annotations

import argparse
import math
from collections import Counter
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # The IR version released with opset 17; onnxruntime reads it.
DEFAULT_SEED = 0


class GraphBuilder:
    """Accumulates nodes and initializers under unique, readable names."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._counts: Counter[str] = Counter()

    def unique(self, prefix: str) -> str:
        """prefix_0, prefix_1, ... so names never collide."""
        index = self._counts[prefix]
        self._counts[prefix] += 1
        return f"{prefix}_{index}"

    def constant(self, prefix: str, array: np.ndarray) -> str:
        """Add an initializer and return its name."""
        name = self.unique(prefix)
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        """Add a single-output node and return the output name."""
        name = self.unique(op)
        output = f"{name}_out"
        self.nodes.append(helper.make_node(op, inputs, [output], name=name,
                                           **attrs))
        return output

    def he_normal(self, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
        """He (Kaiming) normal initialisation, right for ReLU networks."""
        std = np.float32(math.sqrt(2.0 / fan_in))
        # Drawn directly in float32: VGG-16 has 25 M weights to generate.
        return self.rng.standard_normal(shape, dtype=np.float32) * std

    def conv(self, x: str, cin: int, cout: int, kernel: int, stride: int = 1,
             groups: int = 1, bias: bool = True) -> str:
        """A square, 'same'-padded convolution with random weights."""
        fan_in = cin // groups * kernel * kernel
        inputs = [x, self.constant("conv_w", self.he_normal(
            (cout, cin // groups, kernel, kernel), fan_in))]
        if bias:
            inputs.append(self.constant("conv_b", np.zeros(cout, np.float32)))
        pad = kernel // 2
        return self.node("Conv", inputs, kernel_shape=[kernel, kernel],
                         strides=[stride, stride], pads=[pad] * 4,
                         group=groups)

    def batchnorm(self, x: str, channels: int,
                  gamma: tuple[float, float] = (0.5, 1.5)) -> str:
        """Inference BatchNormalization with plausible random statistics
        (trained nets never have the identity BN that would make folding
        trivially exact)."""
        rand = self.rng
        scale = rand.uniform(*gamma, channels).astype(np.float32)
        bias = (rand.standard_normal(channels) * 0.1).astype(np.float32)
        mean = (rand.standard_normal(channels) * 0.1).astype(np.float32)
        var = rand.uniform(0.5, 1.5, channels).astype(np.float32)
        names = [self.constant(p, a) for p, a in (
            ("bn_scale", scale), ("bn_bias", bias),
            ("bn_mean", mean), ("bn_var", var))]
        return self.node("BatchNormalization", [x, *names], epsilon=1e-5)

    def gemm(self, x: str, fin: int, fout: int) -> str:
        """Fully connected layer stored [out, in] with transB, like torch."""
        weight = self.constant("fc_w", self.he_normal((fout, fin), fin))
        bias = self.constant("fc_b", np.zeros(fout, np.float32))
        return self.node("Gemm", [x, weight, bias], transB=1)

    def model(self, input_shape: list, output_shape: list, name: str
              ) -> onnx.ModelProto:
        """Wrap the graph; the first node input is 'input', the last output
        is renamed 'logits'."""
        self.nodes[-1].output[0] = "logits"
        graph = helper.make_graph(
            self.nodes, name,
            [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                           input_shape)],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                           output_shape)],
            self.initializers)
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET)],
            producer_name="graphopt-synthetic")
        model.ir_version = IR_VERSION
        return model


def batch_dim(batch: int | None) -> int | str:
    """A fixed batch size, or the symbolic 'batch' axis when None."""
    return "batch" if batch is None else batch


# --------------------------------------------------------------------------
# ResNet-18
# --------------------------------------------------------------------------


def _basic_block(g: GraphBuilder, x: str, cin: int, cout: int, stride: int
                 ) -> str:
    """Conv-BN-ReLU-Conv-BN + shortcut, then ReLU (torchvision layout)."""
    out = g.node("Relu", [g.batchnorm(g.conv(x, cin, cout, 3, stride,
                                             bias=False), cout)])
    # A small last gamma keeps the residual sum bounded through 8 blocks,
    # the role zero-init-residual plays in real training.
    out = g.batchnorm(g.conv(out, cout, cout, 3, bias=False), cout,
                      gamma=(0.1, 0.3))
    shortcut = x
    if stride != 1 or cin != cout:
        shortcut = g.batchnorm(g.conv(x, cin, cout, 1, stride, bias=False),
                               cout)
    return g.node("Relu", [g.node("Add", [out, shortcut])])


def resnet18(batch: int | None = None, image: int = 224,
             classes: int = 1000, seed: int = DEFAULT_SEED) -> onnx.ModelProto:
    """ResNet-18 (torchvision topology) with separate BatchNormalization
    nodes, input [batch, 3, image, image], output [batch, classes]."""
    g = GraphBuilder(seed)
    x = g.node("Relu", [g.batchnorm(g.conv("input", 3, 64, 7, 2, bias=False),
                                    64)])
    x = g.node("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2],
               pads=[1, 1, 1, 1])
    cin = 64
    for stage, width in enumerate((64, 128, 256, 512)):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            x = _basic_block(g, x, cin, width, stride)
            cin = width
    x = g.node("Flatten", [g.node("GlobalAveragePool", [x])], axis=1)
    g.gemm(x, cin, classes)
    b = batch_dim(batch)
    return g.model([b, 3, image, image], [b, classes], "resnet18")


# --------------------------------------------------------------------------
# VGG-16, ~100 MB
# --------------------------------------------------------------------------

VGG16_CONVS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
               512, 512, 512, "M", 512, 512, 512, "M")


def vgg16(batch: int | None = None, image: int = 224, hidden: int = 384,
          classes: int = 1000, seed: int = DEFAULT_SEED) -> onnx.ModelProto:
    """VGG-16's 13 convolutions (no BN, as in the original) and a
    classifier of width ``hidden``: 384 at 224x224 gives ~24.9 M parameters,
    i.e. a ~100 MB file (the 4096-wide original is 528 MB)."""
    g = GraphBuilder(seed)
    x, cin, size = "input", 3, image
    for item in VGG16_CONVS:
        if item == "M":
            x = g.node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
            size //= 2
        else:
            x = g.node("Relu", [g.conv(x, cin, int(item), 3)])
            cin = int(item)
    x = g.node("Flatten", [x], axis=1)
    x = g.node("Relu", [g.gemm(x, cin * size * size, hidden)])
    x = g.node("Relu", [g.gemm(x, hidden, hidden)])
    g.gemm(x, hidden, classes)
    b = batch_dim(batch)
    return g.model([b, 3, image, image], [b, classes], "vgg16")


# --------------------------------------------------------------------------
# A long chain of small nodes
# --------------------------------------------------------------------------


def _chain_unit(g: GraphBuilder, x: str, channels: int, index: int,
                half: str) -> str:
    """One mixing unit: x' = 0.5 * x + 0.5 * act(conv(x)).

    Averaging with the input keeps activations bounded however long the
    chain gets. Units rotate through plain/BN/depthwise convs and
    Relu/Sigmoid so passes see a mix of patterns.
    """
    kind = index % 4
    groups = channels if kind == 3 else 1
    y = g.conv(x, channels, channels, 3, groups=groups)
    if kind == 1:
        y = g.batchnorm(y, channels)
    y = g.node("Sigmoid" if kind == 2 else "Relu", [y])
    y = g.node("Mul", [y, half])
    return g.node("Add", [y, g.node("Mul", [x, half])])


def chain(n_nodes: int = 10000, batch: int | None = None, channels: int = 4,
          size: int = 8, seed: int = DEFAULT_SEED) -> onnx.ModelProto:
    """About ``n_nodes`` small nodes in one long residual-style chain on
    [batch, channels, size, size] tensors, ending in GlobalAveragePool and
    Flatten (output [batch, channels])."""
    g = GraphBuilder(seed)
    half = g.constant("half", np.array(0.5, np.float32))
    x, index = "input", 0
    while len(g.nodes) < n_nodes - 2:  # two head nodes follow
        x = _chain_unit(g, x, channels, index, half)
        index += 1
    g.node("Flatten", [g.node("GlobalAveragePool", [x])], axis=1)
    b = batch_dim(batch)
    return g.model([b, channels, size, size], [b, channels], "chain")


BUILDERS: dict[str, Callable[..., onnx.ModelProto]] = {
    "resnet18": resnet18,
    "vgg16": vgg16,
    "chain": chain,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Build a synthetic benchmark model (onnx + numpy only).")
    parser.add_argument("name", choices=sorted(BUILDERS))
    parser.add_argument("output", help="where to write the .onnx file")
    parser.add_argument("--batch", type=int, default=None,
                        help="fixed batch size (default: dynamic)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--image", type=int, default=224,
                        help="input resolution (resnet18, vgg16)")
    parser.add_argument("--nodes", type=int, default=10000,
                        help="node count (chain)")
    parser.add_argument("--data", default=None, help="also write random inputs to this .npz")
    parser.add_argument("--samples", type=int, default=64, help="inputs in --data")
    return parser.parse_args(argv)



def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    kwargs = {"batch": args.batch, "seed": args.seed}
    if args.name == "chain":
        kwargs["n_nodes"] = args.nodes
    else:
        kwargs["image"] = args.image
    model = BUILDERS[args.name](**kwargs)
    onnx.checker.check_model(model)
    onnx.save(model, args.output)
    print(f"{args.output}: {len(model.graph.node)} nodes, "
          f"{model.ByteSize() / 1e6:.1f} MB")
    if args.data:
        from graphopt.measure.calibration import random_data  # the builders above need only onnx + numpy
        np.savez(args.data, **random_data(model, args.samples, seed=args.seed).inputs)
        print(f"{args.data}: {args.samples} random inputs")


if __name__ == "__main__":
    main()
