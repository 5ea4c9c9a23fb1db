"""Stable Diffusion's VAE (diffusers' ``AutoencoderKL``) in Flax, loaded from a local folder.

* ``VAEDecoder``: SD latents (B, h, w, 4), already divided by the VAE's ``scaling_factor``, -> images
  (B, 8h, 8w, 3) in [-1, 1] (about): ``post_quant_conv`` (1x1), then the decoder: ``conv_in``, a middle
  block (ResNet, single-head self-attention, ResNet), one up block per level (``layers_per_block + 1``
  ResNets, nearest 2x upsampling and a 3x3 conv except at the last), GroupNorm, SiLU, ``conv_out``.
* ``VAEEncoder``: images (B, H, W, 3) in [-1, 1] -> (mean, log-variance) of the latent posterior, each
  (B, H/8, W/8, 4): ``conv_in``, one down block per level (``layers_per_block`` ResNets, then a stride-2
  3x3 conv on the input padded by one row and column at the bottom and right, except at the last level),
  the middle block, GroupNorm, SiLU, ``conv_out`` (2 x 4 channels), ``quant_conv`` (1x1); the log-variance
  clipped to [-30, 20] as diffusers does. Latents for the UNet: ``mean * scaling_factor`` (the mode).

NHWC throughout (diffusers is NCHW). The Flax modules carry diffusers' parameter names (``.i`` written
``_i``), so the weights convert by name (:func:`dngjax.models.torch_weights.assemble_torch`); the
attention names of older checkpoints (``query``/``key``/``value``/``proj_attn``) are read as well.

    vae, params, cfg = load_vae_decoder("sd/vae")
    images = vae.apply(params, latents / cfg["scaling_factor"])

Parity with diffusers' PyTorch AutoencoderKL: ``tests/test_vae.py`` (tiny random configs).
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import numpy as np
import jax.numpy as jnp
import flax.linen as nn

from .sd_unet import Sampler2x, attend
from .torch_weights import assemble_torch, current_attention_names, read_folder, template
from .unet import GroupNorm

Array = jnp.ndarray
_PAD = ((1, 1), (1, 1))
WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")


class VAEResBlock(nn.Module):
    """diffusers' ``ResnetBlock2D`` without a time embedding (GroupNorm eps 1e-6, SiLU)."""

    out_ch: int
    groups: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        h = nn.swish(GroupNorm(self.groups, epsilon=1e-6, dtype=self.dtype, name="norm1")(x))
        h = nn.Conv(self.out_ch, (3, 3), padding=_PAD, dtype=self.dtype, name="conv1")(h)
        h = nn.swish(GroupNorm(self.groups, epsilon=1e-6, dtype=self.dtype, name="norm2")(h))
        h = nn.Conv(self.out_ch, (3, 3), padding=_PAD, dtype=self.dtype, name="conv2")(h)
        if x.shape[-1] != self.out_ch:
            x = nn.Conv(self.out_ch, (1, 1), dtype=self.dtype, name="conv_shortcut")(x)
        return x + h


class VAEAttention(nn.Module):
    """The middle block's single-head self-attention over all pixels, with ``group_norm`` and a residual."""

    groups: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        b, hgt, wid, c = x.shape
        h = GroupNorm(self.groups, epsilon=1e-6, dtype=self.dtype, name="group_norm")(x).reshape(b, hgt * wid, c)
        q, k, v = (nn.Dense(c, dtype=self.dtype, name=n)(h) for n in ("to_q", "to_k", "to_v"))
        h = nn.Dense(c, dtype=self.dtype, name="to_out_0")(attend(q, k, v, 1))
        return x + h.reshape(b, hgt, wid, c)


class MidBlock(nn.Module):
    groups: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        x = VAEResBlock(c, self.groups, self.dtype, name="resnets_0")(x)
        x = VAEAttention(self.groups, self.dtype, name="attentions_0")(x)
        return VAEResBlock(c, self.groups, self.dtype, name="resnets_1")(x)


class Downsample(nn.Module):
    """``Downsample2D(padding=0)``: pad one row and column at the bottom and right, 3x3 conv, stride 2."""

    ch: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return nn.Conv(self.ch, (3, 3), strides=(2, 2), padding="VALID", dtype=self.dtype, name="conv")(x)


class Level(nn.Module):
    out_ch: int
    num_resnets: int
    resample: bool
    up: bool
    groups: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        for j in range(self.num_resnets):
            x = VAEResBlock(self.out_ch, self.groups, self.dtype, name=f"resnets_{j}")(x)
        if self.resample and self.up:
            x = Sampler2x(self.out_ch, True, dtype=self.dtype, name="upsamplers_0")(x)
        elif self.resample:
            x = Downsample(self.out_ch, self.dtype, name="downsamplers_0")(x)
        return x


class Decoder(nn.Module):
    block_out_channels: Tuple[int, ...]
    layers_per_block: int
    groups: int
    out_channels: int
    dtype: Any = None

    @nn.compact
    def __call__(self, z):
        chans = tuple(reversed(self.block_out_channels))
        x = nn.Conv(chans[0], (3, 3), padding=_PAD, dtype=self.dtype, name="conv_in")(z)
        x = MidBlock(self.groups, self.dtype, name="mid_block")(x)
        for i, ch in enumerate(chans):
            x = Level(ch, self.layers_per_block + 1, i < len(chans) - 1, True, self.groups, self.dtype,
                      name=f"up_blocks_{i}")(x)
        x = nn.swish(GroupNorm(self.groups, epsilon=1e-6, dtype=self.dtype, name="conv_norm_out")(x))
        return nn.Conv(self.out_channels, (3, 3), padding=_PAD, dtype=self.dtype, name="conv_out")(x)


class Encoder(nn.Module):
    block_out_channels: Tuple[int, ...]
    layers_per_block: int
    groups: int
    latent_channels: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        chans = self.block_out_channels
        x = nn.Conv(chans[0], (3, 3), padding=_PAD, dtype=self.dtype, name="conv_in")(x)
        for i, ch in enumerate(chans):
            x = Level(ch, self.layers_per_block, i < len(chans) - 1, False, self.groups, self.dtype,
                      name=f"down_blocks_{i}")(x)
        x = MidBlock(self.groups, self.dtype, name="mid_block")(x)
        x = nn.swish(GroupNorm(self.groups, epsilon=1e-6, dtype=self.dtype, name="conv_norm_out")(x))
        return nn.Conv(2 * self.latent_channels, (3, 3), padding=_PAD, dtype=self.dtype, name="conv_out")(x)


class VAEDecoder(nn.Module):
    """``post_quant_conv`` + diffusers' ``Decoder`` (``up_block_types`` all ``UpDecoderBlock2D``)."""

    block_out_channels: Tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    groups: int = 32
    latent_channels: int = 4
    out_channels: int = 3
    dtype: Any = None

    @nn.compact
    def __call__(self, z):                                          # (B, h, w, latent) -> (B, H, W, 3)
        z = nn.Conv(self.latent_channels, (1, 1), dtype=self.dtype, name="post_quant_conv")(z)
        return Decoder(self.block_out_channels, self.layers_per_block, self.groups, self.out_channels, self.dtype,
                       name="decoder")(z).astype(jnp.float32)


class VAEEncoder(nn.Module):
    """diffusers' ``Encoder`` + ``quant_conv`` (``down_block_types`` all ``DownEncoderBlock2D``)."""

    block_out_channels: Tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    groups: int = 32
    latent_channels: int = 4
    dtype: Any = None

    @nn.compact
    def __call__(self, x):                                          # (B, H, W, 3) -> 2 x (B, h, w, latent)
        h = Encoder(self.block_out_channels, self.layers_per_block, self.groups, self.latent_channels, self.dtype,
                    name="encoder")(x)
        h = nn.Conv(2 * self.latent_channels, (1, 1), dtype=self.dtype, name="quant_conv")(h).astype(jnp.float32)
        mean, logvar = jnp.split(h, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)


#: AutoencoderKL config keys read into the modules (parity-tested in tests/test_vae.py); ``in_channels`` by
#: the encoder only (3: images), ``scaling_factor`` by the pipeline
IMPLEMENTED_KEYS = ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
                    "layers_per_block", "latent_channels", "norm_num_groups", "scaling_factor")
#: keys without effect here: sample_size (diffusers' tiling tile size), force_upcast (float16 VAEs run in
#: float32 in diffusers; this one computes in float32 unless asked otherwise)
NO_EFFECT_KEYS = ("sample_size", "force_upcast")
#: keys refused at any value but these (Stable Diffusion 1.x / 2.x's VAE): name -> the supported value
REQUIRED = {"act_fn": "silu", "shift_factor": None, "latents_mean": None, "latents_std": None,
            "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True}


def _check_config(cfg: Dict[str, Any]) -> Dict[str, Any]:
    bad = [f"{k}={cfg[k]!r}" for k, v in REQUIRED.items() if k in cfg and cfg[k] != v]
    unknown = sorted(k for k in cfg if not k.startswith("_") and k not in REQUIRED and k not in IMPLEMENTED_KEYS
                     and k not in NO_EFFECT_KEYS)
    if bad or unknown:
        raise ValueError("unsupported AutoencoderKL options (Stable Diffusion 1.x / 2.x's VAE only): "
                         + ", ".join(bad + [f"{k} (not known to this implementation)" for k in unknown]))
    levels = len(cfg.get("block_out_channels", [0] * 4))
    for key, kind in (("up_block_types", "UpDecoderBlock2D"), ("down_block_types", "DownEncoderBlock2D")):
        types = cfg.get(key, [kind] * levels)
        if any(u != kind for u in types):
            raise ValueError(f"{key}={types}: only {kind} is supported (Stable Diffusion's VAE)")
    return dict(block_out_channels=tuple(int(c) for c in cfg["block_out_channels"]),
                layers_per_block=int(cfg.get("layers_per_block", 2)), groups=int(cfg.get("norm_num_groups", 32)),
                latent_channels=int(cfg.get("latent_channels", 4)))


def decoder_from_config(cfg: Dict[str, Any], dtype: Any = None) -> VAEDecoder:
    """A :class:`VAEDecoder` from diffusers' ``AutoencoderKL`` config dict (``vae/config.json``)."""
    return VAEDecoder(out_channels=int(cfg.get("out_channels", 3)), dtype=dtype, **_check_config(cfg))


def encoder_from_config(cfg: Dict[str, Any], dtype: Any = None) -> VAEEncoder:
    """A :class:`VAEEncoder` from diffusers' ``AutoencoderKL`` config dict."""
    if int(cfg.get("in_channels", 3)) != 3:
        raise ValueError(f"in_channels={cfg['in_channels']!r}: the encoder takes RGB images (3 channels)")
    return VAEEncoder(dtype=dtype, **_check_config(cfg))


def _renamed(state: Dict[str, np.ndarray], prefixes: Tuple[str, ...]) -> Dict[str, np.ndarray]:
    """The entries under ``prefixes``, attention names of older diffusers checkpoints renamed."""
    return current_attention_names({k: v for k, v in state.items() if k.startswith(prefixes)})


def _load(folder: str, make, prefixes: Tuple[str, ...], example, what: str, dtype):
    cfg, state = read_folder(folder, WEIGHTS, "a diffusers VAE folder")
    module = make(cfg, dtype)
    tmpl = template(module, example(module))
    params = assemble_torch(_renamed(state, prefixes), tmpl, what, dtype=dtype)
    cfg.setdefault("scaling_factor", 0.18215)
    return module, params, cfg


def load_vae_decoder(folder: str, dtype: Any = None) -> Tuple[VAEDecoder, Dict[str, Any], Dict[str, Any]]:
    """(decoder, params, config) from a diffusers ``vae/`` folder (``config.json`` and
    ``diffusion_pytorch_model[.fp16].safetensors``); config["scaling_factor"] is SD's latent scale (0.18215)."""
    return _load(folder, decoder_from_config, ("decoder.", "post_quant_conv."),
                 lambda m: jnp.zeros((1, 8, 8, m.latent_channels)), "VAE decoder", dtype)


def load_vae_encoder(folder: str, dtype: Any = None) -> Tuple[VAEEncoder, Dict[str, Any], Dict[str, Any]]:
    """(encoder, params, config) from a diffusers ``vae/`` folder; ``encoder.apply(params, images)`` gives
    the latent posterior's (mean, log-variance); SD latents are ``mean * config["scaling_factor"]``."""
    return _load(folder, encoder_from_config, ("encoder.", "quant_conv."),
                 lambda m: jnp.zeros((1, 2 ** len(m.block_out_channels), 2 ** len(m.block_out_channels), 3)),
                 "VAE encoder", dtype)
