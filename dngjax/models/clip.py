"""CLIP's text encoder and image encoder in Flax (transformers' ``CLIPTextModel`` /
``CLIPVisionModelWithProjection`` layouts), loaded from local folders without torch.

Stable Diffusion conditions its UNet on the last hidden state of a CLIP text transformer: SD 1.x on
OpenAI's CLIP ViT-L/14 text tower (12 layers, width 768, ``quick_gelu``), SD 2.x on OpenCLIP ViT-H's
(23 layers as shipped, width 1024, ``gelu``), both stored in transformers' ``CLIPTextModel`` layout
(``text_encoder/config.json`` + ``model.safetensors`` in a diffusers folder). This module is that
transformer: token + position embeddings, pre-LayerNorm blocks with causal self-attention and an MLP,
a final LayerNorm. Prompts are padded to ``max_position_embeddings`` tokens by the tokenizer, and, as
in the diffusers pipelines, no padding mask is applied (the causal mask alone).

    encoder, params = load_clip_text("sd/text_encoder")     # no torch needed
    hidden = encoder.apply(params, input_ids)                # (B, L) int -> (B, L, width)

The image tower (:class:`CLIPImageEncoder`, :func:`load_clip_image`) gives the projected image
embeddings of the paper's Q metric (eqs. 22-23).

Parity with transformers' PyTorch models: ``tests/test_clip.py`` (tiny random configs).
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Dict, Optional, Tuple

import numpy as np
import jax
import jax.numpy as jnp
import flax.linen as nn

from .torch_weights import assemble_torch, read_folder, template

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


class CLIPAttention(nn.Module):
    width: int
    heads: int
    causal: bool = True

    @nn.compact
    def __call__(self, x):                                          # (B, L, D)
        b, n, d = x.shape
        head = d // self.heads
        split = lambda y: y.reshape(b, n, self.heads, head)
        q = split(nn.Dense(d, name="q_proj")(x)) * head ** -0.5
        k = split(nn.Dense(d, name="k_proj")(x))
        v = split(nn.Dense(d, name="v_proj")(x))
        logits = jnp.einsum("bqhc,bkhc->bhqk", q, k)
        if self.causal:                                             # the text tower; the image tower sees all
            logits = jnp.where(jnp.tril(jnp.ones((n, n), bool)), logits, jnp.finfo(logits.dtype).min)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(x.dtype)
        out = jnp.einsum("bhqk,bkhc->bqhc", weights, v).reshape(b, n, d)
        return nn.Dense(d, name="out_proj")(out)


class CLIPEncoderLayer(nn.Module):
    width: int
    heads: int
    intermediate: int
    activation: str
    eps: float
    causal: bool = True

    @nn.compact
    def __call__(self, x):
        x = x + CLIPAttention(self.width, self.heads, self.causal, name="self_attn")(nn.LayerNorm(self.eps, name="layer_norm1")(x))
        h = nn.LayerNorm(self.eps, name="layer_norm2")(x)
        h = nn.Dense(self.intermediate, name="fc1")(h)
        h = nn.Dense(self.width, name="fc2")(ACTIVATIONS[self.activation](h))
        return x + h


class CLIPTextEncoder(nn.Module):
    """The text transformer. ``__call__(input_ids (B, L) int32) -> last hidden state (B, L, width)``."""

    vocab_size: int
    width: int
    layers: int
    heads: int
    intermediate: int
    max_positions: int = 77
    activation: str = "quick_gelu"
    eps: float = 1e-5

    @nn.compact
    def __call__(self, input_ids):
        n = input_ids.shape[-1]
        if n > self.max_positions:
            raise ValueError(f"{n} tokens exceed max_position_embeddings={self.max_positions}")
        x = nn.Embed(self.vocab_size, self.width, name="token_embedding")(input_ids)
        x = x + nn.Embed(self.max_positions, self.width, name="position_embedding")(jnp.arange(n))[None]
        for i in range(self.layers):
            x = CLIPEncoderLayer(self.width, self.heads, self.intermediate, self.activation, self.eps,
                                 name=f"layers_{i}")(x)
        return nn.LayerNorm(self.eps, name="final_layer_norm")(x)


class CLIPImageEncoder(nn.Module):
    """The image tower with its projection. ``__call__(pixels (B, S, S, C), normalised as CLIP's processor
    does) -> image embeddings (B, projection_dim)`` (not L2-normalised)."""

    width: int
    layers: int
    heads: int
    intermediate: int
    image_size: int
    patch_size: int
    projection_dim: int
    channels: int = 3
    activation: str = "quick_gelu"
    eps: float = 1e-5

    @nn.compact
    def __call__(self, pixels):
        b, hgt, wid, _ = pixels.shape
        if (hgt, wid) != (self.image_size, self.image_size):
            raise ValueError(f"images of {hgt}x{wid}; the model takes {self.image_size}x{self.image_size}")
        p = self.patch_size
        x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", use_bias=False, name="patch_embedding")(pixels)
        x = x.reshape(b, -1, self.width)
        cls = self.param("class_embedding", nn.initializers.normal(1.0), (self.width,))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.width)), x], axis=1)
        x = x + nn.Embed(x.shape[1], self.width, name="position_embedding")(jnp.arange(x.shape[1]))[None]
        x = nn.LayerNorm(self.eps, name="pre_layrnorm")(x)
        for i in range(self.layers):
            x = CLIPEncoderLayer(self.width, self.heads, self.intermediate, self.activation, self.eps, causal=False,
                                 name=f"layers_{i}")(x)
        pooled = nn.LayerNorm(self.eps, name="post_layernorm")(x[:, 0])
        return nn.Dense(self.projection_dim, use_bias=False, name="visual_projection")(pooled)


def image_encoder_from_config(cfg: Dict[str, Any]) -> CLIPImageEncoder:
    """A :class:`CLIPImageEncoder` from a ``CLIPVisionConfig`` dict, or a ``CLIPConfig`` dict (its
    ``vision_config`` and ``projection_dim``)."""
    vis = dict(cfg.get("vision_config") or cfg)
    act = vis.get("hidden_act", "quick_gelu")
    if act not in ACTIVATIONS:
        raise ValueError(f"hidden_act={act!r} is not supported (supported: {sorted(ACTIVATIONS)})")
    return CLIPImageEncoder(width=int(vis["hidden_size"]), layers=int(vis["num_hidden_layers"]),
                            heads=int(vis["num_attention_heads"]), intermediate=int(vis["intermediate_size"]),
                            image_size=int(vis["image_size"]), patch_size=int(vis["patch_size"]),
                            projection_dim=int(cfg.get("projection_dim", vis.get("projection_dim", 512))),
                            channels=int(vis.get("num_channels", 3)), activation=act,
                            eps=float(vis.get("layer_norm_eps", 1e-5)))


#: CLIPTextConfig keys read into :class:`CLIPTextEncoder` (parity-tested in tests/test_clip.py)
TEXT_IMPLEMENTED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                         "max_position_embeddings", "hidden_act", "layer_norm_eps")
#: CLIPTextConfig keys without effect on the last hidden states (what Stable Diffusion conditions on):
#: projection_dim (the pooled projection), the token ids (pooling and generation), dropout (inference),
#: initialisation scales
TEXT_NO_EFFECT_KEYS = ("projection_dim", "attention_dropout", "dropout", "initializer_range", "initializer_factor",
                       "pad_token_id", "bos_token_id", "eos_token_id")


def encoder_from_config(cfg: Dict[str, Any]) -> CLIPTextEncoder:
    """A :class:`CLIPTextEncoder` from transformers' ``CLIPTextConfig`` dict (``config.json``)."""
    act = cfg.get("hidden_act", "quick_gelu")
    if act not in ACTIVATIONS:
        raise ValueError(f"hidden_act={act!r} is not supported (supported: {sorted(ACTIVATIONS)})")
    width, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    if width % heads:
        raise ValueError(f"hidden_size={width} is not a multiple of num_attention_heads={heads}")
    return CLIPTextEncoder(vocab_size=int(cfg["vocab_size"]), width=width, layers=int(cfg["num_hidden_layers"]),
                           heads=heads, intermediate=int(cfg["intermediate_size"]),
                           max_positions=int(cfg.get("max_position_embeddings", 77)), activation=act,
                           eps=float(cfg.get("layer_norm_eps", 1e-5)))


#: each tower's entries that a loader of the other one skips (a full CLIPModel holds both)
_OTHER_TOWER = {"text_model": ("vision_model", "visual_projection"), "vision_model": ("text_model", "text_projection")}


def _flax_name(key: str, tower: str) -> Optional[str]:
    """transformers' parameter name -> the encoder's parameter in PyTorch naming (``torch_weights.torch_path``),
    for the text tower (``text_model.``) and the image tower (``vision_model.``, ``visual_projection``); None for
    the entries a tower does not use (``position_ids`` buffers, ``logit_scale``, the other tower)."""
    if key.endswith("position_ids") or key == "logit_scale" or key.startswith(_OTHER_TOWER[tower]):
        return None
    parts = key.split(".")
    if parts[0] in ("text_model", "vision_model"):               # transformers 4.x layout / WithProjection
        parts = parts[1:]
    if parts and parts[0] in ("embeddings", "encoder"):           # the encoder's modules sit at its top level
        parts = parts[1:]
    if len(parts) > 3 and parts[0] == "layers" and parts[2] == "mlp":   # layers.i.mlp.fc1 -> layers_i.fc1
        parts = parts[:2] + parts[3:]
    return ".".join(parts)


def params_from_torch(state: Dict[str, np.ndarray], encoder) -> Dict[str, Any]:
    """Flax params of ``encoder`` (text or image) from a transformers CLIP state dict (numpy arrays), mapped
    by :func:`dngjax.models.torch_weights.assemble_torch`.

    Linear weights (out, in) become kernels (in, out). Every parameter of the encoder must be present
    with its shape; buffers (``position_ids``) and a full CLIPModel's other tower are skipped.
    """
    image = isinstance(encoder, CLIPImageEncoder)
    dummy = (jnp.zeros((1, encoder.image_size, encoder.image_size, encoder.channels))
             if image else jnp.zeros((1, 1), jnp.int32))
    tower = "vision_model" if image else "text_model"
    return assemble_torch(state, template(encoder, dummy), f"CLIP {tower.split('_')[0]} encoder",
                          rename=lambda key: _flax_name(key, tower))


def load_clip_text(folder: str) -> Tuple[CLIPTextEncoder, Dict[str, Any]]:
    """(encoder, params) from a transformers/diffusers ``text_encoder`` folder: ``config.json`` and
    ``model.safetensors`` (float32 or float16 weights; loaded as float32)."""
    cfg, state = read_folder(folder, "model.safetensors", "a CLIP text-encoder folder (config.json and "
                             "model.safetensors, as in a diffusers text_encoder/)")
    encoder = encoder_from_config(cfg)
    return encoder, params_from_torch(state, encoder)


def load_clip_image(folder: str) -> Tuple[CLIPImageEncoder, Dict[str, Any]]:
    """(image encoder, params) from a transformers ``CLIPModel`` or ``CLIPVisionModelWithProjection``
    folder (``config.json``, ``model.safetensors``); the text tower of a full CLIPModel is ignored."""
    cfg, state = read_folder(folder, "model.safetensors", "a CLIP model folder")
    encoder = image_encoder_from_config(cfg)
    return encoder, params_from_torch(state, encoder)


def load_tokenizer(folder: str, max_length: int = 77):
    """``prompts -> input_ids (B, max_length) int32`` with the CLIP BPE tokenizer of a diffusers
    ``tokenizer/`` folder (``vocab.json`` and ``merges.txt``, or the ``tokenizer.json`` newer transformers
    save, and its ``tokenizer_config.json``: SD 2 pads with
    "!", SD 1 with the end token), via transformers' ``CLIPTokenizer`` (the ``tokenizers`` library; no torch).
    Prompts are padded to ``max_length`` and truncated, as the Stable Diffusion pipelines do, with a
    warning that quotes the text cut off (the tokens between position max_length - 1 and the end token).
    """
    has = lambda name: os.path.isfile(os.path.join(folder, name))
    if not has("tokenizer.json"):
        for name in ("vocab.json", "merges.txt"):
            if not has(name):
                raise FileNotFoundError(f"{folder!r} is not a CLIP tokenizer folder: {name} is missing "
                                        "(and there is no tokenizer.json)")
    try:
        from transformers import CLIPTokenizer
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the CLIP tokenizer needs transformers (pip install transformers; torch is not needed)") from e
    tok = CLIPTokenizer.from_pretrained(folder)
    # Every tokenizer_config.json key is read by transformers' CLIPTokenizer, the tokenizer diffusers uses;
    # the one this function sets itself is the padded length: diffusers pads to model_max_length.
    if tok.model_max_length < int(1e20) and tok.model_max_length != max_length:     # set in the config
        raise ValueError(f"{folder}: tokenizer_config.json's model_max_length={tok.model_max_length} differs from "
                         f"the text encoder's max_position_embeddings={max_length}: diffusers would pad prompts to "
                         "the former, the text encoder takes the latter; refused")

    def encode(prompts) -> np.ndarray:
        if isinstance(prompts, str):
            prompts = [prompts]
        out = tok(list(prompts), padding="max_length", max_length=max_length, truncation=True)
        for prompt, ids in zip(prompts, tok(list(prompts), truncation=False)["input_ids"]):
            if len(ids) > max_length:                  # as diffusers' pipelines: say what was cut
                cut = tok.decode(ids[max_length - 1:-1])
                warnings.warn(f"the prompt {prompt[:40]!r}... has {len(ids)} tokens; the text encoder takes "
                              f"{max_length}: this part was cut: {cut!r}", UserWarning, stacklevel=3)
        return np.asarray(out["input_ids"], np.int32)

    encode.tokenizer = tok
    return encode
