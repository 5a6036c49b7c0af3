"""graphopt's passes: ``lossless/`` and ``lossy/`` hold one module per pass family, ``presets`` the
named pipelines. Importing this package registers them all.

A pass module imports from :mod:`graphopt.core`, :mod:`graphopt.measure` and :mod:`graphopt.compress`,
never from another pass module (``tests/test_layers.py``): what two passes share lives below them.
"""

import importlib
import pkgutil

from graphopt.passes import lossless, lossy

# Importing a family's module registers its passes. Sorted, so registration order does not depend on
# the file system.
for _package in (lossless, lossy):
    for _module in sorted(m.name for m in pkgutil.iter_modules(_package.__path__)):
        importlib.import_module(f"{_package.__name__}.{_module}")

from graphopt.passes import presets  # noqa: E402  (after the passes it names)

__all__ = ["lossless", "lossy", "presets"]
