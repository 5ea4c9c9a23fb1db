"""No function over 60 lines outside configs: the project's rule, checked by parsing (ast only, nothing imported).

A function's length is ``end_lineno - lineno + 1`` of its ``def`` (its docstring and any functions nested in it
included); files under a ``configs/`` folder are exempt.
"""

import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOTS = ("dngjax", "train", "sample", "experiments", "bench")
MAX_LINES = 60


def _python_files():
    """Paths (relative to the repository) of the .py files under ROOTS, those under a configs/ folder left out."""
    for root in ROOTS:
        for folder, _, names in os.walk(os.path.join(REPO, root)):
            for name in sorted(names):
                path = os.path.relpath(os.path.join(folder, name), REPO).replace(os.sep, "/")
                if name.endswith(".py") and "/configs/" not in f"/{path}":
                    yield path


def _long_functions(path):
    """(line, name, length) of each function of ``path`` longer than MAX_LINES."""
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_LINES:
                yield node.lineno, node.name, length


def test_no_function_over_60_lines():
    files = list(_python_files())
    assert any(p.startswith("dngjax/") for p in files)
    long = [f"{path}:{line} {name} {length}" for path in files for line, name, length in _long_functions(path)]
    assert not long, (f"{len(long)} function(s) over {MAX_LINES} lines (split them into helpers):\n"
                      + "\n".join(long))
