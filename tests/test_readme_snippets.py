"""The README's and the library page's examples run verbatim (tiny analytic models) and print what they show."""

import contextlib
import io
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _blocks_after(path: str, heading: str, lang: str = "python", n: int = 1):
    text = open(os.path.join(ROOT, path)).read()
    start = text.index(heading)
    return re.findall(rf"```{lang}\n(.*?)```", text[start:], re.S)[:n]


def test_readme_example_runs_and_prints_what_the_readme_shows():
    code, = _blocks_after("README.md", "## Guide your own model")
    text = open(os.path.join(ROOT, "README.md")).read()
    shown = re.search(r"prints\n\n```text\n(.*?)```", text[text.index("## Guide your own model"):], re.S).group(1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    assert out.getvalue() == shown


def test_library_page_beyond_the_paper_block_runs_as_written():
    code, = _blocks_after("docs/library.md", "## Beyond the paper's setting")
    scope = {}
    exec(compile(code, "docs/library.md", "exec"), scope)
    cal = scope["cal"]
    assert scope["x"].shape == (256, 2) and cal.rate.shape == (4,) and cal.rate[-1] <= cal.rate[0] < 0.35
