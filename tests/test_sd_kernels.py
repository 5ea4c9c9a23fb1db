"""The CPU forms of Stable Diffusion's UNet kernels equal the plain ones: blocked attention (online softmax)
and the im2col 3x3 convolution, at sizes that take those paths (the parity tests' tiny UNet does not)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dngjax.models import sd_unet


def _softmax_attention(q, k, v):
    """numpy oracle: q (B, H, N, d), k and v (B, H, M, d), float64."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bhnd,bhmd->bhnm", q, k)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bhnm,bhmd->bhnd", w / w.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("n,m", [(1024, 1536), (1000, 1100), (300, 77)])
def test_blocked_attention_equals_the_softmax(n, m):
    rng = np.random.default_rng(n + m)
    q = rng.normal(size=(2, 3, n, 8)).astype(np.float32)
    k = rng.normal(size=(2, 3, m, 8)).astype(np.float32) * 3.0       # large logits: the running max matters
    v = rng.normal(size=(2, 3, m, 8)).astype(np.float32)
    got = np.asarray(jax.jit(sd_unet._attend_blocked)(q, k, v))
    np.testing.assert_allclose(got, _softmax_attention(q, k, v), rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(got, np.asarray(sd_unet._attend_plain(q, k, v)), rtol=2e-5, atol=2e-5)


def test_attend_takes_the_blocked_path_above_one_block_and_matches():
    rng = np.random.default_rng(0)
    b, n, c, heads = 1, 2 * sd_unet.ATTN_Q_BLOCK + 64, 16, 2
    q, k, v = (rng.normal(size=(b, n, c)).astype(np.float32) for _ in range(3))
    got = np.asarray(jax.jit(sd_unet.attend, static_argnums=3)(q, k, v, heads))
    split = lambda a: a.reshape(b, n, heads, c // heads).transpose(0, 2, 1, 3)
    want = _softmax_attention(split(q) / np.sqrt(c // heads), split(k), split(v))
    np.testing.assert_allclose(got, want.transpose(0, 2, 1, 3).reshape(b, n, c), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("hw,strides,padding", [((8, 8), (1, 1), ((1, 1), (1, 1))),
                                                ((5, 7), (1, 1), ((1, 1), (1, 1))),
                                                ((8, 8), (2, 2), ((0, 1), (0, 1))),
                                                ((16, 16), (1, 1), ((1, 1), (1, 1)))])    # lax.conv path
def test_conv3x3_equals_flax_conv(hw, strides, padding):
    rng = np.random.default_rng(hw[0] * 10 + strides[0])
    x = jnp.asarray(rng.normal(size=(2, *hw, 6)), jnp.float32)
    ours = sd_unet.Conv3x3(5, strides=strides, padding=padding)
    params = ours.init(jax.random.key(0), x)
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32), params)
    ref = nn.Conv(5, (3, 3), strides=strides, padding=padding)
    want = ref.apply(params, x)
    got = jax.jit(ours.apply)(params, x)
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)
