"""The package's layering, enforced: core <- measure <- compress <- passes <- app.

Every import inside ``graphopt/`` (at module level or inside a function) is read from the source with
``ast``. A module may import from its own layer and the layers below it; a pass module may not import
another pass module (what two passes share lives below them); no module reaches into another
module's private names; every sub-package declares ``__all__`` with the modules it holds.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import graphopt

ROOT = Path(graphopt.__file__).parent
LAYERS = ["core", "measure", "compress", "passes", "app"]
PACKAGES = ["graphopt.core", "graphopt.measure", "graphopt.compress", "graphopt.passes",
            "graphopt.passes.lossless", "graphopt.passes.lossy", "graphopt.app"]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) < 2 or parts[1] not in LAYERS:
        return len(LAYERS)  # graphopt/__init__ and __main__: the top, above every layer
    return LAYERS.index(parts[1])


def _is_pass_module(module: str) -> bool:
    return module.startswith(("graphopt.passes.lossless.", "graphopt.passes.lossy."))


def _imports(module: str, path: Path) -> list[tuple[str, list[str], int]]:
    """``(imported module, names taken from it, line)`` for every import of a graphopt module."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("graphopt")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base.startswith("graphopt"):
                found.append((base, [a.name for a in node.names], node.lineno))
    return found


def _targets(base: str, names: list[str], modules: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """``from pkg import mod`` imports the module ``pkg.mod``; anything else imports names of ``base``."""
    sub = [n for n in names if f"{base}.{n}" in modules]
    rest = [n for n in names if f"{base}.{n}" not in modules]
    return [(f"{base}.{n}", []) for n in sub] + ([(base, rest)] if rest or not names else [])


def _edges() -> list[tuple[str, str, list[str], int]]:
    modules = _modules()
    return [(m, target, taken, line)
            for m, path in modules.items()
            for base, names, line in _imports(m, path)
            for target, taken in _targets(base, names, modules)]


def test_the_layout_has_the_layers_it_claims():
    modules = _modules()
    for package in PACKAGES:
        assert package in modules, f"{package} is missing"
    assert not (ROOT.parent / "passes").exists(), "passes/ belongs under graphopt/"


def test_imports_point_down_the_layers():
    upward = [f"{m}:{line} imports {t}" for m, t, _, line in _edges()
              if t != "graphopt" and _layer(t) > _layer(m)]
    assert not upward, "\n".join(upward)


def test_no_pass_module_imports_another():
    across = [f"{m}:{line} imports {t}" for m, t, _, line in _edges()
              if _is_pass_module(m) and _is_pass_module(t) and t != m]
    assert not across, "\n".join(across)


def test_no_module_imports_another_modules_private_names():
    private = [f"{m}:{line} takes {n} from {t}" for m, t, taken, line in _edges()
               for n in taken if n.startswith("_") and not n.startswith("__") and t != m]
    assert not private, "\n".join(private)


def test_no_module_reads_a_private_attribute_of_an_imported_module():
    modules = _modules()
    found = []
    for m, path in modules.items():
        tree = ast.parse(path.read_text())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("graphopt"):
                for a in node.names:
                    if f"{node.module}.{a.name}" in modules:
                        aliases[a.asname or a.name] = f"{node.module}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.asname and a.name in modules:
                        aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                found.append(f"{m}:{node.lineno} reads {aliases[node.value.id]}.{node.attr}")
    assert not found, "\n".join(found)


@pytest.mark.parametrize("package", PACKAGES)
def test_every_sub_package_declares_its_modules(package):
    mod = importlib.import_module(package)
    declared = getattr(mod, "__all__", None)
    assert declared is not None, f"{package} declares no __all__"
    present = sorted(m.name for m in pkgutil.iter_modules(mod.__path__))
    assert sorted(declared) == present, f"{package}.__all__ {sorted(declared)} != modules {present}"


def test_the_checker_sees_an_upward_import(tmp_path):
    """The walk above must catch what it is for: an upward import inside a function, relative or not."""
    source = "def f():\n    from ..app import cli\n    from graphopt.passes.lossy import prune\n"
    path = tmp_path / "x.py"
    path.write_text(source)
    seen = [base for base, _, _ in _imports("graphopt.core.x", path)]
    assert seen == ["graphopt.app", "graphopt.passes.lossy"]
    targets = _targets("graphopt.app", ["cli"], _modules())
    assert targets == [("graphopt.app.cli", [])] and _layer("graphopt.app.cli") > _layer("graphopt.core.x")
