import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dngjax as dj
from dngjax.models.configs import cifar10_unet, mnist_unet


def _count(module, shape):
    p = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros(shape), jnp.zeros(shape[0], jnp.int32)))
    return sum(x.size for x in jax.tree.leaves(p))


def test_cifar10_config_has_35_7M_parameters():
    n = _count(cifar10_unet(), (1, 32, 32, 3))
    assert abs(n - 35.7e6) / 35.7e6 < 0.01, n


def test_mnist_config_is_about_1M():
    n = _count(mnist_unet(), (1, 28, 28, 1))
    assert 0.8e6 < n < 1.3e6, n


@pytest.mark.parametrize("shape,kw", [((2, 28, 28, 1), dict(ch=8, groups=4)),
                                      ((2, 32, 32, 3), dict(ch=8, groups=4, ch_mult=(1, 2), attn_resolutions=(16,)))])
def test_output_shape_equals_input_shape(shape, kw):
    m = mnist_unet(**kw)
    x = jax.random.normal(jax.random.key(1), shape)
    t = jnp.array([3, 900])
    params = m.init(jax.random.key(0), x, t)
    y = m.apply(params, x, t)
    assert y.shape == x.shape and y.dtype == jnp.float32


def test_class_conditioning_and_null_label():
    m = mnist_unet(ch=8, groups=4, num_classes=10)
    x = jax.random.normal(jax.random.key(1), (2, 28, 28, 1))
    t = jnp.array([10, 10])
    params = m.init(jax.random.key(0), x, t)
    # make the output depend on everything (zero-initialised output layers otherwise hide it)
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(2), p.shape), params)
    y_null = m.apply(params, x, t)
    y_null2 = m.apply(params, x, t, label=jnp.array([10, 10]))
    y_3 = m.apply(params, x, t, label=3)
    np.testing.assert_allclose(y_null, y_null2, rtol=1e-6)
    assert not np.allclose(y_null, y_3)
    cond = dj.denoiser(m, params, label=3)
    np.testing.assert_allclose(cond(x, t), y_3, rtol=1e-6)
    with pytest.raises(ValueError, match="unconditional"):
        mnist_unet(ch=8, groups=4).apply(jax.tree.map(lambda a: a, mnist_unet(ch=8, groups=4).init(
            jax.random.key(0), x, t)), x, t, label=1)


def test_dropout_only_in_training():
    m = mnist_unet(ch=8, groups=4, dropout=0.5)
    x = jax.random.normal(jax.random.key(1), (2, 28, 28, 1))
    t = jnp.array([5, 6])
    params = m.init(jax.random.key(0), x, t)
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(2), p.shape), params)
    a = m.apply(params, x, t)
    b = m.apply(params, x, t, train=True, rngs={"dropout": jax.random.key(3)})
    assert not np.allclose(a, b)
    np.testing.assert_allclose(a, m.apply(params, x, t), rtol=0, atol=0)


def test_denoiser_runs_in_sampler_without_recompiling_for_new_params():
    m = mnist_unet(ch=8, groups=4)
    x = jnp.zeros((1, 28, 28, 1))
    p1 = m.init(jax.random.key(0), x, jnp.zeros(1, jnp.int32))
    p2 = jax.tree.map(lambda a: a + 0.01, p1)
    sched = dj.respace(dj.linear_schedule(), 3)
    keys = dj.keys_from_seeds([0, 1])
    before = dj.trace_count()
    a = dj.sample(dj.denoiser(m, p1), sched, keys, (28, 28, 1))
    b = dj.sample(dj.denoiser(mnist_unet(ch=8, groups=4), p2), sched, keys, (28, 28, 1))
    assert dj.trace_count() - before == 1
    assert a.shape == (2, 28, 28, 1) and not np.allclose(a, b)


def test_rejects_non_nhwc():
    m = mnist_unet(ch=8, groups=4)
    with pytest.raises(ValueError, match="NHWC"):
        m.init(jax.random.key(0), jnp.zeros((28, 28, 1)), jnp.zeros(1, jnp.int32))
