"""The named pipelines (``--preset``), all in one place.

Order inside ``lossless`` (repeated to a fixed point): first make constants visible (Constant nodes
to initializers, folding), then simplify shape ops and remove no-ops so that fusion patterns become
adjacent, then the DeepRebirth fusions, and dead code last so each round ends with a clean graph.

Every lossy preset starts with ``lossless``, so its pass sees a cleaned graph (BN folded into the
convs, shape no-ops gone), and ends with a cleanup of what it left.
"""

from graphopt.core.manager import FixedPoint, Pass, Sequential, get_pass, register_preset

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


@register_preset("prune", "lossless cleanup, filter pruning to --target-macs/--target-params with least-squares "
                          "reconstruction (lossy), lossless cleanup")
def prune_preset() -> Pass:
    return Sequential([lossless(), get_pass("prune_filters"), lossless()], name="prune")


# merge_linear would multiply the two factors back together whenever the cost model prefers one layer:
# the cleanup after the factorization leaves it out.
_NOT_AFTER_LOWRANK = ("merge_linear",)


@register_preset("lowrank", "lossless, then factorize Gemm/MatMul/Conv layers by (data-aware) truncated SVD "
                            "(lossy), then lossless cleanup without merge_linear")
def lowrank_preset() -> Pass:
    after = FixedPoint([get_pass(n) for n in LOSSLESS if n not in _NOT_AFTER_LOWRANK],
                       name="lossless_after_lowrank", max_steps=10)
    return Sequential([lossless(), get_pass("lowrank"), after], name="lowrank")


@register_preset("compress", "LOSSY: Deep Compression without retraining: lossless, sparsify, weight_sharing "
                             "(options sparsify.density, weight_sharing.bits, weight_sharing.encoding)")
def compress_preset() -> Pass:
    # The lossless preset first folds BN into the convs (its parameters would otherwise stay float). It must
    # not run after weight_sharing: fold_constants would evaluate the compact decoders back into floats.
    return Sequential([lossless(), get_pass("sparsify"), get_pass("weight_sharing"),
                       get_pass("dedupe_initializers")], name="compress")


@register_preset("int8", "LOSSY: lossless, then int8 quantization (onnxruntime QDQ in the format it fuses, or dynamic "
                         "for transformers) with a least-squares re-fit; --quantize adds it after any other preset")
def int8_preset() -> Pass:
    return Sequential([lossless(), get_pass("quantize")], name="int8")
