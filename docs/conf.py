"""Sphinx configuration of the dngjax documentation (Sphinx + MyST, as optax, flax and chex do).

Build (warnings are errors: broken links, cross-references and MyST problems fail the build)::

    pip install -e ".[docs]"
    python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

import os
import sys

# the checkout's package, also when it is not installed
sys.path.insert(0, os.path.abspath(".."))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # importing the modules for autodoc needs no accelerator

import dngjax  # noqa: E402

project = "dngjax"
author = "dngjax contributors"
copyright = "2026, dngjax contributors"
version = release = dngjax.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",   # the docstrings use Google style (Args: / Returns:)
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"

# docs/runs/: archived run records (JSON, NPZ and their READMEs), read by the tools and linked as
# files, not pages; _build: the output
exclude_patterns = ["_build", "runs/**", "**/README.md", "Thumbs.db", ".DS_Store"]

# MyST: "#some-heading" links resolve against headings down to level 4
myst_heading_anchors = 4
myst_enable_extensions = ["dollarmath", "colon_fence"]

# autodoc: members in source order, signatures without the type hints' noise in the heading
autodoc_default_options = {"members": True, "member-order": "bysource", "show-inheritance": False}
autodoc_typehints = "description"
autodoc_typehints_format = "short"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

html_theme = "sphinx_book_theme"
html_title = "dngjax"
html_theme_options = {"show_toc_level": 2}


# --- the docstrings as reStructuredText --------------------------------------------------------
# The library's docstrings are written as plain text with a few reST constructs (``code``, :func:`x`,
# Google-style Args:/Returns:, "::" literal blocks). Their formulas use * and | (|x|^2, *shape) and
# indented lines (a formula under its sentence, "  * item" lists), which reST would read as emphasis,
# substitutions and unexpected block quotes. Before napoleon reads them, this hook escapes * and |
# outside inline literals, roles and **strong**, and separates a change of indentation by a blank line (the
# indented lines become a block quote). "::" literal blocks are left as written; Google sections keep their layout (only escaped).

import re  # noqa: E402

_SECTION = re.compile(r"^(\s*)(Args|Arguments|Parameters|Returns|Return|Raises|Yields|Yield|Attributes|"
                      r"Example|Examples|Note|Notes|Warning|Warns|Keyword Args|Other Parameters|"
                      r"References|See Also|Todo):\s*$")
_BULLET = re.compile(r"^(\s*)([*+-]|\d+[.)])\s+")
# kept as written: ``literals``, :roles:`...`, `interpreted text`, **strong**
_INLINE = re.compile(r"(``.+?``|:[\w:.-]+:`[^`]+`|`[^`]+`_{0,2}|\*\*\w[^*\n]*?\w\*\*)", re.DOTALL)


def _indent(line):
    return len(line) - len(line.lstrip())


def _content_indent(line):
    bullet = _BULLET.match(line)
    return bullet.end() if bullet else _indent(line)


def _escape(text):
    parts = _INLINE.split(text)
    for i in range(0, len(parts), 2):  # the even parts lie outside inline literals and roles
        out = []
        for line in parts[i].split("\n"):
            bullet = _BULLET.match(line) if line.lstrip().startswith("*") else None
            head, rest = (line[:bullet.end()], line[bullet.end():]) if bullet else ("", line)
            out.append(head + re.sub(r"(?<!\\)([*|])", r"\\\1", rest))
        parts[i] = "\n".join(out)
    return "".join(parts)


def _rest_docstring(lines):
    """Plain-text docstring lines -> lines that docutils reads without warnings (see above)."""
    # 1. classify: verbatim (literal blocks, Google sections) or text
    kinds, block_indent, mode = [], None, None
    for line in lines:
        blank = not line.strip()
        if mode and not blank and _indent(line) <= block_indent:
            mode = None
        if mode:
            kinds.append(mode)
            continue
        section = _SECTION.match(line)
        if section:
            mode, block_indent = "section", _indent(line)
            kinds.append("section")
        else:
            kinds.append("text")
            if line.rstrip().endswith("::"):
                mode, block_indent = "literal", _indent(line)
    # 2. escape * and | in runs of text lines; blank lines before a change of indentation
    out, i = [], 0
    while i < len(lines):
        j = i
        while j < len(lines) and kinds[j] == kinds[i]:
            j += 1
        run = lines[i:j]
        if kinds[i] == "literal":
            if run and run[0].strip():
                out.append("")
            out.extend(run)
        elif kinds[i] == "section":  # napoleon reads their layout; * and | escaped in them too
            out.extend(_escape("\n".join(run)).split("\n"))
        else:
            run = _escape("\n".join(run)).split("\n")
            previous = None
            for line in run:
                if line.strip() and previous is not None and previous.strip():
                    if _indent(line) != _content_indent(previous) and not (
                            _BULLET.match(line) and _indent(line) == _indent(previous)):
                        out.append("")
                out.append(line)
                previous = line
        i = j
    return out


def _process_docstring(app, what, name, obj, options, lines):
    lines[:] = _rest_docstring(lines)


def _top_level_alias(app, env, node, contnode):
    """:func:`dngjax.sweep` (a name of ``import dngjax as dj``) -> its documentation in its module."""
    target = node.get("reftarget", "")
    if node.get("refdomain") != "py" or not target.startswith("dngjax.") or target.count(".") != 1:
        return None
    obj = getattr(dngjax, target.split(".", 1)[1], None)
    module = getattr(obj, "__module__", None)
    if not module or module == "dngjax" or not hasattr(obj, "__qualname__"):
        return None
    return env.get_domain("py").resolve_xref(env, node["refdoc"], app.builder, node["reftype"],
                                             f"{module}.{obj.__qualname__}", node, contnode)


def setup(app):
    app.connect("missing-reference", _top_level_alias)
    # before napoleon (priority 500), which turns the Google sections into fields
    app.connect("autodoc-process-docstring", _process_docstring, priority=400)
