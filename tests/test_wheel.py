"""The built wheel installs the ``dngjax`` namespace only, and its commands work from any folder.

The wheel is built from this checkout (``pip wheel --no-deps --no-build-isolation``), installed with
``pip install --no-deps --target`` into a temporary folder, and run from another empty folder with only
that folder (and the environment's dependencies) on the path: no checkout to fall back on.
"""

import os
import subprocess
import sys
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    base = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(base / "dist"), REPO], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = (base / "dist").glob("dngjax-*.whl")
    target = base / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                        str(wheel)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    elsewhere = base / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(target), JAX_PLATFORMS="cpu")
    return wheel, target, elsewhere, env


def test_wheel_holds_the_dngjax_namespace_only(installed):
    wheel, *_ = installed
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        entry_points = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"dngjax"}, sorted(top)
    # the tools and their configurations travel with it
    for module in ("dngjax/tools/train/trainer.py", "dngjax/tools/sample/class_removal.py",
                   "dngjax/tools/gmm_lab/samplers.py", "dngjax/tools/train/configs/mnist_ddpm.py",
                   "dngjax/tools/sample/configs/mnist.py", "dngjax/tools/sample/configs/sd.py"):
        assert module in names, module
    for command, target in (("dngjax-train", "dngjax.tools.train.main:cli_main"),
                            ("dngjax-sample", "dngjax.tools.sample.main:cli_main"),
                            ("dngjax-export", "dngjax.tools.train.export:cli_main"),
                            ("dngjax-gmm", "dngjax.tools.gmm_lab.__main__:cli_main")):
        assert f"{command} = {target}" in entry_points, entry_points


def _run(installed, *args, timeout=300):
    _, target, elsewhere, env = installed
    return subprocess.run([sys.executable, *args], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_installed_package_is_the_wheel_not_the_checkout(installed):
    _, target, _, _ = installed
    r = _run(installed, "-c", "import dngjax, dngjax.tools.sample.class_removal as c; print(dngjax.__file__)")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().startswith(str(target)), r.stdout


@pytest.mark.parametrize("command", ["dngjax-train", "dngjax-sample", "dngjax-export", "dngjax-gmm"])
def test_installed_commands_answer_help_from_any_folder(installed, command):
    _, target, _, _ = installed
    script = target / "bin" / command
    assert script.exists(), sorted(os.listdir(target / "bin"))
    r = _run(installed, str(script), "--help")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--" in r.stdout


def test_installed_train_finds_the_packaged_config_by_its_checkout_path(installed):
    """``--config=train/configs/mnist_ddpm.py:cpu`` from a folder without it: the package's copy is used
    (its validation then refuses the bad field, before anything is built)."""
    _, target, elsewhere, _ = installed
    r = _run(installed, str(target / "bin" / "dngjax-train"), "--config=train/configs/mnist_ddpm.py:cpu",
             f"--workdir={elsewhere / 'w'}", "--config.num_train_steps=0")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "config.num_train_steps must be >= 1" in r.stderr, r.stderr[-2000:]
    assert not (elsewhere / "w").exists()


def test_installed_sample_without_a_checkout_names_the_missing_models(installed):
    """The shipped MNIST models live in the checkout, not in the wheel: the main job says so at once."""
    _, target, elsewhere, _ = installed
    r = _run(installed, str(target / "bin" / "dngjax-sample"))
    assert r.returncode == 2, r.stderr[-2000:]
    assert "checkpoints/mnist" in r.stderr and "--config.checkpoints" in r.stderr, r.stderr[-2000:]
