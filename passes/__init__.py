"""graphopt's passes, one module per family. Importing this package registers them all.

Presets that combine several pass families live here; a family's own presets live in its module.

Order inside ``lossless`` (repeated to a fixed point): first make constants visible (Constant nodes
to initializers, folding), then simplify shape ops and remove no-ops so that fusion patterns become
adjacent, then the DeepRebirth fusions, and dead code last so each round ends with a clean graph.
"""

import importlib
import pkgutil

from graphopt.manager import FixedPoint, Pass, Sequential, get_pass, register_preset

# Every module of this package is a pass family; importing it registers its passes (and presets).
# Sorted, so registration order does not depend on the file system.
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")

LOSSLESS = [
    "constant_to_initializer", "fold_constants", "simplify", "channel_permute", "identity", "cse", "dedupe_initializers",
    "fuse_patterns", "fold_batchnorm", "fold_affine", "fuse_pad", "merge_linear",
    "merge_concat_convs", "merge_sum_branches", "horizontal_fusion", "pool_through_concat",
    "gemm_rows", "dead_code",
]


@register_preset("lossless", "every rewrite that keeps the model's function within float noise, to a fixed point")
def lossless() -> Pass:
    return FixedPoint([get_pass(name) for name in LOSSLESS], name="lossless", max_steps=10)


@register_preset("deeprebirth", "lossless, then merge conv + pool/LRN blocks into one conv fitted on the data "
                                "(lossy, within --max-drop)")
def deeprebirth_preset() -> Pass:
    return Sequential([lossless(), get_pass("deeprebirth_approx"), lossless()], name="deeprebirth")
