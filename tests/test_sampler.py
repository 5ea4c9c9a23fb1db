
from typing import Any, Callable, NamedTuple

import chex
import numpy as np
import pytest
import jax
import jax.numpy as jnp

import dngjax as dj
from dngjax import sampler as sampler_mod
from tests.oracle import sample_numpy
from compile_count import count_compiles

SHAPE = (3, 2)


# Two smooth, non-linear, time-dependent "networks" (numpy and jax twins).
def _eps_u_np(x, t):
    return 0.3 * np.tanh(x) + 1e-3 * t * 0.05 + 0.1


def _eps_c_np(x, t):
    return 0.3 * np.tanh(x - 0.5) - 0.02 * np.sin(x) + 1e-4 * t


def eps_u(x, t):
    return 0.3 * jnp.tanh(x) + 1e-3 * t.reshape(-1, 1, 1) * 0.05 + 0.1


def eps_c(x, t):
    return 0.3 * jnp.tanh(x - 0.5) - 0.02 * jnp.sin(x) + 1e-4 * t.reshape(-1, 1, 1)


@pytest.fixture(scope="module")
def schedule():
    return dj.respace(dj.linear_schedule(), 25)


CASES = [
    ("none", dj.NoGuidance(), {}),
    ("np", dj.NegativePrompting(0.7), {"scale": 0.7}),
    ("cfg", dj.ClassifierFreeGuidance(1.5), {"scale": 1.5}),
    ("sld", dj.SafeLatentDiffusion(0.6, warmup=3),
     {"scale": 0.6, "threshold": 0.04, "s_s": 100.0, "beta_m": 0.2, "s_m": 0.1, "warmup": 3}),
    ("dng", dj.DynamicNegativeGuidance(3.0, prior=0.3, temperature=0.25, offset=1e-4),
     {"scale": 3.0, "prior": 0.3, "temperature": 0.25, "offset": 1e-4, "update_variance": "beta_tilde"}),
    ("dng", dj.DynamicNegativeGuidance(3.0, prior=0.3, temperature=0.25, offset=1e-4, update_variance="beta"),
     {"scale": 3.0, "prior": 0.3, "temperature": 0.25, "offset": 1e-4, "update_variance": "beta"}),
]


@pytest.mark.parametrize("method,rule,hp", CASES, ids=[c[0] + "-" + c[2].get("update_variance", "") for c in CASES])
def test_scan_matches_numpy_loop(schedule, method, rule, hp):
    keys = dj.keys_from_seeds(np.arange(4))
    x, tr = dj.sample(eps_u, schedule, keys, SHAPE, rule=rule, denoiser_c=eps_c, return_trace=True)
    x_ref, lam_ref, p_ref = sample_numpy(_eps_u_np, _eps_c_np, schedule, keys, SHAPE, method, hp)
    np.testing.assert_allclose(np.asarray(x), x_ref, rtol=1e-4, atol=1e-4)
    lam, p = np.asarray(tr.lam), np.asarray(tr.p)
    if method == "dng":
        # The last update divides by beta_tilde of the second-to-last step (~1e-5 on this chain),
        # which amplifies float32 rounding of x ~5e4-fold: compare that row at 2e-3, the rest at 1e-4.
        np.testing.assert_allclose(lam[:-1], lam_ref[:-1], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(p[:-1], p_ref[:-1], rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(lam[-1], lam_ref[-1], rtol=2e-3)
        np.testing.assert_allclose(p[-1], p_ref[-1], rtol=2e-3)
        assert np.ptp(p_ref) > 0.05, "the posterior must actually move for this test to mean something"
    else:
        np.testing.assert_allclose(lam, lam_ref, rtol=1e-4, atol=1e-5)
        assert np.all(np.isnan(p))
    if method == "sld":
        assert 0 < np.mean(lam_ref[3:] > 0) and lam_ref[:3].max() == 0.0


@pytest.mark.parametrize("method,rule,hp", [CASES[0], CASES[4]], ids=["none", "dng"])
def test_beta_tilde_noise_matches_numpy_loop(schedule, method, rule, hp):
    """noise="beta_tilde": sigma_t^2 = beta_tilde_t in the step, against the numpy loop."""
    keys = dj.keys_from_seeds(np.arange(4))
    x = dj.sample(eps_u, schedule, keys, SHAPE, rule=rule, denoiser_c=eps_c, noise="beta_tilde")
    x_ref = sample_numpy(_eps_u_np, _eps_c_np, schedule, keys, SHAPE, method, dict(hp, noise="beta_tilde"))[0]
    np.testing.assert_allclose(np.asarray(x), x_ref, rtol=1e-4, atol=1e-4)
    x_beta = sample_numpy(_eps_u_np, _eps_c_np, schedule, keys, SHAPE, method, hp)[0]
    assert np.abs(x_ref - x_beta).max() > 1e-2, "the two variances must give different samples"
    xs = dj.sweep(eps_u, schedule, keys, SHAPE, rule=dj.NegativePrompting(0.0), grid={"scale": [0.0, 0.7]},
                  denoiser_c=eps_c, noise="beta_tilde")
    np_ref = sample_numpy(_eps_u_np, _eps_c_np, schedule, keys, SHAPE, "np", {"scale": 0.7, "noise": "beta_tilde"})[0]
    np.testing.assert_allclose(xs[1], np_ref, rtol=1e-4, atol=1e-4)


DDIM_CASES = [("none", dj.NoGuidance(), {}, 0.0), ("none", dj.NoGuidance(), {}, 0.5),
              ("np", dj.NegativePrompting(0.7), {"scale": 0.7}, 0.0),
              ("dng", dj.DynamicNegativeGuidance(3.0, prior=0.3, offset=1e-4),
               {"scale": 3.0, "prior": 0.3, "temperature": 0.25, "offset": 1e-4}, 0.5),
              ("dng", dj.DynamicNegativeGuidance(3.0, prior=0.3, offset=1e-4, update_variance="step"),
               {"scale": 3.0, "prior": 0.3, "temperature": 0.25, "offset": 1e-4, "update_variance": "step"}, 0.7)]


@pytest.mark.parametrize("method,rule,hp,eta", DDIM_CASES,
                         ids=[f"{c[0]}-{c[2].get('update_variance', '')}-eta{c[3]}" for c in DDIM_CASES])
def test_ddim_matches_numpy_loop(schedule, method, rule, hp, eta):
    """eta: the DDIM step of Song et al.'s eq. 12 (the numpy loop writes it as in the paper)."""
    keys = dj.keys_from_seeds(np.arange(4))
    x, tr = dj.sample(eps_u, schedule, keys, SHAPE, rule=rule, denoiser_c=eps_c, eta=eta, return_trace=True)
    x_ref, lam_ref, p_ref = sample_numpy(_eps_u_np, _eps_c_np, schedule, keys, SHAPE, method, dict(hp, eta=eta))
    np.testing.assert_allclose(np.asarray(x), x_ref, rtol=1e-4, atol=1e-4)
    if method == "dng":          # the last row divides by a tiny variance (see test_scan_matches_numpy_loop)
        np.testing.assert_allclose(np.asarray(tr.p)[:-1], p_ref[:-1], rtol=2e-4, atol=1e-7)
        assert np.ptp(p_ref) > 0.05
    ancestral = sample_numpy(_eps_u_np, _eps_c_np, schedule, keys, SHAPE, method, dict(hp, noise="beta_tilde"))[0]
    assert np.abs(x_ref - ancestral).max() > 1e-2, "eta < 1 must differ from the ancestral chain"


def test_ddim_eta_one_is_the_ancestral_posterior_noise_chain(schedule):
    keys = dj.keys_from_seeds(np.arange(4))
    rule = dj.DynamicNegativeGuidance(3.0, prior=0.3)
    a = dj.sample(eps_u, schedule, keys, SHAPE, rule=rule, denoiser_c=eps_c, eta=1.0)
    b = dj.sample(eps_u, schedule, keys, SHAPE, rule=rule, denoiser_c=eps_c, noise="beta_tilde")
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    steps = dj.chain_steps(schedule, eta=1.0)
    ref = dj.chain_steps(schedule, noise="beta_tilde")
    np.testing.assert_allclose(steps.mean_eps, ref.mean_eps, rtol=1e-6)
    np.testing.assert_allclose(steps.noise_variance, ref.noise_variance, rtol=1e-6)


def test_eta_errors_before_sampling(schedule):
    keys = dj.keys_from_seeds([0])
    with pytest.raises(ValueError, match="eta must lie in"):
        dj.sample(eps_u, schedule, keys, SHAPE, eta=1.5)
    with pytest.raises(ValueError, match="eta must be a number"):
        dj.sample(eps_u, schedule, keys, SHAPE, eta="ddim")
    with pytest.raises(ValueError, match="pass one of them"):
        dj.sample(eps_u, schedule, keys, SHAPE, eta=0.5, noise="beta_tilde")
    with pytest.raises(ValueError, match="stochastic step"):
        dj.sample(eps_u, schedule, keys, SHAPE, rule=dj.DynamicNegativeGuidance(), denoiser_c=eps_c, eta=0.0)


def test_x0_and_v_predicting_denoisers_give_the_eps_samples(schedule):
    """The same model in its three parameterisations (converted here from the definitions) samples alike."""
    ab = jnp.asarray(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)), jnp.float32)
    col = lambda a, t: a[t].reshape(-1, 1, 1)

    def x0_u(x, t):
        return (x - jnp.sqrt(1 - col(ab, t)) * eps_u(x, t)) / jnp.sqrt(col(ab, t))

    def v_u(x, t):
        return jnp.sqrt(col(ab, t)) * eps_u(x, t) - jnp.sqrt(1 - col(ab, t)) * x0_u(x, t)

    def x0_c(x, t):
        return (x - jnp.sqrt(1 - col(ab, t)) * eps_c(x, t)) / jnp.sqrt(col(ab, t))

    keys = dj.keys_from_seeds(np.arange(3))
    rule = dj.DynamicNegativeGuidance(2.0, prior=0.3)
    ref = dj.sample(eps_u, schedule, keys, SHAPE, rule=rule, denoiser_c=eps_c)
    for du, dc in [(dj.denoiser(x0_u, prediction="x0"), dj.denoiser(x0_c, prediction="x0")),
                   (dj.denoiser(v_u, prediction="v"), eps_c)]:
        got = dj.sample(du, schedule, keys, SHAPE, rule=rule, denoiser_c=dc)
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="prediction must be one of"):
        dj.denoiser(eps_u, prediction="score")


def test_unknown_noise_is_rejected(schedule):
    with pytest.raises(ValueError, match="noise must be one of"):
        dj.sample(eps_u, schedule, dj.keys_from_seeds([0]), SHAPE, noise="learned")


def test_dng_static_limit_equals_np(schedule):
    keys = dj.keys_from_seeds(np.arange(5))
    scale, prior = 2.0, 0.2
    dng = dj.DynamicNegativeGuidance(scale, prior=prior, temperature=0.0, offset=0.0, p_min=1e-6, p_max=0.99)
    np_rule = dj.NegativePrompting(scale * prior / (1 - prior))
    x1 = dj.sample(eps_u, schedule, keys, SHAPE, rule=dng, denoiser_c=eps_c)
    x2 = dj.sample(eps_u, schedule, keys, SHAPE, rule=np_rule, denoiser_c=eps_c)
    np.testing.assert_allclose(np.asarray(x1), np.asarray(x2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [
    dict(scale=1e3, prior=1e-8, p_min=1e-9, p_max=0.999999, temperature=0.25, offset=1e6),
    dict(scale=1e3, prior=0.999, p_min=1e-30, p_max=0.999999, temperature=1e3, offset=-1e6),
    dict(scale=1e3, prior=0.5, p_min=1e-6, p_max=0.999999, temperature=1e3, offset=0.0, update_variance="beta"),
])
def test_dng_extreme_settings_stay_finite_and_clamped(kw):
    schedule = dj.respace(dj.linear_schedule(), 20)
    rule = dj.DynamicNegativeGuidance(**kw)
    keys = dj.keys_from_seeds(np.arange(6))
    x, tr = dj.sample(eps_u, schedule, keys, SHAPE, rule=rule, denoiser_c=eps_c, return_trace=True)
    p = np.asarray(tr.p)[1:]  # after the first update
    assert np.all(np.isfinite(np.asarray(tr.lam))) and np.all(np.isfinite(p))
    assert p.min() >= np.float32(kw["p_min"]) * (1 - 1e-5) and p.max() <= np.float32(kw["p_max"]) * (1 + 1e-6)
    # clamps are reached: the offset drives p to one end
    if kw["offset"] > 0:
        assert np.isclose(p[-1].max(), kw["p_max"], rtol=1e-5)
    if kw["offset"] < 0:
        assert np.isclose(p[-1].min(), kw["p_min"], rtol=1e-3)
    # x itself may be huge at scale 1e3 on this toy pair, but never NaN
    assert not np.any(np.isnan(np.asarray(x)))


def test_batch_independence(schedule):
    rule = dj.DynamicNegativeGuidance(4.0, prior=0.3, temperature=0.25)
    keys = dj.keys_from_seeds(np.arange(10, 18))
    x_all = np.asarray(dj.sample(eps_u, schedule, keys, SHAPE, rule=rule, denoiser_c=eps_c))
    perm = np.array([5, 2, 7, 0, 1, 3, 6, 4])
    x_perm = np.asarray(dj.sample(eps_u, schedule, keys[perm], SHAPE, rule=rule, denoiser_c=eps_c))
    np.testing.assert_allclose(x_perm, x_all[perm], rtol=1e-6, atol=1e-6)
    x_one = np.asarray(dj.sample(eps_u, schedule, keys[3:4], SHAPE, rule=rule, denoiser_c=eps_c))
    np.testing.assert_allclose(x_one[0], x_all[3], rtol=1e-6, atol=1e-6)
    assert not np.allclose(x_all[0], x_all[1])


def test_sweep_matches_single_calls_and_compiles_once(schedule):
    # a fresh schedule length so nothing is cached from other tests
    sched = dj.respace(dj.linear_schedule(), 17)
    rule = dj.DynamicNegativeGuidance(1.0, prior=0.3, temperature=0.25)
    scales = np.array([0.0, 1.0, 2.5, 5.0], np.float32)
    keys = dj.keys_from_seeds(np.arange(7))
    with count_compiles("_grid_impl") as compiles:
        x, tr = dj.sweep(eps_u, sched, keys, SHAPE, rule=rule, grid={"scale": scales}, denoiser_c=eps_c,
                         chunk_size=3, return_trace=True)
    assert len(compiles) == 1, "3 chunks (one padded) must share one compilation"
    chex.assert_shape(x, (4, 7) + SHAPE)
    chex.assert_shape([tr.lam, tr.p], (4, 17, 7))
    for k in (0, 2, 3):
        for n in (0, 4, 6):
            single = dj.sample(eps_u, sched, keys[n:n + 1], SHAPE, rule=rule.replace(scale=scales[k]), denoiser_c=eps_c)
            np.testing.assert_allclose(x[k, n], np.asarray(single)[0], rtol=1e-5, atol=1e-5)
    # sweeping a different leaf works too
    xt = dj.sweep(eps_u, sched, keys[:2], SHAPE, rule=rule.replace(scale=3.0),
                  grid={"temperature": [0.0, 0.5]}, denoiser_c=eps_c)
    assert not np.allclose(xt[0], xt[1])


def test_sweep_over_two_leaves_and_clear_grid_errors(schedule):
    rule = dj.SafeLatentDiffusion(0.5)
    keys = dj.keys_from_seeds(np.arange(2))
    x = dj.sweep(eps_u, schedule, keys, SHAPE, rule=rule, grid={"scale": [0.1, 0.5], "threshold": [0.0, 0.04]},
                 denoiser_c=eps_c)
    chex.assert_shape(x, (2, 2) + SHAPE)
    with pytest.raises(ValueError, match="mismatched lengths"):
        dj.sweep(eps_u, schedule, keys, SHAPE, rule=rule, grid={"scale": [0.1, 0.5], "threshold": [0.0]}, denoiser_c=eps_c)
    with pytest.raises(ValueError, match="no hyperparameter"):
        dj.sweep(eps_u, schedule, keys, SHAPE, rule=rule, grid={"lambda": [0.1]}, denoiser_c=eps_c)
    with pytest.raises(ValueError, match="scale"):
        dj.sweep(eps_u, schedule, keys, SHAPE, rule=rule, grid={"scale": [0.1, -1.0]}, denoiser_c=eps_c)


def test_wrong_denoiser_shape_errors_before_compiling(schedule):
    bad = lambda x, t: x[..., :1]
    keys = dj.keys_from_seeds(np.arange(2))
    with pytest.raises(ValueError, match="must return one array of the shape of x"):
        dj.sample(bad, schedule, keys, SHAPE)
    with pytest.raises(ValueError, match="denoiser_c returned"):
        dj.sample(eps_u, schedule, keys, SHAPE, rule=dj.NegativePrompting(1.0), denoiser_c=bad)
    with pytest.raises(ValueError, match="pass denoiser_c"):
        dj.sample(eps_u, schedule, keys, SHAPE, rule=dj.NegativePrompting(1.0))
    with pytest.raises(ValueError, match="keys"):
        dj.sample(eps_u, schedule, jnp.zeros((2, 3)), SHAPE)


def test_exact_dng_uses_posterior_fn(schedule):
    # constant posterior p -> exact DNG equals NP with scale * p / (1 - p)
    def posterior(x, t):
        return jnp.full((x.shape[0],), 0.2)
    keys = dj.keys_from_seeds(np.arange(3))
    x1, tr = dj.sample(eps_u, schedule, keys, SHAPE, rule=dj.ExactDynamicNegativeGuidance(2.0, posterior),
                       denoiser_c=eps_c, return_trace=True)
    x2 = dj.sample(eps_u, schedule, keys, SHAPE, rule=dj.NegativePrompting(0.5), denoiser_c=eps_c)
    np.testing.assert_allclose(np.asarray(x1), np.asarray(x2), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(tr.p), 0.2, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(tr.lam), 0.5, rtol=1e-5)


def test_vmap_over_rule_leaf_directly(schedule):
    """A user can vmap sample() over a rule's leaves themselves (the rule is a pytree)."""
    keys = dj.keys_from_seeds(np.arange(3))
    rule = dj.NegativePrompting(jnp.array([0.0, 1.0]))
    f = jax.vmap(lambda r: sampler_mod._sample_impl(dj.as_denoiser(eps_u), dj.as_denoiser(eps_c), r,
                                                   schedule, keys, SHAPE, False, "beta", None)[0])
    x = f(rule)
    x0 = dj.sample(eps_u, schedule, keys, SHAPE, rule=dj.NegativePrompting(1.0), denoiser_c=eps_c)
    np.testing.assert_allclose(np.asarray(x[1]), np.asarray(x0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seeds,message", [
    ([0, 2 ** 40], r"seeds must lie in \[0, 2\^32\)"),
    ([-1, 3], r"seeds must lie in \[0, 2\^32\)"),
    ([0.5, 1.0], "seeds must be integers"),
    ([[0, 1]], "1-D sequence"),
])
def test_keys_from_seeds_rejects_seeds_that_would_wrap_or_round(seeds, message):
    with pytest.raises(ValueError, match=message):
        dj.keys_from_seeds(seeds)


def test_denoiser_returning_a_tuple_gets_a_clear_error(schedule):
    with pytest.raises(ValueError, match="denoiser_u returned a tuple"):
        dj.sample(lambda x, t: (x, x), schedule, dj.keys_from_seeds([0]), SHAPE)


def test_chunked_sample_and_empty_grid_sweep_equal_one_call(schedule):
    """One sampling loop: sample(chunk_size=) and sweep(grid={}) give what one call gives, per seed."""
    rule = dj.DynamicNegativeGuidance(2.0, prior=0.3)
    keys = dj.keys_from_seeds(np.arange(5))
    x, tr = dj.sample(eps_u, schedule, keys, SHAPE, rule=rule, denoiser_c=eps_c, return_trace=True)
    xc, trc = dj.sample(eps_u, schedule, keys, SHAPE, rule=rule, denoiser_c=eps_c, return_trace=True,
                        chunk_size=2)
    assert isinstance(xc, np.ndarray)
    chex.assert_shape(xc, (5,) + SHAPE)
    chex.assert_equal_shape([trc.p, tr.p])
    np.testing.assert_allclose(xc, np.asarray(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(trc.p, np.asarray(tr.p), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(trc.t, np.asarray(tr.t))
    xs = dj.sweep(eps_u, schedule, keys, SHAPE, rule=rule, grid={}, denoiser_c=eps_c, chunk_size=3)
    assert xs.shape == (1, 5) + SHAPE
    np.testing.assert_allclose(xs[0], np.asarray(x), rtol=1e-5, atol=1e-5)
    seen = [(c.start, c.x.shape[0]) for c in dj.sample_chunks(eps_u, schedule, keys, SHAPE, rule=rule,
                                                              denoiser_c=eps_c, chunk_size=2)]
    assert seen == [(0, 2), (2, 2), (4, 1)]


def test_given_x_T_replaces_only_the_starting_draw(schedule):
    """x_T= starts the chain from given samples; the keys still give the same step noise, so passing the
    keys' own starting draws reproduces the default run (one call, chunked, and in a sweep)."""
    rule = dj.DynamicNegativeGuidance(2.0, prior=0.3)
    keys = dj.keys_from_seeds(np.arange(5))
    one = dj.respace(dj.linear_schedule(), 1)                 # one final step: x_0 = mean_x x_T (eps = 0)
    zero = lambda x, t: jnp.zeros_like(x)
    x_start = np.asarray(dj.sample(zero, one, keys, SHAPE)) * np.sqrt(float(one.alphas[0]))
    x = dj.sample(eps_u, schedule, keys, SHAPE, rule=rule, denoiser_c=eps_c)
    for kw in ({}, {"chunk_size": 2}):
        got = dj.sample(eps_u, schedule, keys, SHAPE, rule=rule, denoiser_c=eps_c, x_T=x_start, **kw)
        np.testing.assert_allclose(np.asarray(got), np.asarray(x), rtol=1e-5, atol=1e-5)
    xs = dj.sweep(eps_u, schedule, keys, SHAPE, rule=rule, grid={"scale": [2.0, 0.0]}, denoiser_c=eps_c,
                  x_T=x_start, chunk_size=3)
    np.testing.assert_allclose(xs[0], np.asarray(x), rtol=1e-5, atol=1e-5)
    # a different start: the one-step chain maps it by the step's mean (no noise at the final step)
    other = np.random.default_rng(0).standard_normal((5,) + SHAPE).astype(np.float32)
    got = np.asarray(dj.sample(eps_u, one, keys, SHAPE, x_T=other))
    want = (other - float(one.betas[0]) / np.sqrt(float(one.one_minus_alpha_bars[0]))
            * np.asarray(eps_u(jnp.asarray(other), jnp.zeros(5)))) / np.sqrt(float(one.alphas[0]))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"x_T must be one starting sample per key, shape \(5, 3, 2\)"):
        dj.sample(eps_u, schedule, keys, SHAPE, x_T=other[:4])


class _Functions(NamedTuple):
    """A rule as a pair of pure functions (as optax writes a transformation), no GuidanceRule: the sampler
    takes the protocol's defaults for the rest (no update, no posterior, ...)."""

    init: Callable
    guide: Callable


def _np_as_functions(scale):
    return _Functions(init=lambda x: (),
                      guide=lambda state, x_t, eps_u, eps_c, step: (
                          eps_u - scale * (eps_c - eps_u), jnp.full((x_t.shape[0],), scale, jnp.float32), state))


class _CountingNP(NamedTuple):
    """Negative prompting written from scratch, with a traced hyperparameter (its leaf, swept by name), a state
    (the steps taken) and a 'posterior' that reports it (steps taken / 100)."""

    scale: Any = 1.0

    def init(self, x):
        return jnp.zeros((x.shape[0],), jnp.float32)

    def guide(self, state, x_t, eps_u, eps_c, step):
        scale = jnp.asarray(self.scale, jnp.float32)
        return eps_u - scale * (eps_c - eps_u), jnp.broadcast_to(scale, (x_t.shape[0],)), state

    def update(self, state, x_t, x_next, eps_u, eps_c, step):
        return state + 1.0

    def posterior(self, state, batch):
        return state / 100.0


def test_any_rule_that_follows_the_protocol_samples_and_sweeps(schedule):
    """dj.sample and dj.sweep take objects that follow dj.Rule without subclassing GuidanceRule."""
    keys = dj.keys_from_seeds(np.arange(4))
    ref, ref_tr = dj.sample(eps_u, schedule, keys, SHAPE, rule=dj.NegativePrompting(0.7), denoiser_c=eps_c,
                            return_trace=True)
    fns = _np_as_functions(0.7)
    assert not isinstance(fns, dj.GuidanceRule) and not isinstance(_CountingNP(), dj.GuidanceRule)
    x, tr = dj.sample(eps_u, schedule, keys, SHAPE, rule=fns, denoiser_c=eps_c, return_trace=True)
    np.testing.assert_allclose(np.asarray(x), np.asarray(ref), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(tr.lam), np.asarray(ref_tr.lam))
    assert np.all(np.isnan(np.asarray(tr.p)))                               # the default posterior: none
    xs = dj.sweep(eps_u, schedule, keys, SHAPE, rule=fns, grid={}, denoiser_c=eps_c, chunk_size=3)
    chex.assert_shape(xs, (1, 4) + SHAPE)
    np.testing.assert_allclose(xs[0], np.asarray(ref), rtol=1e-5, atol=1e-5)
    # a pytree rule of one's own: its leaf is traced and swept by name, its update and posterior are used
    x, tr = dj.sample(eps_u, schedule, keys, SHAPE, rule=_CountingNP(0.7), denoiser_c=eps_c, return_trace=True)
    np.testing.assert_allclose(np.asarray(x), np.asarray(ref), rtol=1e-6, atol=1e-7)
    steps = schedule.num_steps
    np.testing.assert_allclose(np.asarray(tr.p), np.broadcast_to(np.arange(steps)[:, None] / 100.0, (steps, 4)),
                               rtol=1e-6)
    xs, trs = dj.sweep(eps_u, schedule, keys, SHAPE, rule=_CountingNP(), grid={"scale": [0.0, 0.7]},
                       denoiser_c=eps_c, chunk_size=3, return_trace=True)
    chex.assert_shape(xs, (2, 4) + SHAPE)
    chex.assert_shape([trs.lam, trs.p], (2, steps, 4))
    np.testing.assert_allclose(xs[1], np.asarray(ref), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(xs[0], np.asarray(dj.sample(eps_u, schedule, keys, SHAPE)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(trs.lam[1], 0.7)
    with pytest.raises(ValueError, match="no hyperparameter"):
        dj.sweep(eps_u, schedule, keys, SHAPE, rule=_CountingNP(), grid={"prior": [0.1]}, denoiser_c=eps_c)
    with pytest.raises(TypeError, match="must follow the dngjax.Rule protocol"):
        dj.sample(eps_u, schedule, keys, SHAPE, rule=object(), denoiser_c=eps_c)

    class Unhashable:
        __hash__ = None

        def init(self, x):
            return ()

        def guide(self, state, x_t, eps_u, eps_c, step):
            return eps_u, jnp.zeros((x_t.shape[0],)), state

    with pytest.raises(TypeError, match="must be hashable"):
        dj.sample(eps_u, schedule, keys, SHAPE, rule=Unhashable(), denoiser_c=eps_c)
