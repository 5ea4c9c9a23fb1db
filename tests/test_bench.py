"""The benchmark scripts start as the README runs them: ``python bench/X.py`` from any folder."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the script must find the repo itself
    return subprocess.run([sys.executable, os.path.join(REPO, "bench", script), *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=300)


def test_sampler_bench_finds_the_project_and_rejects_an_unknown_arch(tmp_path):
    # run as a script, bench/ comes first on sys.path and bench/train.py would shadow the train package
    r = _run("sampler.py", "--arch", "nope", cwd=str(tmp_path))
    assert r.returncode != 0
    assert "--arch 'nope' is unknown; known: cpu, cpu_v1, gpu, cpu_136, cpu_r2" in r.stderr, r.stderr[-2000:]


def test_train_bench_finds_the_project_and_rejects_an_unknown_arch(tmp_path):
    r = _run("train.py", "--archs", "cpu,nope", cwd=str(tmp_path))
    assert r.returncode != 0
    assert "--archs nope unknown; known: cpu, cpu_v1, gpu, cpu_136, cpu_r2" in r.stderr, r.stderr[-2000:]
