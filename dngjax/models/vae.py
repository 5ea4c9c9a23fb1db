"""The decoder of Stable Diffusion's VAE (diffusers' ``AutoencoderKL``) in Flax, loaded from a local folder.

``decode(latents)`` maps SD latents (B, h, w, 4), already divided by the VAE's ``scaling_factor``, to
images (B, 8h, 8w, 3) in [-1, 1] (about): ``post_quant_conv`` (1x1), then the decoder: ``conv_in``, a
middle block (ResNet, single-head self-attention, ResNet), one up block per level (``layers_per_block
+ 1`` ResNets, nearest 2x upsampling and a 3x3 conv except at the last), GroupNorm, SiLU, ``conv_out``.
NHWC throughout (diffusers is NCHW); the blocks reuse the project UNet's GroupNorm, 1x1 convolution,
upsampling and attention.

    vae, params, cfg = load_vae_decoder("sd/vae")
    images = vae.apply(params, latents / cfg["scaling_factor"])

Parity with diffusers' PyTorch decoder: ``tests/test_vae.py`` (tiny random configs).
"""

from __future__ import annotations

import re
from typing import Any, Dict, Tuple

import numpy as np
import jax.numpy as jnp
import flax.linen as nn

from .torch_weights import assemble, read_folder, template

from .unet import AttnBlock, Conv1x1, GroupNorm, upsample_nearest_2x

_PAD = ((1, 1), (1, 1))


class VAEResBlock(nn.Module):
    """diffusers' ``ResnetBlock2D`` without a time embedding (GroupNorm eps 1e-6, SiLU)."""

    out_ch: int
    groups: int

    @nn.compact
    def __call__(self, x):
        h = nn.swish(GroupNorm(self.groups, epsilon=1e-6, name="norm1")(x))
        h = nn.Conv(self.out_ch, (3, 3), padding=_PAD, name="conv1")(h)
        h = nn.swish(GroupNorm(self.groups, epsilon=1e-6, name="norm2")(h))
        h = nn.Conv(self.out_ch, (3, 3), padding=_PAD, name="conv2")(h)
        if x.shape[-1] != self.out_ch:
            x = Conv1x1(self.out_ch, name="conv_shortcut")(x)
        return x + h


class VAEDecoder(nn.Module):
    """``post_quant_conv`` + diffusers' ``Decoder`` (``up_block_types`` all ``UpDecoderBlock2D``)."""

    block_out_channels: Tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    groups: int = 32
    latent_channels: int = 4
    out_channels: int = 3

    @nn.compact
    def __call__(self, z):                                          # (B, h, w, latent) -> (B, H, W, 3)
        z = Conv1x1(self.latent_channels, name="post_quant_conv")(z)
        chans = tuple(reversed(self.block_out_channels))
        x = nn.Conv(chans[0], (3, 3), padding=_PAD, name="conv_in")(z)
        x = VAEResBlock(chans[0], self.groups, name="mid_resnet_0")(x)
        x = AttnBlock(self.groups, name="mid_attn")(x)
        x = VAEResBlock(chans[0], self.groups, name="mid_resnet_1")(x)
        for i, ch in enumerate(chans):
            for j in range(self.layers_per_block + 1):
                x = VAEResBlock(ch, self.groups, name=f"up_{i}_resnet_{j}")(x)
            if i < len(chans) - 1:
                x = nn.Conv(ch, (3, 3), padding=_PAD, name=f"up_{i}_upsample")(upsample_nearest_2x(x))
        x = nn.swish(GroupNorm(self.groups, epsilon=1e-6, name="conv_norm_out")(x))
        return nn.Conv(self.out_channels, (3, 3), padding=_PAD, name="conv_out")(x)


def decoder_from_config(cfg: Dict[str, Any]) -> VAEDecoder:
    """A :class:`VAEDecoder` from diffusers' ``AutoencoderKL`` config dict (``vae/config.json``)."""
    ups = cfg.get("up_block_types", ["UpDecoderBlock2D"] * len(cfg.get("block_out_channels", [0] * 4)))
    if any(u != "UpDecoderBlock2D" for u in ups):
        raise ValueError(f"up_block_types={ups}: only UpDecoderBlock2D is supported (Stable Diffusion's VAE)")
    if cfg.get("mid_block_add_attention", True) is False:
        raise ValueError("mid_block_add_attention=False is not supported")
    return VAEDecoder(block_out_channels=tuple(int(c) for c in cfg["block_out_channels"]),
                      layers_per_block=int(cfg.get("layers_per_block", 2)), groups=int(cfg.get("norm_num_groups", 32)),
                      latent_channels=int(cfg.get("latent_channels", 4)), out_channels=int(cfg.get("out_channels", 3)))


_RES = {"norm1": "norm1", "norm2": "norm2", "conv1": "conv1", "conv2": "conv2", "conv_shortcut": "conv_shortcut"}
_ATT = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
        "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}        # (older diffusers names)


def _flax_path(key: str, n_levels: int) -> Tuple[Tuple[str, ...], str]:
    """diffusers' parameter name (decoder or post_quant_conv) -> (flax module path, torch leaf)."""
    m = re.fullmatch(r"post_quant_conv\.(weight|bias)", key)
    if m:
        return ("post_quant_conv",), m.group(1)
    m = re.fullmatch(r"decoder\.(conv_in|conv_out|conv_norm_out)\.(weight|bias)", key)
    if m:
        return (m.group(1),), m.group(2)
    m = re.fullmatch(r"decoder\.mid_block\.resnets\.(\d+)\.(\w+)\.(weight|bias)", key)
    if m:
        return (f"mid_resnet_{m.group(1)}", _RES[m.group(2)]), m.group(3)
    m = re.fullmatch(r"decoder\.mid_block\.attentions\.0\.([\w.]+?)\.(weight|bias)", key)
    if m:
        return ("mid_attn", _ATT[m.group(1)]), m.group(2)
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(weight|bias)", key)
    if m:
        return (f"up_{m.group(1)}_resnet_{m.group(2)}", _RES[m.group(3)]), m.group(4)
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)", key)
    if m:
        return (f"up_{m.group(1)}_upsample",), m.group(2)
    raise KeyError(key)


def _convert(w: np.ndarray, leaf: str, kind: str) -> np.ndarray:
    """torch leaf -> flax leaf value: conv (out, in, kh, kw) -> (kh, kw, in, out); linear (out, in) -> (in, out)."""
    w = np.asarray(w, np.float32)
    if leaf == "bias" or kind == "norm":
        return w
    if w.ndim == 4:
        return w.transpose(2, 3, 1, 0)
    if w.ndim == 2:
        return w.T
    raise ValueError(f"unexpected weight of shape {w.shape}")


def params_from_torch(state: Dict[str, np.ndarray], decoder: VAEDecoder) -> Dict[str, Any]:
    """Flax params of ``decoder`` from an ``AutoencoderKL`` state dict (numpy); encoder and quant_conv
    entries are ignored; every decoder parameter must be present with its shape."""
    tmpl = template(decoder, jnp.zeros((1, 8, 8, decoder.latent_channels)))
    out: Dict[Tuple[str, ...], np.ndarray] = {}
    for key, w in state.items():
        if not (key.startswith("decoder.") or key.startswith("post_quant_conv.")):
            continue
        try:
            mod, leaf = _flax_path(key, len(decoder.block_out_channels))
        except KeyError:
            raise ValueError(f"unexpected VAE decoder parameter {key!r}") from None
        is_norm = mod[-1].startswith("norm") or mod[-1] in ("conv_norm_out",)
        name = ("scale" if is_norm else "kernel") if leaf == "weight" else "bias"
        a = _convert(w, leaf, "norm" if is_norm else "other")
        if mod[-1] in ("q", "k", "v", "proj_out") and a.ndim == 4:          # 1x1 conv attention (old layout)
            a = a[0, 0]
        if mod[-1] in ("conv_shortcut", "post_quant_conv") and a.ndim == 2:
            a = a[None, None]
        out[mod + (name,)] = a
    return assemble(out, tmpl, "decoder")


def load_vae_decoder(folder: str) -> Tuple[VAEDecoder, Dict[str, Any], Dict[str, Any]]:
    """(decoder, params, config) from a diffusers ``vae/`` folder (``config.json`` and
    ``diffusion_pytorch_model.safetensors``); config["scaling_factor"] is SD's latent scale (0.18215)."""
    cfg, state = read_folder(folder, "diffusion_pytorch_model.safetensors", "a diffusers VAE folder")
    decoder = decoder_from_config(cfg)
    cfg.setdefault("scaling_factor", 0.18215)
    return decoder, params_from_torch(state, decoder), cfg
