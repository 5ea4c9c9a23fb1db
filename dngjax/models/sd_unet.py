"""Stable Diffusion's UNet (diffusers' ``UNet2DConditionModel`` of SD 1.x and 2.x) in Flax.

``unet.apply(params, latents, t, context)``: latents (B, h, w, C_in) NHWC, t (B,) timesteps of the
1000-step training chain (int or float), context (B, L, D) the text encoder's last hidden states ->
the network's output (B, h, w, C_out): eps for SD 1.x and SD 2 base, v for SD 2 768-v (the folder's
scheduler config says which).

Structure (diffusers' names, which are also the Flax module names with ``.i`` written ``_i``):

* ``time_proj``: sinusoidal embedding of t (cos first: ``flip_sin_to_cos``), ``time_embedding``: two
  Dense layers (SiLU between) to 4 x the first level's channels;
* ``conv_in`` (3x3), then per level a down block of ``layers_per_block`` ResNets (``ResnetBlock2D``:
  GroupNorm, SiLU, conv, + Dense(SiLU(temb)), GroupNorm, SiLU, conv, 1x1 shortcut when the channels
  change), each followed by a spatial transformer in ``CrossAttnDownBlock2D`` levels, and a stride-2
  3x3 conv except at the last level;
* ``mid_block``: ResNet, transformer, ResNet;
* per level an up block of ``layers_per_block + 1`` ResNets over the concatenation [h, skip], each
  followed by a transformer in ``CrossAttnUpBlock2D`` levels, and nearest 2x upsampling + 3x3 conv
  except at the last;
* GroupNorm, SiLU, ``conv_out``.

The spatial transformer (``Transformer2DModel``): GroupNorm (eps 1e-6), ``proj_in`` (1x1 conv in SD 1.x,
Dense in SD 2.x: ``use_linear_projection``), ``transformer_layers`` blocks of [LayerNorm + self-attention,
LayerNorm + cross-attention to the context, LayerNorm + GEGLU feed-forward (4x)], each residual,
``proj_out``, plus the input. Heads per level: the config's ``num_attention_heads``, or, in the SD
configs, ``attention_head_dim`` (which diffusers reads as the number of heads); head size = channels /
heads. Attention logits and softmax in float32 whatever the compute dtype (SD 2.1's
``upcast_attention``).

``load_sd_unet(folder)`` reads a diffusers ``unet/`` folder (config.json and safetensors) without torch.
Parity with diffusers' PyTorch UNet: ``tests/test_sd_unet.py`` (tiny random SD 1.x- and 2.x-style
configs).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import numpy as np
import jax
import jax.numpy as jnp
import flax.linen as nn

from .torch_weights import assemble_torch, read_folder, template
from .unet import GroupNorm, upsample_nearest_2x

Array = jnp.ndarray
_PAD = ((1, 1), (1, 1))
DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")


def timestep_embedding(t: Array, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0) -> Array:
    """diffusers' ``get_timestep_embedding``: (B,) -> (B, dim), frequencies exp(-log(1e4) i / (dim/2 - shift))."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
    arg = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
    sin, cos = jnp.sin(arg), jnp.cos(arg)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


#: ``act_fn`` of the config (diffusers' ``get_activation``): the ResNets', the time embedding's and the output's.
ACTIVATIONS = {"silu": nn.swish, "swish": nn.swish, "gelu": lambda x: jax.nn.gelu(x, approximate=False),
               "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)), "relu": jax.nn.relu}


class TimestepEmbedding(nn.Module):
    dim: int
    dtype: Any = None
    act: str = "silu"

    @nn.compact
    def __call__(self, e: Array) -> Array:
        e = nn.Dense(self.dim, dtype=self.dtype, name="linear_1")(e)
        return nn.Dense(self.dim, dtype=self.dtype, name="linear_2")(ACTIVATIONS[self.act](e))


#: a 3x3 convolution whose output has at most this many pixels per image is one matrix product (im2col)
IM2COL_MAX_PIXELS = 64


class Conv3x3(nn.Module):
    """``nn.Conv(features, (3, 3), strides, padding)`` with the same parameters (``kernel`` (3, 3, C_in,
    C_out), ``bias``) and math. On small feature maps (at most ``IM2COL_MAX_PIXELS`` output pixels, SD's
    8 x 8 and 4 x 4 levels with 1280 channels) and on a CPU (``lax.platform_dependent``; other backends
    keep ``lax.conv``) it is one matrix product of the nine shifted copies of the input (im2col): XLA:CPU's
    convolution runs at about half the rate of its matrix product there (im2col measured 1.8-2.7x faster
    at batch 1-2, 1.16x at batch 8; slower from 16 x 16 up, which keep ``lax.conv``; docs/benchmarks.md)."""

    features: int
    strides: Tuple[int, int] = (1, 1)
    padding: Tuple[Tuple[int, int], Tuple[int, int]] = _PAD
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        from flax.linen.dtypes import promote_dtype
        cin = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, cin, self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        (pt, pb), (pl, pr) = self.padding
        sh, sw = self.strides
        ho = (x.shape[1] + pt + pb - 3) // sh + 1
        wo = (x.shape[2] + pl + pr - 3) // sw + 1
        conv = lambda x, kernel: jax.lax.conv_general_dilated(x, kernel, self.strides, self.padding,
                                                              dimension_numbers=("NHWC", "HWIO", "NHWC"))

        def im2col(x, kernel):
            xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
            cols = jnp.concatenate([xp[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :]
                                    for i in range(3) for j in range(3)], axis=-1)
            return cols @ kernel.reshape(9 * cin, self.features)

        if ho * wo > IM2COL_MAX_PIXELS:
            return conv(x, kernel) + bias
        return jax.lax.platform_dependent(x, kernel, cpu=im2col, default=conv) + bias


class ResnetBlock(nn.Module):
    """``ResnetBlock2D`` with the time embedding added between the two convolutions; (x + h) / ``scale``
    (``output_scale_factor``: the config's ``mid_block_scale_factor`` in the mid block, else 1)."""

    out_ch: int
    groups: int = 32
    eps: float = 1e-5
    dtype: Any = None
    act: str = "silu"
    scale: float = 1.0

    @nn.compact
    def __call__(self, x: Array, temb: Array) -> Array:
        act = ACTIVATIONS[self.act]
        h = act(GroupNorm(self.groups, self.eps, dtype=self.dtype, name="norm1")(x))
        h = Conv3x3(self.out_ch, dtype=self.dtype, name="conv1")(h)
        h = h + nn.Dense(self.out_ch, dtype=self.dtype, name="time_emb_proj")(act(temb))[:, None, None, :]
        h = act(GroupNorm(self.groups, self.eps, dtype=self.dtype, name="norm2")(h))
        h = Conv3x3(self.out_ch, dtype=self.dtype, name="conv2")(h)
        if x.shape[-1] != self.out_ch:
            x = nn.Conv(self.out_ch, (1, 1), dtype=self.dtype, name="conv_shortcut")(x)
        return x + h if self.scale == 1.0 else (x + h) / self.scale


#: float32 attention on a CPU: query rows per block and keys per block of the blocked softmax (below)
ATTN_Q_BLOCK, ATTN_K_BLOCK = 256, 512


def _divisor_at_most(n: int, cap: int, low: int) -> int:
    """The largest divisor of n in [low, cap], or n itself when there is none (no blocking)."""
    for d in range(min(cap, n), low - 1, -1):
        if n % d == 0:
            return d
    return n


def _attend_plain(q: Array, k: Array, v: Array) -> Array:
    """q (B, H, N, d) already scaled, k and v (B, H, M, d) -> (B, H, N, d): logits, softmax, weighted sum."""
    w = jax.nn.softmax(jnp.einsum("bhnd,bhmd->bhnm", q, k), axis=-1)
    return jnp.einsum("bhnm,bhmd->bhnd", w, v)


def _attend_blocked(q: Array, k: Array, v: Array) -> Array:
    """``_attend_plain`` computed by blocks: query rows in blocks of ``ATTN_Q_BLOCK`` (``lax.map``), and for
    each, the keys in blocks of ``ATTN_K_BLOCK`` with a running maximum and sum (the online softmax of
    flash attention, ``lax.scan``). The same sums in another order; on XLA:CPU the (B, H, N, M) logits of
    a large self-attention never exist at once, only cache-sized blocks of them (SD 2 base's 64 x 64
    self-attention, 4096 x 4096 logits per head: 3.4-3.7x faster than the plain softmax; docs/benchmarks.md)."""
    b, hd, n, d = q.shape
    m = k.shape[2]
    qc = _divisor_at_most(n, ATTN_Q_BLOCK, 32)
    kc = _divisor_at_most(m, ATTN_K_BLOCK, 64)
    nk = m // kc
    ks = k.reshape(b, hd, nk, kc, d).transpose(2, 0, 1, 3, 4)
    vs = v.reshape(b, hd, nk, kc, d).transpose(2, 0, 1, 3, 4)

    def rows(qq):                                              # (B, H, qc, d) -> (B, H, qc, d)
        if nk == 1:
            return _attend_plain(qq, k, v)

        def step(carry, kv):
            out, top, total = carry
            logits = jnp.einsum("bhnd,bhmd->bhnm", qq, kv[0])
            new_top = jnp.maximum(top, logits.max(-1, keepdims=True))
            e, shrink = jnp.exp(logits - new_top), jnp.exp(top - new_top)
            out = out * shrink + jnp.einsum("bhnm,bhmd->bhnd", e, kv[1])
            return (out, new_top, total * shrink + e.sum(-1, keepdims=True)), None

        init = (jnp.zeros(qq.shape, qq.dtype), jnp.full(qq.shape[:-1] + (1,), -jnp.inf, qq.dtype),
                jnp.zeros(qq.shape[:-1] + (1,), qq.dtype))
        (out, _, total), _ = jax.lax.scan(step, init, (ks, vs))
        return out / total

    if qc == n:
        return rows(q)
    out = jax.lax.map(rows, q.reshape(b, hd, n // qc, qc, d).transpose(2, 0, 1, 3, 4))
    return out.transpose(1, 2, 0, 3, 4).reshape(b, hd, n, d)


def attend(q: Array, k: Array, v: Array, heads: int) -> Array:
    """Softmax attention: q (B, N, C), k and v (B, M, C) -> (B, N, C), ``heads`` heads of C / heads.

    float32: diffusers' math (logits, softmax, weighted sum) in heads-first layout; on a CPU a
    self-attention larger than one block (``ATTN_Q_BLOCK`` queries or ``ATTN_K_BLOCK`` keys) is computed
    by blocks (``_attend_blocked``, ``lax.platform_dependent``: other backends get the plain form).
    Half precision: ``jax.nn.dot_product_attention``, which XLA may lower to a fused kernel on a GPU
    (cuDNN flash attention) instead of materialising the (B, heads, N, M) logits; softmax statistics
    in float32."""
    b, n, c = q.shape
    d = c // heads
    if q.dtype in (jnp.float16, jnp.bfloat16):
        q, k, v = (a.reshape(b, a.shape[1], heads, d) for a in (q, k, v))
        return jax.nn.dot_product_attention(q, k, v, scale=1.0 / math.sqrt(d)).reshape(b, n, c)
    q, k, v = (a.reshape(b, a.shape[1], heads, d).transpose(0, 2, 1, 3) for a in (q, k, v))
    q = q * (1.0 / math.sqrt(d))
    if n > ATTN_Q_BLOCK or k.shape[2] > ATTN_K_BLOCK:
        out = jax.lax.platform_dependent(q, k, v, cpu=_attend_blocked, default=_attend_plain)
    else:
        out = _attend_plain(q, k, v)
    return out.transpose(0, 2, 1, 3).reshape(b, n, c)


class Attention(nn.Module):
    """Multi-head attention of ``x`` (B, N, C) to ``context`` (B, M, D) (self-attention without one):
    ``to_q``/``to_k``/``to_v`` (bias only with ``qkv_bias``), ``to_out_0``."""

    heads: int
    qkv_bias: bool = False
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, context: Optional[Array] = None) -> Array:
        context = x if context is None else context
        c = x.shape[-1]
        dense = lambda name: nn.Dense(c, use_bias=self.qkv_bias, dtype=self.dtype, name=name)
        out = attend(dense("to_q")(x), dense("to_k")(context), dense("to_v")(context), self.heads)
        return nn.Dense(c, dtype=self.dtype, name="to_out_0")(out)


class GEGLU(nn.Module):
    inner: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h, gate = jnp.split(nn.Dense(2 * self.inner, dtype=self.dtype, name="proj")(x), 2, axis=-1)
        return h * jax.nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    mult: int = 4
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = GEGLU(self.mult * x.shape[-1], dtype=self.dtype, name="net_0")(x)
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="net_2")(h)


class TransformerBlock(nn.Module):
    """``BasicTransformerBlock``: self-attention, cross-attention, GEGLU feed-forward, each pre-LayerNorm."""

    heads: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, context: Array) -> Array:
        ln = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=name)
        x = x + Attention(self.heads, dtype=self.dtype, name="attn1")(ln("norm1")(x))
        x = x + Attention(self.heads, dtype=self.dtype, name="attn2")(ln("norm2")(x), context)
        return x + FeedForward(dtype=self.dtype, name="ff")(ln("norm3")(x))


class SpatialTransformer(nn.Module):
    """``Transformer2DModel`` (continuous input): (B, H, W, C) -> same shape."""

    heads: int
    layers: int = 1
    linear_projection: bool = False
    groups: int = 32
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, context: Array) -> Array:
        b, hgt, wid, c = x.shape
        h = GroupNorm(self.groups, 1e-6, dtype=self.dtype, name="norm")(x)
        if self.linear_projection:
            h = nn.Dense(c, dtype=self.dtype, name="proj_in")(h.reshape(b, hgt * wid, c))
        else:
            h = nn.Conv(c, (1, 1), dtype=self.dtype, name="proj_in")(h).reshape(b, hgt * wid, c)
        for i in range(self.layers):
            h = TransformerBlock(self.heads, dtype=self.dtype, name=f"transformer_blocks_{i}")(h, context)
        if self.linear_projection:
            h = nn.Dense(c, dtype=self.dtype, name="proj_out")(h).reshape(b, hgt, wid, c)
        else:
            h = nn.Conv(c, (1, 1), dtype=self.dtype, name="proj_out")(h.reshape(b, hgt, wid, c))
        return h + x


def upsample_nearest(x: Array, size: Tuple[int, int]) -> Array:
    """(B, h, w, C) -> (B, H, W, C) nearest, as PyTorch's ``interpolate(size=(H, W), mode="nearest")``:
    output pixel i takes input floor(i * (h / H)) (the ratio in float32, as PyTorch computes it)."""
    b, h, w, c = x.shape
    if tuple(size) == (2 * h, 2 * w):
        return upsample_nearest_2x(x)
    idx = lambda n, m: np.minimum(np.floor(np.arange(m, dtype=np.float32) * np.float32(n / m)).astype(np.int64), n - 1)
    return jnp.take(jnp.take(x, idx(h, size[0]), axis=1), idx(w, size[1]), axis=2)


class Sampler2x(nn.Module):
    """``Downsample2D`` (3x3 conv, stride 2; padding 1, or with ``downsample_padding=0`` one zero row and
    column after the end: h -> ceil(h / 2), or floor(h / 2)) or ``Upsample2D`` (nearest to ``size``, by
    default 2x; 3x3 conv); parameter ``conv``."""

    ch: int
    up: bool
    dtype: Any = None
    padding: int = 1

    @nn.compact
    def __call__(self, x: Array, size: Optional[Tuple[int, int]] = None) -> Array:
        if self.up:
            size = (2 * x.shape[1], 2 * x.shape[2]) if size is None else size
            return Conv3x3(self.ch, dtype=self.dtype, name="conv")(upsample_nearest(x, size))
        pad = _PAD if self.padding == 1 else ((0, 1), (0, 1))
        return Conv3x3(self.ch, (2, 2), pad, dtype=self.dtype, name="conv")(x)


class Level(nn.Module):
    """One down or up block: ResNets, each with a transformer after it when ``cross_attn``, then the
    resampler. A down block returns (h, [outputs for the skips]); an up block consumes its skips."""

    out_ch: int
    num_resnets: int
    cross_attn: bool
    resample: bool
    up: bool
    heads: int
    transformer_layers: int
    linear_projection: bool
    groups: int
    eps: float
    dtype: Any = None
    act: str = "silu"
    downsample_padding: int = 1

    @nn.compact
    def __call__(self, x, temb, context, skips=None, up_size=None):
        outputs = []
        for i in range(self.num_resnets):
            if self.up:                                       # the latest skip first, as diffusers pops them
                x = jnp.concatenate([x, skips[-1 - i]], axis=-1)
            x = ResnetBlock(self.out_ch, self.groups, self.eps, dtype=self.dtype, act=self.act,
                            name=f"resnets_{i}")(x, temb)
            if self.cross_attn:
                x = SpatialTransformer(self.heads, self.transformer_layers, self.linear_projection, self.groups,
                                       dtype=self.dtype, name=f"attentions_{i}")(x, context)
            outputs.append(x)
        if self.resample:
            x = Sampler2x(self.out_ch, self.up, dtype=self.dtype, padding=self.downsample_padding,
                          name="upsamplers_0" if self.up else "downsamplers_0")(x, up_size if self.up else None)
            outputs.append(x)
        return x if self.up else (x, outputs)


class MidBlock(nn.Module):
    heads: int
    transformer_layers: int
    linear_projection: bool
    groups: int
    eps: float
    dtype: Any = None
    act: str = "silu"
    scale: float = 1.0

    @nn.compact
    def __call__(self, x, temb, context):
        c = x.shape[-1]
        res = lambda name: ResnetBlock(c, self.groups, self.eps, dtype=self.dtype, act=self.act, scale=self.scale,
                                       name=name)
        x = res("resnets_0")(x, temb)
        x = SpatialTransformer(self.heads, self.transformer_layers, self.linear_projection, self.groups,
                               dtype=self.dtype, name="attentions_0")(x, context)
        return res("resnets_1")(x, temb)


class SDUNet(nn.Module):
    """``UNet2DConditionModel`` of SD 1.x / 2.x; fields as in its config (per-level tuples in down order)."""

    block_out_channels: Tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: Tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: Tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    layers_per_block: int = 2
    heads: Tuple[int, ...] = (8, 8, 8, 8)
    transformer_layers: Tuple[int, ...] = (1, 1, 1, 1)
    use_linear_projection: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    in_channels: int = 4
    out_channels: int = 4
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    dtype: Any = None
    act_fn: str = "silu"
    mid_block_scale_factor: float = 1.0
    downsample_padding: int = 1

    @nn.compact
    def __call__(self, x: Array, t: Array, context: Array) -> Array:
        """latents x (B, h, w, C_in) of any size, t (B,) or (), context (B, L, D) -> (B, h, w, C_out) float32.

        Each downsampling halves the size rounding up (``downsample_padding=0``: down); each upsampling
        goes back to the size of the skip it meets (diffusers' ``upsample_size``, forwarded when h or w is
        not a multiple of 2 ** downsamplings), so h and w need not be multiples of anything."""
        levels = len(self.block_out_channels)
        t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
        c0 = self.block_out_channels[0]
        temb = timestep_embedding(t, c0, self.flip_sin_to_cos, self.freq_shift)
        temb = TimestepEmbedding(4 * c0, dtype=self.dtype, act=self.act_fn,
                                 name="time_embedding")(temb.astype(self.dtype or jnp.float32))
        if self.dtype is not None:
            x, context = x.astype(self.dtype), context.astype(self.dtype)
        common = dict(linear_projection=self.use_linear_projection, groups=self.norm_num_groups, eps=self.norm_eps,
                      dtype=self.dtype, act=self.act_fn)
        h = nn.Conv(c0, (3, 3), padding=_PAD, dtype=self.dtype, name="conv_in")(x)
        skips = [h]
        for i, ch in enumerate(self.block_out_channels):
            h, out = Level(ch, self.layers_per_block, self.down_block_types[i] == "CrossAttnDownBlock2D",
                           i < levels - 1, False, self.heads[i], self.transformer_layers[i],
                           downsample_padding=self.downsample_padding, name=f"down_blocks_{i}", **common)(h, temb, context)
            skips += out
        h = MidBlock(self.heads[-1], self.transformer_layers[-1], scale=float(self.mid_block_scale_factor),
                     name="mid_block", **common)(h, temb, context)
        rev = list(reversed(range(levels)))
        for i, lvl in enumerate(rev):
            n = self.layers_per_block + 1
            up_size = tuple(skips[-n - 1].shape[1:3]) if i < levels - 1 else None    # the next skip's size
            h = Level(self.block_out_channels[lvl], n, self.up_block_types[i] == "CrossAttnUpBlock2D",
                      i < levels - 1, True, self.heads[lvl], self.transformer_layers[lvl], name=f"up_blocks_{i}",
                      **common)(h, temb, context, tuple(skips[-n:]), up_size)
            del skips[-n:]
        h = ACTIVATIONS[self.act_fn](GroupNorm(self.norm_num_groups, self.norm_eps, dtype=self.dtype,
                                               name="conv_norm_out")(h))
        return nn.Conv(self.out_channels, (3, 3), padding=_PAD, dtype=self.dtype, name="conv_out")(h).astype(jnp.float32)


# config keys whose non-default values this implementation does not have
_UNSUPPORTED = {"class_embed_type": None, "addition_embed_type": None, "num_class_embeds": None,
                "encoder_hid_dim": None, "encoder_hid_dim_type": None, "time_embedding_type": "positional",
                "resnet_time_scale_shift": "default", "dual_cross_attention": False,
                "only_cross_attention": False, "mid_block_type": "UNetMidBlock2DCrossAttn",
                "conv_in_kernel": 3, "conv_out_kernel": 3, "attention_type": "default",
                "cross_attention_norm": None, "time_cond_proj_dim": None, "mid_block_only_cross_attention": None,
                "reverse_transformer_layers_per_block": None, "center_input_sample": False,
                "time_embedding_dim": None, "timestep_post_act": None, "projection_class_embeddings_input_dim": None,
                "class_embeddings_concat": False, "addition_time_embed_dim": None,
                "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "time_embedding_act_fn": None}
#: config keys read into the module (each parity-tested in tests/test_sd_unet.py)
IMPLEMENTED_KEYS = ("sample_size", "in_channels", "out_channels", "flip_sin_to_cos", "freq_shift", "down_block_types",
                    "up_block_types", "block_out_channels", "layers_per_block", "downsample_padding",
                    "mid_block_scale_factor", "act_fn", "norm_num_groups", "norm_eps", "cross_attention_dim",
                    "transformer_layers_per_block", "attention_head_dim", "num_attention_heads",
                    "use_linear_projection")
#: config keys with no effect on this module's outputs: dropout (inference), upcast_attention (attention
#: logits and softmax are float32 always), addition_embed_type_num_heads (only with an addition_embed_type)
NO_EFFECT_KEYS = ("dropout", "upcast_attention", "addition_embed_type_num_heads")


def _per_level(value, levels: int, name: str) -> Tuple[int, ...]:
    if isinstance(value, (list, tuple)):
        if len(value) != levels or any(isinstance(v, (list, tuple)) for v in value):
            raise ValueError(f"config {name}={value}: expected one integer per level ({levels})")
        return tuple(int(v) for v in value)
    return (int(value),) * levels


def unet_from_config(cfg: Dict[str, Any], dtype: Any = None) -> SDUNet:
    """An :class:`SDUNet` from a diffusers ``unet/config.json`` dict; unsupported options raise ValueError."""
    if cfg.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise ValueError(f"{cfg.get('_class_name')!r} is not a UNet2DConditionModel")
    bad = [f"{k}={cfg[k]!r}" for k, default in _UNSUPPORTED.items() if k in cfg and cfg[k] != default]
    if cfg.get("act_fn", "silu") not in ACTIVATIONS:
        bad.append(f"act_fn={cfg['act_fn']!r} (supported: {sorted(ACTIVATIONS)})")
    if cfg.get("downsample_padding", 1) not in (0, 1):
        bad.append(f"downsample_padding={cfg['downsample_padding']!r} (0 or 1)")
    if bad:
        raise ValueError(f"unsupported UNet2DConditionModel options (SD 1.x / 2.x only): {', '.join(bad)}")
    unknown = sorted(k for k in cfg if not k.startswith("_") and k not in _UNSUPPORTED and k not in IMPLEMENTED_KEYS
                     and k not in NO_EFFECT_KEYS)
    if unknown:
        raise ValueError(f"UNet2DConditionModel config keys {unknown} are not known to this implementation "
                         "(a newer diffusers' options?): not supported")
    chans = tuple(int(c) for c in cfg.get("block_out_channels", (320, 640, 1280, 1280)))
    levels = len(chans)
    down = tuple(cfg.get("down_block_types", SDUNet.down_block_types))
    up = tuple(cfg.get("up_block_types", SDUNet.up_block_types))
    if len(down) != levels or len(up) != levels or any(d not in DOWN_TYPES for d in down) \
            or any(u not in UP_TYPES for u in up):
        raise ValueError(f"block types {down} / {up}: one per level, each one of {DOWN_TYPES} / {UP_TYPES}")
    if [d.startswith("CrossAttn") for d in down] != [u.startswith("CrossAttn") for u in reversed(up)]:
        raise ValueError(f"down {down} and up {up} blocks must mirror each other's cross-attention levels")
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)   # diffusers' legacy reading
    cross = cfg.get("cross_attention_dim", 768)
    if isinstance(cross, (list, tuple)) and len(set(cross)) > 1:
        raise ValueError(f"cross_attention_dim={cross}: one context width for all levels is supported")
    heads = _per_level(heads, levels, "num_attention_heads")
    for ch, n in zip(chans, heads):
        if ch % n:
            raise ValueError(f"{ch} channels are not divisible into {n} attention heads")
    return SDUNet(block_out_channels=chans, down_block_types=down, up_block_types=up,
                  layers_per_block=int(cfg.get("layers_per_block", 2)), heads=heads,
                  transformer_layers=_per_level(cfg.get("transformer_layers_per_block", 1), levels,
                                                "transformer_layers_per_block"),
                  use_linear_projection=bool(cfg.get("use_linear_projection", False)),
                  norm_num_groups=int(cfg.get("norm_num_groups", 32)), norm_eps=float(cfg.get("norm_eps", 1e-5)),
                  in_channels=int(cfg.get("in_channels", 4)), out_channels=int(cfg.get("out_channels", 4)),
                  flip_sin_to_cos=bool(cfg.get("flip_sin_to_cos", True)), freq_shift=float(cfg.get("freq_shift", 0)),
                  act_fn=cfg.get("act_fn", "silu"), mid_block_scale_factor=float(cfg.get("mid_block_scale_factor", 1)),
                  downsample_padding=int(cfg.get("downsample_padding", 1)), dtype=dtype)


def context_dim(cfg: Dict[str, Any]) -> int:
    cross = cfg.get("cross_attention_dim", 768)
    return int(cross[0] if isinstance(cross, (list, tuple)) else cross)


def load_sd_unet(folder: str, dtype: Any = None) -> Tuple[SDUNet, Dict[str, Any], Dict[str, Any]]:
    """(unet, params, config) from a diffusers ``unet/`` folder (``config.json`` and
    ``diffusion_pytorch_model[.fp16].safetensors``), no torch. ``dtype`` (e.g. ``jnp.float16`` or
    ``jnp.bfloat16`` on a GPU): the parameters and the computation's dtype (default float32)."""
    cfg, state = read_folder(folder, ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"),
                             "a diffusers UNet folder")
    unet = unet_from_config(cfg, dtype)
    levels = len(unet.block_out_channels)
    s = 2 ** (levels - 1)
    tmpl = template(unet, jnp.zeros((1, s, s, unet.in_channels)), jnp.zeros((1,)),
                    jnp.zeros((1, 1, context_dim(cfg))))
    params = assemble_torch(state, tmpl, "UNet", dtype=dtype)
    return unet, params, cfg
