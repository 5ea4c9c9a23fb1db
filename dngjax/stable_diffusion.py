"""Text-to-image guidance with Stable Diffusion 1.x / 2.x, loaded from a local diffusers folder.

The paper's section 4.2: DNG (or NP, SLD) in the positive-prompt mode, with three predictions per
step -- eps(x | ""), eps(x | prompt) and eps(x | negative prompt) -- combined by a ``Positive...``
rule of :mod:`dngjax.guidance`: classifier-free guidance toward the prompt (``cfg_scale``) plus the
negative guidance, whose "unconditional" prediction is the prompt's. The latents are sampled by the
core scan sampler (one compiled trajectory, vmapped over guidance scales, chunked over seeds) and
decoded by the VAE.

    from dngjax import stable_diffusion as sd
    pipe = sd.load("stable-diffusion-2-base")        # model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/
    rule = dj.PositiveDynamicNegativeGuidance(scale=1.0, cfg_scale=7.5, prior=0.01, temperature=0.2, offset=0.004)
    images, trace = sd.generate(pipe, "A Medieval Feast", "Chalices, candles", seeds=range(4), rule=rule,
                                grid={"scale": [0.0, 27.0]}, steps=50, return_trace=True)
    # images: (K = 2 scales, N = 4 seeds, 512, 512, 3) uint8; scale 0 is plain CFG toward the prompt

Nothing is downloaded: the folder is the user's (``huggingface-cli download stabilityai/stable-diffusion-2-base
--local-dir ...``, see the README). The UNet, VAE and CLIP text encoder are this project's Flax modules
(:mod:`dngjax.models.sd_unet`, :mod:`~dngjax.models.vae`, :mod:`~dngjax.models.clip`), parity-tested
against diffusers / transformers; the tokenizer is transformers' CLIP tokenizer on the folder's files.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import jax
import jax.numpy as jnp

from .denoiser import Denoiser
from .guidance import ClassifierFreeGuidance, GuidanceRule, NoGuidance
from .sampler import keys_from_seeds, sweep
from .schedules import Schedule, linear_schedule, respace, scaled_linear_schedule

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


@dataclasses.dataclass(frozen=True)
class StableDiffusion:
    """A loaded pipeline: modules, their parameters, the tokenizer and the training schedule.

    Attributes:
      latent_shape: (h, w, C) of the latents the UNet was trained on (``sample_size``; 64 x 64 x 4 for
        SD 2 base, i.e. 512 x 512 images).
      prediction: what the UNet predicts (``"eps"`` or ``"v"``), from the scheduler config.
      schedule: the full training chain (1000 steps); :func:`generate` respaces it.
      downscale: image pixels per latent pixel (8 for SD).
    """

    unet: Any
    unet_params: Any
    text_encoder: Any
    text_params: Any
    tokenize: Callable[[Sequence[str]], np.ndarray]
    vae: Any
    vae_params: Any
    scaling_factor: float
    schedule: Schedule
    prediction: str
    latent_shape: Tuple[int, int, int]
    downscale: int
    folder: str


def _schedule_from_config(cfg: Dict[str, Any]) -> Tuple[Schedule, str]:
    kind = cfg.get("beta_schedule", "linear")
    T = int(cfg.get("num_train_timesteps", 1000))
    if cfg.get("trained_betas"):
        raise ValueError("scheduler config with trained_betas is not supported")
    start, end = float(cfg.get("beta_start", 1e-4)), float(cfg.get("beta_end", 0.02))
    if kind == "scaled_linear":
        schedule = scaled_linear_schedule(T, start, end)
    elif kind == "linear":
        schedule = linear_schedule(T, start, end)
    else:
        raise ValueError(f"beta_schedule={kind!r} is not supported (scaled_linear or linear)")
    pred = cfg.get("prediction_type", "epsilon")
    if pred not in _PREDICTIONS:
        raise ValueError(f"prediction_type={pred!r} is not supported ({sorted(_PREDICTIONS)})")
    return schedule, _PREDICTIONS[pred]


def load(folder: str, dtype: Any = None) -> StableDiffusion:
    """Load a diffusers Stable Diffusion folder (1.x or 2.x) without torch.

    ``folder`` holds ``model_index.json`` and the components unet/, vae/, text_encoder/, tokenizer/ and
    scheduler/ (safetensors weights, float32 or the ``.fp16`` variant). ``dtype``: the UNet's parameter
    and compute dtype (e.g. ``jnp.float16`` or ``jnp.bfloat16`` on a GPU; default float32); the text
    encoder and the VAE stay in float32. Errors name the missing or mismatched part (the folder's
    layout and the scheduler are checked before any weights are read).
    """
    from .models.clip import load_clip_text, load_tokenizer
    from .models.sd_unet import context_dim, load_sd_unet
    from .models.vae import load_vae_decoder

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder!r} is not a folder (a diffusers Stable Diffusion download)")
    index_path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index_path):
        raise FileNotFoundError(f"{folder!r} is not a diffusers pipeline folder: model_index.json is missing")
    with open(index_path) as f:
        index = json.load(f)
    missing = [c for c in COMPONENTS if c not in index or not os.path.isdir(os.path.join(folder, c))]
    if missing:
        raise FileNotFoundError(f"{folder!r} lacks the component(s) {missing} of a Stable Diffusion pipeline "
                                f"(needs {list(COMPONENTS)})")
    sched_path = os.path.join(folder, "scheduler", "scheduler_config.json")
    if not os.path.isfile(sched_path):
        raise FileNotFoundError(f"{sched_path!r} is missing")
    with open(sched_path) as f:
        schedule, prediction = _schedule_from_config(json.load(f))
    text_encoder, text_params = load_clip_text(os.path.join(folder, "text_encoder"))
    tokenize = load_tokenizer(os.path.join(folder, "tokenizer"), max_length=text_encoder.max_positions)
    unet, unet_params, unet_cfg = load_sd_unet(os.path.join(folder, "unet"), dtype)
    if context_dim(unet_cfg) != text_encoder.width:
        raise ValueError(f"the UNet attends to {context_dim(unet_cfg)}-wide text features but the text encoder "
                         f"gives {text_encoder.width}: components of different models")
    vae, vae_params, vae_cfg = load_vae_decoder(os.path.join(folder, "vae"))
    if vae.latent_channels != unet.in_channels:
        raise ValueError(f"the VAE has {vae.latent_channels} latent channels, the UNet {unet.in_channels}")
    size = unet_cfg.get("sample_size", 64)
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return StableDiffusion(unet=unet, unet_params=unet_params, text_encoder=text_encoder, text_params=text_params,
                           tokenize=tokenize, vae=vae, vae_params=vae_params,
                           scaling_factor=float(vae_cfg["scaling_factor"]), schedule=schedule, prediction=prediction,
                           latent_shape=(int(h), int(w), unet.in_channels),
                           downscale=2 ** (len(vae.block_out_channels) - 1), folder=folder)


def encode_prompts(pipe: StableDiffusion, prompts: Sequence[str]) -> jnp.ndarray:
    """The text encoder's last hidden states of ``prompts``: (N, 77, D) float32 ("" is the null prompt)."""
    ids = pipe.tokenize(list(prompts))
    return _apply(pipe.text_encoder, pipe.text_params, jnp.asarray(ids))


@functools.partial(jax.jit, static_argnums=0)
def _apply(module, params, x):
    """``module.apply(params, x)``, compiled once per module configuration and input shape."""
    return module.apply(params, x)


@dataclasses.dataclass(frozen=True)
class _UNetWithText:
    """Hashable ``apply_fn(params, x, t)`` of a UNet whose params carry one prompt's text features."""

    unet: Any

    def __call__(self, params, x, t):
        unet_params, context = params
        return self.unet.apply(unet_params, x, t, jnp.broadcast_to(context, (x.shape[0],) + context.shape))


def text_denoiser(pipe: StableDiffusion, context: jnp.ndarray) -> Denoiser:
    """eps(x, t | prompt) for one prompt's text features ``context`` (77, D): a Denoiser over latents
    (B, h, w, C), the UNet's output converted from v (or x0) to eps by the sampler where needed."""
    if context.ndim != 2:
        raise ValueError(f"context must be one prompt's features (L, D), got shape {context.shape}")
    return Denoiser(apply_fn=_UNetWithText(pipe.unet), params=(pipe.unet_params, context),
                    prediction=pipe.prediction)


def denoisers(pipe: StableDiffusion, prompt: str, negative_prompt: Optional[str] = None,
              null_prompt: str = "") -> Tuple[Denoiser, Tuple[Denoiser, ...]]:
    """(denoiser of the null prompt, (denoiser of the prompt[, denoiser of the negative prompt]))."""
    prompts = [null_prompt, prompt] + ([] if negative_prompt is None else [negative_prompt])
    ctx = encode_prompts(pipe, prompts)
    return text_denoiser(pipe, ctx[0]), tuple(text_denoiser(pipe, c) for c in ctx[1:])


def decode(pipe: StableDiffusion, latents, batch_size: int = 8) -> np.ndarray:
    """Latents (..., h, w, C) -> uint8 images (..., downscale h, downscale w, 3), ``batch_size`` at a time."""
    latents = np.asarray(latents, np.float32)
    lead, flat = latents.shape[:-3], latents.reshape((-1,) + latents.shape[-3:])
    out = []
    for i in range(0, flat.shape[0], batch_size):
        part = flat[i:i + batch_size]
        m = len(part)
        if m < batch_size and flat.shape[0] > batch_size:      # the last batch padded: one compiled shape
            part = np.concatenate([part, np.repeat(part[-1:], batch_size - m, axis=0)])
        x = np.asarray(_apply(pipe.vae, pipe.vae_params, jnp.asarray(part / pipe.scaling_factor)))[:m]
        out.append(np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8))
    images = np.concatenate(out) if out else np.zeros((0,) + tuple(s * pipe.downscale for s in latents.shape[-3:-1]) + (3,), np.uint8)
    return images.reshape(lead + images.shape[1:])


def generate(pipe: StableDiffusion, prompt: str, negative_prompt: Optional[str], seeds: Sequence[int], *,
             rule: GuidanceRule, grid: Optional[Mapping[str, Any]] = None, steps: int = 50,
             noise: Optional[str] = None, eta: Optional[float] = None, solver: Optional[str] = None,
             chunk_size: Optional[int] = None, return_trace: bool = False, return_latents: bool = False,
             progress: bool = False, latent_shape: Optional[Tuple[int, int, int]] = None):
    """Images for ``prompt`` away from ``negative_prompt``, one per seed and grid point.

    Args:
      rule: a positive-mode rule (``dj.PositiveDynamicNegativeGuidance``, ``PositiveNegativePrompting``,
        ``PositiveSafeLatentDiffusion``; predictions "", prompt, negative prompt), or
        ``dj.ClassifierFreeGuidance`` (no negative prompt: pass None) or ``dj.NoGuidance`` (the
        prompt's model alone).
      grid: rule leaves to sweep, e.g. {"scale": [0, 27]} (scale 0: plain CFG toward the prompt, the
        unguided reference of the same seeds); all points in one compiled call.
      steps: chain length (the 1000-step training chain respaced); ``noise``/``eta``/``solver``: the step
        (see :func:`dngjax.sample`; ``noise`` defaults to "posterior" on the ancestral step and takes no
        value with ``eta`` or a ``solver``). DNG on a deterministic solver (``solver="dpmpp_2m"``, "ddim",
        "euler") needs its continuous-time posterior (``estimator="stratonovich"``).
      latent_shape: (h, w, C) to sample instead of the UNet's training size.
    Returns:
      uint8 images (K, N, H, W, 3) (K = grid points, 1 without a grid), and with ``return_trace`` the
      :class:`dngjax.Trace` (lambda_t, p_t: (K, S, N)); with ``return_latents`` the latents
      (K, N, h, w, C) as well (images, latents[, trace]).
    """
    positive = getattr(rule, "num_conditions", None) == 2
    if positive and negative_prompt is None:
        raise ValueError(f"{type(rule).__name__} needs a negative prompt")
    if not positive and negative_prompt is not None:
        raise ValueError(f"{type(rule).__name__} does not use a negative prompt: use a Positive... rule "
                         "(e.g. dj.PositiveDynamicNegativeGuidance) to guide away from it")
    if not isinstance(rule, (NoGuidance, ClassifierFreeGuidance)) and not positive:
        raise ValueError(f"{type(rule).__name__}: text-to-image takes a positive-mode rule, ClassifierFreeGuidance "
                         "or NoGuidance")
    seeds = np.asarray(list(seeds))
    if seeds.size == 0:
        raise ValueError("no seeds")
    shape = tuple(latent_shape or pipe.latent_shape)
    d_null, conds = denoisers(pipe, prompt, negative_prompt)
    if positive:
        denoiser_u, denoiser_c = d_null, conds
    elif isinstance(rule, ClassifierFreeGuidance):
        denoiser_u, denoiser_c = d_null, conds[0]
    else:
        denoiser_u, denoiser_c = conds[0], None
    schedule = pipe.schedule if steps >= pipe.schedule.num_steps else respace(pipe.schedule, steps)
    if noise is None:                                  # beta_tilde on the ancestral step; DDIM etc. take none
        noise = "posterior" if eta is None and solver in (None, "ddpm") else "beta"
    out = sweep(denoiser_u, schedule, keys_from_seeds(seeds), shape, rule=rule, grid=grid or {},
                denoiser_c=denoiser_c, noise=noise, eta=eta, solver=solver, chunk_size=chunk_size,
                return_trace=return_trace, progress=progress)
    latents, trace = out if return_trace else (out, None)
    images = decode(pipe, latents)
    result = (images,) + ((latents,) if return_latents else ()) + ((trace,) if return_trace else ())
    return result[0] if len(result) == 1 else result
