"""The DDPM UNet of Ho et al. (2020) in Flax linen, NHWC.

Layer for layer this is the architecture of the original TensorFlow code and
of diffusers' ``UNet2DModel`` with the ``google/ddpm-cifar10-32`` config, so
that released weights convert exactly (3x3 convolutions pad one pixel on every
side, as in PyTorch; the stride-2 downsampling either does too or, with
``downsample_padding=0``, pads bottom/right only like TensorFlow's 'SAME'). Optional class conditioning adds a learned label embedding to the
timestep embedding; label ``num_classes`` is the null label, so one network
serves as eps(x) and eps(x | c).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

Array = jnp.ndarray
_PAD = ((1, 1), (1, 1))


def timestep_embedding(t: Array, dim: int) -> Array:
    """Sinusoidal embedding of integer timesteps: (B,) -> (B, dim), [sin, cos] halves."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - 1))
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class GroupNorm(nn.Module):
    """GroupNorm over NHWC, with the parameters (``scale``, ``bias``) and the math of ``nn.GroupNorm``.

    Faster on XLA:CPU than flax's, forward and backward: the statistics are reduced over the
    spatial axes per channel first (a contiguous reduction), then over the channels of each group
    on the small (B, C) sums, and the normalisation is folded into one per-channel scale and
    shift, so the full-size tensor is read twice and written once. Variance as E[x^2] - E[x]^2
    (flax's default ``use_fast_variance``), in float32 whatever the compute dtype.
    ``tests/test_unet.py`` checks it against ``nn.GroupNorm``, values and gradients.
    """

    num_groups: int = 32
    epsilon: float = 1e-6
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        if c % self.num_groups:
            raise ValueError(f"GroupNorm: {c} channels are not divisible into {self.num_groups} groups")
        k = c // self.num_groups
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        xf = x.astype(jnp.float32)
        spatial = tuple(range(1, x.ndim - 1))
        n = k * math.prod(x.shape[1:-1])
        mean = jnp.sum(xf, axis=spatial).reshape(-1, self.num_groups, k).sum(-1) / n         # (B, G)
        mean2 = jnp.sum(xf * xf, axis=spatial).reshape(-1, self.num_groups, k).sum(-1) / n
        inv = jax.lax.rsqrt(jnp.maximum(mean2 - mean * mean, 0.0) + self.epsilon)
        a = jnp.repeat(inv, k, axis=1) * scale                                               # (B, C)
        b = bias - jnp.repeat(mean, k, axis=1) * a
        bshape = (x.shape[0],) + (1,) * (x.ndim - 2) + (c,)
        return (xf * a.reshape(bshape) + b.reshape(bshape)).astype(self.dtype or x.dtype)


class Conv1x1(nn.Module):
    """A 1x1 convolution as a matrix product, with ``nn.Conv``'s parameters (kernel (1, 1, in, out), bias).

    Same values as ``nn.Conv(features, (1, 1))``; XLA:CPU computes the kernel gradient of a
    1x1 convolution several times slower than that of the equal matrix product.
    """

    features: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (1, 1, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        dt = self.dtype or x.dtype
        return jnp.dot(x.astype(dt), kernel[0, 0].astype(dt)) + bias.astype(dt)


def upsample_nearest_2x(x: Array) -> Array:
    """(B, H, W, C) -> (B, 2H, 2W, C), each pixel repeated 2x2 (= ``jax.image.resize(..., "nearest")``).

    A broadcast and a reshape: its gradient is a sum over the 2x2 blocks, where the resize's
    gather has a scatter-add for a gradient.
    """
    b, h, w, c = x.shape
    return jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)


class ResBlock(nn.Module):
    out_ch: int
    groups: int
    dropout: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, temb: Array, train: bool) -> Array:
        h = nn.swish(GroupNorm(self.groups, epsilon=1e-6, dtype=self.dtype, name="norm1")(x))
        h = nn.Conv(self.out_ch, (3, 3), padding=_PAD, dtype=self.dtype, name="conv1")(h)
        h = h + nn.Dense(self.out_ch, dtype=self.dtype, name="temb_proj")(nn.swish(temb))[:, None, None, :]
        h = nn.swish(GroupNorm(self.groups, epsilon=1e-6, dtype=self.dtype, name="norm2")(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = nn.Conv(self.out_ch, (3, 3), padding=_PAD, dtype=self.dtype,
                    kernel_init=nn.initializers.zeros, name="conv2")(h)
        if x.shape[-1] != self.out_ch:
            x = Conv1x1(self.out_ch, dtype=self.dtype, name="shortcut")(x)
        return x + h


class AttnBlock(nn.Module):
    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, hgt, wid, c = x.shape
        h = GroupNorm(self.groups, epsilon=1e-6, dtype=self.dtype, name="norm")(x)
        h = h.reshape(b, hgt * wid, c)
        q = nn.Dense(c, dtype=self.dtype, name="q")(h)
        k = nn.Dense(c, dtype=self.dtype, name="k")(h)
        v = nn.Dense(c, dtype=self.dtype, name="v")(h)
        w = jnp.einsum("bic,bjc->bij", q, k) * (c ** -0.5)
        w = jax.nn.softmax(w.astype(jnp.float32), axis=-1).astype(v.dtype)
        h = jnp.einsum("bij,bjc->bic", w, v)
        h = nn.Dense(c, dtype=self.dtype, kernel_init=nn.initializers.zeros, name="proj_out")(h)
        return x + h.reshape(b, hgt, wid, c)


class UNet(nn.Module):
    """eps-prediction UNet. ``apply(params, x, t[, label])``: x (B,H,W,C) float, t (B,) int -> (B,H,W,C).

    Attributes:
      ch: base channels. ch_mult: channel multiplier per resolution level.
      num_res_blocks: residual blocks per level (the up path has one more).
      attn_resolutions: spatial sizes (height) at which self-attention is applied.
      dropout: dropout rate in the residual blocks (active only with ``train=True``).
      out_ch: output channels (defaults to the input's).
      num_classes: if > 0, class-conditional; label ``num_classes`` means "no label".
      groups: GroupNorm groups. dtype: compute dtype (params stay float32).
      downsample_padding: padding of the stride-2 downsampling convs, as diffusers'
        ``downsample_padding``: 1 pads one pixel on every side (PyTorch style); 0 pads
        one pixel at the bottom and right only, as TensorFlow's ``'SAME'`` in Ho et al.'s
        code and in ``google/ddpm-cifar10-32`` (whose config says 0).
    """

    ch: int = 128
    ch_mult: Sequence[int] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = (16,)
    dropout: float = 0.1
    out_ch: Optional[int] = None
    num_classes: int = 0
    groups: int = 32
    dtype: Any = jnp.float32
    downsample_padding: int = 1

    @nn.compact
    def __call__(self, x: Array, t: Array, label: Optional[Array] = None,
                 train: bool = False) -> Array:
        if x.ndim != 4:
            raise ValueError(f"UNet expects NHWC input of rank 4, got shape {x.shape}")
        if self.downsample_padding not in (0, 1):
            raise ValueError(f"downsample_padding must be 0 or 1, got {self.downsample_padding}")
        down_pad = _PAD if self.downsample_padding == 1 else ((0, 1), (0, 1))
        b = x.shape[0]
        t = jnp.broadcast_to(jnp.asarray(t), (b,))
        temb_dim = self.ch * 4
        temb = timestep_embedding(t, self.ch)
        temb = nn.Dense(temb_dim, dtype=self.dtype, name="temb_dense0")(temb)
        temb = nn.Dense(temb_dim, dtype=self.dtype, name="temb_dense1")(nn.swish(temb))
        if self.num_classes > 0:
            if label is None:
                label = jnp.full((b,), self.num_classes, jnp.int32)
            label = jnp.broadcast_to(jnp.asarray(label, jnp.int32), (b,))
            temb = temb + nn.Embed(self.num_classes + 1, temb_dim, name="label_emb")(label).astype(temb.dtype)
        elif label is not None:
            raise ValueError("this UNet is unconditional (num_classes=0) but a label was given")

        h = nn.Conv(self.ch, (3, 3), padding=_PAD, dtype=self.dtype, name="conv_in")(x.astype(self.dtype))
        skips = [h]
        n_levels = len(self.ch_mult)
        for level, mult in enumerate(self.ch_mult):
            for i in range(self.num_res_blocks):
                h = ResBlock(self.ch * mult, self.groups, self.dropout, self.dtype,
                             name=f"down_{level}_res_{i}")(h, temb, train)
                if h.shape[1] in self.attn_resolutions:
                    h = AttnBlock(self.groups, self.dtype, name=f"down_{level}_attn_{i}")(h)
                skips.append(h)
            if level != n_levels - 1:
                h = nn.Conv(h.shape[-1], (3, 3), strides=(2, 2), padding=down_pad, dtype=self.dtype,
                            name=f"down_{level}_downsample")(h)
                skips.append(h)

        h = ResBlock(h.shape[-1], self.groups, self.dropout, self.dtype, name="mid_res_0")(h, temb, train)
        h = AttnBlock(self.groups, self.dtype, name="mid_attn")(h)
        h = ResBlock(h.shape[-1], self.groups, self.dropout, self.dtype, name="mid_res_1")(h, temb, train)

        for level in reversed(range(n_levels)):
            mult = self.ch_mult[level]
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = ResBlock(self.ch * mult, self.groups, self.dropout, self.dtype,
                             name=f"up_{level}_res_{i}")(h, temb, train)
                if h.shape[1] in self.attn_resolutions:
                    h = AttnBlock(self.groups, self.dtype, name=f"up_{level}_attn_{i}")(h)
            if level != 0:
                h = upsample_nearest_2x(h)
                h = nn.Conv(h.shape[-1], (3, 3), padding=_PAD, dtype=self.dtype, name=f"up_{level}_upsample")(h)
        assert not skips

        h = nn.swish(GroupNorm(self.groups, epsilon=1e-6, dtype=self.dtype, name="norm_out")(h))
        out_ch = self.out_ch or x.shape[-1]
        h = nn.Conv(out_ch, (3, 3), padding=_PAD, dtype=self.dtype,
                    kernel_init=nn.initializers.zeros, name="conv_out")(h)
        return h.astype(jnp.float32)
