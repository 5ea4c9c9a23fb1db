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
    np.testing.assert_allclose(s.beta_tildes[1:], b[1:] * (1 - ab[:-1]) / (1 - ab[1:]), rtol=1e-5)
    assert float(s.beta_tildes[0]) == 0.0
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
    np.testing.assert_allclose(r.beta_tildes[1:],
                               np.asarray(r.betas[1:]) * (1 - ab[:-1]) / (1 - ab[1:]), rtol=1e-4)
    full = dj.respace(s, 1000)
    np.testing.assert_allclose(full.betas, s.betas, rtol=1e-5)


def test_schedule_is_a_pytree():
    r = dj.respace(dj.linear_schedule(), 10)
    leaves = jax.tree.leaves(r)
    assert len(leaves) == 8
    doubled = jax.jit(lambda s: s.betas * 2)(r)
    np.testing.assert_allclose(doubled, 2 * np.asarray(r.betas))


@pytest.mark.parametrize("n", [0, 1001])
def test_respace_range(n):
    with pytest.raises(ValueError, match="num_steps"):
        dj.respace(dj.linear_schedule(), n)


@pytest.mark.parametrize("name,make", [("scaled_linear", dj.scaled_linear_schedule),
                                       ("squaredcos_cap_v2", dj.cosine_schedule), ("linear", dj.linear_schedule)])
def test_schedules_match_diffusers(name, make):
    """Stable Diffusion's scaled_linear and the cosine schedule, against diffusers' DDPMScheduler (test-only)."""
    diffusers = pytest.importorskip("diffusers")
    kw = {"beta_start": 0.00085, "beta_end": 0.012} if name == "scaled_linear" else {}
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=name, **kw)
    s = make()
    np.testing.assert_allclose(s.betas, ref.betas.numpy(), rtol=2e-6, atol=1e-9)
    np.testing.assert_allclose(s.alpha_bars, ref.alphas_cumprod.numpy(), rtol=2e-5, atol=1e-9)


def test_cosine_schedule_formula():
    """Nichol & Dhariwal eq. 17: alpha_bar_t = f(t)/f(0) (before the beta cap), written out in float64."""
    T, s = 1000, 0.008
    f = lambda t: np.cos((t / T + s) / (1 + s) * np.pi / 2) ** 2
    ab = f(np.arange(1, T + 1)) / f(0)
    got = np.asarray(dj.cosine_schedule(T).alpha_bars, np.float64)
    np.testing.assert_allclose(got[:990], ab[:990], rtol=1e-5)       # the cap (beta <= 0.999) acts at the end
    assert float(dj.cosine_schedule(T).betas[-1]) == pytest.approx(0.999)


def test_schedule_from_betas_and_alpha_bars_round_trip():
    s = dj.cosine_schedule(200)
    b = np.asarray(dj.schedule_from_betas(np.asarray(s.betas)).betas)
    np.testing.assert_allclose(b, s.betas, rtol=1e-6)
    ab = np.cumprod(1 - np.linspace(1e-4, 0.02, 300))
    r = dj.schedule_from_alpha_bars(ab)
    np.testing.assert_allclose(r.alpha_bars, ab, rtol=1e-5)
    np.testing.assert_allclose(r.betas, np.linspace(1e-4, 0.02, 300), rtol=1e-5)
    for bad, match in [([0.1, 1.0], "betas must lie"), ([[0.1]], "1-D"), ([], "1-D")]:
        with pytest.raises(ValueError, match=match):
            dj.schedule_from_betas(bad)
    with pytest.raises(ValueError, match="strictly decreasing"):
        dj.schedule_from_alpha_bars([0.9, 0.95])


@pytest.mark.parametrize("make", [dj.cosine_schedule, dj.scaled_linear_schedule])
def test_respace_is_exact_on_every_schedule(make):
    """A respaced chain keeps alpha_bar at its timesteps (so the marginals), on every schedule."""
    s = make()
    for n in (7, 50, 333):
        r = dj.respace(s, n)
        ts = np.asarray(r.timesteps)
        np.testing.assert_allclose(r.alpha_bars, np.asarray(s.alpha_bars)[ts], rtol=2e-5, atol=1e-12)
        np.testing.assert_allclose(r.one_minus_alpha_bars, np.asarray(s.one_minus_alpha_bars)[ts], rtol=2e-6)


def test_one_minus_alpha_bar_is_float64_accurate_near_t0():
    """1 - alpha_bar is stored from float64: near t = 0, 1 - float32(alpha_bar) would be ~1.7e-4 off."""
    s = dj.linear_schedule()
    b = np.linspace(1e-4, 0.02, 1000)
    exact = 1 - np.cumprod(1 - b)
    np.testing.assert_allclose(s.one_minus_alpha_bars, exact, rtol=1e-6)
    np.testing.assert_allclose(s.one_minus_alpha_bars_prev[1:], exact[:-1], rtol=1e-6)
    naive = 1.0 - np.asarray(s.alpha_bars, np.float32)
    assert abs(naive[0] / exact[0] - 1) > 1e-5          # what the float64 field avoids


def test_spaced_timesteps_are_diffusers_schedulers_timesteps():
    """linspace / leading / trailing, steps_offset 0 and 1, against diffusers' own set_timesteps."""
    diffusers = pytest.importorskip("diffusers")
    cases = [(diffusers.DDIMScheduler, False, ("linspace", "leading", "trailing")),
             (diffusers.DDPMScheduler, False, ("linspace", "leading", "trailing")),
             (diffusers.DPMSolverMultistepScheduler, True, ("linspace", "leading", "trailing")),
             (diffusers.EulerDiscreteScheduler, False, ("leading", "trailing"))]
    for cls, multistep, spacings in cases:
        for spacing in spacings:
            for offset in (0, 1):
                for n in (7, 25, 50, 333):
                    sch = cls(num_train_timesteps=1000, timestep_spacing=spacing, steps_offset=offset)
                    sch.set_timesteps(n)
                    ours = dj.spaced_timesteps(1000, n, spacing, offset, multistep=multistep)
                    np.testing.assert_array_equal(ours, sch.timesteps.numpy().astype(np.int64),
                                                  err_msg=f"{cls.__name__} {spacing} offset {offset} n {n}")
    with pytest.raises(ValueError, match="spacing must be one of"):
        dj.spaced_timesteps(1000, 10, "karras")
    with pytest.raises(ValueError, match="outside"):
        dj.spaced_timesteps(1000, 10, "leading", steps_offset=200)
