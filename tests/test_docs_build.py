"""The documentation site builds with warnings as errors, and its API reference holds the library's names."""

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

pytest.importorskip("sphinx", reason="the docs extra is not installed (pip install -e '.[docs]')")
pytest.importorskip("myst_parser", reason="the docs extra is not installed (pip install -e '.[docs]')")
pytest.importorskip("sphinx_book_theme", reason="the docs extra is not installed (pip install -e '.[docs]')")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("docs") / "html"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
                           "-d", str(out.parent / "doctrees"), str(ROOT / "docs"), str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"sphinx failed:\n{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}"
    return out


def test_site_builds_clean(site):
    for page in ["index", "getting_started", "changelog", "samplers", "results", "api/index"]:
        assert (site / f"{page}.html").is_file(), page
    assert not (site / "runs").exists()  # the archived run records are not pages


def test_api_pages_hold_the_main_names(site):
    guidance = (site / "api" / "guidance.html").read_text()
    sampler = (site / "api" / "sampler.html").read_text()
    assert 'id="dngjax.guidance.DynamicNegativeGuidance"' in guidance
    assert 'id="dngjax.sampler.sample"' in sampler
    assert 'id="dngjax.sampler.sweep"' in sampler
    for module in ["schedules", "denoiser", "checkpoint", "evaluation", "metrics", "stable_diffusion",
                   "sd_scheduler", "q_metric", "gmm", "calibration", "memory", "data"]:
        assert f'id="module-dngjax.{module}"' in (site / "api" / f"{module}.html").read_text(), module
    models = (site / "api" / "models.html").read_text()
    assert 'id="module-dngjax.models.unet"' in models and 'id="module-dngjax.models.sd_unet"' in models


def test_every_top_level_name_links_to_its_documentation(site):
    import dngjax
    page = (site / "api" / "dngjax.html").read_text()
    for name in dir(dngjax):
        obj = getattr(dngjax, name)
        if name.startswith("_") or isinstance(obj, types.ModuleType) or not hasattr(obj, "__module__"):
            continue
        target = f"#{obj.__module__}.{obj.__qualname__}"
        assert target in page, f"docs/api/dngjax.md lacks a resolved link to dj.{name} ({target})"
