"""The import graph of the dngjax package, read from the source (ast; nothing is imported).

The library sits on the ground and the tools above it:

* (a) ``dngjax/models/*`` imports nothing of dngjax outside ``dngjax/models`` (networks and their weight
  loaders; the converter's model folder and command line live above, in ``dngjax/convert.py``);
* (b) the core (``schedules``, ``denoiser``, ``guidance``, ``sampler``) imports neither the tools nor the
  converters (``dngjax.tools``, ``dngjax.models.convert*``, ``dngjax.convert``);
* (c) nothing of dngjax outside ``dngjax/tools`` imports ``dngjax.tools``;
* (d) no import cycle among dngjax's modules through the imports that run when a module is imported
  (those at module level: outside any function body). Imports inside functions run later, when the
  function is called; they may close a loop without breaking an import, but a loop is a loop of design
  all the same: (e) checks the graph with them too, and names each cycle it finds.

Rules (a) to (c) count every import: module level, inside a function, or for type checkers only
(``if TYPE_CHECKING:``). The cycle checks (d) and (e) leave the type-checking ones out: they never run.
"""

from __future__ import annotations

import ast
import os
from typing import Dict, List, Set, Tuple

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dngjax")
CORE = ("dngjax.schedules", "dngjax.denoiser", "dngjax.guidance", "dngjax.sampler")


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].split(os.sep)
    return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def _modules() -> Dict[str, str]:
    """{dotted module name: file} of every module under dngjax/."""
    out = {}
    for folder, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                out[_module_name(os.path.join(folder, f))] = os.path.join(folder, f)
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES.get(name, "").endswith("__init__.py")


def _type_checking(node: ast.AST) -> bool:
    """``if TYPE_CHECKING:`` / ``if typing.TYPE_CHECKING:``."""
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"
                                         or isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(name: str) -> List[Tuple[str, str, int]]:
    """(imported dngjax module, where: "module" | "function" | "typing", line) for every import of module
    ``name`` (module level, inside a function body, or under ``if TYPE_CHECKING:``), relative imports
    resolved. ``from X import y`` imports X.y where that is a module, else X (a name X defines)."""
    path = MODULES[name]
    tree = ast.parse(open(path, encoding="utf-8").read(), filename=path)
    package = name if _is_package(name) else name.rpartition(".")[0]
    found: List[Tuple[str, str, int]] = []

    def visit(node: ast.AST, where: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, "function" if where == "module" else where)
                continue
            if _type_checking(child):
                for sub in child.body:
                    visit(ast.Module(body=[sub], type_ignores=[]), "typing")
                for sub in child.orelse:
                    visit(ast.Module(body=[sub], type_ignores=[]), where)
                continue
            if isinstance(child, ast.Import):
                found.extend((a.name, where, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[:len(base) - (child.level - 1)]
                    mod = ".".join(base + ([child.module] if child.module else []))
                else:
                    mod = child.module or ""
                found.extend((f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod, where, child.lineno)
                             for a in child.names)
            visit(child, where)

    visit(tree, "module")
    return [(m, where, line) for m, where, line in found if m == "dngjax" or m.startswith("dngjax.")]


IMPORTS = {name: _imports(name) for name in MODULES}


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _violations(importers, forbidden) -> List[str]:
    return [f"{MODULES[name]}:{line}: {name} imports {mod}"
            for name in sorted(MODULES) if importers(name)
            for mod, _, line in IMPORTS[name] if forbidden(name, mod)]


def test_the_graph_is_read():
    """The reader sees the package: its known modules and some known edges."""
    for name in CORE + ("dngjax.models.unet", "dngjax.models.torch_weights", "dngjax.checkpoint",
                        "dngjax.convert", "dngjax.tools"):
        assert name in MODULES, name
    assert ("dngjax.schedules", "module") in {(m, where) for m, where, _ in IMPORTS["dngjax.sampler"]}
    assert "dngjax.models.torch_weights" in {m for m, _, _ in IMPORTS["dngjax.models.clip"]}
    assert "dngjax.checkpoint" in {m for m, _, _ in IMPORTS["dngjax.convert"]}


def test_models_import_nothing_above_them():
    """(a) dngjax/models/*: networks and weight loaders, standing on nothing of dngjax but themselves."""
    bad = _violations(lambda n: _inside(n, "dngjax.models"),
                      lambda n, m: not _inside(m, "dngjax.models"))
    assert not bad, "\n".join(bad)


def test_core_imports_no_tools_or_converters():
    """(b) the core (schedules, denoiser, guidance, sampler) knows no tool and no converter."""
    def forbidden(_, mod):
        return (_inside(mod, "dngjax.tools") or mod.startswith("dngjax.models.convert")
                or _inside(mod, "dngjax.convert"))
    bad = _violations(lambda n: n in CORE, forbidden)
    assert not bad, "\n".join(bad)


def test_library_imports_no_tools():
    """(c) the tools sit above the library: nothing outside dngjax/tools imports them."""
    bad = _violations(lambda n: not _inside(n, "dngjax.tools"), lambda n, m: _inside(m, "dngjax.tools"))
    assert not bad, "\n".join(bad)


def _cycles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """One cycle (a list of modules, first == last) per strongly connected group that has one
    (depth-first search; white / grey / black colouring)."""
    colour: Dict[str, int] = {}
    stack: List[str] = []
    found: List[List[str]] = []
    seen: Set[frozenset] = set()

    def dfs(node: str) -> None:
        colour[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if colour.get(nxt, 0) == 0:
                dfs(nxt)
            elif colour[nxt] == 1:                                   # a back edge: a cycle
                cycle = stack[stack.index(nxt):] + [nxt]
                key = frozenset(cycle)
                if key not in seen:
                    seen.add(key)
                    found.append(cycle)
        stack.pop()
        colour[node] = 2

    for node in sorted(edges):
        if colour.get(node, 0) == 0:
            dfs(node)
    return found


def _graph(module_level_only: bool) -> Dict[str, Set[str]]:
    """{module: dngjax modules it imports}. Parent packages are not edges of their own: importing
    ``dngjax.a.b`` runs ``dngjax/__init__`` first, and a package's submodules import each other while it
    is being imported; ``import dngjax`` or ``from dngjax import name`` (a name the package defines) is an
    edge to the package."""
    kinds = ("module",) if module_level_only else ("module", "function")
    return {name: {m for m, where, _ in IMPORTS[name] if m in MODULES and m != name and where in kinds}
            for name in MODULES}


def test_type_checking_blocks_are_recognised():
    tree = ast.parse("import typing\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a\n"
                     "if typing.TYPE_CHECKING:\n    import b\nif x:\n    import c\n")
    assert [_type_checking(n) for n in tree.body] == [False, False, True, True, False]


def test_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_no_import_cycles_at_module_level():
    """(d) the imports that run on import form no cycle."""
    cycles = _cycles(_graph(module_level_only=True))
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_import_cycles_with_function_level_imports():
    """(e) with the imports inside functions too (they run when the function is first called)."""
    cycles = _cycles(_graph(module_level_only=False))
    assert not cycles, "import cycles (function-level imports included):\n" + "\n".join(" -> ".join(c) for c in cycles)


if __name__ == "__main__":                     # print the graph: python tests/test_import_graph.py
    for name in sorted(MODULES):
        deps = sorted({m + {"module": "", "function": " (in a function)", "typing": " (type checking)"}[where]
                       for m, where, _ in IMPORTS[name] if m in MODULES})
        print(name, "->", ", ".join(deps) or "-")
    pytest.main([__file__, "-q", "-n", "0"])
