#!/usr/bin/env python3
"""Train the graphopt model zoo on Fashion-MNIST and export it to ONNX.

Every architecture is trained on the CPU from a fixed seed, exported with the
real torch exporters (TorchScript and dynamo) in several forms, verified
against torch and onnxruntime, and described in ``models/zoo.json`` and
``models/README.md``.

    python tools/make_models.py                 # rebuild the whole zoo
    python tools/make_models.py --only vgg      # retrain and re-export one arch
    python tools/make_models.py --epochs 1      # quick smoke run (low accuracy)

Requirements (dev only, never needed by graphopt or its tests):
``torch==2.13.0`` (CPU wheel), ``onnxscript`` (dynamo exporter), the Debian
package ``dataset-fashion-mnist``.

All models share one interface: float32 ``input`` [batch, 1, 28, 28]
normalised with ``(pixel / 255 - MEAN) / STD``, float32 ``logits`` [batch, 10].
"""

from __future__ import annotations

import os

# The CPU is usually shared: OpenMP threads that spin while waiting make
# 2-thread training several times slower as soon as another process runs.
# Must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import gzip
import hashlib
import io
import json
import logging
import math
import struct
import sys
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnx import version_converter
from torch import nn

# --------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO / "models"
VARIANTS_DIR = MODELS_DIR / "variants"
DATA_DIR = Path("/usr/share/datasets/fashion-mnist")

SEED = 20240601
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST training-set pixel statistics.
NUM_CALIB, NUM_EVAL = 512, 2000
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

CANONICAL_OPSET = 17
LOW_OPSET = 11
# The newest opset onnxruntime 1.31 loads (27 is rejected at load time).
NEWEST_ORT_OPSET = 26
# The dynamo exporter's own opset-26 conversion silently falls back to an
# invalid opset-18 model (Gelu without an adapter), so it exports at 23, the
# newest opset torchlib emits natively, and onnx.version_converter goes on.
DYNAMO_EXPORT_OPSET = 23
# onnxruntime 1.31 reads IR versions up to 13; onnx 1.23 stamps 14.
MAX_ORT_IR_VERSION = 13

# models/README.md ends with the corpus section that tools/make_corpus.py
# writes after this marker; write_readme keeps it.
CORPUS_README_MARKER = "<!-- corpus section: written by tools/make_corpus.py -->"

# A variant must match torch this closely (max |diff| of logits).
MAX_ABS_DIFF = 1e-3

# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    """Read a gzipped IDX file (the MNIST container format) as uint8."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 28, 28] -> float32 [N, 1, 28, 28], the zoo's input format."""
    x = images.astype(np.float32)[:, None] / np.float32(255.0)
    return ((x - np.float32(MEAN)) / np.float32(STD)).astype(np.float32)


@dataclass
class Dataset:
    """Fashion-MNIST, normalised, as numpy arrays."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


def load_fashion_mnist() -> Dataset:
    """Load the Debian-packaged Fashion-MNIST files."""
    if not DATA_DIR.is_dir():
        sys.exit(f"{DATA_DIR} missing: apt-get install dataset-fashion-mnist")

    def part(prefix: str) -> tuple[np.ndarray, np.ndarray]:
        images = read_idx(DATA_DIR / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(DATA_DIR / f"{prefix}-labels-idx1-ubyte.gz")
        return normalize(images), labels.astype(np.int64)

    train_x, train_y = part("train")
    test_x, test_y = part("t10k")
    return Dataset(train_x, train_y, test_x, test_y)


def write_npz_if_changed(path: Path, **arrays: np.ndarray) -> None:
    """Save arrays with np.savez_compressed unless the file already holds them.

    Skipping identical rewrites keeps reruns from touching committed files.
    """
    if path.exists():
        with np.load(path) as old:
            if set(old.files) == set(arrays) and all(
                    old[k].dtype == v.dtype and np.array_equal(old[k], v)
                    for k, v in arrays.items()):
                return
    np.savez_compressed(path, **arrays)


def write_data_files(data: Dataset) -> dict:
    """Write the calibration and evaluation sets shared by every model.

    Calibration: 512 training images picked with a seeded permutation.
    Evaluation: the first 2,000 test images (the test set is class balanced).
    """
    rng = np.random.default_rng(SEED)
    calib_idx = np.sort(rng.permutation(len(data.train_x))[:NUM_CALIB])
    write_npz_if_changed(MODELS_DIR / "fmnist_calib.npz",
                         input=data.train_x[calib_idx],
                         labels=data.train_y[calib_idx])
    write_npz_if_changed(MODELS_DIR / "fmnist_eval.npz",
                         input=data.test_x[:NUM_EVAL],
                         labels=data.test_y[:NUM_EVAL])
    return {
        "calib": {"file": "models/fmnist_calib.npz", "split": "train",
                  "count": NUM_CALIB, "keys": ["input", "labels"]},
        "eval": {"file": "models/fmnist_eval.npz", "split": "test[:2000]",
                 "count": NUM_EVAL, "keys": ["input", "labels"]},
    }


# --------------------------------------------------------------------------
# Architectures
# --------------------------------------------------------------------------


def conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1,
            groups: int = 1, act: type[nn.Module] | None = nn.ReLU
            ) -> nn.Sequential:
    """Conv (no bias: BN supplies it) -> BatchNorm -> optional activation."""
    layers: list[tuple[str, nn.Module]] = [
        ("conv", nn.Conv2d(cin, cout, kernel, stride, kernel // 2,
                           groups=groups, bias=False)),
        ("bn", nn.BatchNorm2d(cout)),
    ]
    if act is not None:
        layers.append(("act", act()))
    return nn.Sequential(OrderedDict(layers))


class LeNet300(nn.Sequential):
    """LeNet-300-100: the fully connected MNIST net of Deep Compression."""

    def __init__(self) -> None:
        super().__init__(OrderedDict([
            ("flatten", nn.Flatten()),
            ("fc1", nn.Linear(784, 300)), ("relu1", nn.ReLU()),
            ("fc2", nn.Linear(300, 100)), ("relu2", nn.ReLU()),
            ("fc3", nn.Linear(100, 10)),
        ]))


class LeNet5(nn.Sequential):
    """LeNet-5 as in Caffe's MNIST example (no activation after the convs)."""

    def __init__(self) -> None:
        super().__init__(OrderedDict([
            ("conv1", nn.Conv2d(1, 20, 5)), ("pool1", nn.MaxPool2d(2)),
            ("conv2", nn.Conv2d(20, 50, 5)), ("pool2", nn.MaxPool2d(2)),
            ("flatten", nn.Flatten()),
            ("fc1", nn.Linear(800, 500)), ("relu", nn.ReLU()),
            ("fc2", nn.Linear(500, 10)),
        ]))


class Classifier(nn.Module):
    """A conv net ending in global average pool -> flatten -> Linear(features, 10).

    The three modules keep the names ``pool``, ``flatten``, ``fc`` in every net (and so in the ONNX
    export); a subclass registers them after its body with :meth:`add_classifier`.
    """

    def add_classifier(self, features: int) -> None:
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(features, 10)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(x)))


class VGG(nn.Module):
    """VGG-style conv3x3/BN/ReLU stack whose last feature map is flattened
    straight into a Gemm, so channel pruning must map channels to FC inputs."""

    def __init__(self, cfg=(16, 16, "M", 32, 32, "M", 64, 64, "M"),
                 hidden: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin, size = 1, 28
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                size //= 2
            else:
                layers.append(conv_bn(cin, int(item)))
                cin = int(item)
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(cin * size * size, hidden)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(self.flatten(self.features(x)))))


class BasicBlock(nn.Module):
    """ResNet basic block; a strided 1x1 conv+BN shortcut when shapes change."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv_bn(cin, cout, 3, stride)
        self.conv2 = conv_bn(cout, cout, 3, act=None)
        self.downsample = (conv_bn(cin, cout, 1, stride, act=None)
                           if stride != 1 or cin != cout else nn.Identity())
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv2(self.conv1(x)) + self.downsample(x))


class ResNet(Classifier):
    """A ResNet-8: 28x28 -> 14x14 -> 7x7 stages of basic blocks."""

    def __init__(self, widths=(16, 32, 64), blocks=(1, 1, 1)) -> None:
        super().__init__()
        self.stem = conv_bn(1, widths[0])
        stages, cin = [], widths[0]
        for i, (width, count) in enumerate(zip(widths, blocks)):
            stride = 1 if i == 0 else 2
            stage = [BasicBlock(cin, width, stride)]
            stage += [BasicBlock(width, width, 1) for _ in range(count - 1)]
            stages.append(nn.Sequential(*stage))
            cin = width
        self.layers = nn.Sequential(*stages)
        self.add_classifier(cin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.layers(self.stem(x)))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, linear 1x1 project."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[tuple[str, nn.Module]] = []
        if expand != 1:  # As in the paper, t=1 blocks skip the expansion.
            layers.append(("expand", conv_bn(cin, hidden, 1, act=nn.ReLU6)))
        layers += [
            ("depthwise", conv_bn(hidden, hidden, 3, stride, groups=hidden,
                                  act=nn.ReLU6)),
            ("project", conv_bn(hidden, cout, 1, act=None)),
        ]
        self.block = nn.Sequential(OrderedDict(layers))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.residual else out


class MobileNetV2(Classifier):
    """A narrow MobileNetV2 for 28x28 inputs (28->14->7)."""

    # (expansion t, output channels c, repeats n, first stride s)
    SETTINGS = ((1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 2, 1), (4, 64, 1, 1))

    def __init__(self, head: int = 128) -> None:
        super().__init__()
        # Stride-2 stem as in the paper: 14x14 maps keep CPU training cheap.
        self.stem = conv_bn(1, 16, stride=2, act=nn.ReLU6)
        blocks, cin = [], 16
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                blocks.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        self.blocks = nn.Sequential(*blocks)
        self.head = conv_bn(cin, head, 1, act=nn.ReLU6)
        self.add_classifier(head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.head(self.blocks(self.stem(x))))


class InceptionBlock(nn.Module):
    """GoogLeNet inception module: 1x1 | 1x1->3x3 | 1x1->5x5 | pool->1x1."""

    def __init__(self, cin: int, c1: int, c3r: int, c3: int, c5r: int,
                 c5: int, cpool: int) -> None:
        super().__init__()
        self.branch1 = conv_bn(cin, c1, 1)
        self.branch3 = nn.Sequential(conv_bn(cin, c3r, 1), conv_bn(c3r, c3, 3))
        self.branch5 = nn.Sequential(conv_bn(cin, c5r, 1), conv_bn(c5r, c5, 5))
        self.branch_pool = nn.Sequential(nn.MaxPool2d(3, 1, 1),
                                         conv_bn(cin, cpool, 1))
        self.out_channels = c1 + c3 + c5 + cpool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch3(x), self.branch5(x),
                          self.branch_pool(x)], dim=1)


class Inception(Classifier):
    """A three-module GoogLeNet-style net with BN in every conv unit."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(1, 32)
        self.pool1 = nn.MaxPool2d(2)
        self.block_a = InceptionBlock(32, 16, 16, 24, 4, 8, 8)     # -> 56
        self.block_b = InceptionBlock(56, 24, 24, 32, 8, 16, 16)   # -> 88
        self.pool2 = nn.MaxPool2d(2)
        self.block_c = InceptionBlock(88, 32, 32, 48, 8, 16, 16)   # -> 112
        self.add_classifier(self.block_c.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.stem(x))
        x = self.pool2(self.block_b(self.block_a(x)))
        return self.classify(self.block_c(x))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet channel shuffle as Reshape -> Transpose -> Reshape.

    Written like the reference implementations (sizes read from the tensor),
    so the TorchScript exporter emits the usual Shape/Gather/Concat feeding
    the Reshapes when the batch axis is dynamic.
    """
    batch, channels, height, width = x.size()
    # reshape, not view: training runs channels-last, where view would fail.
    x = x.reshape(batch, groups, channels // groups, height, width)
    return x.transpose(1, 2).reshape(batch, channels, height, width)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 unit: channel split (stride 1) or two-branch downsample."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        half = cout // 2
        self.stride = stride
        if stride == 1:
            assert cin == cout, "stride-1 units keep the width"
            self.branch1 = nn.Identity()
            branch2_in = half
        else:
            self.branch1 = nn.Sequential(
                conv_bn(cin, cin, 3, stride, groups=cin, act=None),
                conv_bn(cin, half, 1))
            branch2_in = cin
        self.branch2 = nn.Sequential(
            conv_bn(branch2_in, half, 1),
            conv_bn(half, half, 3, stride, groups=half, act=None),
            conv_bn(half, half, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat([x1, self.branch2(x2)], dim=1)
        else:
            out = torch.cat([self.branch1(x), self.branch2(x)], dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(Classifier):
    """A small ShuffleNetV2: stem + maxpool (28->14), two stages (->7->4),
    1x1 head."""

    def __init__(self, widths=(48, 96), repeats=(3, 3), head: int = 128
                 ) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(1, 24), nn.MaxPool2d(3, 2, 1))
        units, cin = [], 24
        for width, count in zip(widths, repeats):
            units.append(ShuffleUnit(cin, width, 2))
            units += [ShuffleUnit(width, width, 1) for _ in range(count - 1)]
            cin = width
        self.stages = nn.Sequential(*units)
        self.head = conv_bn(cin, head, 1)
        self.add_classifier(head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.head(self.stages(self.stem(x))))


class SqueezeExcite(nn.Module):
    """SE block: GlobalAveragePool -> 1x1 -> ReLU -> 1x1 -> Sigmoid -> Mul."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        self.squeeze = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, channels // reduction, 1)
        self.relu = nn.ReLU()
        self.expand = nn.Conv2d(channels // reduction, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.gate(self.expand(self.relu(self.reduce(self.squeeze(x)))))
        return x * scale


class SENet(Classifier):
    """A plain (non-residual) conv net with an SE block ending each stage."""

    def __init__(self) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(conv_bn(1, 24), SqueezeExcite(24),
                                    nn.MaxPool2d(2))
        self.stage2 = nn.Sequential(conv_bn(24, 48), SqueezeExcite(48),
                                    nn.MaxPool2d(2))
        self.stage3 = nn.Sequential(conv_bn(48, 64), conv_bn(64, 64),
                                    SqueezeExcite(64))
        self.add_classifier(64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.stage3(self.stage2(self.stage1(x))))


class MultiHeadAttention(nn.Module):
    """Self-attention written out with MatMul/Softmax (no fused kernel), so
    every exporter emits the classic Q/K/V MatMul pattern."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, D] -> [B, heads, T, head_dim]."""
        batch, tokens, _ = x.size()
        return x.view(batch, tokens, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.size()
        q = self.split_heads(self.query(x))
        k = self.split_heads(self.key(x))
        v = self.split_heads(self.value(x))
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        context = torch.matmul(scores.softmax(dim=-1), v)
        context = context.transpose(1, 2).reshape(batch, tokens, dim)
        return self.out(context)


class EncoderLayer(nn.Module):
    """Pre-norm transformer encoder layer with a GELU MLP."""

    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(OrderedDict([
            ("fc1", nn.Linear(dim, mlp_dim)), ("gelu", nn.GELU()),
            ("fc2", nn.Linear(mlp_dim, dim)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """A small Vision Transformer: 7x7 patches (16 tokens) + class token."""

    def __init__(self, patch: int = 7, dim: int = 64, depth: int = 4,
                 heads: int = 4, mlp_dim: int = 128) -> None:
        super().__init__()
        tokens = (28 // patch) ** 2
        self.patch_embed = nn.Conv2d(1, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.layers = nn.Sequential(
            *[EncoderLayer(dim, heads, mlp_dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, T, D]
        cls = self.cls_token.expand(x.size(0), -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = self.norm(self.layers(x))
        return self.head(x[:, 0])


# --------------------------------------------------------------------------
# Zoo registry
# --------------------------------------------------------------------------

# Variant forms. Every form but "canonical" is written to models/variants/.
CANONICAL = "canonical"
BN_FOLDED = "bn_folded"
CONSTANT_WEIGHTS = "constant_weights"
OPSET11 = "opset11"
OPSET_NEWEST = "opset_newest"
STATIC_BATCH = "static_batch"
ALL_VARIANTS = (BN_FOLDED, CONSTANT_WEIGHTS, OPSET11, OPSET_NEWEST,
                STATIC_BATCH)


@dataclass
class ArchSpec:
    """How to build, train and export one architecture."""

    name: str
    title: str
    build: Callable[[], nn.Module]
    epochs: int
    lr: float
    variants: tuple[str, ...]
    weight_decay: float = 5e-4
    optimizer: str = "sgd"
    notes: str = ""


ARCHS: dict[str, ArchSpec] = {spec.name: spec for spec in (
    ArchSpec("lenet300", "LeNet-300-100", LeNet300, epochs=20, lr=0.05,
             variants=(CONSTANT_WEIGHTS, OPSET11, STATIC_BATCH),
             notes="Flatten -> 784-300-100-10 Gemm/ReLU"),
    ArchSpec("lenet5", "LeNet-5 (Caffe)", LeNet5, epochs=8, lr=0.05,
             variants=(OPSET_NEWEST, STATIC_BATCH),
             notes="conv20 5x5, pool, conv50 5x5, pool, fc500, relu, fc10"),
    ArchSpec("vgg", "VGG-style", VGG, epochs=6, lr=0.1,
             variants=ALL_VARIANTS,
             notes="16-16-M-32-32-M-64-64-M conv/BN/ReLU, Flatten -> Gemm 576-64-10"),
    ArchSpec("resnet", "ResNet-style", ResNet, epochs=5, lr=0.1,
             variants=ALL_VARIANTS,
             notes="BasicBlocks [1,1,1] x 16/32/64, 1x1 conv+BN stride-2 shortcuts, GAP"),
    ArchSpec("mobilenetv2", "MobileNetV2-style", MobileNetV2, epochs=10,
             lr=0.1, variants=ALL_VARIANTS, weight_decay=4e-5,
             notes="stride-2 stem, inverted residuals (t=1/4), depthwise 3x3, ReLU6 (Clip), GAP"),
    ArchSpec("inception", "Inception-style", Inception, epochs=5, lr=0.1,
             variants=ALL_VARIANTS,
             notes="3 modules, branches 1x1 / 1x1->3x3 / 1x1->5x5 / maxpool->1x1, Concat"),
    ArchSpec("shufflenet", "ShuffleNetV2-style", ShuffleNetV2, epochs=10,
             lr=0.1, variants=(BN_FOLDED, OPSET11, OPSET_NEWEST, STATIC_BATCH),
             weight_decay=4e-5,
             notes="stem+maxpool, 2 stages x 3 units, channel split "
                   "(torch.chunk: Slice pairs in TorchScript exports, Split in "
                   "dynamo), Concat, shuffle as Reshape-Transpose-Reshape"),
    ArchSpec("senet", "SE-CNN", SENet, epochs=6, lr=0.1,
             variants=ALL_VARIANTS,
             notes="conv/BN/ReLU stages ending in squeeze-excite (GAP-1x1-ReLU-1x1-Sigmoid-Mul)"),
    ArchSpec("transformer", "ViT-style", ViT, epochs=12, lr=2e-3,
             variants=(CONSTANT_WEIGHTS, OPSET11, OPSET_NEWEST, STATIC_BATCH),
             optimizer="adamw", weight_decay=0.05,
             notes="7x7 patches, class token, 4 pre-norm layers, dim 64, 4 heads, GELU MLP 128"),
)}


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------


def make_optimizer(spec: ArchSpec, model: nn.Module, steps: int
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """SGD+Nesterov (CNNs) or AdamW (ViT) under a one-cycle schedule, which
    reaches good accuracy in the few epochs a 2-core CPU can afford."""
    # No weight decay on biases and norm parameters (all 1-d tensors).
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": spec.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if spec.optimizer == "adamw":
        opt = torch.optim.AdamW(groups, lr=spec.lr)
    else:
        opt = torch.optim.SGD(groups, lr=spec.lr, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=spec.lr, total_steps=steps, pct_start=0.25)
    return opt, sched


def random_hflip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mirror half the batch: clothes are left/right symmetric."""
    flip = torch.rand(x.shape[0], generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def train(spec: ArchSpec, model: nn.Module, data: Dataset, epochs: int,
          batch_size: int = 128) -> None:
    """Train in place with a seeded shuffle, logging loss and accuracy.

    Runs channels-last, which is markedly faster for these small convs on
    the CPU; the model is handed back in the default layout for export.
    """
    gen = torch.Generator().manual_seed(SEED)
    x_all = torch.from_numpy(data.train_x)
    y_all = torch.from_numpy(data.train_y)
    steps_per_epoch = len(x_all) // batch_size  # drop the ragged last batch
    opt, sched = make_optimizer(spec, model, epochs * steps_per_epoch)
    model.to(memory_format=torch.channels_last)
    for epoch in range(epochs):
        model.train()
        start, total_loss, correct = time.time(), 0.0, 0
        order = torch.randperm(len(x_all), generator=gen)
        for step in range(steps_per_epoch):
            idx = order[step * batch_size:(step + 1) * batch_size]
            x = random_hflip(x_all[idx], gen).to(memory_format=torch.channels_last)
            logits = model(x)
            loss = F.cross_entropy(logits, y_all[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item()
            correct += int((logits.argmax(1) == y_all[idx]).sum())
        print(f"  [{spec.name}] epoch {epoch + 1}/{epochs} "
              f"loss {total_loss / steps_per_epoch:.4f} "
              f"train {100 * correct / (steps_per_epoch * batch_size):.2f}% "
              f"({time.time() - start:.0f}s)", flush=True)
    model.to(memory_format=torch.contiguous_format)
    model.eval()


@torch.no_grad()
def torch_logits(model: nn.Module, x: np.ndarray, batch: int = 500
                 ) -> np.ndarray:
    """Eval-mode logits of a numpy batch."""
    model.eval()
    return np.concatenate([model(torch.from_numpy(x[i:i + batch])).numpy()
                           for i in range(0, len(x), batch)])


def torch_accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy in percent."""
    return float((torch_logits(model, x).argmax(1) == y).mean() * 100)


# --------------------------------------------------------------------------
# Model statistics
# --------------------------------------------------------------------------


def count_params(model: nn.Module) -> int:
    """Trainable parameters (BN running statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module) -> int:
    """Multiply-accumulates for one 28x28 image, from layer shapes.

    Counts Conv (out elements x in_channels/groups x kernel area), Linear
    (out elements x in_features) and the two attention MatMuls (QK^T and
    attention x V: 2 x tokens^2 x dim); element-wise ops, norms and pooling
    are ignored, as is customary.
    """
    total = 0

    def on_conv(m: nn.Conv2d, _inp, out: torch.Tensor) -> None:
        nonlocal total
        kh, kw = m.kernel_size
        total += out.numel() * (m.in_channels // m.groups) * kh * kw

    def on_linear(m: nn.Linear, _inp, out: torch.Tensor) -> None:
        nonlocal total
        total += out.numel() * m.in_features

    def on_attention(_m, inp, _out) -> None:
        nonlocal total
        _, tokens, dim = inp[0].shape
        total += 2 * tokens * tokens * dim

    hooks = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(on_conv))
        elif isinstance(module, nn.Linear):
            hooks.append(module.register_forward_hook(on_linear))
        elif isinstance(module, MultiHeadAttention):
            hooks.append(module.register_forward_hook(on_attention))
    model.eval()
    model(torch.zeros(1, 1, 28, 28))
    for hook in hooks:
        hook.remove()
    return total


# --------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------


def export_torchscript(model: nn.Module, opset: int, *, dynamic_batch: bool,
                       fold_bn: bool) -> onnx.ModelProto:
    """Export with the TorchScript-based exporter (``dynamo=False``).

    TrainingMode.EVAL lets the exporter fuse Conv+BatchNorm, the usual eval
    export; PRESERVE on an eval-mode model keeps BatchNormalization nodes
    (inference mode) as separate nodes.
    """
    example = torch.zeros(2 if dynamic_batch else 1, 1, 28, 28)
    mode = torch.onnx.TrainingMode.EVAL if fold_bn else torch.onnx.TrainingMode.PRESERVE
    axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy-exporter deprecation notice
        torch.onnx.export(model, (example,), buf, dynamo=False,
                          opset_version=opset, training=mode,
                          do_constant_folding=True, input_names=["input"],
                          output_names=["logits"], dynamic_axes=axes)
    return onnx.load_from_string(buf.getvalue())


def export_dynamo(model: nn.Module, opset: int) -> onnx.ModelProto:
    """Export with the torch.export-based exporter, then convert the opset.

    Its default optimiser folds BatchNorm into the convs. Stack-trace
    metadata (absolute paths of this script) is dropped so files do not
    depend on the checkout location.
    """
    example = torch.zeros(2, 1, 28, 28)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, (example,), dynamo=True, opset_version=DYNAMO_EXPORT_OPSET,
            input_names=["input"], output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    proto = program.model_proto
    strip_stack_traces(proto)
    if opset != DYNAMO_EXPORT_OPSET:
        proto = version_converter.convert_version(proto, opset)
    return proto


def strip_stack_traces(model: onnx.ModelProto) -> None:
    """Remove the dynamo exporter's per-node source stack traces."""
    def keep(props) -> list:
        return [p for p in props if p.key != "pkg.torch.onnx.stack_trace"]

    for node in model.graph.node:
        kept = keep(node.metadata_props)
        del node.metadata_props[:]
        node.metadata_props.extend(kept)


def weights_to_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Move every initializer into a Constant node (as some older exporters
    and converters emit weights); the tensor keeps its name."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    constants = [onnx.helper.make_node("Constant", [], [init.name],
                                       name=f"Constant_{init.name}", value=init)
                 for init in graph.initializer]
    nodes = constants + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    return out


def fix_ir_version(model: onnx.ModelProto) -> None:
    """Make the IR version one onnxruntime reads and the opset allows.

    Keeps the exporter's stamp when possible, raises it to the minimum the
    opset requires (onnx's release table) and caps it at what ORT reads.
    """
    minimum = onnx.helper.find_min_ir_version_for(list(model.opset_import))
    model.ir_version = min(max(model.ir_version, minimum), MAX_ORT_IR_VERSION)


def opset_of(model: onnx.ModelProto) -> int:
    """The default-domain opset version."""
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def has_batchnorm(model: onnx.ModelProto) -> bool:
    return any(n.op_type == "BatchNormalization" for n in model.graph.node)


def is_dynamic_batch(model: onnx.ModelProto) -> bool:
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    return not dim.HasField("dim_value")


# --------------------------------------------------------------------------
# Verification with onnxruntime
# --------------------------------------------------------------------------


def ort_session(model_bytes: bytes) -> ort.InferenceSession:
    """An ORT CPU session with graph optimisations off, as the tests use."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(model_bytes, opts,
                                providers=["CPUExecutionProvider"])


def ort_logits(session: ort.InferenceSession, x: np.ndarray,
               dynamic_batch: bool, batch: int = 500) -> np.ndarray:
    """Run a model over x, one image at a time for static-batch models."""
    step = batch if dynamic_batch else 1
    return np.concatenate([session.run(None, {"input": x[i:i + step]})[0]
                           for i in range(0, len(x), step)])


def verify(model: onnx.ModelProto, reference: np.ndarray, check_x: np.ndarray
           ) -> float:
    """Check validity and agreement with torch; return max |diff|."""
    onnx.checker.check_model(model, full_check=True)
    session = ort_session(model.SerializeToString())
    got = ort_logits(session, check_x, is_dynamic_batch(model))
    diff = float(np.abs(got - reference).max())
    if diff > MAX_ABS_DIFF:
        raise AssertionError(f"ONNX output differs from torch by {diff}")
    return diff


# --------------------------------------------------------------------------
# Building one architecture
# --------------------------------------------------------------------------


def make_form(model: nn.Module, form: str) -> tuple[onnx.ModelProto, str]:
    """Export one form; returns the model and a how-it-was-made note."""
    if form == CANONICAL:
        return (export_torchscript(model, CANONICAL_OPSET, dynamic_batch=True,
                                   fold_bn=False),
                "torch.onnx TorchScript, training=PRESERVE")
    if form == BN_FOLDED:
        return (export_torchscript(model, CANONICAL_OPSET, dynamic_batch=True,
                                   fold_bn=True),
                "torch.onnx TorchScript, training=EVAL (Conv+BN fused)")
    if form == CONSTANT_WEIGHTS:
        canonical, _ = make_form(model, CANONICAL)
        return (weights_to_constants(canonical),
                "canonical, initializers moved to Constant nodes (onnx)")
    if form == OPSET11:
        return (export_torchscript(model, LOW_OPSET, dynamic_batch=True,
                                   fold_bn=False),
                "torch.onnx TorchScript opset 11, training=PRESERVE")
    if form == OPSET_NEWEST:
        return (export_dynamo(model, NEWEST_ORT_OPSET),
                f"torch.onnx dynamo opset {DYNAMO_EXPORT_OPSET} -> "
                f"onnx.version_converter {NEWEST_ORT_OPSET}")
    if form == STATIC_BATCH:
        return (export_torchscript(model, CANONICAL_OPSET, dynamic_batch=False,
                                   fold_bn=False),
                "torch.onnx TorchScript, batch fixed to 1, training=PRESERVE")
    raise ValueError(form)


def form_path(arch: str, form: str) -> Path:
    if form == CANONICAL:
        return MODELS_DIR / f"{arch}.onnx"
    return VARIANTS_DIR / f"{arch}.{form}.onnx"


def describe_forms(form: str, model: onnx.ModelProto, arch_has_bn: bool
                   ) -> str | list[str]:
    """The manifest's form field: a list when an export combines forms
    (the dynamo exporter always folds BN, for instance)."""
    forms = [form]
    if arch_has_bn and not has_batchnorm(model) and form != BN_FOLDED:
        forms.append(BN_FOLDED)
    return forms[0] if len(forms) == 1 else forms


def build_arch(spec: ArchSpec, data: Dataset, eval_set: dict, epochs: int
               ) -> list[dict]:
    """Train one architecture, export every form, return manifest entries."""
    print(f"== {spec.name}: {spec.title}", flush=True)
    torch.manual_seed(SEED)  # per arch, so --only reproduces the full run
    model = spec.build()
    arch_has_bn = any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    start = time.time()
    train(spec, model, data, epochs)
    # Wall-clock time stays out of the manifest so reruns give equal files.
    print(f"  [{spec.name}] trained in {time.time() - start:.0f}s; torch test "
          f"accuracy (10,000 images): "
          f"{torch_accuracy(model, data.test_x, data.test_y):.2f}%", flush=True)
    params, macs = count_params(model), count_macs(model)

    check_x = eval_set["input"][:64]
    reference = torch_logits(model, check_x)
    entries = []
    for form in (CANONICAL, *spec.variants):
        proto, how = make_form(model, form)
        fix_ir_version(proto)
        proto.graph.name = spec.name
        diff = verify(proto, reference, check_x)
        path = form_path(spec.name, form)
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = proto.SerializeToString()
        path.write_bytes(blob)
        dynamic = is_dynamic_batch(proto)
        logits = ort_logits(ort_session(blob), eval_set["input"], dynamic)
        accuracy = float((logits.argmax(1) == eval_set["labels"]).mean() * 100)
        print(f"  {path.relative_to(REPO)}: {len(blob) / 1e6:.2f} MB, "
              f"opset {opset_of(proto)}, IR {proto.ir_version}, "
              f"acc {accuracy:.2f}%, max|diff| {diff:.1e}", flush=True)
        entries.append({
            "file": str(path.relative_to(REPO)),
            "arch": spec.name,
            "form": describe_forms(form, proto, arch_has_bn),
            "opset": opset_of(proto),
            "ir_version": proto.ir_version,
            "params": params,
            "macs": macs,
            "file_bytes": len(blob),
            "sha256": hashlib.sha256(blob).hexdigest(),
            "test_accuracy": round(accuracy, 2),
            "dynamic_batch": dynamic,
            "has_batchnorm_nodes": has_batchnorm(proto),
            "nodes": len(proto.graph.node),
            "exporter": how,
            "train_epochs": epochs,
        })
    return entries


# --------------------------------------------------------------------------
# Manifest and README
# --------------------------------------------------------------------------


def load_manifest_entries() -> list[dict]:
    path = MODELS_DIR / "zoo.json"
    if not path.exists():
        return []
    return json.loads(path.read_text())["models"]


def write_manifest(entries: list[dict], data_info: dict) -> None:
    """Write models/zoo.json, entries ordered as in ARCHS."""
    order = {name: i for i, name in enumerate(ARCHS)}
    entries = sorted(entries, key=lambda e: (order[e["arch"]],
                                             e["form"] != CANONICAL, e["file"]))
    manifest = {
        "description": "graphopt model zoo: Fashion-MNIST classifiers "
                       "(regenerate with python tools/make_models.py)",
        "input": {"name": "input", "dtype": "float32",
                  "shape": ["batch", 1, 28, 28],
                  "normalization": f"(pixel / 255 - {MEAN}) / {STD}"},
        "output": {"name": "logits", "dtype": "float32",
                   "shape": ["batch", 10], "classes": list(CLASSES)},
        "accuracy_unit": "percent top-1 on models/fmnist_eval.npz "
                         "(onnxruntime, graph optimizations disabled)",
        "data": data_info,
        "models": entries,
    }
    (MODELS_DIR / "zoo.json").write_text(json.dumps(manifest, indent=2) + "\n")


def format_forms(form: str | list[str]) -> str:
    return form if isinstance(form, str) else " + ".join(form)


def write_readme(entries: list[dict]) -> None:
    """Write models/README.md with one table row per ONNX file."""
    rows = ["| file | architecture | form | opset | IR | params | MACs | "
            "size | accuracy | exported with |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        spec = ARCHS[e["arch"]]
        rows.append(
            f"| `{e['file'].removeprefix('models/')}` | {spec.title} | "
            f"{format_forms(e['form'])} | {e['opset']} | {e['ir_version']} | "
            f"{e['params']:,} | {e['macs'] / 1e6:.2f} M | "
            f"{e['file_bytes'] / 1024:.0f} KiB | {e['test_accuracy']:.2f}% | "
            f"{e['exporter']} |")
    archs = ["| name | architecture | notes | epochs |", "|---|---|---|---|"]
    for spec in ARCHS.values():
        epochs = next((e["train_epochs"] for e in entries
                       if e["arch"] == spec.name), spec.epochs)
        archs.append(f"| `{spec.name}` | {spec.title} | {spec.notes} | {epochs} |")
    text = README_TEMPLATE.format(
        mean=MEAN, std=STD, arch_table="\n".join(archs),
        model_table="\n".join(rows))
    (MODELS_DIR / "README.md").write_text(text + corpus_section())


def corpus_section() -> str:
    """The corpus section of models/README.md (marker included), or "" when absent."""
    path = MODELS_DIR / "README.md"
    old = path.read_text() if path.exists() else ""
    at = old.find(CORPUS_README_MARKER)
    return "" if at < 0 else "\n" + old[at:]


README_TEMPLATE = """\
# graphopt model zoo

Small Fashion-MNIST classifiers, trained on the CPU and exported to ONNX the
way real exporters write them, so graphopt's passes, tests and benchmarks run
on realistic graphs. Everything here is generated by `tools/make_models.py`;
do not edit by hand.

* Input: float32 `input` `[batch, 1, 28, 28]`, `(pixel / 255 - {mean}) / {std}`.
* Output: float32 `logits` `[batch, 10]` (Fashion-MNIST class order).
* `fmnist_calib.npz`: 512 training images (`input` float32 [512,1,28,28],
  `labels` int64), for calibration and data-driven passes.
* `fmnist_eval.npz`: the first 2,000 test images, same keys.
* `zoo.json`: the manifest; `models` holds one entry per ONNX file (file, arch,
  form, opset, ir_version, params, macs, file_bytes, sha256, test_accuracy,
  dynamic_batch, has_batchnorm_nodes, nodes, exporter).

Accuracy is top-1 on `fmnist_eval.npz` with onnxruntime (graph optimizations
disabled). Params are the trainable parameters of the torch model (BN running
statistics excluded); MACs are per image and count Conv, Gemm/MatMul and the
attention MatMuls.

## Forms

| form | what it is |
|---|---|
| canonical (`<arch>.onnx`) | TorchScript exporter, opset 17, `training=PRESERVE` so BatchNormalization stays a separate node, weights as initializers, dynamic batch |
| bn_folded | TorchScript exporter's normal eval export: BN fused into the Conv weights |
| constant_weights | the canonical model with every initializer moved into a Constant node |
| opset11 | TorchScript exporter at opset 11 (LayerNorm decomposed into ReduceMean/Sub/Pow/Sqrt/Div) |
| opset_newest | dynamo (torch.export) exporter at opset 23, converted to opset 26 (the newest onnxruntime 1.31 loads) with onnx.version_converter; its optimiser folds BN |
| static_batch | TorchScript exporter with the batch axis fixed to 1 |

## Things the graphs contain (all produced by the exporters, on purpose)

* TorchScript exports with a dynamic batch compute reshape targets at run
  time: `shufflenet` (channel shuffle, chunk) and `transformer` (head split,
  class-token Expand) carry Shape/Gather/Unsqueeze/Concat subgraphs feeding
  their Reshapes. The static-batch and dynamo exports have (mostly) constant
  shapes instead.
* The TorchScript exporter de-duplicates equal initializers and re-creates
  the copies with Identity nodes: in `resnet` the BN biases of a block's last
  conv and of its downsample shortcut trained to identical values (they only
  ever receive the same gradient), so two `Identity` nodes feed BN inputs.
* ReLU6 is `Clip` with min/max from `Constant` nodes (not initializers).
* The dynamo exporter's optimiser always folds BN and writes Flatten as
  Reshape and global pooling as ReduceMean; asked directly for opset 26 it
  returns an opset-18 model containing Gelu, which onnxruntime rejects, hence
  export at 23 plus onnx.version_converter.
* IR versions: opset 11 files are IR 6, opset 17 IR 8 (as the TorchScript
  exporter stamps them), opset 26 files IR 13 (the lowest onnx allows for
  opset 26; onnxruntime 1.31 reads up to 13, while onnx 1.23 stamps 14).

## Architectures

{arch_table}

## Models

{model_table}

## Regenerating

```
apt-get install dataset-fashion-mnist
pip install torch==2.13.0 onnxscript      # CPU wheel; dev only
python tools/make_models.py               # whole zoo, deterministic (seeded)
python tools/make_models.py --only vgg    # one architecture
pytest tests/test_zoo_models.py           # checks every file against zoo.json
```
"""


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(ARCHS), action="append",
                        help="build only this architecture (repeatable)")
    parser.add_argument("--epochs", type=int,
                        help="override every architecture's epoch count")
    return parser.parse_args(argv)


def configure_torch() -> None:
    """Deterministic, 2-thread CPU execution and a quiet exporter."""
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    logging.getLogger("torch._export").setLevel(logging.ERROR)
    logging.getLogger("onnxscript").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_torch()
    MODELS_DIR.mkdir(exist_ok=True)
    data = load_fashion_mnist()
    data_info = write_data_files(data)
    with np.load(MODELS_DIR / "fmnist_eval.npz") as f:
        eval_set = {k: f[k] for k in f.files}

    names = args.only or list(ARCHS)
    entries = [e for e in load_manifest_entries() if e["arch"] not in names]
    start = time.time()
    for name in names:
        spec = ARCHS[name]
        entries += build_arch(spec, data, eval_set, args.epochs or spec.epochs)
        write_manifest(entries, data_info)  # keep progress if a later arch fails
    entries = load_manifest_entries()
    write_readme(entries)
    total = sum(p.stat().st_size for p in MODELS_DIR.rglob("*") if p.is_file())
    print(f"done in {time.time() - start:.0f}s; models/ holds "
          f"{total / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
