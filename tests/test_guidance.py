from typing import Any

import chex
import numpy as np
import pytest
import jax
import jax.numpy as jnp

import dngjax as dj
from dngjax import guidance as G


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
        dj.DynamicNegativeGuidance(update_variance="tilde")
    assert dj.DynamicNegativeGuidance().update_variance == "beta_tilde"


def test_exact_needs_callable():
    with pytest.raises(ValueError, match="posterior_fn"):
        dj.ExactDynamicNegativeGuidance(1.0)


def test_replace_validates():
    rule = dj.DynamicNegativeGuidance(1.0)
    with pytest.raises(ValueError, match="prior"):
        rule.replace(prior=2.0)
    assert float(rule.replace(scale=3.0).scale) == 3.0


def test_rules_are_pytrees_with_array_leaves():
    rule = dj.DynamicNegativeGuidance(2.0, prior=0.1, temperature=0.3, offset=1e-3, update_variance="beta")
    leaves, treedef = jax.tree_util.tree_flatten(rule)
    assert len(leaves) == 7 and all(isinstance(l, jax.Array) for l in leaves)   # scale .. p_max, hold_below
    back = jax.tree_util.tree_unflatten(treedef, leaves)
    assert back.update_variance == "beta" and float(back.prior) == pytest.approx(0.1)
    # jax may build such trees with placeholders (vmap axes): no validation on unflatten
    axes = jax.tree_util.tree_unflatten(treedef, [0] + [None] * 6)
    assert axes.scale == 0
    # traced values pass through construction inside jit
    f = jax.jit(lambda s: dj.DynamicNegativeGuidance(s).scale * 2)
    assert float(f(1.5)) == 3.0


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
                 dj.SafeLatentDiffusion(1.0), dj.DynamicNegativeGuidance(1.0),
                 dj.PositiveMode(dj.DynamicNegativeGuidance(1.0), cfg_scale=2.0),
                 dj.MultiConcept(dj.DynamicNegativeGuidance(1.0, prior=0.1), num_concepts=3)):
        assert isinstance(rule, dj.Rule)


def _step(index=5):
    return jax.tree.map(lambda a: a[index], dj.chain_steps(dj.linear_schedule(10)))


class RuleUnitTest(chex.TestCase):
    """The rules' pure functions by hand, each run as written and under jit (the rule a traced argument)."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_dng_lambda_and_update_by_hand(self):
        rule = dj.DynamicNegativeGuidance(2.0, prior=0.2, temperature=0.5, offset=0.1, p_min=1e-6, p_max=0.99)
        init = self.variant(lambda r, x: r.init(x))
        guide = self.variant(lambda r, *a: r.guide(*a))
        update = self.variant(lambda r, *a: r.update(*a))
        x = jnp.ones((1, 2))
        state = init(rule, x)
        chex.assert_shape(state, (1,))
        np.testing.assert_allclose(np.exp(state), [0.2], rtol=1e-6)
        eps_u, eps_c = jnp.zeros((1, 2)), jnp.ones((1, 2))
        # an ancestral DDPM step (mean (x - beta / sqrt(1 - ab) eps) / sqrt(1 - beta)) with beta_tilde = 0.015
        step = dj.Step(index=jnp.array(3), t=jnp.array(30), beta=jnp.array(0.02), alpha_bar=jnp.array(0.5),
                       alpha_bar_prev=jnp.array(0.51), one_minus_alpha_bar=jnp.array(0.5),
                       one_minus_alpha_bar_prev=jnp.array(0.49), beta_tilde=jnp.array(0.015),
                       mean_x=jnp.array(1 / np.sqrt(0.98)), mean_eps=jnp.array(-0.02 / np.sqrt(0.5) / np.sqrt(0.98)),
                       noise_variance=jnp.array(0.02), steps_taken=jnp.array(0), is_last=jnp.array(False))
        eps, lam, state = guide(rule, state, x, eps_u, eps_c, step)
        chex.assert_shape([eps, lam], [(1, 2), (1,)])
        np.testing.assert_allclose(lam, [2.0 * 0.2 / 0.8], rtol=1e-6)
        np.testing.assert_allclose(eps, -0.5 * np.ones((1, 2)), rtol=1e-6)
        x_next = jnp.array([[0.3, -0.2]])
        new = update(rule, state, x, x_next, eps_u, eps_c, step)
        c = 0.02 / np.sqrt(0.5)
        mu_u = (1.0 - c * 0.0) / np.sqrt(0.98)
        mu_n = (1.0 - c * 1.0) / np.sqrt(0.98)
        d = np.sum((np.array([0.3, -0.2]) - mu_n) ** 2) - np.sum((np.array([0.3, -0.2]) - mu_u) ** 2)
        expected = np.log(0.2) + (-0.5 * d + 0.1) / (2 * 0.015)
        expected = np.clip(expected, np.log(1e-6), np.log(0.99))
        np.testing.assert_allclose(new, [expected], rtol=1e-5)
        # the final step uses beta_t, not beta_tilde_t (which is 0 there)
        last = step.replace(is_last=jnp.array(True), beta_tilde=jnp.array(0.0))
        new_last = update(rule, state, x, x_next, eps_u, eps_c, last)
        exp_last = np.clip(np.log(0.2) + (-0.5 * d + 0.1) / (2 * 0.02), np.log(1e-6), np.log(0.99))
        np.testing.assert_allclose(new_last, [exp_last], rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_sld_mask_by_hand(self):
        rule = dj.SafeLatentDiffusion(scale=2.0, threshold=0.04, s_s=100.0, beta_m=0.2, s_m=0.1)
        guide = self.variant(lambda r, *a: r.guide(*a))
        eps_u = jnp.array([[0.0, 0.0, 0.0]])
        eps_c = jnp.array([[0.001, 0.5, -0.5]])  # d = eps_u - eps_c = [-0.001, -0.5, 0.5]
        m = rule.init(eps_u)
        step = _step()                                       # SLD reads only steps_taken
        eps, lam, m = guide(rule, m, eps_u, eps_u, eps_c, step)
        mask = np.array([0.1, 1.0, 0.0])                     # min(1, 100 |d|) where d < 0.04
        corr = -mask * np.array([-0.001, -0.5, 0.5])
        np.testing.assert_allclose(eps, [-2.0 * corr], rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(m, [0.8 * corr], rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(lam, [2.0 * mask.mean()], rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_positive_mode_combines_null_positive_and_negative_by_hand(self):
        """eps = eps_null + g (eps_pos - eps_null) - lambda (eps_neg - eps_pos); DNG's update sees
        (eps_pos, eps_neg)."""
        guide = self.variant(lambda r, *a: r.guide(*a))
        update = self.variant(lambda r, *a: r.update(*a))
        step = _step()
        null, pos, neg = jnp.array([[0.1, 0.2]]), jnp.array([[0.5, -0.3]]), jnp.array([[1.0, 0.4]])
        eps, lam, _ = guide(dj.PositiveMode(dj.NegativePrompting(scale=0.7), cfg_scale=3.0), (), null, null, (pos, neg),
                            step)
        np.testing.assert_allclose(eps, null + 3.0 * (pos - null) - 0.7 * (neg - pos), rtol=1e-6)
        np.testing.assert_allclose(lam, [0.7])
        rule = dj.PositiveMode(dj.DynamicNegativeGuidance(2.0, prior=0.2), cfg_scale=1.0)
        single = dj.DynamicNegativeGuidance(2.0, prior=0.2)
        state = rule.init(null)
        eps, lam, _ = guide(rule, state, null, null, (pos, neg), step)
        np.testing.assert_allclose(eps, pos - 2.0 * 0.25 * (neg - pos), rtol=1e-6)   # cfg_scale 1: from eps(x | c+)
        x_next = jnp.array([[0.3, -0.2]])
        np.testing.assert_allclose(update(rule, state, null, x_next, null, (pos, neg), step),
                                   update(single, state, null, x_next, pos, neg, step), rtol=1e-6)
        sld = dj.PositiveMode(dj.SafeLatentDiffusion(scale=1.0), cfg_scale=2.0)
        e1, _, m1 = guide(sld, sld.init(null), null, null, (pos, neg), step)
        e0, _, m0 = guide(dj.SafeLatentDiffusion(scale=1.0), sld.init(null), null, pos, neg, step)
        np.testing.assert_allclose(e1, e0 + (pos - null), rtol=1e-6)
        np.testing.assert_allclose(m1, m0)
        with pytest.raises(ValueError, match="cfg_scale must be >= 0"):
            dj.PositiveMode(dj.DynamicNegativeGuidance(), cfg_scale=-1.0)


# --------------------------------------------------------------------------- composed rules vs the former classes

def _legacy_positive(base):
    """The positive mode as the library generated it before the rules were composed (a subclass of base)."""

    class Positive(base):
        cfg_scale: Any = 1.0
        num_conditions = 2

        def __post_init__(self):
            base.__post_init__(self)
            G._check("cfg_scale", self.cfg_scale, lambda a: a >= 0, ">= 0")
            G._as_leaf(self, "cfg_scale")

        def guide(self, state, x_t, eps_u, eps_c, step, **tangents):
            eps_pos, eps_neg = eps_c
            eps, lam, state = base.guide(self, state, x_t, eps_pos, eps_neg, step, **_legacy_tangents(tangents))
            return eps + G._per_sample(self.cfg_scale - 1.0, eps_u) * (eps_pos - eps_u), lam, state

        def update(self, state, x_t, x_next, eps_u, eps_c, step, **tangents):
            return base.update(self, state, x_t, x_next, eps_c[0], eps_c[1], step, **_legacy_tangents(tangents))

    Positive.__name__ = Positive.__qualname__ = "LegacyPositive" + base.__name__
    return G.rule_class(Positive)


def _legacy_tangents(kw):
    t = kw.get("tangents")
    return {} if t is None else {"tangents": t._replace(eps_u=t.eps_c[0], eps_c=t.eps_c[1])}


@G.rule_class
class LegacyMultiConcept(dj.DynamicNegativeGuidance):
    """Multi-concept DNG as the library wrote it before (a subclass of DynamicNegativeGuidance)."""

    num_concepts: int = G.static(2)

    def __post_init__(self):
        G._check_concepts(self.num_concepts)
        G._check_dng_leaves(self)

    @property
    def num_conditions(self) -> int:
        return self.num_concepts

    def init(self, x):
        return jnp.broadcast_to(jnp.log(self.prior), (x.shape[0], self.num_concepts)).astype(jnp.float32)

    def guide(self, log_p, x_t, eps_u, eps_c, step):
        eps, lam, _ = G._guide_concepts(self.scale, log_p, jnp.log(self.p_max), eps_u, eps_c)
        return eps, lam.astype(jnp.float32), log_p

    def update(self, log_p, x_t, x_next, eps_u, eps_c, step):
        inc = jnp.stack([G._log_likelihood_ratio(self, x_t, x_next, eps_u, e, step) for e in eps_c], axis=-1)
        log_p = jnp.clip(log_p + inc, jnp.log(self.p_min), jnp.log(self.p_max))
        return G._cap_total(log_p, jnp.log(self.p_max))[0]

    def posterior(self, log_p, batch):
        return jnp.exp(jax.scipy.special.logsumexp(log_p, axis=-1))


def _post(x, t):
    return jnp.clip(jax.nn.sigmoid(0.3 * x.reshape(x.shape[0], -1).sum(-1) + 1e-3 * t), 1e-3, 0.9)


_DNG = dict(prior=0.2, temperature=0.3, offset=1e-3)
_STRAT = dict(prior=0.2, temperature=1.0, estimator="stratonovich", divergence="hutchinson", probes=2)
#: (the wrapped rule's class, its arguments, the deprecated name of its positive mode)
POSITIVE = [
    (dj.NegativePrompting, dict(scale=0.7), "PositiveNegativePrompting"),
    (dj.SafeLatentDiffusion, dict(scale=0.6, warmup=2), "PositiveSafeLatentDiffusion"),
    (dj.DynamicNegativeGuidance, dict(scale=2.0, **_DNG), "PositiveDynamicNegativeGuidance"),
    (dj.DynamicNegativeGuidance, dict(scale=1.5, update_variance="beta", **_DNG), "PositiveDynamicNegativeGuidance"),
    (dj.DynamicNegativeGuidance, dict(scale=1.5, **_STRAT), "PositiveDynamicNegativeGuidance"),
    (dj.DynamicNegativeGuidance, dict(scale=1.5, **dict(_STRAT, estimator="ito")), "PositiveDynamicNegativeGuidance"),
    (dj.ExactDynamicNegativeGuidance, dict(scale=1.0, posterior_fn=_post), "PositiveExactDynamicNegativeGuidance"),
]


def _chain_of_calls(rule, x, eps_u, eps_c, xs, tangents, steps):
    """init, then guide / posterior / update along a few steps: every output, as one tree."""
    kw = {} if tangents is None else {"tangents": tangents}
    state, out = rule.init(x), []
    for x_t, x_next, step in zip(xs[:-1], xs[1:], steps):
        eps, lam, state = rule.guide(state, x_t, eps_u, eps_c, step, **kw)
        p = rule.posterior(state, x.shape[0])
        state = rule.update(state, x_t, x_next, eps_u, eps_c, step, **kw)
        out.append((eps, lam, p, state))
    return out


class ComposedEqualsFormerTest(chex.TestCase):
    """PositiveMode(rule) and MultiConcept(dng, K), and the deprecated names that build them, give what the
    former generated classes gave, bit for bit, on random inputs (as written and under jit)."""

    def _inputs(self, k, with_tangents=False):
        rng = np.random.default_rng(k)
        draw = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
        b, shape = 4, (3, 2)
        x, eps_u = draw(b, *shape), 0.3 * draw(b, *shape)
        eps_c = tuple(0.3 * draw(b, *shape) for _ in range(k))
        xs = [draw(b, *shape) for _ in range(4)]
        steps = [_step(i) for i in (7, 4, 0)]                  # the final step among them
        tangents = None
        if with_tangents:
            probes = jnp.sign(draw(2, b, *shape))
            tangents = dj.Tangents(probes, draw(2, b, *shape), tuple(draw(2, b, *shape) for _ in range(k)), 0.5)
        return x, eps_u, eps_c, xs, tangents, steps

    @chex.variants(with_jit=True, without_jit=True)
    def test_positive_mode_equals_the_former_classes(self):
        run = self.variant(_chain_of_calls)
        for base, kw, old_name in POSITIVE:
            legacy = _legacy_positive(base)(**kw, cfg_scale=3.0)
            composed = dj.PositiveMode(base(**kw), cfg_scale=3.0)
            with pytest.warns(DeprecationWarning, match=f"{old_name} is deprecated"):
                old = getattr(dj, old_name)(**kw, cfg_scale=3.0)
            assert type(old).__name__ == old_name and isinstance(old, dj.PositiveMode)
            assert old.leaf_names == composed.leaf_names == legacy.leaf_names
            x, eps_u, eps_c, xs, tangents, steps = self._inputs(2, with_tangents="estimator" in kw)
            want = run(legacy, x, eps_u, eps_c, xs, tangents, steps)
            chex.assert_trees_all_equal(run(composed, x, eps_u, eps_c, xs, tangents, steps), want)
            chex.assert_trees_all_equal(run(old, x, eps_u, eps_c, xs, tangents, steps), want)
            chex.assert_trees_all_equal(jax.tree.leaves(old), jax.tree.leaves(legacy))
            assert (old.tangent_spec(), old.num_conditions) == (legacy.tangent_spec(), legacy.num_conditions)

    @chex.variants(with_jit=True, without_jit=True)
    def test_multi_concept_equals_the_former_class(self):
        run = self.variant(_chain_of_calls)
        for k, kw in [(1, dict(scale=2.0, **_DNG)), (2, dict(scale=2.0, **_DNG)),
                      (3, dict(scale=3.0, prior=0.1, temperature=0.5, update_variance="step"))]:
            legacy = LegacyMultiConcept(**kw, num_concepts=k)
            composed = dj.MultiConcept(dj.DynamicNegativeGuidance(**kw), num_concepts=k)
            with pytest.warns(DeprecationWarning, match="MultiConceptDynamicNegativeGuidance is deprecated"):
                old = dj.MultiConceptDynamicNegativeGuidance(**kw, num_concepts=k)
            assert type(old).__name__ == "MultiConceptDynamicNegativeGuidance" and isinstance(old, dj.MultiConcept)
            assert old.num_concepts == old.num_conditions == k and old.leaf_names == legacy.leaf_names
            x, eps_u, eps_c, xs, tangents, steps = self._inputs(k)
            want = run(legacy, x, eps_u, eps_c, xs, None, steps)
            chex.assert_trees_all_equal(run(composed, x, eps_u, eps_c, xs, None, steps), want)
            chex.assert_trees_all_equal(run(old, x, eps_u, eps_c, xs, None, steps), want)


def test_composed_rules_sample_and_sweep_as_the_former_classes():
    """Through the compiled sampler (one call, and a sweep over an inner and an outer leaf): bit for bit."""
    sched = dj.respace(dj.linear_schedule(), 8)
    keys = dj.keys_from_seeds(np.arange(3))
    e0 = lambda x, t: 0.3 * jnp.tanh(x) + 0.1
    e1 = lambda x, t: 0.3 * jnp.tanh(x - 0.5) - 0.02 * jnp.sin(x)
    e2 = lambda x, t: 0.25 * jnp.tanh(x + 0.3) + 0.05 * jnp.cos(x)
    pairs = [(_legacy_positive(dj.DynamicNegativeGuidance)(2.0, cfg_scale=3.0, **_DNG),
              dj.PositiveMode(dj.DynamicNegativeGuidance(2.0, **_DNG), cfg_scale=3.0), {"cfg_scale": [1.0, 4.0]}),
             (LegacyMultiConcept(2.0, num_concepts=2, **_DNG),
              dj.MultiConcept(dj.DynamicNegativeGuidance(2.0, **_DNG), num_concepts=2), {"temperature": [0.1, 1.0]})]
    for legacy, composed, grid in pairs:
        run = lambda rule: dj.sample(e0, sched, keys, (2,), rule=rule, denoiser_c=(e1, e2), return_trace=True)
        chex.assert_trees_all_equal(run(composed), run(legacy))
        grid = dict(grid, scale=[0.0, 2.5])
        swept = lambda rule: dj.sweep(e0, sched, keys, (2,), rule=rule, grid=grid, denoiser_c=(e1, e2),
                                      return_trace=True)
        chex.assert_trees_all_equal(swept(composed), swept(legacy))


def test_composed_rules_replace_read_and_refuse():
    dng = dj.DynamicNegativeGuidance(2.0, prior=0.2)
    pos = dj.PositiveMode(dng, cfg_scale=3.0)
    assert pos.leaf_names == dng.leaf_names + ("cfg_scale",) and pos.num_conditions == 2
    assert float(pos.prior) == pytest.approx(0.2) and pos.update_variance == "beta_tilde"    # the inner rule's, read through
    new = pos.replace(scale=5.0, cfg_scale=1.5)
    assert type(new) is dj.PositiveMode and float(new.rule.scale) == 5.0 and float(new.cfg_scale) == 1.5
    assert float(pos.scale) == 2.0                                                       # pos itself unchanged
    with pytest.raises(ValueError, match="prior"):
        pos.replace(prior=2.0)
    with pytest.raises(ValueError, match="cfg_scale must be >= 0"):
        pos.replace(cfg_scale=-1.0)
    with pytest.raises(ValueError, match="cannot be put in it again"):
        dj.PositiveMode(pos)
    with pytest.raises(ValueError, match="wraps a guidance rule"):
        dj.PositiveMode(3.0)
    multi = dj.MultiConcept(dng, num_concepts=3)
    assert multi.num_conditions == 3 and multi.leaf_names == dng.leaf_names
    with pytest.raises(ValueError, match="must sum below p_max"):
        multi.replace(prior=0.4)
    with pytest.raises(ValueError, match="paper's update only"):
        dj.MultiConcept(dj.DynamicNegativeGuidance(estimator="stratonovich"), num_concepts=2)
    with pytest.raises(ValueError, match="runs one concept's DynamicNegativeGuidance"):
        dj.MultiConcept(dj.NegativePrompting(1.0), num_concepts=2)
    with pytest.raises(ValueError, match="num_concepts must be an integer"):
        dj.MultiConcept(dng, num_concepts=0)
    # the positive mode over K concepts: (c+, c-_1, ..., c-_K)
    both = dj.PositiveMode(multi, cfg_scale=2.0)
    assert both.num_conditions == 4
    null, pos_eps, *negs = (jnp.full((2, 3), v) for v in (0.1, 0.5, 1.0, 0.7, 0.2))
    eps, lam, _ = both.guide(both.init(null), null, null, (pos_eps, *negs), _step())
    e, l, _ = multi.guide(multi.init(null), null, pos_eps, tuple(negs), _step())
    np.testing.assert_allclose(eps, e + (pos_eps - null), rtol=1e-6)
    np.testing.assert_allclose(lam, l)
    # the deprecated names keep their signatures: positional arguments, the own field last
    with pytest.warns(DeprecationWarning):
        old = dj.PositiveNegativePrompting(0.5, 2.0)
    assert float(old.scale) == 0.5 and float(old.cfg_scale) == 2.0
    with pytest.warns(DeprecationWarning):
        with pytest.raises(ValueError, match="num_concepts must be an integer"):
            dj.MultiConceptDynamicNegativeGuidance(num_concepts=0)
