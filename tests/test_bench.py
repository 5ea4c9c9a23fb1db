"""The benchmark scripts start as the README runs them: ``python bench/X.py`` from any folder."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the script must find the repo itself
    return subprocess.run([sys.executable, os.path.join(REPO, "bench", script), *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=300)


def test_sampler_bench_finds_the_project_and_rejects_an_unknown_arch(tmp_path):
    # run as a script from another folder: bench/ is first on sys.path, the project is found installed
    r = _run("sampler.py", "--arch", "nope", cwd=str(tmp_path))
    assert r.returncode != 0
    assert "--arch 'nope' is unknown; known: cpu, cpu_v1, gpu, cpu_136, cpu_r2" in r.stderr, r.stderr[-2000:]


def test_train_bench_finds_the_project_and_rejects_an_unknown_arch(tmp_path):
    r = _run("train.py", "--archs", "cpu,nope", cwd=str(tmp_path))
    assert r.returncode != 0
    assert "--archs nope unknown; known: cpu, cpu_v1, gpu, cpu_136, cpu_r2" in r.stderr, r.stderr[-2000:]


@pytest.mark.slow                 # ~1 min: a benchmark lever, not the library
def test_split_step_lever_is_the_whole_batch_step():
    # bench/train.py's SplitStep (one jitted call per micro-batch) must use the gradient the whole
    # batch gives from the same draws, or its timing is not a lever of the library's step
    import jax
    import jax.numpy as jnp
    import numpy as np
    from bench import train as bt
    from dngjax.models.unet import UNet
    module = UNet(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0, groups=4)
    params = bt.perturbed_params(module)
    s = bt.SplitStep(module, params, batch=8, micro=4)
    xt, t, noise = s.draw(s.x, s.key)
    want_loss, want = jax.value_and_grad(lambda p: jnp.mean((module.apply(p, xt, t) - noise) ** 2))(params)
    total = s.first(params, xt[:4], t[:4], noise[:4])
    total = s.add(total, params, xt[4:], t[4:], noise[4:])
    loss, grads = jax.tree.map(lambda a: a / 2, total)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    before = jax.tree.map(np.asarray, s.state["params"])
    s(2)  # whole lever steps: draws, two micro-batch calls, the update (the warm-up's first lr is 0)
    assert int(s.state["step"]) == 2
    assert any(not np.allclose(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(s.state["params"])))


def test_sd_unet_pass_bench_starts_and_rejects_an_unknown_size(tmp_path):
    r = _run("sd_unet_pass.py", "--sizes", "tiny,nope", cwd=str(tmp_path))
    assert r.returncode != 0
    assert "--sizes nope unknown; known: tiny, small, medium, narrow, full" in r.stderr, r.stderr[-2000:]
