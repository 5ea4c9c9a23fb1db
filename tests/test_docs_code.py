"""Every code block of README.md and docs/*.md runs, at tiny sizes, or says in the page why it does not.

The blocks are found with markdown-it (the parser MyST renders the site with), so an indented code
block counts as much as a fenced one. Each block is one of:

* ```` ```python ````: run. The python blocks of one page run in order in one namespace, in a
  subprocess with a timeout, from a scratch folder that links the checkout's folders (so relative
  paths such as ``checkpoints/mnist`` work and outputs land in the scratch folder). The table
  ``PYTHON_SUBS`` shrinks the sizes of some pages, ``SLOW_PAGES`` run only with ``-m slow``, and the
  blocks of ``RUN_ELSEWHERE`` are run (and their output checked) by another test.
* ```` ```bash ```` / ```` ```console ```` / ```` ```sh ````: run with ``bash -e`` from such a
  folder, after the substitutions of its entry in the table ``SHELL`` (tiny sizes); an unmarked
  shell block must have an entry there.
* a block whose first line is ``# not run in CI: <why>`` (python or shell): not run; the reason is
  shown on the page.
* ```` ```text ````: what a command prints, or a formula: not code.
* a MyST directive (```` ```{toctree} ````).

A block that is none of these (an unmarked shell block without an entry, an indented block, a fence
without a language) fails ``test_every_block_is_run_or_marked``, so a new block must choose.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

markdown_it = pytest.importorskip("markdown_it", reason="the docs extra is not installed (pip install -e '.[docs]')")

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))
MARK = "# not run in CI:"
PYTHON, SHELLS, TEXT = {"python"}, {"bash", "console", "sh"}, {"text"}

TINY_UNET = ("unet = mnist_unet()", "unet = mnist_unet(ch=4, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), groups=2)")
# page -> [(old, new)]: tiny sizes for the python blocks of a page (each `old` must occur)
PYTHON_SUBS = {
    "docs/getting_started.md": [TINY_UNET],
    "docs/gmm.md": [("np.arange(10_000)", "np.arange(500)")],
    "docs/library.md": [TINY_UNET, ("dj.respace(dj.linear_schedule(), 50)", "dj.respace(dj.linear_schedule(), 5)"),
                        ("np.arange(16)", "np.arange(4)"), ("chunk_size=8", "chunk_size=2")],
}
# pages whose python blocks run only with -m slow, to keep the default run near 90 s on a busy 2-core
# machine: getting_started's examples are library.md's UNet sweep and README's analytic one, which the
# default run covers
SLOW_PAGES = {"docs/getting_started.md"}
# (page, a line of the block) -> the test that runs that python block already (verbatim, checking
# what it prints or computes); the block is not run again here
RUN_ELSEWHERE = {
    ("README.md", "for s, xs in zip(scales, x):"): "tests/test_readme_snippets.py",
    ("docs/library.md", "# the smallest scale of a grid whose 95 % upper bound on the unwanted rate is <= 1 % (one sweep)"):
        "tests/test_readme_snippets.py",
}

# (page, first command line of the block) -> {"subs": [(old, new)], "slow": bool}
SHELL = {
    ("docs/calibration.md", "python sample/main.py --job=calibrate"): {
        "subs": [("--config.n=1024", "--config.n=8 --config.steps=4")], "slow": True},
    ("docs/multi_concept.md", "python sample/main.py --config.conditional"): {
        "subs": [("--config.n=256 --config.steps=100", "--config.n=8 --config.steps=4")], "slow": True},
    ("docs/results.md", "python sample/main.py --job=summary"): {"subs": [], "slow": False},
    ("docs/results.md", "python sample/main.py --job=posterior_check"): {
        "subs": [("--classes=0,1,2,3", "--classes=0"), ("--classes=0,2", "--classes=0"),
                 ("--config.n=256", "--config.n=8 --config.steps=4")], "slow": True},
    ("docs/training.md", "python train/main.py --config=train/configs/mnist_ddpm.py:cpu"): {
        "subs": [(".py:cpu ", ".py:tiny ")], "slow": True},
    ("docs/samplers.md", "python sample/main.py --config=sample/configs/mnist.py:fewstep"): {
        "subs": [("--config.removed_class=C", "--config.removed_class=0 --config.n=8 --config.steps=4"),
                 ("class_C", "class_0"), ("--classes=0,1,2,3", "--classes=0"),
                 ("--config.n=256", "--config.n=8 --config.steps=4")], "slow": True},
}


def _blocks(page):
    """(line, kind, info, code) of every code block of a page, kind 'fence' or 'code_block'."""
    md = markdown_it.MarkdownIt("commonmark")
    out = []
    for tok in md.parse((ROOT / page).read_text()):
        if tok.type in ("fence", "code_block"):
            info = tok.info.strip().split()[0] if tok.info.strip() else ""
            out.append((tok.map[0] + 1, tok.type, info, tok.content))
    return out


def _first_command(code):
    return next(line.strip() for line in code.splitlines() if line.strip() and not line.lstrip().startswith("#"))


def _marked(code):
    return code.lstrip().startswith(MARK)


def _elsewhere(page, code):
    return any(p == page and line in code.splitlines() for p, line in RUN_ELSEWHERE)


def _python_blocks(page):
    """(where, code) of the python blocks of a page that this test runs."""
    return [(f"{page}:{line}", code) for line, kind, info, code in _blocks(page)
            if kind == "fence" and info in PYTHON and not _marked(code) and not _elsewhere(page, code)]


def _shell_entry(page, code):
    first = _first_command(code)
    hits = [v for (p, prefix), v in SHELL.items() if p == page and first.startswith(prefix)]
    return hits[0] if hits else None


def _substitute(code, subs, where):
    for old, new in subs:
        assert old in code, f"{where}: the test substitutes {old!r}, which the block no longer holds"
        code = code.replace(old, new)
    return code


def _scratch(tmp_path):
    """A folder of links to the checkout's top-level entries (outputs/ and workdir/ stay in it)."""
    for entry in ROOT.iterdir():
        if entry.name not in {"outputs", "workdir", ".git", ".venv"}:
            (tmp_path / entry.name).symlink_to(entry)
    return tmp_path


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), MPLBACKEND="Agg",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    env.setdefault("DNGJAX_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    return env


def test_every_block_is_run_or_marked():
    for page, line in RUN_ELSEWHERE:
        assert any(line in code.splitlines() for _, _, _, code in _blocks(page)), \
            f"{page}: no block holds the line {line!r} that RUN_ELSEWHERE names"
    problems = []
    for page in PAGES:
        for line, kind, info, code in _blocks(page):
            where = f"{page}:{line}"
            if kind == "code_block":
                problems.append(f"{where}: an indented code block; fence it with a language (python, bash, text)")
            elif info.startswith("{") or info in TEXT or info in PYTHON:
                continue
            elif info in SHELLS:
                if not _marked(code) and _shell_entry(page, code) is None:
                    problems.append(f"{where}: a shell block neither in this test's SHELL table nor marked "
                                    f"'{MARK} <why>'")
            else:
                problems.append(f"{where}: fence language {info!r}; use python, bash or text (output)")
    assert not problems, "\n".join(problems)


_DRIVER = textwrap.dedent("""
    import sys, time
    pages = {pages!r}
    for page, blocks in pages:
        scope = {{"__name__": "__main__"}}  # one namespace per page
        t0 = time.time()
        for where, code in blocks:
            print("### " + where, flush=True)
            exec(compile(code, where, "exec"), scope)
        print(f"--- {{page}}: {{time.time() - t0:.1f}} s", flush=True)
""")


def _run_python_pages(pages, tmp_path):
    """Runs the python blocks of the pages in one subprocess (one interpreter start), a namespace per page."""
    todo = []
    for page in pages:
        blocks = _python_blocks(page)
        subs = PYTHON_SUBS.get(page, [])
        joined = "\n".join(code for _, code in blocks)
        for old, _ in subs:
            assert old in joined, f"{page}: the test substitutes {old!r}, which no block holds"
        todo.append((page, [(where, _substitute(code, [(o, n) for o, n in subs if o in code], where))
                            for where, code in blocks]))
    proc = subprocess.run([sys.executable, "-c", _DRIVER.format(pages=todo)], cwd=_scratch(tmp_path),
                          env=_env(), capture_output=True, text=True, timeout=900)
    print(proc.stdout)
    assert proc.returncode == 0, f"a block failed (the last ### line names it)\n{proc.stdout[-3000:]}\n" \
                                 f"{proc.stderr[-5000:]}"


def _python_pages():
    return [page for page in PAGES if _python_blocks(page)]


def test_python_blocks_run(tmp_path):
    _run_python_pages([page for page in _python_pages() if page not in SLOW_PAGES], tmp_path)


@pytest.mark.slow
def test_python_blocks_of_the_slow_pages_run(tmp_path):
    pages = [page for page in _python_pages() if page in SLOW_PAGES]
    if not pages:
        pytest.skip("no slow pages")
    _run_python_pages(pages, tmp_path)


def _shell_blocks():
    params = []
    for page in PAGES:
        for line, kind, info, code in _blocks(page):
            if kind == "fence" and info in SHELLS and not _marked(code):
                entry = _shell_entry(page, code)
                if entry is None:
                    continue  # reported by test_every_block_is_run_or_marked
                marks = [pytest.mark.slow] if entry["slow"] else []
                params.append(pytest.param(page, line, marks=marks, id=f"{page}:{line}"))
    return params


@pytest.mark.parametrize("page,line", _shell_blocks())
def test_shell_blocks_run(page, line, tmp_path):
    code = next(c for ln, _, _, c in _blocks(page) if ln == line)
    code = _substitute(code, _shell_entry(page, code)["subs"], f"{page}:{line}")
    proc = subprocess.run(["bash", "-e", "-c", code], cwd=_scratch(tmp_path), env=_env(), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"{page}:{line} failed\n{code}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
