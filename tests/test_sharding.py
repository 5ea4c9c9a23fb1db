"""sweep() and sample() shard the seed axis over several devices (4 forced host devices in a subprocess)."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import numpy as np, jax, jax.numpy as jnp
    import dngjax as dj
    assert jax.device_count() == 4, jax.devices()
    def eps_u(x, t): return 0.3 * jnp.tanh(x) + 0.1
    def eps_c(x, t): return 0.3 * jnp.tanh(x - 0.5)
    sched = dj.respace(dj.linear_schedule(), 8)
    keys = dj.keys_from_seeds(np.arange(10))
    rule = dj.DynamicNegativeGuidance(1.0, prior=0.3, temperature=0.25)
    x = dj.sweep(eps_u, sched, keys, (3,), rule=rule, grid={"scale": [0.0, 2.0]}, denoiser_c=eps_c, chunk_size=6)
    assert x.shape == (2, 10, 3)
    # the compiled sweep really spreads a chunk's seeds over the 4 devices
    from dngjax import sampler as S
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    kc = jax.device_put(keys[:8], NamedSharding(Mesh(np.asarray(jax.devices()), ("n",)), PartitionSpec("n")))
    out = S._grid_jit(dj.as_denoiser(eps_u), dj.as_denoiser(eps_c), S.grid_rules(rule, {"scale": [0.0, 2.0]})[0],
                      sched, kc, (3,), False, "beta", None, ("scale",))[0]
    assert len(out.sharding.device_set) == 4, out.sharding
    # sample() is the same loop: chunked and sharded, equal to the sweep's point
    xs = dj.sample(eps_u, sched, keys, (3,), rule=rule.replace(scale=2.0), denoiser_c=eps_c, chunk_size=6)
    np.testing.assert_allclose(xs, x[1], rtol=1e-5, atol=1e-5)
    for k, s in enumerate([0.0, 2.0]):
        for n in (0, 7, 9):
            ref = dj.sample(eps_u, sched, keys[n:n+1], (3,), rule=rule.replace(scale=s), denoiser_c=eps_c)
            np.testing.assert_allclose(x[k, n], np.asarray(ref)[0], rtol=1e-5, atol=1e-5)
    print("SHARDED-OK")
""")


def test_sweep_shards_over_four_host_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "SHARDED-OK" in res.stdout, res.stderr[-3000:]
