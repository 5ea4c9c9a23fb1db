import numpy as np
import pytest
import jax

import dngjax as dj


def test_linear_schedule_values():
    s = dj.linear_schedule()
    assert s.num_steps == 1000
    b = np.linspace(1e-4, 0.02, 1000)
    np.testing.assert_allclose(s.betas, b, rtol=1e-6)
    ab = np.cumprod(1 - b)
    np.testing.assert_allclose(s.alpha_bars, ab, rtol=1e-5)
    np.testing.assert_allclose(s.posterior_variances[1:], b[1:] * (1 - ab[:-1]) / (1 - ab[1:]), rtol=1e-5)
    assert float(s.posterior_variances[0]) == 0.0
    np.testing.assert_array_equal(s.timesteps, np.arange(1000))


def test_respace_keeps_marginals_and_indices():
    s = dj.linear_schedule()
    r = dj.respace(s, 50)
    assert r.num_steps == 50
    ts = np.asarray(r.timesteps)
    assert ts[0] == 0 and ts[-1] == 999 and np.all(np.diff(ts) > 0)
    np.testing.assert_allclose(r.alpha_bars, np.asarray(s.alpha_bars)[ts], rtol=1e-5)
    # beta'_i = 1 - abar_{tau_i} / abar_{tau_{i-1}}
    ab = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[ts]
    np.testing.assert_allclose(r.betas[1:], 1 - ab[1:] / ab[:-1], rtol=1e-4)
    np.testing.assert_allclose(r.posterior_variances[1:],
                               np.asarray(r.betas[1:]) * (1 - ab[:-1]) / (1 - ab[1:]), rtol=1e-4)
    full = dj.respace(s, 1000)
    np.testing.assert_allclose(full.betas, s.betas, rtol=1e-5)


def test_schedule_is_a_pytree():
    r = dj.respace(dj.linear_schedule(), 10)
    leaves = jax.tree.leaves(r)
    assert len(leaves) == 6
    doubled = jax.jit(lambda s: s.betas * 2)(r)
    np.testing.assert_allclose(doubled, 2 * np.asarray(r.betas))


@pytest.mark.parametrize("n", [0, 1001])
def test_respace_range(n):
    with pytest.raises(ValueError, match="num_steps"):
        dj.respace(dj.linear_schedule(), n)
