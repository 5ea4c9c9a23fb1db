"""The analytic Gaussian-mixture lab (dngjax.gmm): exactness of eps / score / posterior, and
the sampler checked against exact targets.

Default suite: 20,000 samples of the 1-D lab mixture (toy_1d: modes -3/0/3, middle one
forbidden) on the linear T = 1000 schedule respaced to 250 steps, fixed seeds 0..19,999.
The `slow` tests repeat the sampling checks with 100,000 samples on the full 1000-step chain.

Where the W1 bounds come from (W1 between samples and the exact law, computed from the
exact CDF, see dngjax.gmm.wasserstein1_1d):
* sampling error: W1 of n exact samples of the target, 500 seeds at n = 20k and 200 at
  n = 100k: mean 0.0195 / 0.0081, 99.9% quantile 0.062 / 0.030 (max 0.064 / 0.030). It is
  dominated by the binomial error of the two kept modes' weights times their distance 6:
  6 sqrt(2/pi) sqrt(w(1-w)/n) = 0.0165 / 0.0074 on average, 99.9% quantile 3.29 times the
  scale = 0.068 / 0.030;
* discretisation error of the chain (exact eps): 250 steps shift the kept weights by -0.004
  (200k samples; W1 ~ 0.02 beyond noise); 1000 steps by about +0.003 (two independent 100k
  runs: +0.0026 and +0.0033, 2.7 standard errors together; W1 ~ 0.018).
Bounds: 0.062 + 0.03 -> W1_BOUND_FAST = 0.10 (20k, 250 steps); 0.030 + 0.018 ->
W1_BOUND_SLOW = 0.05 (100k, 1000 steps).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from scipy.stats import ks_2samp, norm

import dngjax as dj
from dngjax.gmm import (ExactNegativePosterior, NegativeSplit, GaussianMixture, alpha_bar_table,
                        log_posterior, mixture_denoiser, toy_1d, toy_2d, wasserstein1_1d)
from compile_count import count_compiles

N_FAST, STEPS_FAST = 20_000, 250
N_2D = 8_000                                           # the 2-D extension checks (several concepts, positive mode)
N_SLOW, STEPS_SLOW = 100_000, 1000
W1_BOUND_FAST = 0.10
W1_BOUND_SLOW = 0.05
KEPT_WEIGHTS = np.array([0.25, 0.40]) / 0.65          # 0.3846, 0.6154


def _chain(steps):
    base = dj.linear_schedule()
    return base if steps == base.num_steps else dj.respace(base, steps)


@functools.lru_cache(maxsize=None)
def _lab(steps):
    mixture, forget = toy_1d()
    return NegativeSplit(mixture, forget, _chain(steps))


@functools.lru_cache(maxsize=None)
def _run(method, steps, n, seed0=0, trace=False):
    """x0 (n, 1) numpy [and trace p (S, n)] for a method on the 1-D lab, seeds seed0 .. seed0+n-1."""
    lab = _lab(steps)
    rules = {
        "none": (dj.NoGuidance(), None),
        "target": (dj.NoGuidance(), None),                          # denoiser_remember, unguided
        "cfg": (dj.ClassifierFreeGuidance(1.0), lab.denoiser_remember),
        "np": (dj.NegativePrompting(1.0), lab.denoiser_neg),
        "dng_exact": (lab.exact_dng(1.0), lab.denoiser_neg),
        "dng_approx": (lab.approximate_dng(1.0), lab.denoiser_neg),
        "track_exact": (lab.exact_dng(0.0), lab.denoiser_neg),
        "track_approx": (lab.approximate_dng(0.0, p_max=1 - 1e-6), lab.denoiser_neg),
    }
    rule, eps_c = rules[method]
    eps_u = lab.denoiser_remember if method == "target" else lab.denoiser_full
    keys = dj.keys_from_seeds(np.arange(seed0, seed0 + n))
    out = dj.sample(eps_u, lab.schedule, keys, (1,), rule=rule, denoiser_c=eps_c, return_trace=trace)
    if trace:
        return np.asarray(out[0]), np.asarray(out[1].p)
    return np.asarray(out)


# --------------------------------------------------------------------------- analytic parts

def _mixtures():
    rng = np.random.default_rng(0)
    m3 = GaussianMixture.create(rng.uniform(0.1, 1, 4), rng.normal(0, 2, (4, 3)), rng.uniform(0.2, 0.8, 4))
    return [toy_1d()[0], toy_2d()[0], m3]


@jax.jit
def _autodiff_check(mixture, ab):
    d = mixture.dim
    x = jnp.concatenate([jax.random.normal(jax.random.key(1), (64, d)) * 3.0,
                         jnp.sqrt(ab) * mixture.means + 0.01,               # at the modes
                         jnp.full((2, d), 12.0), jnp.full((2, d), -12.0)])  # far tails
    grad = jax.vmap(jax.grad(lambda xi: mixture.log_prob(xi[None], ab)[0]))(x)
    return grad, mixture.score(x, ab), mixture.eps(x, ab)


@pytest.mark.parametrize("ab", [0.9999, 0.99, 0.7, 0.3, 0.02, 4e-5])
def test_eps_and_score_match_autodiff(ab):
    """eps = -sqrt(1 - ab) grad log p_t and score = grad log p_t, against jax.grad, float32."""
    for mixture in _mixtures():
        grad, score, eps = _autodiff_check(mixture, jnp.float32(ab))
        assert np.all(np.isfinite(np.asarray(grad)))
        scale = 1.0 + np.abs(np.asarray(grad))
        np.testing.assert_array_less(np.abs(np.asarray(score - grad)) / scale, 5e-5)
        scale_e = 1.0 + np.abs(np.asarray(eps))
        np.testing.assert_array_less(np.abs(np.asarray(eps + math.sqrt(1 - ab) * grad)) / scale_e, 5e-5)


def _np_reference(mixture, x, ab):
    """float64 numpy log p_t, responsibilities, score, eps."""
    lw, mu, s = (np.asarray(a, np.float64) for a in (mixture.log_weights, mixture.means, mixture.stds))
    x = np.asarray(x, np.float64)
    var = 1 - ab + ab * s ** 2
    diff = x[:, None, :] - np.sqrt(ab) * mu[None]
    joint = lw - 0.5 * (np.sum(diff ** 2, -1) / var + x.shape[1] * np.log(2 * np.pi * var))
    mx = joint.max(1, keepdims=True)
    log_p = mx[:, 0] + np.log(np.exp(joint - mx).sum(1))
    r = np.exp(joint - log_p[:, None])
    score = -np.sum((r / var)[..., None] * diff, 1)
    return log_p, r, score, -np.sqrt(1 - ab) * score


def test_large_batches_under_jit():
    """Regression test: XLA:CPU (jaxlib 0.10.2) miscomputed the mixture's weighted sum over
    components for d >= 2 and batches > 16384 under jit (errors ~10); see gmm._weighted_sum."""
    for mixture in _mixtures():
        x = jax.random.normal(jax.random.key(2), (20_000, mixture.dim)) * 2.5
        f = jax.jit(lambda m, x, ab: (m.log_prob(x, ab), m.responsibilities(x, ab), m.score(x, ab),
                                      m.eps(x, ab)))
        for ab in (0.9, 0.3):
            got = f(mixture, x, jnp.float32(ab))
            for g, r in zip(got, _np_reference(mixture, x, ab)):
                np.testing.assert_allclose(np.asarray(g, np.float64), r, rtol=1e-4, atol=1e-4)


def test_log_prob_is_the_diffused_mixture():
    """p_t(x) = sum_i c_i N(sqrt(ab) mu_i, 1 - ab + ab s_i^2), against scipy in float64; normalised."""
    mixture, _ = toy_1d()
    w = np.array([0.25, 0.35, 0.40])
    mu = np.array([-3.0, 0.0, 3.0])
    s = np.array([0.35, 0.50, 0.40])
    grid = np.linspace(-12, 12, 24001)
    for ab in (1.0, 0.8, 0.1):
        ref = np.sum(w * norm.pdf(grid[:, None], np.sqrt(ab) * mu, np.sqrt(1 - ab + ab * s ** 2)), -1)
        got = np.exp(np.asarray(mixture.log_prob(jnp.asarray(grid[:, None], jnp.float32), ab)))
        np.testing.assert_allclose(got, ref, rtol=2e-5, atol=1e-30)
        assert abs(np.trapezoid(got, grid) - 1.0) < 1e-5
    np.testing.assert_allclose(mixture.cdf_1d(grid)[[0, -1]], [0.0, 1.0], atol=1e-12)
    np.testing.assert_allclose(mixture.density_1d(grid), np.sum(w * norm.pdf(grid[:, None], mu, s), -1),
                               rtol=2e-5)


def test_sub_mixtures_and_posterior_follow_bayes():
    lab = _lab(STEPS_FAST)
    assert lab.negative == (1,) and lab.remember == (0, 2)
    assert abs(lab.negative_weight - 0.35) < 1e-6
    np.testing.assert_allclose(np.asarray(lab.remember_mixture.weights), KEPT_WEIGHTS, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(lab.negative_mixture.weights), [1.0], rtol=1e-6)
    x = jnp.linspace(-6, 6, 97)[:, None]
    parts = jax.jit(lambda ab: (lab.negative_mixture.log_prob(x, ab), lab.full.log_prob(x, ab),
                                lab.remember_mixture.log_prob(x, ab), lab.log_posterior(x, ab)))
    for ab in (0.9999, 0.9, 0.4, 0.01):
        lf, lu, lr, lp = (np.asarray(a, np.float64) for a in parts(jnp.float32(ab)))
        p = np.exp(lp)
        ok = lu > -60                                     # where the densities are representable
        np.testing.assert_allclose(p[ok], (0.35 * np.exp(lf - lu))[ok], rtol=2e-4, atol=1e-7)
        # p_t = c_f p_f + (1 - c_f) p_r
        np.testing.assert_allclose(np.exp(lu[ok]), (0.35 * np.exp(lf) + 0.65 * np.exp(lr))[ok], rtol=2e-4)


def test_posterior_is_stable_and_jit_vmap_safe():
    lab = _lab(STEPS_FAST)
    far = jnp.array([[-1e3], [-40.0], [-3.0], [0.0], [3.0], [40.0], [1e3]])
    f = jax.jit(jax.vmap(lambda ab: lab.log_posterior(far, ab)))
    out = np.asarray(f(jnp.array([1.0, 0.9999, 0.5, 1e-5])))
    assert out.shape == (4, 7) and np.all(np.isfinite(out)) and np.all(out <= 0.0)
    assert out[0, 3] > -1e-4                              # at the forbidden mode at t = 0: p ~ 1
    assert out[0, 2] < -10 and out[0, 4] < -10            # at the kept modes: p ~ 0 (log p finite)
    # far out the widest component (the forbidden one, std 0.5) dominates: p -> 1 without overflow
    assert out[0, 0] > -1e-4 and out[0, -1] > -1e-4
    np.testing.assert_allclose(out[-1, 2:5], np.log(0.35), atol=1e-2)   # nearly pure noise: the prior
    eps = jax.jit(jax.vmap(lambda ab: lab.full.eps(far, ab)))(jnp.array([0.9999, 0.5, 1e-5]))
    assert np.all(np.isfinite(np.asarray(eps)))


def test_denoisers_posterior_fn_and_compile_cache():
    base = dj.linear_schedule()
    sched = _chain(STEPS_FAST)
    lab = _lab(STEPS_FAST)
    t = jnp.asarray(np.asarray(sched.timesteps)[[0, 17, 100, -1]], jnp.int32)
    x = jnp.linspace(-4, 4, 4)[:, None]
    ab = np.asarray(base.alpha_bars)[np.asarray(t)]
    np.testing.assert_allclose(np.asarray(lab.denoiser_full(x, t)), np.asarray(lab.full.eps(x, ab)), rtol=1e-6)
    # a respaced chain's table agrees with the full schedule's at its own timesteps
    np.testing.assert_allclose(np.asarray(alpha_bar_table(sched))[np.asarray(t)], ab, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(mixture_denoiser(lab.full, base)(x, t)),
                               np.asarray(lab.denoiser_full(x, t)), rtol=1e-6)
    lp = np.asarray(lab.posterior_fn(x, t))
    np.testing.assert_allclose(lp, np.asarray(log_posterior(lab.full, (1,), x, ab)), rtol=1e-6, atol=1e-7)
    # equal labs give equal (hashable) posterior functions: no recompilation
    other = NegativeSplit(*toy_1d(), sched)
    assert other.posterior_fn == lab.posterior_fn and hash(other.posterior_fn) == hash(lab.posterior_fn)
    assert ExactNegativePosterior(lab.full, (0,), sched) != lab.posterior_fn
    keys = dj.keys_from_seeds(np.arange(8))
    dj.sample(lab.denoiser_full, sched, keys, (1,), rule=lab.exact_dng(1.0), denoiser_c=lab.denoiser_neg)
    with count_compiles("_grid_impl") as compiles:
        dj.sample(other.denoiser_full, sched, keys, (1,), rule=other.exact_dng(2.0), denoiser_c=other.denoiser_neg)
    assert compiles == []


@functools.partial(jax.jit, static_argnums=0)
def _eps_all(lab, x, t):
    tt = jnp.full((x.shape[0],), t, jnp.int32)
    return lab.denoiser_full(x, tt), lab.denoiser_neg(x, tt), lab.denoiser_remember(x, tt), lab.posterior_fn(x, tt)


@pytest.mark.parametrize("t", [0, 10, 100, 300, 600, 999])
def test_exact_dng_and_cfg_give_the_remaining_modes_eps(t):
    """eps_u - p/(1-p) (eps_- - eps_u) = eps_r = eps_u + 1 (eps_r - eps_u), pointwise (float32).

    Checked where p(c-|x_t) <= 0.999: closer to 1 the difference eps_- - eps_u = (1-p)(eps_- - eps_r)
    cancels in float32 (the sampler's trajectories never get there; see docs/gmm.md)."""
    base = dj.linear_schedule()
    lab = _lab(1000)
    x = jnp.linspace(-7, 7, 1401)[:, None]
    e_u, e_f, e_r, log_p = (np.asarray(a, np.float64) for a in _eps_all(lab, x, jnp.int32(t)))
    p = np.exp(log_p)
    ok = p <= 0.999
    assert ok.mean() > 0.5
    dng = e_u[ok] - (p[ok] / (1 - p[ok]))[:, None] * (e_f[ok] - e_u[ok])
    tol = 1e-5 + 2e-6 / (1 - p[ok])[:, None] * (1 + np.abs(e_f[ok]))
    np.testing.assert_array_less(np.abs(dng - e_r[ok]), tol)
    # the rule itself, through guide()
    rule = lab.exact_dng(1.0)
    step = jax.tree.map(lambda a: a[t], dj.chain_steps(base))
    eps, lam, p_rule = rule.guide(rule.init(x), x, jnp.asarray(e_u, jnp.float32), jnp.asarray(e_f, jnp.float32), step)
    np.testing.assert_allclose(np.asarray(p_rule)[ok], p[ok], rtol=1e-5, atol=1e-7)
    np.testing.assert_array_less(np.abs(np.asarray(eps, np.float64)[ok] - e_r[ok]), tol + 1e-5)
    cfg, _, _ = dj.ClassifierFreeGuidance(1.0).guide((), x, jnp.asarray(e_u, jnp.float32),
                                                       jnp.asarray(e_r, jnp.float32), step)
    np.testing.assert_allclose(np.asarray(cfg), e_r, atol=1e-6)


def test_wasserstein1_1d_against_scipy():
    """Against scipy's W1 to the law quantised on a fine grid (no reference sampling noise)."""
    from scipy.stats import wasserstein_distance
    mixture, _ = toy_1d()
    grid = np.linspace(-8, 8, 16001)
    weights = mixture.density_1d(grid)
    for shift in (0.0, 0.5):
        x = np.asarray(mixture.sample(jax.random.key(3), 20_000))[:, 0] + shift
        ref = wasserstein_distance(x, grid, v_weights=weights)
        assert abs(wasserstein1_1d(x, mixture) - ref) < 1e-3, (shift, ref)
    assert abs(wasserstein1_1d(x, mixture) - 0.5) < 0.02        # W1 of a shift is about the shift


# --------------------------------------------------------------------------- sampling (fast)

def _kept_weights(lab, x):
    return lab.remember_fractions(x)


def test_exact_dng_reproduces_the_remaining_modes():
    lab = _lab(STEPS_FAST)
    x = _run("dng_exact", STEPS_FAST, N_FAST)
    w1 = wasserstein1_1d(x, lab.remember_mixture)
    assert w1 < W1_BOUND_FAST, w1
    assert lab.in_negative(x).mean() < 0.005
    assert np.all(np.abs(_kept_weights(lab, x) - KEPT_WEIGHTS) < 0.03)
    # the same seeds through CFG (lambda = 1, i.e. plain sampling with eps_r): the same paths
    y = _run("cfg", STEPS_FAST, N_FAST)
    d = np.abs(x - y)
    assert np.quantile(d, 0.999) < 1e-3 and d.max() < 0.1, d.max()
    assert wasserstein1_1d(y, lab.remember_mixture) < W1_BOUND_FAST


def test_unguided_and_np_do_not_reproduce_the_target():
    lab = _lab(STEPS_FAST)
    w1_dng = wasserstein1_1d(_run("dng_exact", STEPS_FAST, N_FAST), lab.remember_mixture)
    x_none = _run("none", STEPS_FAST, N_FAST)
    assert abs(lab.in_negative(x_none).mean() - 0.35) < 0.02
    x_np = _run("np", STEPS_FAST, N_FAST)
    w1_np = wasserstein1_1d(x_np, lab.remember_mixture)
    assert w1_np > 5 * W1_BOUND_FAST and w1_np > 15 * w1_dng, (w1_np, w1_dng)
    # NP pushes the kept modes outward: the median |x| moves well past 3
    assert np.median(np.abs(x_np)) > 3.8


def test_markov_chain_posterior_tracks_the_exact_one():
    lab = _lab(STEPS_FAST)
    xa, pa = _run("track_approx", STEPS_FAST, N_FAST, trace=True)
    xe, pe = _run("track_exact", STEPS_FAST, N_FAST, trace=True)
    pa, pe = pa.astype(np.float64), pe.astype(np.float64)
    # lambda = 0: the same trajectories (up to float rounding: the two programs compile differently)
    assert np.abs(xa - xe).max() < 1e-3
    forb = lab.in_negative(xe)
    assert np.mean(forb != lab.in_negative(xa)) < 1e-4
    assert 0.3 < forb.mean() < 0.4
    ma = np.stack([pa[:, forb].mean(1), pa[:, ~forb].mean(1)])
    me = np.stack([pe[:, forb].mean(1), pe[:, ~forb].mean(1)])
    gap = np.abs(ma - me).max()
    assert gap < 0.15, gap                                # measured 0.096 (250 steps), 0.04 (1000)
    np.testing.assert_allclose(ma[:, 0], 0.35, atol=1e-6)  # both start at the prior
    assert ma[0, -1] > 0.8 and ma[1, -1] < 0.01           # forbidden group ends near 1, the others near 0
    assert ma[0, -1] - ma[1, -1] > 0.75


def test_approximate_dng_removes_most_forbidden_mass():
    lab = _lab(STEPS_FAST)
    x = _run("dng_approx", STEPS_FAST, N_FAST)
    forb = lab.in_negative(x).mean()
    assert forb < 0.06, forb                              # from 0.35 unguided; measured 0.036
    w = _kept_weights(lab, x)
    assert np.all(np.abs(w - KEPT_WEIGHTS) < 0.02), w     # measured |dw| = 0.010
    assert wasserstein1_1d(x, lab.remember_mixture) < 0.15


def test_ddim_exact_dng_reproduces_the_remaining_modes_and_tracked_dng_removes_most():
    """DDIM steps (eta < 1, and eta = 0 for the exact posterior, which needs no noise): exact DNG samples
    the remaining modes; tracked DNG with the step's own variance removes part of the forbidden mass (less than
    on the ancestral chain: half the noise gives its likelihood ratios less evidence; see docs/gmm.md)."""
    lab = _lab(STEPS_FAST)
    keys = dj.keys_from_seeds(np.arange(N_FAST))
    run = lambda rule, eta: np.asarray(dj.sample(lab.denoiser_full, lab.schedule, keys, (1,), rule=rule,
                                                 denoiser_c=lab.denoiser_neg, eta=eta, chunk_size=N_FAST))
    for eta in (0.0, 0.5):
        x = run(lab.exact_dng(1.0), eta)
        assert lab.in_negative(x).mean() < 0.005, eta
        assert wasserstein1_1d(x, lab.remember_mixture) < W1_BOUND_FAST, eta
    x = run(lab.approximate_dng(1.0, update_variance="step"), 0.5)
    forb = lab.in_negative(x).mean()
    assert forb < 0.2, forb          # from 0.35 unguided; measured 0.144 (ancestral beta-noise chain: 0.036)
    with pytest.raises(ValueError, match="stochastic step"):
        run(lab.approximate_dng(1.0), 0.0)


def _marginal_w1(x: np.ndarray, mixture: GaussianMixture, direction) -> float:
    """W1 between the projection of 2-D samples on a unit direction and the projected (1-D) mixture."""
    u = np.asarray(direction, np.float64) / np.linalg.norm(direction)
    means = np.asarray(mixture.means, np.float64) @ u
    proj = GaussianMixture.create(np.exp(np.asarray(mixture.log_weights)), means[:, None],
                                  np.asarray(mixture.stds, np.float64).reshape(-1))
    return wasserstein1_1d(np.asarray(x, np.float64) @ u, proj)


def test_multi_concept_dng_exact_removes_both_concepts_and_equals_cfg_toward_the_rest():
    """Two forbidden modes given as two concepts: exact multi-concept DNG at lambda0 = 1 samples the two
    remaining modes (marginal W1 within sampling error, forbidden mass < 0.5 %) and follows CFG toward
    them path by path; tracked multi-concept DNG removes most of both."""
    from dngjax.gmm import ConceptSplit, toy_2d_two_concepts
    mixture, concepts = toy_2d_two_concepts()
    lab = ConceptSplit(mixture, concepts, _chain(STEPS_FAST))
    keys = dj.keys_from_seeds(np.arange(N_2D))
    run = lambda rule, dc: np.asarray(dj.sample(lab.denoiser_full, lab.schedule, keys, (2,), rule=rule,
                                                denoiser_c=dc, chunk_size=N_2D))
    x = run(lab.exact_dng(1.0), lab.denoisers_concepts)
    target = lab.union.remember_mixture
    assert lab.union.in_negative(x).mean() < 0.005
    ref = np.asarray(target.sample(jax.random.key(7), N_2D))       # the sampling error of N exact draws
    for d in ([1, 0], [0, 1], [1, 1]):
        floor = _marginal_w1(ref, target, d)
        assert _marginal_w1(x, target, d) < 3 * floor + 0.02, (d, floor)
    cfg = run(dj.ClassifierFreeGuidance(1.0), lab.union.denoiser_remember)
    dist = np.abs(x - cfg).max(-1)
    assert np.quantile(dist, 0.999) < 1e-3 and dist.max() < 0.1
    # tracked posteriors, one per concept; the unguided chain leaves half the mass in the two concepts
    none = run(dj.NoGuidance(), None)
    assert abs(lab.union.in_negative(none).mean() - 0.5) < 0.02
    tracked, tr = dj.sample(lab.denoiser_full, lab.schedule, keys, (2,), rule=lab.approximate_dng(1.0),
                            denoiser_c=lab.denoisers_concepts, chunk_size=N_2D, return_trace=True)
    forb = lab.union.in_negative(np.asarray(tracked))
    assert forb.mean() < 0.06, forb.mean()
    for c in lab.concepts:                                   # each concept removed, not only their sum
        assert c.in_negative(np.asarray(tracked)).mean() < 0.04
    assert np.all(np.asarray(tr.p) <= 0.99 + 1e-6)          # P = sum_k p_k capped at p_max
    with pytest.raises(ValueError, match="sequence of 2 denoisers \\(one per concept"):
        run(lab.approximate_dng(1.0), lab.denoisers_concepts[0])
    with pytest.raises(ValueError, match="takes one denoiser_c"):
        run(dj.DynamicNegativeGuidance(), lab.denoisers_concepts)


def test_positive_mode_exact_dng_samples_the_prompt_without_the_negative():
    """c+ = the left modes {0, 2}, c- = the top modes {2, 3}: exact DNG in the positive mode at lambda0 = 1,
    with eps(x | c+, c-) as its negative prediction, samples p(x | c+, not c-) = mode 0, path by path the
    chain of mode 0's own eps; tracked DNG removes most of mode 2 with that prediction, and part of it
    with the text-to-image stand-in eps(x | c-)."""
    from dngjax.gmm import mixture_denoiser, toy_2d_two_concepts
    mixture, _ = toy_2d_two_concepts()
    sched = _chain(STEPS_FAST)
    pos = NegativeSplit(mixture.subset([0, 2]), [1], sched)     # within c+: forget mode 2 (= c+ and c-)
    null = mixture_denoiser(mixture, sched)
    keys = dj.keys_from_seeds(np.arange(N_2D))
    run = lambda rule, dc: np.asarray(dj.sample(null, sched, keys, (2,), rule=rule, denoiser_c=dc, chunk_size=N_2D))
    comp = lambda x: np.bincount(np.asarray(mixture.classify(jnp.asarray(x))), minlength=4) / len(x)
    rule = dj.PositiveMode(dj.ExactDynamicNegativeGuidance(1.0, posterior_fn=pos.posterior_fn, log_space=True))
    x = run(rule, (pos.denoiser_full, pos.denoiser_neg))
    assert comp(x)[0] > 0.995, comp(x)
    target = pos.remember_mixture
    ref = np.asarray(target.sample(jax.random.key(7), N_2D))
    for d in ([1, 0], [0, 1]):
        assert _marginal_w1(x, target, d) < 3 * _marginal_w1(ref, target, d) + 0.02
    direct = np.asarray(dj.sample(pos.denoiser_remember, sched, keys, (2,), chunk_size=N_2D))
    dist = np.abs(x - direct).max(-1)
    assert np.quantile(dist, 0.999) < 1e-3 and dist.max() < 0.1
    tracked = dj.PositiveMode(dj.DynamicNegativeGuidance(1.0, prior=0.5, temperature=1.0, update_variance="beta"))
    forb = comp(run(tracked, (pos.denoiser_full, pos.denoiser_neg)))[2]
    assert forb < 0.07, forb                                   # from 0.5 within c+; measured 0.035
    standin = comp(run(tracked, (pos.denoiser_full, mixture_denoiser(mixture.subset([2, 3]), sched))))[2]
    assert forb < standin < 0.35, standin                      # measured 0.24
    with pytest.raises(ValueError, match="c\\+ and c-"):
        run(tracked, pos.denoiser_full)


def test_calibrate_finds_the_smallest_scale_meeting_the_target_with_a_bound():
    """One sweep over NP scales on the 1-D lab: the chosen scale's upper 95 % bound meets 5 %, the scale
    before it does not, and the bound is Clopper-Pearson's."""
    from scipy import stats
    lab = _lab(STEPS_FAST)
    keys = dj.keys_from_seeds(np.arange(2000))
    scales = [0.0, 0.5, 1.0, 2.0, 4.0, 8.0]
    cal = dj.calibrate(lab.denoiser_full, lab.schedule, keys, (1,), rule=dj.NegativePrompting(), scales=scales[::-1],
                       is_unwanted=lab.in_negative, target=0.05, denoiser_c=lab.denoiser_neg, chunk_size=2000)
    np.testing.assert_array_equal(cal.scales, scales)                # sorted
    assert cal.n == 2000 and abs(cal.rate[0] - 0.35) < 0.04          # unguided: the forbidden mode's weight
    assert cal.met and cal.scale in scales[1:]
    k = scales.index(cal.scale)
    assert cal.upper[k] <= 0.05 < cal.upper[k - 1]
    assert np.all(cal.upper >= cal.rate)
    np.testing.assert_allclose(cal.upper[k], stats.beta.ppf(0.95, cal.unwanted[k] + 1, 2000 - cal.unwanted[k]))
    # the same samples as a plain sweep
    x = dj.sweep(lab.denoiser_full, lab.schedule, keys, (1,), rule=dj.NegativePrompting(), grid={"scale": [cal.scale]},
                 denoiser_c=lab.denoiser_neg, chunk_size=2000)
    assert int(lab.in_negative(x[0]).sum()) == cal.unwanted[k]
    assert "smallest scale meeting 5 %" in cal.table()
    # k = 0 of n: the bound is 1 - (1 - c)^(1/n)
    np.testing.assert_allclose(dj.calibration.upper_bound(np.array([0]), 300, 0.95), 1 - 0.05 ** (1 / 300), rtol=1e-9)
    none = dj.calibrate(lab.denoiser_full, lab.schedule, keys[:200], (1,), rule=dj.NegativePrompting(), scales=[0.0],
                        is_unwanted=lab.in_negative, target=0.05, denoiser_c=lab.denoiser_neg)
    assert not none.met and "no candidate scale" in none.table()
    for kw, message in [({"target": 5.0}, "target must be a rate"), ({"confidence": 0.3}, "confidence must"),
                        ({"scales": []}, "scales is empty"), ({"scales": [-1.0]}, "scale must be >= 0")]:
        args = dict(rule=dj.NegativePrompting(), scales=[1.0], is_unwanted=lab.in_negative, target=0.05,
                    denoiser_c=lab.denoiser_neg)
        args.update(kw)
        with pytest.raises(ValueError, match=message):
            dj.calibrate(lab.denoiser_full, lab.schedule, keys[:10], (1,), **args)


def test_multi_concept_dng_with_one_concept_is_dng():
    lab = _lab(STEPS_FAST)
    keys = dj.keys_from_seeds(np.arange(64))
    one = dj.sample(lab.denoiser_full, lab.schedule, keys, (1,), rule=lab.approximate_dng(2.0),
                    denoiser_c=lab.denoiser_neg)
    multi = dj.MultiConcept(dj.DynamicNegativeGuidance(2.0, prior=lab.negative_weight, temperature=1.0,
                                                       update_variance="beta"), num_concepts=1)
    got = dj.sample(lab.denoiser_full, lab.schedule, keys, (1,), rule=multi, denoiser_c=[lab.denoiser_neg])
    np.testing.assert_allclose(np.asarray(got), np.asarray(one), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="must sum below p_max"):
        dj.MultiConcept(dj.DynamicNegativeGuidance(prior=0.5), num_concepts=2)
    with pytest.raises(ValueError, match="num_concepts must be an integer"):
        dj.MultiConcept(dj.DynamicNegativeGuidance(), num_concepts=0)


# --------------------------------------------------------------------------- sampling (slow)

@pytest.mark.slow
def test_slow_exact_dng_full_chain_100k():
    lab = _lab(STEPS_SLOW)
    x = _run("dng_exact", STEPS_SLOW, N_SLOW)
    assert wasserstein1_1d(x, lab.remember_mixture) < W1_BOUND_SLOW
    assert lab.in_negative(x).mean() < 0.005
    # CFG on other seeds: statistically indistinguishable from DNG
    y = _run("cfg", STEPS_SLOW, N_SLOW, seed0=10 ** 6)
    assert wasserstein1_1d(y, lab.remember_mixture) < W1_BOUND_SLOW
    assert ks_2samp(x[:, 0], y[:, 0]).pvalue > 1e-3
    x_np = _run("np", STEPS_SLOW, N_SLOW)
    assert wasserstein1_1d(x_np, lab.remember_mixture) > 20 * W1_BOUND_SLOW


@pytest.mark.slow
def test_slow_tracking_and_approximate_dng_full_chain():
    lab = _lab(STEPS_SLOW)
    n = 50_000
    xa, pa = _run("track_approx", STEPS_SLOW, n, trace=True)
    xe, pe = _run("track_exact", STEPS_SLOW, n, trace=True)
    pa, pe = pa.astype(np.float64), pe.astype(np.float64)
    forb = lab.in_negative(xe)
    gap = max(np.abs(pa[:, forb].mean(1) - pe[:, forb].mean(1)).max(),
              np.abs(pa[:, ~forb].mean(1) - pe[:, ~forb].mean(1)).max())
    assert gap < 0.07, gap
    x = _run("dng_approx", STEPS_SLOW, N_SLOW)
    assert lab.in_negative(x).mean() < 0.03
    assert np.all(np.abs(_kept_weights(lab, x) - KEPT_WEIGHTS) < 0.01)
