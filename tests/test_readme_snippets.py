"""The README's library examples run verbatim (tiny analytic models)."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _block_after(heading: str) -> str:
    text = open(os.path.join(ROOT, "README.md")).read()
    start = text.index(heading)
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


def test_beyond_the_paper_block_runs_as_written():
    code = _block_after("### Beyond the paper's setting")
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    cal = scope["cal"]
    assert scope["x"].shape == (256, 2) and cal.rate.shape == (4,) and cal.rate[-1] <= cal.rate[0] < 0.35
