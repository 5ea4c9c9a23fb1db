import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dngjax as dj
from dngjax.models.configs import cifar10_unet, mnist_unet

from compile_count import count_compiles

# what these tests check (labels, dropout, micro-batching, recompilation) does not depend on the depth:
# one level without attention compiles several times faster than the 3-level MNIST net
ONE_LEVEL = dict(ch=8, groups=4, ch_mult=(1,), attn_resolutions=())


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
    params = jax.jit(m.init)(jax.random.key(0), x, t)   # jitted: eager dispatch compiles op by op
    y = jax.jit(m.apply)(params, x, t)
    assert y.shape == x.shape and y.dtype == jnp.float32


def test_class_conditioning_and_null_label():
    m = mnist_unet(**ONE_LEVEL, num_classes=10)
    x = jax.random.normal(jax.random.key(1), (2, 28, 28, 1))
    t = jnp.array([10, 10])
    params = jax.jit(m.init)(jax.random.key(0), x, t)
    # make the output depend on everything (zero-initialised output layers otherwise hide it)
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(2), p.shape), params)
    apply = jax.jit(m.apply)
    y_null = apply(params, x, t)
    y_null2 = apply(params, x, t, label=jnp.array([10, 10]))
    y_3 = apply(params, x, t, label=3)
    np.testing.assert_allclose(y_null, y_null2, rtol=1e-6)
    assert not np.allclose(y_null, y_3)
    cond = dj.denoiser(m, params, label=3)
    np.testing.assert_allclose(cond(x, t), y_3, rtol=1e-5, atol=1e-6)  # another compilation of the same net
    with pytest.raises(ValueError, match="unconditional"):
        u = mnist_unet(**ONE_LEVEL)
        jax.eval_shape(lambda p: u.apply(p, x, t, label=1), jax.eval_shape(u.init, jax.random.key(0), x, t))


def test_dropout_only_in_training():
    m = mnist_unet(**ONE_LEVEL, dropout=0.5)
    x = jax.random.normal(jax.random.key(1), (2, 28, 28, 1))
    t = jnp.array([5, 6])
    params = jax.jit(m.init)(jax.random.key(0), x, t)
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(2), p.shape), params)
    apply = jax.jit(m.apply, static_argnames="train")
    a = apply(params, x, t)
    b = apply(params, x, t, train=True, rngs={"dropout": jax.random.key(3)})
    assert not np.allclose(a, b)
    np.testing.assert_allclose(a, apply(params, x, t), rtol=0, atol=0)


def test_denoiser_runs_in_sampler_without_recompiling_for_new_params():
    m = mnist_unet(**ONE_LEVEL)
    x = jnp.zeros((1, 28, 28, 1))
    p1 = jax.jit(m.init)(jax.random.key(0), x, jnp.zeros(1, jnp.int32))
    p2 = jax.tree.map(lambda a: a + 0.01, p1)
    sched = dj.respace(dj.linear_schedule(), 3)
    keys = dj.keys_from_seeds([0, 1])
    with count_compiles("_grid_impl") as compiles:
        a = dj.sample(dj.denoiser(m, p1), sched, keys, (28, 28, 1))
        b = dj.sample(dj.denoiser(mnist_unet(**ONE_LEVEL), p2), sched, keys, (28, 28, 1))
    assert len(compiles) == 1
    assert a.shape == (2, 28, 28, 1) and not np.allclose(a, b)


@pytest.mark.parametrize("b,label", [(37, None), (37, "per_image"), (37, 3), (16, None), (5, "per_image")])
def test_micro_batched_denoiser_computes_the_whole_batch(b, label):
    # 37 = 2 x 16 + 5: the last micro-batch is padded; 16 and 5: no split at all
    m = mnist_unet(**ONE_LEVEL, num_classes=10)
    p = jax.jit(m.init)(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), jnp.zeros(1, jnp.int32), jnp.zeros(1, jnp.int32))
    p = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(a.size), a.shape), p)  # no zero layers
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(b, 28, 28, 1)), jnp.float32)
    t = jnp.asarray(rng.integers(0, 1000, b), jnp.int32)
    lab = jnp.asarray(rng.integers(0, 11, b)) if label == "per_image" else label
    whole = dj.denoiser(m, p, label=lab, micro_batch=None)
    micro = dj.denoiser(m, p, label=lab, micro_batch=16)
    assert whole.micro_batch is None and micro.micro_batch == 16
    ref = np.asarray(jax.jit(lambda d, x, t: d(x, t))(whole, x, t))
    np.testing.assert_allclose(np.asarray(jax.jit(lambda d, x, t: d(x, t))(micro, x, t)), ref, rtol=1e-5,
                               atol=1e-5 * np.abs(ref).max())
    # the label really reaches every image: another label changes the output
    if label is not None:
        other = dj.denoiser(m, p, label=(lab + 1) % 11, micro_batch=16)
        assert not np.allclose(np.asarray(other(x, t)), ref, atol=1e-3)


def test_micro_batched_denoiser_folds_a_vmapped_grid_into_its_micro_batches():
    # a sweep vmaps the chain over guidance scales: the network must still see parts of micro_batch
    # images (3 x 12 = 36 -> 3 parts of 16), and compute what the whole batch does
    m = mnist_unet(**ONE_LEVEL, num_classes=10)
    p = jax.jit(m.init)(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), jnp.zeros(1, jnp.int32), jnp.zeros(1, jnp.int32))
    p = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(a.size), a.shape), p)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 12, 28, 28, 1)), jnp.float32)
    t = jnp.asarray(rng.integers(0, 1000, 12), jnp.int32)
    lab = jnp.asarray(rng.integers(0, 11, 12))
    for label in (None, lab):
        run = lambda d: jax.vmap(lambda x: d(x, t))(x)
        ref = np.asarray(jax.jit(run)(dj.denoiser(m, p, label=label, micro_batch=None)))
        micro = dj.denoiser(m, p, label=label, micro_batch=16)
        np.testing.assert_allclose(np.asarray(jax.jit(run)(micro)), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
        assert "f32[3,16,28,28,1] = scan[" in str(jax.make_jaxpr(run)(micro))
    # vmapped parameters (one network per grid point) fall back to the plain vmap
    p2 = jax.tree.map(lambda a: jnp.stack([a, 1.1 * a, 0.9 * a]), p)
    f = lambda pp, mb: jax.vmap(lambda q, x: dj.denoiser(m, q, micro_batch=mb)(x, t))(pp, x)
    np.testing.assert_allclose(np.asarray(jax.jit(f, static_argnums=1)(p2, 16)),
                               np.asarray(jax.jit(f, static_argnums=1)(p2, None)), rtol=1e-5, atol=1e-4)


@pytest.mark.slow                 # ~45 s; the forward equality is in the default suite
def test_micro_batched_denoiser_is_differentiable_like_the_whole_batch():
    # jax.grad (wrt params and x) and jax.jvp through a micro-batched denoiser, also under vmap, give the
    # whole batch's derivatives (custom_vmap alone has no autodiff rule: this failed before)
    m = mnist_unet(ch=8, groups=4, num_classes=10)
    p = jax.jit(m.init)(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), jnp.zeros(1, jnp.int32), jnp.zeros(1, jnp.int32))
    p = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(a.size), a.shape), p)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(20, 28, 28, 1)), jnp.float32)
    t = jnp.asarray(rng.integers(0, 1000, 20), jnp.int32)
    lab = jnp.asarray(rng.integers(0, 11, 20))
    w = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

    def loss(params, x, mb):
        return jnp.sum(w * dj.denoiser(m, params, label=lab, micro_batch=mb)(x, t))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    (gp16, gx16), (gp, gx) = grad(p, x, 16), grad(p, x, None)
    np.testing.assert_allclose(np.asarray(gx16), np.asarray(gx), rtol=1e-4, atol=1e-5 * np.abs(gx).max())
    for a, b in zip(jax.tree.leaves(gp16), jax.tree.leaves(gp)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5 * np.abs(b).max())
    assert float(jnp.abs(gx).max()) > 0
    # forward mode, and reverse mode under vmap (a sweep's axis)
    d16 = dj.denoiser(m, p, label=lab, micro_batch=16)
    dw = dj.denoiser(m, p, label=lab, micro_batch=None)
    _, tan16 = jax.jvp(lambda x: d16(x, t), (x,), (w,))
    _, tan = jax.jvp(lambda x: dw(x, t), (x,), (w,))
    np.testing.assert_allclose(np.asarray(tan16), np.asarray(tan), rtol=1e-4, atol=1e-5 * np.abs(tan).max())
    xs = jnp.stack([x, 0.5 * x])
    vg = lambda d: jax.vmap(jax.grad(lambda x: jnp.sum(w * d(x, t))))(xs)
    ref = np.asarray(jax.jit(vg)(dw))
    np.testing.assert_allclose(np.asarray(jax.jit(vg)(d16)), ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_denoiser_micro_batch_auto_and_bad_values():
    m = mnist_unet(ch=8, groups=4)
    auto = dj.denoiser(m, {}).micro_batch
    from dngjax.denoiser import CPU_MICRO_BATCH
    assert auto == (CPU_MICRO_BATCH if jax.default_backend() == "cpu" else None)
    assert dj.denoiser(lambda x, t: x).micro_batch is None  # a plain function is taken as it is
    for bad in (0, -3, 2.5, "16", True, [16]):
        with pytest.raises(ValueError, match="micro_batch must be a positive int"):
            dj.denoiser(m, {}, micro_batch=bad)


def test_rejects_non_nhwc():
    m = mnist_unet(ch=8, groups=4)
    with pytest.raises(ValueError, match="NHWC"):
        m.init(jax.random.key(0), jnp.zeros((28, 28, 1)), jnp.zeros(1, jnp.int32))


# --------------------------------------------------------------------------- fast layers vs flax's

@pytest.mark.parametrize("shape,groups,dtype", [((3, 7, 5, 16), 8, jnp.float32), ((2, 28, 28, 32), 8, jnp.float32),
                                                ((2, 4, 4, 12), 3, jnp.float32), ((2, 6, 6, 8), 4, jnp.bfloat16)])
def test_group_norm_equals_flax_group_norm_values_and_gradients(shape, groups, dtype):
    import flax.linen as nn
    from dngjax.models.unet import GroupNorm

    rng = np.random.default_rng(0)
    # an offset mean and a scale per channel, so the E[x^2] - E[x]^2 variance is exercised
    x = jnp.asarray(3.0 + rng.normal(size=shape) * rng.uniform(0.5, 2.0, size=shape[-1]), jnp.float32)
    ours, ref = GroupNorm(groups, epsilon=1e-6, dtype=dtype), nn.GroupNorm(groups, epsilon=1e-6, dtype=dtype)
    p_ref = ref.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x)) == jax.tree.map(jnp.shape, p_ref)
    p = jax.tree.map(lambda a: a + jnp.asarray(rng.normal(size=a.shape), a.dtype), p_ref)  # non-trivial scale/bias
    y, y_ref = ours.apply(p, x.astype(dtype)), ref.apply(p, x.astype(dtype))
    assert y.dtype == y_ref.dtype == dtype
    tol = 1e-4 if dtype == jnp.float32 else 2e-2  # E[x^2] - E[x]^2 at mean 3: float32 sums in another order
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref, np.float32), rtol=tol, atol=tol)
    if dtype == jnp.float32:
        w = jnp.asarray(rng.normal(size=shape), jnp.float32)
        loss = lambda m: (lambda p, x: jnp.sum(jnp.tanh(m.apply(p, x)) * w))
        (gp, gx), (gp_ref, gx_ref) = jax.grad(loss(ours), (0, 1))(p, x), jax.grad(loss(ref), (0, 1))(p, x)
        np.testing.assert_allclose(gx, gx_ref, rtol=1e-4, atol=1e-4)
        for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(gp_ref)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()))


def test_group_norm_rejects_indivisible_channels():
    from dngjax.models.unet import GroupNorm
    with pytest.raises(ValueError, match="divisible"):
        GroupNorm(4).init(jax.random.key(0), jnp.zeros((1, 2, 2, 6)))


def test_conv1x1_equals_flax_conv_with_the_same_params():
    import flax.linen as nn
    from dngjax.models.unet import Conv1x1

    x = jax.random.normal(jax.random.key(1), (2, 5, 7, 6))
    p = nn.Conv(4, (1, 1)).init(jax.random.key(0), x)
    p = jax.tree.map(lambda a: a + 0.1, p)
    assert jax.tree.map(jnp.shape, Conv1x1(4).init(jax.random.key(0), x)) == jax.tree.map(jnp.shape, p)
    np.testing.assert_allclose(Conv1x1(4).apply(p, x), nn.Conv(4, (1, 1)).apply(p, x), rtol=1e-5, atol=1e-6)


def test_upsample_equals_nearest_resize():
    from dngjax.models.unet import upsample_nearest_2x

    x = jax.random.normal(jax.random.key(0), (2, 7, 5, 3))
    np.testing.assert_array_equal(upsample_nearest_2x(x), jax.image.resize(x, (2, 14, 10, 3), "nearest"))
