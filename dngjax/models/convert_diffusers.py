"""Convert a diffusers ``UNet2DModel`` checkpoint to the Flax :class:`~dngjax.models.unet.UNet`.

The source is a directory as ``save_pretrained`` writes it or as it is
downloaded from the Hugging Face hub (e.g. ``google/ddpm-cifar10-32``):
``config.json`` plus ``diffusion_pytorch_model.safetensors`` (read with
``safetensors``' numpy API) or ``diffusion_pytorch_model.bin`` (read with
``torch.load(weights_only=True)``; never an arbitrary pickle). A pipeline
directory whose UNet sits in ``unet/`` works too.

Only configurations the Flax UNet represents exactly are accepted: positional
``[sin, cos]`` timestep embedding with ``freq_shift=1``, ``DownBlock2D`` /
``AttnDownBlock2D`` and the mirrored ``UpBlock2D`` / ``AttnUpBlock2D``,
single-head attention, SiLU, GroupNorm eps 1e-6, no class embedding; anything
else raises a ``ValueError`` naming the config field.

The weights are read and mapped by :mod:`dngjax.models.torch_weights`. Writing the converted model as a
dngjax model folder (the card, the scheduler config) and the command line
(``python -m dngjax.convert SRC_DIR OUT_DIR``) sit above the models, in :mod:`dngjax.convert`.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Dict, Mapping, Tuple

import numpy as np

from .torch_weights import assemble_torch, current_attention_names, read_bin, read_safetensors, template
from .unet import UNet

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "diffusion_pytorch_model.safetensors"
BIN_NAME = "diffusion_pytorch_model.bin"
PARAMS_NAME = "params.msgpack"

# Defaults of diffusers' UNet2DModel.__init__ (0.42): a field missing from
# config.json takes this value in diffusers, so it is validated as such.
DIFFUSERS_DEFAULTS: Dict[str, Any] = dict(
    sample_size=None, in_channels=3, out_channels=3, center_input_sample=False,
    time_embedding_type="positional", time_embedding_dim=None, freq_shift=0,
    flip_sin_to_cos=True,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    mid_block_type="UNetMidBlock2D",
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(224, 448, 672, 896), layers_per_block=2, mid_block_scale_factor=1,
    downsample_padding=1, downsample_type="conv", upsample_type="conv", dropout=0.0,
    act_fn="silu", attention_head_dim=8, norm_num_groups=32, attn_norm_num_groups=None,
    norm_eps=1e-5, resnet_time_scale_shift="default", add_attention=True,
    class_embed_type=None, num_class_embeds=None, num_train_timesteps=None,
)

_DOWN_TYPES = ("DownBlock2D", "AttnDownBlock2D")
_UP_TYPES = ("UpBlock2D", "AttnUpBlock2D")
_FLAX_NORM_EPS = 1e-6


# --------------------------------------------------------------------------- config


def _reject(field: str, value: Any, why: str) -> None:
    raise ValueError(f"unsupported diffusers UNet2DModel config: {field}={value!r}: {why}")


def _need(cfg: Mapping[str, Any], field: str, ok: bool, why: str) -> None:
    """Reject ``cfg[field]`` (see :func:`_reject`) unless ``ok``."""
    if not ok:
        _reject(field, cfg[field], why)


def _check_scalar_fields(cfg: Mapping[str, Any]) -> None:
    """Reject the embedding, activation, mid-block, resampling and norm options the Flax UNet lacks."""
    _need(cfg, "time_embedding_type", cfg["time_embedding_type"] == "positional",
          "only the 'positional' sinusoidal embedding is supported")
    _need(cfg, "flip_sin_to_cos", cfg["flip_sin_to_cos"] is False,
          "the Flax UNet's timestep embedding is [sin, cos] (flip_sin_to_cos=False)")
    _need(cfg, "freq_shift", cfg["freq_shift"] == 1,
          "the Flax UNet's frequencies are exp(-log(10000) i / (half - 1)) (freq_shift=1)")
    _need(cfg, "center_input_sample", not cfg["center_input_sample"], "must be False")
    _need(cfg, "act_fn", cfg["act_fn"] in ("silu", "swish"), "only silu/swish is supported")
    _need(cfg, "resnet_time_scale_shift", cfg["resnet_time_scale_shift"] == "default",
          "only 'default' (additive timestep embedding) is supported")
    _need(cfg, "class_embed_type", cfg["class_embed_type"] is None,
          "class-conditional diffusers models are not supported")
    _need(cfg, "num_class_embeds", cfg["num_class_embeds"] is None,
          "class-conditional diffusers models are not supported")
    _need(cfg, "mid_block_type", cfg["mid_block_type"] == "UNetMidBlock2D",
          "only 'UNetMidBlock2D' is supported")
    _need(cfg, "add_attention", cfg["add_attention"] is True,
          "the Flax UNet always has mid-block attention")
    _need(cfg, "mid_block_scale_factor", cfg["mid_block_scale_factor"] == 1, "must be 1")
    _need(cfg, "downsample_type", cfg["downsample_type"] == "conv", "only 'conv' is supported")
    _need(cfg, "upsample_type", cfg["upsample_type"] == "conv", "only 'conv' is supported")
    _need(cfg, "downsample_padding", cfg["downsample_padding"] in (0, 1), "must be 0 or 1")
    _need(cfg, "norm_eps", isinstance(cfg["norm_eps"], (int, float))
          and math.isclose(cfg["norm_eps"], _FLAX_NORM_EPS, rel_tol=1e-6),
          f"the Flax UNet's GroupNorm eps is {_FLAX_NORM_EPS}")


def _block_layout(cfg: Mapping[str, Any]) -> Tuple[Tuple[int, ...], list]:
    """(block_out_channels as a tuple, the levels with attention): the block channels and types checked, the up
    blocks mirroring the down blocks."""
    boc = cfg["block_out_channels"]
    _need(cfg, "block_out_channels", isinstance(boc, (list, tuple)) and len(boc) >= 1
          and all(isinstance(c, int) and c > 0 for c in boc), "must be a list of positive ints")
    boc = tuple(boc)
    _need(cfg, "block_out_channels", all(c % boc[0] == 0 for c in boc),
          "every entry must be a multiple of the first (the Flax UNet uses ch * ch_mult)")
    n = len(boc)
    down, up = tuple(cfg["down_block_types"]), tuple(cfg["up_block_types"])
    _need(cfg, "down_block_types", len(down) == n, "must have one entry per block_out_channels entry")
    _need(cfg, "up_block_types", len(up) == n, "must have one entry per block_out_channels entry")
    for i, d in enumerate(down):
        if d not in _DOWN_TYPES:
            _reject(f"down_block_types[{i}]", d, f"supported block types are {_DOWN_TYPES}")
    for j, u in enumerate(up):
        if u not in _UP_TYPES:
            _reject(f"up_block_types[{j}]", u, f"supported block types are {_UP_TYPES}")
    attn_levels = [i for i, d in enumerate(down) if d == "AttnDownBlock2D"]
    for j, u in enumerate(up):
        level = n - 1 - j
        if (u == "AttnUpBlock2D") != (level in attn_levels):
            _reject("up_block_types", list(up),
                    f"up_block_types[{j}] ({u}) must mirror down_block_types[{level}] "
                    f"({down[level]}): the Flax UNet uses attention at the same resolutions "
                    "on both paths")
    return boc, attn_levels


def _check_widths(cfg: Mapping[str, Any], boc: Tuple[int, ...], attn_levels: list) -> None:
    """Reject layer counts, group counts, time-embedding and attention-head widths the Flax UNet lacks."""
    lpb = cfg["layers_per_block"]
    _need(cfg, "layers_per_block", isinstance(lpb, int) and lpb >= 1, "must be a positive int")
    groups = cfg["norm_num_groups"]
    _need(cfg, "norm_num_groups", isinstance(groups, int) and groups > 0
          and all(c % groups == 0 for c in boc), "must be a positive int dividing every channel count")
    _need(cfg, "attn_norm_num_groups", cfg["attn_norm_num_groups"] in (None, groups),
          "the Flax UNet's attention GroupNorm uses norm_num_groups")
    ch = boc[0]
    _need(cfg, "time_embedding_dim", cfg["time_embedding_dim"] in (None, 4 * ch),
          f"the Flax UNet's time embedding has 4 * block_out_channels[0] = {4 * ch} features")
    head_dim = cfg["attention_head_dim"]
    attn_channels = sorted({boc[i] for i in attn_levels} | {boc[-1]})  # + the mid block
    _need(cfg, "attention_head_dim", head_dim is None or all(c == head_dim for c in attn_channels),
          f"the Flax UNet's attention is single-head: attention_head_dim must be null or equal "
          f"to the channels of every attention block {attn_channels}")


def _sample_height(cfg: Mapping[str, Any], num_levels: int) -> int:
    """The sample height (``sample_size``: an int or [height, width]), checked to be divisible by every level's
    downsampling."""
    size = cfg["sample_size"]
    if isinstance(size, (list, tuple)):
        _need(cfg, "sample_size", len(size) == 2 and all(isinstance(s, int) for s in size),
              "must be an int or [height, width]")
        height = size[0]
    else:
        _need(cfg, "sample_size", isinstance(size, int) and size > 0,
              "an int is needed to place attention by resolution")
        height = size
    _need(cfg, "sample_size", height % (2 ** (num_levels - 1)) == 0,
          f"the height must be divisible by 2**(len(block_out_channels)-1) = {2 ** (num_levels - 1)}")
    return height


def unet_kwargs_from_config(config: Mapping[str, Any]) -> Dict[str, Any]:
    """Validate a diffusers ``UNet2DModel`` config; return the equivalent ``UNet(**kwargs)``.

    Raises:
      ValueError: naming the first field the Flax UNet cannot represent exactly.
    """
    cls = config.get("_class_name", "UNet2DModel")
    if cls != "UNet2DModel":
        _reject("_class_name", cls, "only UNet2DModel checkpoints can be converted")
    cfg = dict(DIFFUSERS_DEFAULTS)
    cfg.update({k: v for k, v in config.items() if not k.startswith("_")})
    _check_scalar_fields(cfg)
    boc, attn_levels = _block_layout(cfg)
    _check_widths(cfg, boc, attn_levels)
    height = _sample_height(cfg, len(boc))
    for name in ("in_channels", "out_channels"):
        _need(cfg, name, isinstance(cfg[name], int) and cfg[name] > 0, "must be a positive int")
    dropout = cfg["dropout"]
    _need(cfg, "dropout", isinstance(dropout, (int, float)) and 0 <= dropout < 1, "must be in [0, 1)")
    ch = boc[0]
    return dict(
        ch=ch,
        ch_mult=tuple(c // ch for c in boc),
        num_res_blocks=cfg["layers_per_block"],
        attn_resolutions=tuple(height // 2 ** i for i in attn_levels),
        dropout=float(dropout),
        out_ch=cfg["out_channels"],
        num_classes=0,
        groups=cfg["norm_num_groups"],
        downsample_padding=cfg["downsample_padding"],
    )


# --------------------------------------------------------------------------- loading


def find_unet_dir(src: str) -> str:
    """The folder of the UNet: ``src`` itself, or its ``unet/`` (a pipeline folder)."""
    if not os.path.isdir(src):
        raise FileNotFoundError(f"diffusers checkpoint directory not found: {src!r}")
    if os.path.isfile(os.path.join(src, CONFIG_NAME)):
        return src
    sub = os.path.join(src, "unet")
    if os.path.isfile(os.path.join(sub, CONFIG_NAME)):
        return sub
    raise FileNotFoundError(f"no {CONFIG_NAME} in {src!r} (nor in {sub!r})")


def load_diffusers_checkpoint(src: str) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
    """(config dict, state dict of numpy arrays) of a diffusers UNet2DModel directory."""
    model_dir = find_unet_dir(src)
    with open(os.path.join(model_dir, CONFIG_NAME)) as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{os.path.join(model_dir, CONFIG_NAME)!r} is not valid JSON: {e}") from e
    st, pt = os.path.join(model_dir, SAFETENSORS_NAME), os.path.join(model_dir, BIN_NAME)
    if os.path.isfile(st):
        state = read_safetensors(st)
    elif os.path.isfile(pt):
        state = read_bin(pt)
    else:
        raise FileNotFoundError(f"no {SAFETENSORS_NAME} or {BIN_NAME} in {model_dir!r}")
    return config, state


# --------------------------------------------------------------------------- mapping

def _module_map(n_levels: int, params_shape: Mapping[str, Any]) -> Dict[str, Tuple[str, str]]:
    """Flax module path -> (diffusers prefix, kind) for every module of the Flax tree."""
    mapping: Dict[str, Tuple[str, str]] = {
        "conv_in": ("conv_in", "conv"),
        "temb_dense0": ("time_embedding.linear_1", "dense"),
        "temb_dense1": ("time_embedding.linear_2", "dense"),
        "norm_out": ("conv_norm_out", "norm"),
        "conv_out": ("conv_out", "conv"),
        "mid_res_0": ("mid_block.resnets.0", "res"),
        "mid_res_1": ("mid_block.resnets.1", "res"),
        "mid_attn": ("mid_block.attentions.0", "attn"),
    }
    pat = re.compile(r"^(down|up)_(\d+)_(res|attn)_(\d+)$|^(down|up)_(\d+)_(downsample|upsample)$")
    for name in params_shape:
        if name in mapping:
            continue
        m = pat.match(name)
        if not m:
            raise AssertionError(f"unexpected Flax module {name!r}")
        if m.group(1):
            path, level, kind, i = m.group(1), int(m.group(2)), m.group(3), m.group(4)
            block = f"down_blocks.{level}" if path == "down" else f"up_blocks.{n_levels - 1 - level}"
            sub = "resnets" if kind == "res" else "attentions"
            mapping[name] = (f"{block}.{sub}.{i}", kind)
        else:
            path, level, kind = m.group(5), int(m.group(6)), m.group(7)
            if kind == "downsample":
                mapping[name] = (f"down_blocks.{level}.downsamplers.0.conv", "conv")
            else:
                mapping[name] = (f"up_blocks.{n_levels - 1 - level}.upsamplers.0.conv", "conv")
    return mapping


#: the Flax names of a residual / attention block's submodules -> diffusers'
_SUBMODULES = {
    "res": {"norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj", "norm2": "norm2",
            "conv2": "conv2", "shortcut": "conv_shortcut"},
    "attn": {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"},
}


def _prefixes(n_levels: int, tmpl: Mapping[Tuple[str, ...], Any]) -> Dict[str, str]:
    """diffusers module prefix -> the Flax module (``name`` or ``name.child``) it is, for every module of the
    Flax tree: ``down_blocks.0.resnets.1.time_emb_proj`` -> ``down_0_res_1.temb_proj``."""
    out = {}
    for name, (prefix, kind) in _module_map(n_levels, {path[0]: None for path in tmpl}).items():
        if kind in _SUBMODULES:
            for child, torch_child in _SUBMODULES[kind].items():
                out[f"{prefix}.{torch_child}"] = f"{name}.{child}"
        else:
            out[prefix] = name
    return out


def convert_state_dict(state: Mapping[str, np.ndarray], module: UNet,
                       sample_shape: Tuple[int, int, int]) -> Dict[str, Any]:
    """Map a diffusers state dict onto ``module``'s parameter tree ({'params': ...}), by name
    (:func:`dngjax.models.torch_weights.assemble_torch`, the diffusers names renamed to the Flax UNet's).

    Every Flax parameter must be found with the right shape and every checkpoint
    tensor must be used; otherwise a ``ValueError`` lists the offending keys.
    """
    import jax
    import jax.numpy as jnp

    h, w, c = sample_shape
    tmpl = template(module, jax.ShapeDtypeStruct((1, h, w, c), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.int32))
    to_flax = _prefixes(len(module.ch_mult), tmpl)
    to_torch = {v: k for k, v in to_flax.items()}

    def rename(key: str) -> str:
        prefix, _, leaf = key.rpartition(".")
        return f"{to_flax[prefix]}.{leaf}" if prefix in to_flax else key

    def source_of(path: Tuple[str, ...]) -> str:
        return f"{to_torch['.'.join(path[:-1])]}.{'bias' if path[-1] == 'bias' else 'weight'}"

    return assemble_torch(current_attention_names(state), tmpl, "UNet", rename=rename, source_of=source_of)


def convert(src: str) -> Tuple[UNet, Dict[str, Any]]:
    """Convert a diffusers ``UNet2DModel`` directory: returns ``(UNet module, params)``.

    ``module.apply(params, x, t)`` with ``x`` NHWC equals the diffusers model's
    output on the NCHW transpose of ``x``.
    """
    return convert_loaded(*load_diffusers_checkpoint(src))


def convert_loaded(config: Mapping[str, Any], state: Mapping[str, np.ndarray]) -> Tuple[UNet, Dict[str, Any]]:
    """:func:`convert` of a config and state dict already read (:func:`load_diffusers_checkpoint`)."""
    kwargs = unet_kwargs_from_config(config)
    module = UNet(**kwargs)
    size = config.get("sample_size")
    hgt, wid = (size, size) if isinstance(size, int) else tuple(size)
    in_ch = config.get("in_channels", DIFFUSERS_DEFAULTS["in_channels"])
    return module, convert_state_dict(state, module, (hgt, wid, in_ch))


if __name__ == "__main__":              # the command line sits above the models, in dngjax.convert
    import sys
    print("error: the converter's command line is python -m dngjax.convert SRC_DIR OUT_DIR", file=sys.stderr)
    sys.exit(2)
