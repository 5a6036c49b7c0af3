"""graphopt's passes, one module per family. Importing this package registers them all.

Presets live here because they are the one place that knows about several pass families.
"""

from graphopt.manager import FixedPoint, Pass, get_pass, register_preset

from . import cleanup  # noqa: F401  (registers its passes)

LOSSLESS = ["identity", "dead_code"]


@register_preset("lossless", "every rewrite that keeps the model's function within float noise, to a fixed point")
def lossless() -> Pass:
    return FixedPoint([get_pass(name) for name in LOSSLESS], name="lossless", max_steps=10)
