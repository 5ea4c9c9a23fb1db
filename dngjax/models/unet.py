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


def _zero_init_if(flag: bool):
    return nn.initializers.zeros if flag else nn.initializers.lecun_normal()


class ResBlock(nn.Module):
    out_ch: int
    groups: int
    dropout: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, temb: Array, train: bool) -> Array:
        h = nn.swish(nn.GroupNorm(self.groups, epsilon=1e-6, dtype=self.dtype, name="norm1")(x))
        h = nn.Conv(self.out_ch, (3, 3), padding=_PAD, dtype=self.dtype, name="conv1")(h)
        h = h + nn.Dense(self.out_ch, dtype=self.dtype, name="temb_proj")(nn.swish(temb))[:, None, None, :]
        h = nn.swish(nn.GroupNorm(self.groups, epsilon=1e-6, dtype=self.dtype, name="norm2")(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = nn.Conv(self.out_ch, (3, 3), padding=_PAD, dtype=self.dtype,
                    kernel_init=nn.initializers.zeros, name="conv2")(h)
        if x.shape[-1] != self.out_ch:
            x = nn.Conv(self.out_ch, (1, 1), dtype=self.dtype, name="shortcut")(x)
        return x + h


class AttnBlock(nn.Module):
    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, hgt, wid, c = x.shape
        h = nn.GroupNorm(self.groups, epsilon=1e-6, dtype=self.dtype, name="norm")(x)
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
                bh, hh, wh, ch = h.shape
                h = jax.image.resize(h, (bh, hh * 2, wh * 2, ch), method="nearest")
                h = nn.Conv(ch, (3, 3), padding=_PAD, dtype=self.dtype, name=f"up_{level}_upsample")(h)
        assert not skips

        h = nn.swish(nn.GroupNorm(self.groups, epsilon=1e-6, dtype=self.dtype, name="norm_out")(h))
        out_ch = self.out_ch or x.shape[-1]
        h = nn.Conv(out_ch, (3, 3), padding=_PAD, dtype=self.dtype,
                    kernel_init=nn.initializers.zeros, name="conv_out")(h)
        return h.astype(jnp.float32)
