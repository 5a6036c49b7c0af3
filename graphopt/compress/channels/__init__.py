"""Channel pruning's dependency graph, split the way Torch-Pruning splits its own: which (tensor, axis)
dimensions must lose the same channels, the groups they form, what a plan costs, and the shrink.

==================  ===========================================================================================
``analysis``        :func:`analyze` and :class:`ChannelAnalysis`: the entry point (groups, plan costs)
``dims``            a dimension ``(value, axes, reader)`` and the :class:`CannotFollow` refusal
``walk``            the coupling walk over the graph: dimensions, position pairs, shape evaluation
``coupling``        what each op means for channel dims: the rule table and the pass-through families
``index_mapping``   rules that move positions: Transpose, Reshape family, Concat, Split, Slice, Gather
``layers``          rules of the layers: Conv, ConvTranspose, Gemm, MatMul (producers and consumers)
``shape_eval``      evaluating shape computations (``Shape -> Gather -> Concat`` feeding a Reshape)
``groups``          union-find of positions into channels, channels into groups, and why a group is frozen
``plan``            the plan cost model: MACs, params and predicted time of a plan without building it
``shapes``          the shape inputs a plan makes stale (Reshape targets, Split sizes, Slice bounds...)
``shrink``          physically removing a plan's channels from a model
``units``           the target CPU's channel unit of each group (its NCHWc block, or its vector lanes)
==================  ===========================================================================================

Dependencies point down this list's reverse: ``dims`` <- rules <- ``walk`` <- ``groups`` / ``shapes`` <-
``plan`` <- ``analysis`` <- ``shrink``.
"""

# the main public names, re-exported for ``from graphopt.compress import channels; channels.analyze(...)``
from graphopt.compress.channels.analysis import ChannelAnalysis as ChannelAnalysis
from graphopt.compress.channels.analysis import analyze as analyze
from graphopt.compress.channels.groups import Consumer as Consumer
from graphopt.compress.channels.groups import Group as Group
from graphopt.compress.channels.groups import Member as Member
from graphopt.compress.channels.groups import Producer as Producer

__all__ = ["analysis", "coupling", "dims", "groups", "index_mapping", "layers", "plan", "shape_eval", "shapes",
           "shrink", "units", "walk"]
