"""DNG's continuous-time posterior estimators and the deterministic / multistep samplers they serve.

Oracles: the analytic Gaussian mixtures (exact log densities, scores and posteriors, differentiated by
jax for the identity itself), numpy loops written from the papers' formulas, and diffusers' schedulers
(test-only PyTorch) for DPM-Solver++(2M) and Euler.
"""

import warnings

import numpy as np
import pytest
import jax
import jax.numpy as jnp

import dngjax as dj
from dngjax.gmm import NegativeSplit, toy_1d, toy_2d


def _lab(dim: int, steps: int):
    sched = dj.linear_schedule() if steps >= 1000 else dj.respace(dj.linear_schedule(), steps)
    mixture, forget = toy_1d() if dim == 1 else toy_2d()
    return sched, NegativeSplit(mixture, forget, sched)


def test_the_identity_for_log_r_holds_on_an_analytic_mixture():
    """d/d lambda log r = 1/2 [g . (x + s_c + s_u) + div g] at fixed x, lambda = -log alpha_bar, r = p(x|c-)/p(x).

    Both sides from the exact 2-D mixture: the left by autodiff through alpha_bar = exp(-lambda), the right
    from the scores and the Hessian's trace: an independent check of the Fokker-Planck derivation."""
    mixture, forget = toy_2d()
    lab = NegativeSplit(mixture, forget, dj.linear_schedule())
    full, neg = lab.full, lab.negative_mixture
    log_r = lambda x, lam: neg.log_prob(x[None], jnp.exp(-lam))[0] - full.log_prob(x[None], jnp.exp(-lam))[0]
    rng = np.random.default_rng(0)
    for lam in (0.05, 0.5, 2.0, 6.0):
        for x in rng.normal(0.0, 1.5, size=(4, 2)).astype(np.float32):
            x = jnp.asarray(x)
            lhs = jax.grad(log_r, argnums=1)(x, jnp.float32(lam))
            g = jax.grad(log_r)(x, jnp.float32(lam))
            s_c = jax.grad(lambda y: neg.log_prob(y[None], jnp.exp(-lam))[0])(x)
            s_u = jax.grad(lambda y: full.log_prob(y[None], jnp.exp(-lam))[0])(x)
            div = jnp.trace(jax.hessian(log_r)(x, jnp.float32(lam)))
            rhs = 0.5 * (jnp.dot(g, x + s_c + s_u) + div)
            np.testing.assert_allclose(float(lhs), float(rhs), rtol=2e-3, atol=2e-4)


@pytest.mark.parametrize("dim,solver,eta", [(1, None, 0.0), (2, None, 0.0), (2, "dpmpp_2m", None), (1, None, 1.0)])
def test_tracked_posterior_follows_the_exact_one_along_the_chain(dim, solver, eta):
    """Unguided (scale 0: the same path for every rule), 100 steps: the Stratonovich estimate of p(c- | x_t)
    stays within a few 1e-3 of the exact posterior at every step; the paper's update (ancestral) drifts."""
    sched, lab = _lab(dim, 100)
    keys = dj.keys_from_seeds(np.arange(2000))
    kw = dict(denoiser_c=lab.denoiser_neg, eta=eta, solver=solver, return_trace=True)
    tracked = dj.DynamicNegativeGuidance(0.0, prior=lab.negative_weight, temperature=1.0, p_min=1e-30,
                                         p_max=1 - 1e-7, estimator="stratonovich", divergence="exact",
                                         start="gaussian")
    _, tr = dj.sample(lab.denoiser_full, sched, keys, (dim,), rule=tracked, **kw)
    if eta == 0.0 and dim == 2:   # log r_T = 0 (Alg. 1's start) is off by the exact p_T's distance from the
        # prior (0.0036 on average here), and a deterministic path keeps that error to the end
        _, pr = dj.sample(lab.denoiser_full, sched, keys, (dim,), rule=tracked.replace(start="prior"), **kw)
        np.testing.assert_allclose(np.asarray(pr.p)[0], lab.negative_weight, rtol=1e-6)
        assert 0.003 < np.abs(np.asarray(pr.p)[-30] - np.asarray(tr.p)[-30]).mean() < 0.01
    _, ex = dj.sample(lab.denoiser_full, sched, keys, (dim,), rule=lab.exact_dng(0.0, p_max=1 - 1e-7), **kw)
    err = np.abs(np.asarray(tr.p) - np.asarray(ex.p)).mean(axis=1)           # (S,) mean |p - p_exact|
    bound = 0.004 if eta == 0.0 or solver else 0.02                         # the ancestral chain's longer segments
    assert err.max() < bound, err.max()
    assert float(np.asarray(ex.p)[-1].std()) > 0.3                          # the posterior really moved
    if eta == 1.0:                                                           # the paper's update on the same chain
        paper = dj.DynamicNegativeGuidance(0.0, prior=lab.negative_weight, temperature=1.0, p_min=1e-30,
                                           p_max=1 - 1e-7)
        _, pa = dj.sample(lab.denoiser_full, sched, keys, (dim,), rule=paper, **kw)
        assert np.abs(np.asarray(pa.p) - np.asarray(ex.p)).mean(axis=1).max() > 2 * err.max()


def test_dng_with_the_continuous_posterior_removes_the_mode_on_25_deterministic_steps():
    sched, lab = _lab(1, 25)
    keys = dj.keys_from_seeds(np.arange(20_000))
    rule = dj.DynamicNegativeGuidance(1.0, prior=lab.negative_weight, temperature=1.0, p_max=0.99,
                                      estimator="stratonovich")
    for solver in ("ddim", "dpmpp_2m"):
        x = np.asarray(dj.sample(lab.denoiser_full, sched, keys, (1,), rule=rule, denoiser_c=lab.denoiser_neg,
                                 solver=solver))
        assert lab.in_negative(x).mean() < 0.012, (solver, lab.in_negative(x).mean())      # unguided: 0.35
        x_np = np.asarray(dj.sample(lab.denoiser_full, sched, keys, (1,), rule=dj.NegativePrompting(0.0),
                                    denoiser_c=lab.denoiser_neg, solver=solver))
        assert lab.in_negative(x_np).mean() > 0.3


def test_hutchinson_divergence_is_unbiased_and_exact_for_one_probe_direction_per_dim():
    """The sampler's tangents: Rademacher probes give E[v.Jv] = tr J; the basis vectors give tr J exactly."""
    a = jnp.asarray(np.random.default_rng(1).normal(size=(6, 6)).astype(np.float32))
    f = lambda x: x @ a.T                                         # eps_c - eps_u = x A^T: div = tr A
    x = jnp.ones((1, 6))
    keys = jax.vmap(jax.random.key)(jnp.arange(4000))
    from dngjax.sampler import _probes
    est = []
    for k in keys[:2000]:
        v, w = _probes(("hutchinson", 2), k[None], x)
        du = jnp.zeros_like(v)
        dc = jax.vmap(lambda vk: jax.jvp(f, (x,), (vk,))[1])(v)
        est.append(float(dj.Tangents(v, du, dc, w).divergence(du, dc)[0]))
    assert abs(np.mean(est) - float(jnp.trace(a))) < 4 * np.std(est) / np.sqrt(len(est))
    v, w = _probes(("exact", 0), keys[:1], x)
    dc = jax.vmap(lambda vk: jax.jvp(f, (x,), (vk,))[1])(v)
    np.testing.assert_allclose(float(dj.Tangents(v, 0 * dc, dc, w).divergence(0 * dc, dc)[0]),
                               float(jnp.trace(a)), rtol=1e-5)


def _dpmpp_2m_numpy(eps_fn, alpha_bars, x):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2 with midpoint D1) as written in the paper, x0 = (x - s eps) / a.

    alpha_bars: the chain's points, noisiest first, ending with alpha_bar = 1 (the final step to sigma = 0,
    of first order)."""
    a, s = np.sqrt(alpha_bars), np.sqrt(1 - alpha_bars)
    lam = np.log(a[:-1]) - np.log(s[:-1])
    n = len(alpha_bars) - 1
    x0_prev = None
    for i in range(n):
        x0 = (x - s[i] * eps_fn(x, i)) / a[i]
        last = i == n - 1
        if last:
            x = x0                                                            # to sigma = 0
        else:
            h = lam[i + 1] - lam[i]
            if x0_prev is None:
                d = x0
            else:
                r = (lam[i] - lam[i - 1]) / h
                d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
            x = s[i + 1] / s[i] * x - a[i + 1] * np.expm1(-h) * d
        x0_prev = x0
    return x


@pytest.mark.parametrize("steps", [8, 20])
def test_dpmpp_2m_matches_a_numpy_loop_of_the_paper(steps):
    sched, lab = _lab(2, steps)
    keys = dj.keys_from_seeds(np.arange(64))
    x_T = np.asarray(jax.random.normal(jax.random.key(3), (64, 2)))
    x = np.asarray(dj.sample(lab.denoiser_full, sched, keys, (2,), solver="dpmpp_2m", x_T=x_T))
    ts = np.asarray(sched.timesteps)[::-1]
    ab = np.concatenate([np.asarray(sched.alpha_bars, np.float64)[::-1], [1.0]])
    eps = lambda y, i: np.asarray(lab.denoiser_full(jnp.asarray(y, jnp.float32), jnp.full((len(y),), ts[i])))
    ref = _dpmpp_2m_numpy(eps, ab, x_T.astype(np.float64))
    np.testing.assert_allclose(x, ref, rtol=2e-4, atol=2e-4)


def test_dpmpp_2m_and_euler_match_diffusers_schedulers():
    """diffusers' DPMSolverMultistepScheduler (defaults) and EulerDiscreteScheduler (trailing spacing: integer
    timesteps) on the same analytic eps model, with their timesteps given to dj.respace(timesteps=...)."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    base = dj.linear_schedule()
    mixture, forget = toy_2d()
    x_T = np.asarray(jax.random.normal(jax.random.key(5), (16, 2)))
    for name, kw, solver in [("DPMSolverMultistepScheduler", {}, "dpmpp_2m"),
                             ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}, "euler")]:
        sch = getattr(diffusers, name)(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                       beta_schedule="linear", **kw)
        sch.set_timesteps(12)
        ts = sch.timesteps.numpy().astype(np.int64)
        sched = dj.respace(base, timesteps=ts)
        lab = NegativeSplit(mixture, forget, sched)
        full_lab = NegativeSplit(mixture, forget, base)                       # eps at the original indices
        eps = lambda y, t: np.asarray(full_lab.denoiser_full(jnp.asarray(y, jnp.float32),
                                                             jnp.full((len(y),), int(t))))
        x = torch.tensor(x_T, dtype=torch.float64) * float(sch.init_noise_sigma)
        for t in sch.timesteps:
            inp = sch.scale_model_input(x, t)
            # the VP model sees x_t = inp (Euler: x / sqrt(sigma^2 + 1)); it predicts eps
            out = torch.tensor(eps(inp.numpy(), t), dtype=torch.float64)
            x = sch.step(out, t, x).prev_sample
        ours = np.asarray(dj.sample(lab.denoiser_full, sched, dj.keys_from_seeds(np.arange(16)), (2,),
                                    solver=solver, x_T=x_T))
        np.testing.assert_allclose(ours, x.numpy(), rtol=1e-3, atol=1e-3, err_msg=name)


def test_euler_and_euler_ancestral_are_ddim_at_eta_0_and_1():
    sched, lab = _lab(2, 30)
    keys = dj.keys_from_seeds(np.arange(32))
    for solver, eta in (("euler", 0.0), ("euler_ancestral", 1.0)):
        a = dj.sample(lab.denoiser_full, sched, keys, (2,), solver=solver)
        b = dj.sample(lab.denoiser_full, sched, keys, (2,), eta=eta)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_nonfinite_samples_are_counted_and_warned_about_naming_the_step():
    sched = dj.respace(dj.linear_schedule(), 10)
    # a denoiser that returns NaN for sample 0 from timestep <= 500 on
    def eps(x, t):
        bad = (jnp.arange(x.shape[0]) == 0)[:, None] & (t[:, None] <= 500)
        return jnp.where(bad, jnp.nan, 0.1 * x)
    keys = dj.keys_from_seeds(np.arange(4))
    with pytest.warns(dj.NonFiniteSamplesWarning, match=r"1 of 4 samples .* first after step 6 of 10 \(timestep 444\)"):
        x, tr = dj.sample(eps, sched, keys, (3,), return_trace=True)
    assert np.isnan(np.asarray(x)[0]).all() and np.isfinite(np.asarray(x)[1:]).all()
    np.testing.assert_array_equal(np.asarray(tr.nonfinite), [0] * 5 + [1] * 5)
    with pytest.warns(dj.NonFiniteSamplesWarning, match="first after step 6"):
        dj.sample(eps, sched, keys, (3,), chunk_size=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dj.sample(lambda x, t: 0.1 * x, sched, keys, (3,), chunk_size=3)      # finite: no warning


@pytest.mark.parametrize("kw,call,message", [
    (dict(), dict(eta=0.0), "estimator='stratonovich'"),
    (dict(), dict(solver="dpmpp_2m"), "estimator='stratonovich'"),
    (dict(estimator="stratonovich", offset=0.1), None, "offset belongs to the paper's update"),
    (dict(estimator="stratonovich", update_variance="beta"), None, "variance belongs to the paper's update"),
    (dict(estimator="stratonovich", divergence="none"), None, "needs the divergence"),
    (dict(estimator="kalman"), None, "estimator must be one of"),
    (dict(estimator="ito", divergence="trace"), None, "divergence must be one of"),
    (dict(estimator="ito", probes=0), None, "probes must be an integer >= 1"),
    (dict(hold_below=0.2), None, "hold_below belongs to the continuous-time estimators"),
    (dict(estimator="stratonovich", start="exact"), None, "start must be one of"),
    (dict(estimator="ito", start="gaussian"), None, "belongs to estimator='stratonovich'"),
    (dict(estimator="stratonovich", hold_below=1.0), None, "hold_below must be a noise level"),
    (dict(estimator="stratonovich", hold_below=-0.1), None, "hold_below must be a noise level"),
    (dict(estimator="stratonovich", divergence="exact"), dict(shape=(17, 17)), "divergence='exact' costs one jvp"),
    (dict(estimator="stratonovich"), dict(solver="euler", eta=0.5), "has no eta"),
    (dict(estimator="stratonovich"), dict(solver="heun"), "solver must be one of"),
])
def test_bad_estimator_and_solver_settings_are_refused_before_sampling(kw, call, message):
    eps = lambda x, t: 0.1 * x
    with pytest.raises(ValueError, match=message):
        rule = dj.DynamicNegativeGuidance(1.0, **kw)
        call = dict(call or {})
        shape = call.pop("shape", (2,))
        dj.sample(eps, dj.respace(dj.linear_schedule(), 5), dj.keys_from_seeds([0]), shape, rule=rule,
                  denoiser_c=eps, **call)


@pytest.mark.parametrize("estimator,solver", [("stratonovich", "ddim"), ("ito", None)])
def test_hold_below_freezes_the_posterior_at_low_noise_and_log_r_starts_at_0(estimator, solver):
    """The tracked p starts at the prior (log r_T = 0, Alg. 1); with hold_below = s no increment comes from a
    point with sigma = sqrt(1 - alpha_bar) < s: p is constant from the first such point on, and equal to the
    untouched run's p before it (the lab's exact scores: the increments there are far from 0)."""
    sched, lab = _lab(2, 20)
    keys = dj.keys_from_seeds(np.arange(300))
    kw = dict(denoiser_c=lab.denoiser_neg, solver=solver, eta=None if solver else 1.0, return_trace=True)
    base = dict(prior=lab.negative_weight, temperature=1.0, p_min=1e-30, p_max=1 - 1e-7, estimator=estimator,
                divergence="exact" if estimator == "stratonovich" else "none")
    _, free = dj.sample(lab.denoiser_full, sched, keys, (2,), rule=dj.DynamicNegativeGuidance(0.0, **base), **kw)
    _, held = dj.sample(lab.denoiser_full, sched, keys, (2,),
                        rule=dj.DynamicNegativeGuidance(0.0, hold_below=0.5, **base), **kw)
    p_free, p_held = np.asarray(free.p), np.asarray(held.p)                  # (S, N), noisiest first
    np.testing.assert_allclose(p_free[0], lab.negative_weight, rtol=1e-6)      # log r_T = 0
    sigma = np.sqrt(np.asarray(sched.one_minus_alpha_bars))[::-1]            # noisiest first, as the trace
    # the trace's p at step k is the posterior that guided step k, the last increment's segment ending at x_k
    # (stratonovich: updated at x_k; ito: after the step that reached x_k)
    first = int(np.argmax(sigma < 0.5))
    assert 0 < first < len(sigma) - 1
    np.testing.assert_allclose(p_held[:first], p_free[:first], rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(p_held[first:], np.broadcast_to(p_held[first - 1], p_held[first:].shape), rtol=1e-6)
    assert np.abs(p_free[-1] - p_free[first - 1]).max() > 0.05               # tracking would have moved it


def test_several_concepts_refuse_the_continuous_estimators():
    with pytest.raises(ValueError, match="paper's update only"):
        dj.MultiConcept(dj.DynamicNegativeGuidance(1.0, prior=0.2, estimator="stratonovich"), num_concepts=2)


def test_positive_mode_tracks_the_posterior_relative_to_the_positive_prediction():
    """Positive-mode DNG with the continuous posterior equals DNG with eps_pos as the unconditional prediction
    (cfg_scale 1: eps_null unused beyond its call)."""
    sched, lab = _lab(2, 20)
    keys = dj.keys_from_seeds(np.arange(64))
    kw = dict(prior=lab.negative_weight, temperature=1.0, estimator="stratonovich", divergence="exact")
    positive = dj.PositiveMode(dj.DynamicNegativeGuidance(1.0, **kw))
    a = dj.sample(lab.denoiser_remember, sched, keys, (2,), rule=positive,
                  denoiser_c=(lab.denoiser_full, lab.denoiser_neg), solver="ddim", return_trace=True)
    b = dj.sample(lab.denoiser_full, sched, keys, (2,), rule=dj.DynamicNegativeGuidance(1.0, **kw),
                  denoiser_c=lab.denoiser_neg, solver="ddim", return_trace=True)
    np.testing.assert_allclose(np.asarray(a[0]), np.asarray(b[0]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(a[1].p), np.asarray(b[1].p), rtol=1e-4, atol=1e-6)
