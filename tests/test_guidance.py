import numpy as np
import pytest
import jax
import jax.numpy as jnp

import dngjax as dj


@pytest.mark.parametrize("ctor,kw,name", [
    (dj.NegativePrompting, dict(scale=-1.0), "scale"),
    (dj.ClassifierFreeGuidance, dict(scale=-0.1), "scale"),
    (dj.NegativePrompting, dict(scale=float("nan")), "scale"),
    (dj.SafeLatentDiffusion, dict(scale=-1.0), "scale"),
    (dj.SafeLatentDiffusion, dict(scale=1.0, warmup=-1), "warmup"),
    (dj.SafeLatentDiffusion, dict(scale=1.0, warmup=1.5), "warmup"),
    (dj.SafeLatentDiffusion, dict(scale=1.0, beta_m=1.5), "beta_m"),
    (dj.SafeLatentDiffusion, dict(scale=1.0, threshold=float("inf")), "threshold"),
    (dj.DynamicNegativeGuidance, dict(scale=-1.0), "scale"),
    (dj.DynamicNegativeGuidance, dict(prior=0.0), "prior"),
    (dj.DynamicNegativeGuidance, dict(prior=1.0), "prior"),
    (dj.DynamicNegativeGuidance, dict(prior=1.5), "prior"),
    (dj.DynamicNegativeGuidance, dict(temperature=-0.1), "temperature"),
    (dj.DynamicNegativeGuidance, dict(p_min=0.0), "p_min"),
    (dj.DynamicNegativeGuidance, dict(p_min=-1e-3), "p_min"),
    (dj.DynamicNegativeGuidance, dict(p_max=1.0), "p_max"),
    (dj.DynamicNegativeGuidance, dict(p_min=0.5, p_max=0.4), "p_min"),
    (dj.DynamicNegativeGuidance, dict(p_min=0.5, p_max=0.5), "p_min"),
    (dj.DynamicNegativeGuidance, dict(offset=float("inf")), "offset"),
    (dj.DynamicNegativeGuidance, dict(temperature=float("nan")), "temperature"),
    (dj.DynamicNegativeGuidance, dict(scale=np.array([1.0, -2.0])), "scale"),
    (dj.ExactDynamicNegativeGuidance, dict(scale=-1.0, posterior_fn=lambda x, t: x), "scale"),
])
def test_illegal_hyperparameters_raise_naming_the_parameter(ctor, kw, name):
    with pytest.raises(ValueError, match=name):
        ctor(**kw)


def test_variance_convention_is_checked():
    with pytest.raises(ValueError, match="variance"):
        dj.DynamicNegativeGuidance(variance="beta_tilde")
    assert dj.DynamicNegativeGuidance().variance == "posterior"


def test_exact_needs_callable():
    with pytest.raises(ValueError, match="posterior_fn"):
        dj.ExactDynamicNegativeGuidance(1.0)


def test_replace_validates():
    rule = dj.DynamicNegativeGuidance(1.0)
    with pytest.raises(ValueError, match="prior"):
        rule.replace(prior=2.0)
    assert float(rule.replace(scale=3.0).scale) == 3.0


def test_rules_are_pytrees_with_array_leaves():
    rule = dj.DynamicNegativeGuidance(2.0, prior=0.1, temperature=0.3, offset=1e-3, variance="beta")
    leaves, treedef = jax.tree_util.tree_flatten(rule)
    assert len(leaves) == 7 and all(isinstance(l, jax.Array) for l in leaves)   # scale .. p_max, hold_below
    back = jax.tree_util.tree_unflatten(treedef, leaves)
    assert back.variance == "beta" and float(back.prior) == pytest.approx(0.1)
    # jax may build such trees with placeholders (vmap axes): no validation on unflatten
    axes = jax.tree_util.tree_unflatten(treedef, [0] + [None] * 6)
    assert axes.scale == 0
    # traced values pass through construction inside jit
    f = jax.jit(lambda s: dj.DynamicNegativeGuidance(s).scale * 2)
    assert float(f(1.5)) == 3.0


def test_dng_lambda_and_update_by_hand():
    rule = dj.DynamicNegativeGuidance(2.0, prior=0.2, temperature=0.5, offset=0.1, p_min=1e-6, p_max=0.99)
    x = jnp.ones((1, 2))
    state = rule.init(x)
    np.testing.assert_allclose(np.exp(state), [0.2], rtol=1e-6)
    eps_u, eps_c = jnp.zeros((1, 2)), jnp.ones((1, 2))
    # an ancestral DDPM step (mean (x - beta / sqrt(1 - ab) eps) / sqrt(1 - beta)) with beta_tilde = 0.015
    step = dj.Step(index=jnp.array(3), t=jnp.array(30), beta=jnp.array(0.02), alpha_bar=jnp.array(0.5),
                   alpha_bar_prev=jnp.array(0.51), one_minus_alpha_bar=jnp.array(0.5),
                   one_minus_alpha_bar_prev=jnp.array(0.49), posterior_variance=jnp.array(0.015),
                   mean_x=jnp.array(1 / np.sqrt(0.98)), mean_eps=jnp.array(-0.02 / np.sqrt(0.5) / np.sqrt(0.98)),
                   noise_variance=jnp.array(0.02), steps_taken=jnp.array(0), is_last=jnp.array(False))
    eps, lam, state = rule.guide(state, x, eps_u, eps_c, step)
    np.testing.assert_allclose(lam, [2.0 * 0.2 / 0.8], rtol=1e-6)
    np.testing.assert_allclose(eps, -0.5 * np.ones((1, 2)), rtol=1e-6)
    x_next = jnp.array([[0.3, -0.2]])
    new = rule.update(state, x, x_next, eps_u, eps_c, step)
    c = 0.02 / np.sqrt(0.5)
    mu_u = (1.0 - c * 0.0) / np.sqrt(0.98)
    mu_n = (1.0 - c * 1.0) / np.sqrt(0.98)
    d = np.sum((np.array([0.3, -0.2]) - mu_n) ** 2) - np.sum((np.array([0.3, -0.2]) - mu_u) ** 2)
    expected = np.log(0.2) + (-0.5 * d + 0.1) / (2 * 0.015)
    expected = np.clip(expected, np.log(1e-6), np.log(0.99))
    np.testing.assert_allclose(new, [expected], rtol=1e-5)
    # the final step uses beta_t, not beta_tilde_t (which is 0 there)
    last = step.replace(is_last=jnp.array(True), posterior_variance=jnp.array(0.0))
    new_last = rule.update(state, x, x_next, eps_u, eps_c, last)
    exp_last = np.clip(np.log(0.2) + (-0.5 * d + 0.1) / (2 * 0.02), np.log(1e-6), np.log(0.99))
    np.testing.assert_allclose(new_last, [exp_last], rtol=1e-5)


def test_sld_mask_by_hand():
    rule = dj.SafeLatentDiffusion(scale=2.0, threshold=0.04, s_s=100.0, beta_m=0.2, s_m=0.1)
    eps_u = jnp.array([[0.0, 0.0, 0.0]])
    eps_c = jnp.array([[0.001, 0.5, -0.5]])  # d = eps_u - eps_c = [-0.001, -0.5, 0.5]
    m = rule.init(eps_u)
    step = jax.tree.map(lambda a: a[5], dj.chain_steps(dj.linear_schedule(10)))   # SLD reads only steps_taken
    eps, lam, m = rule.guide(m, eps_u, eps_u, eps_c, step)
    mask = np.array([0.1, 1.0, 0.0])                     # min(1, 100 |d|) where d < 0.04
    corr = -mask * np.array([-0.001, -0.5, 0.5])
    np.testing.assert_allclose(eps, [-2.0 * corr], rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(m, [0.8 * corr], rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(lam, [2.0 * mask.mean()], rtol=1e-6)


@pytest.mark.parametrize("value", [None, "5", [1.0, None], True])
def test_non_numeric_hyperparameters_raise_on_construction(value):
    with pytest.raises(ValueError, match="scale must be a number or an array of numbers"):
        dj.DynamicNegativeGuidance(scale=value)
    with pytest.raises(ValueError, match="scale must be a number"):
        dj.NegativePrompting(scale=value)


def test_dng_prior_outside_the_clamp_is_rejected():
    with pytest.raises(ValueError, match=r"prior must lie in \[p_min, p_max\]"):
        dj.DynamicNegativeGuidance(prior=0.995, p_max=0.99)
    with pytest.raises(ValueError, match=r"prior must lie in \[p_min, p_max\]"):
        dj.DynamicNegativeGuidance(prior=0.01, p_min=0.05)
    dj.DynamicNegativeGuidance(prior=0.99, p_max=0.99)          # on the boundary: fine


def test_shipped_rules_follow_the_protocol():
    for rule in (dj.NoGuidance(), dj.NegativePrompting(1.0), dj.ClassifierFreeGuidance(1.0),
                 dj.SafeLatentDiffusion(1.0), dj.DynamicNegativeGuidance(1.0)):
        assert isinstance(rule, dj.Rule)


def test_positive_mode_combines_null_positive_and_negative_by_hand():
    """eps = eps_null + g (eps_pos - eps_null) - lambda (eps_neg - eps_pos); DNG's update sees (eps_pos, eps_neg)."""
    step = jax.tree.map(lambda a: a[5], dj.chain_steps(dj.linear_schedule(10)))
    null, pos, neg = jnp.array([[0.1, 0.2]]), jnp.array([[0.5, -0.3]]), jnp.array([[1.0, 0.4]])
    eps, lam, _ = dj.PositiveNegativePrompting(scale=0.7, cfg_scale=3.0).guide((), null, null, (pos, neg), step)
    np.testing.assert_allclose(eps, null + 3.0 * (pos - null) - 0.7 * (neg - pos), rtol=1e-6)
    np.testing.assert_allclose(lam, [0.7])
    rule = dj.PositiveDynamicNegativeGuidance(2.0, prior=0.2, cfg_scale=1.0)
    single = dj.DynamicNegativeGuidance(2.0, prior=0.2)
    state = rule.init(null)
    eps, lam, _ = rule.guide(state, null, null, (pos, neg), step)
    np.testing.assert_allclose(eps, pos - 2.0 * 0.25 * (neg - pos), rtol=1e-6)   # cfg_scale 1: from eps(x | c+)
    x_next = jnp.array([[0.3, -0.2]])
    np.testing.assert_allclose(rule.update(state, null, x_next, null, (pos, neg), step),
                               single.update(state, null, x_next, pos, neg, step), rtol=1e-6)
    sld = dj.PositiveSafeLatentDiffusion(scale=1.0, cfg_scale=2.0)
    e1, _, m1 = sld.guide(sld.init(null), null, null, (pos, neg), step)
    e0, _, m0 = dj.SafeLatentDiffusion(scale=1.0).guide(sld.init(null), null, pos, neg, step)
    np.testing.assert_allclose(e1, e0 + (pos - null), rtol=1e-6)
    np.testing.assert_allclose(m1, m0)
    with pytest.raises(ValueError, match="cfg_scale must be >= 0"):
        dj.PositiveDynamicNegativeGuidance(cfg_scale=-1.0)
