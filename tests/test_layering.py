"""mrgfast's layers point down: every import in every module under mrgfast/ (module-level and inside functions)
goes to a package of the same layer or one below, and no two packages import each other, directly or round a loop.

Bottom to top: foundation -> ops -> layers/losses -> peft/models/data/metrics -> training machinery -> assembly
(config + building a run) -> train/evaluate/onpolicy_pairs/convert/integrations -> demo -> `__main__` entry points -> the
root package's lazy re-exports.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "mrgfast"

# Package (or top-level module) -> layer. A module belongs to the longest name here that prefixes it.
LAYERS = {
    "mrgfast": 9,                  # the package's own __init__: a facade above everything, re-exporting lazily
    "mrgfast._C": 0,               # the native extension
    "mrgfast.common": 0,
    "mrgfast.layout": 0,
    "mrgfast.testing": 0,          # test tools (the host-sync guard): torch only
    "mrgfast.ops": 1,
    "mrgfast.layers": 2,
    "mrgfast.losses": 2,
    "mrgfast.peft": 3,
    "mrgfast.models": 3,
    "mrgfast.data": 3,
    "mrgfast.metrics": 3,
    "mrgfast.training": 4,
    "mrgfast.config": 5,
    "mrgfast.assemble": 5,
    "mrgfast.train": 6,
    "mrgfast.evaluate": 6,
    "mrgfast.onpolicy_pairs": 6,
    "mrgfast.convert": 6,            # python -m mrgfast.convert: other projects' checkpoints -> mrgfast's
    "mrgfast.integrations": 6,     # HF / PEFT / TRL drop-ins: may import ops, layers, losses, peft, models...
    "mrgfast.demo": 7,
}
ENTRY_POINT_LAYER = 8  # `python -m` entry points (`__main__`): nothing imports them, they may import anything


def module_name(path: Path, root: Path) -> str:
    """The dotted module name of a file under the package directory `root`."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(tree: ast.AST, module: str, is_package: bool) -> list:
    """(imported module, line) for every import statement anywhere in the tree (functions included), relative
    imports resolved against `module`."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            # `from pkg import sub` may import the submodule pkg.sub: judge by the most specific name.
            found += [(f"{name}.{alias.name}", node.lineno) for alias in node.names]
    return found


def owner(module: str, layers: dict) -> str:
    """The entry of `layers` that `module` belongs to (the longest prefix; the bare package name only for itself),
    or '' for none."""
    parts = module.split(".")
    for end in range(len(parts), 1, -1):
        name = ".".join(parts[:end])
        if name in layers:
            return name
    return module if module in layers else ""


def layer_of(module: str, layers: dict) -> int:
    """The layer of a module: its package's, or the entry-point layer for a `__main__`."""
    return ENTRY_POINT_LAYER if module.endswith("__main__") else layers[owner(module, layers)]


def check(sources: dict, layers: dict) -> list:
    """Every violation in `sources` ({module: (python source, is_package)}): imports up the layers, modules in no
    layer, and cycles between packages. Returns readable lines (empty when the rules hold)."""
    problems, edges = [], {}
    for module, (source, is_package) in sorted(sources.items()):
        if not owner(module, layers):
            problems.append(f"{module}: in no layer (add its package to LAYERS)")
            continue
        seen = set()
        for target, line in imported_modules(ast.parse(source), module, is_package):
            if not target.startswith("mrgfast") or (line, owner(target, layers)) in seen:
                continue  # one line importing several names from one package is judged once
            seen.add((line, owner(target, layers)))
            target_owner = owner(target, layers)
            if not target_owner:
                problems.append(f"{module}:{line} imports {target}, which is in no layer")
                continue
            if "__main__" in target.split("."):
                problems.append(f"{module}:{line} imports the entry point {target}")
            here, there = layer_of(module, layers), layers[target_owner]
            if there > here:
                problems.append(f"{module}:{line} imports {target} (layer {there}) from layer {here}: up the layers")
            source_owner = owner(module, layers)
            if target_owner != source_owner and not module.endswith("__main__") and target_owner != "mrgfast":
                edges.setdefault(source_owner, set()).add(target_owner)
    problems += [f"packages import each other round a loop: {' -> '.join(cycle)}" for cycle in cycles(edges)]
    return problems


def cycles(edges: dict) -> list:
    """One cycle (as a closed path) through each strongly connected group of packages that has one."""
    found, done = [], set()
    for start in sorted(edges):
        if start in done:
            continue
        stack, path = [(start, iter(sorted(edges.get(start, ()))))], [start]
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                path.pop()
                done.add(node)
            elif child in path:
                found.append(path[path.index(child):] + [child])
                done.update(path)
                stack, path = [], []
            elif child not in done:
                stack.append((child, iter(sorted(edges.get(child, ())))))
                path.append(child)
    return found


def package_sources() -> dict:
    """{module: (source, is_package)} for every .py file under mrgfast/."""
    return {module_name(path, ROOT): (path.read_text(encoding="utf-8"), path.name == "__init__.py")
            for path in sorted(ROOT.rglob("*.py"))}


def test_every_import_in_mrgfast_points_down_the_layers_and_no_packages_form_a_loop():
    sources = package_sources()
    assert len(sources) > 100  # the whole package was read
    problems = check(sources, LAYERS)
    assert not problems, "\n".join(problems)


# The checker itself, on made-up modules: each rule must be able to fail.

def fake(**modules) -> dict:
    """{dotted module: (source, False)} from keyword arguments with '__' for dots."""
    return {name.replace("__", "."): (source, False) for name, source in modules.items()}


def test_an_import_up_the_layers_is_named_with_its_line():
    sources = fake(mrgfast__ops__a="import torch\n\ndef f():\n    from mrgfast.train.loop import train\n")
    assert check(sources, LAYERS) == [
        "mrgfast.ops.a:4 imports mrgfast.train.loop.train (layer 6) from layer 1: up the layers"]


def test_a_loop_between_packages_of_one_layer_is_found():
    sources = fake(mrgfast__models__a="from mrgfast.data import x\n", mrgfast__data__b="import mrgfast.models.a\n")
    assert check(sources, LAYERS) == ["packages import each other round a loop: mrgfast.data -> mrgfast.models -> "
                                      "mrgfast.data"]


def test_modules_outside_every_layer_and_imports_of_entry_points_are_named():
    sources = fake(mrgfast__newpkg__a="x = 1\n", mrgfast__demo__b="from mrgfast.train.__main__ import main\n")
    assert check(sources, LAYERS) == [
        "mrgfast.demo.b:1 imports the entry point mrgfast.train.__main__.main",
        "mrgfast.newpkg.a: in no layer (add its package to LAYERS)"]


@pytest.mark.parametrize("source", ["from . import sibling\n", "from .sibling import x\n"])
def test_relative_imports_are_resolved(source):
    assert imported_modules(ast.parse(source), "mrgfast.models.decoder", False)[0][0].startswith("mrgfast.models.")
    up = imported_modules(ast.parse("from ..train import loop\n"), "mrgfast.models.decoder", False)
    assert up == [("mrgfast.train.loop", 1)]
