"""Text-to-image guidance with Stable Diffusion 1.x / 2.x, loaded from a local diffusers folder.

The paper's section 4.2: DNG (or NP, SLD) in the positive-prompt mode, with three predictions per
step -- eps(x | ""), eps(x | prompt) and eps(x | negative prompt) -- combined by a rule in the positive
mode (``dj.PositiveMode(rule, cfg_scale)`` of :mod:`dngjax.guidance`): classifier-free guidance toward the
prompt (``cfg_scale``) plus the rule's negative guidance, whose "unconditional" prediction is the prompt's.
The baseline beside it is the negative prompt as diffusers runs it: ``dj.ClassifierFreeGuidance(scale)`` with a negative prompt, two
predictions per step, the negative prompt's in place of the unconditional one (see :func:`generate`).
The latents are sampled by the core scan sampler (one compiled trajectory, vmapped over guidance
scales, chunked over seeds) and decoded by the VAE::

    import dngjax as dj
    from dngjax import stable_diffusion as sd
    pipe = sd.load("stable-diffusion-2-base")        # model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/
    rule = dj.PositiveMode(dj.DynamicNegativeGuidance(scale=1.0, prior=0.01, temperature=0.2, offset=0.004),
                           cfg_scale=7.5)
    images, trace = sd.generate(pipe, "A Medieval Feast", "Chalices, candles", seeds=range(4), rule=rule,
                                grid={"scale": [0.0, 27.0]}, steps=50, return_trace=True)
    # images: (K = 2 scales, N = 4 seeds, 512, 512, 3) uint8; scale 0 is plain CFG toward the prompt

Nothing is downloaded: the folder is the user's (``huggingface-cli download stabilityai/stable-diffusion-2-base
--local-dir ...``, see docs/text_to_image.md). The UNet, VAE and CLIP text encoder are this project's Flax modules
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
from .schedules import Schedule
from .sd_scheduler import Chain, scheduler_chain, training_schedule

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclasses.dataclass(frozen=True)
class StableDiffusion:
    """A loaded pipeline: modules, their parameters, the tokenizer and the training schedule.

    Attributes:
      latent_shape: (h, w, C) of the latents the UNet was trained on (``sample_size``; 64 x 64 x 4 for
        SD 2 base, i.e. 512 x 512 images).
      prediction: what the UNet predicts (``"eps"`` or ``"v"``), from the scheduler config.
      schedule: the full training chain (1000 steps) of the scheduler config; :func:`chain` respaces it
        as the folder's scheduler (or another diffusers scheduler built from its config) would.
      downscale: image pixels per latent pixel (8 for SD).
      scheduler_config: the folder's ``scheduler/scheduler_config.json`` (class name and options).
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
    scheduler_config: Any = None


def chain(pipe: StableDiffusion, steps: int, solver: Optional[str] = None, eta: Optional[float] = None) -> Chain:
    """The chain of ``steps`` inference steps that the folder's scheduler config gives (no tracing).

    ``solver``: None (the folder's scheduler class) or one of "ddim", "ddpm", "dpmpp_2m", "euler",
    "euler_ancestral" (that diffusers scheduler built from the folder's config, as
    ``XScheduler.from_config(pipe.scheduler.config)``). ``eta``: DDIM's (default 0.0). Returns a
    :class:`dngjax.sd_scheduler.Chain` (schedule, solver, eta, noise, x_T_scale, scheduler, config):
    run ``dj.sample(..., chain.schedule, ..., solver=chain.solver, eta=chain.eta, noise=chain.noise,
    x_T=chain.x_T_scale * N(0, I))`` to step as diffusers does. Timestep spacing, steps_offset,
    set_alpha_to_one, rescale_betas_zero_snr and the class's options are followed; what is not
    implemented (PNDMScheduler, clip_sample, thresholding, Karras sigmas, ...) raises a ValueError naming
    it (see :mod:`dngjax.sd_scheduler`).
    """
    if pipe.scheduler_config is None:
        raise ValueError("this pipeline carries no scheduler config (load it with sd.load)")
    return scheduler_chain(pipe.scheduler_config, steps, solver=solver, eta=eta)


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
        scheduler_config = json.load(f)
    schedule, prediction = training_schedule(scheduler_config)
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
                           downscale=2 ** (len(vae.block_out_channels) - 1), folder=folder,
                           scheduler_config=scheduler_config)


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


def _pixels(name: str, value, downscale: int) -> int:
    """A pixel size (height or width) as an int, checked to be a positive multiple of ``downscale``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be a whole number of pixels, got {value!r}")
    if value < downscale or value % downscale:
        raise ValueError(f"{name}={value} px: image sizes must be positive multiples of {downscale} px (the VAE "
                         f"decodes one latent pixel to {downscale} x {downscale} image pixels); "
                         f"e.g. {name}={max(downscale, value // downscale * downscale)}")
    return int(value)


def _checked_latent_shape(latent_shape, downscale: int, training_shape: Tuple[int, int, int]) -> Tuple[int, int, int]:
    """``latent_shape`` as (h, w, C) ints, checked: C the UNet's channels (last), and no image size in pixels
    (``training_shape``: the UNet's (h0, w0, C) latents)."""
    d, (h0, w0, c) = downscale, training_shape
    try:
        shape = tuple(int(s) for s in latent_shape)
    except (TypeError, ValueError):
        raise ValueError(f"latent_shape must be (h, w, {c}) latents, got {latent_shape!r}") from None
    if len(shape) != 3 or shape[2] != c or min(shape) < 1:
        raise ValueError(f"latent_shape must be (h, w, {c}): latents of the UNet's {c} channels, channels last; "
                         f"got {shape}" + ("; for an image size in pixels pass height=, width="
                                           if len(shape) == 2 else ""))
    if shape[:2] == (h0 * d, w0 * d) or (d > 1 and shape[0] % d == 0 and shape[1] % d == 0
                                           and shape[0] >= 4 * h0 and shape[1] >= 4 * w0):
        raise ValueError(f"latent_shape={shape} looks like an image size in pixels: latents are 1/{d} of it "
                         f"(the training size is {h0} x {w0} latents = {h0 * d} x {w0 * d} px); pass "
                         f"height={shape[0]}, width={shape[1]} (pixels) or latent_shape="
                         f"{(shape[0] // d, shape[1] // d, c)}")
    return shape


def _checked_x_T(x_T, n: Optional[int], shape: Optional[Tuple[int, int, int]], asked_in_latents: bool,
                 downscale: int, channels: int) -> Tuple[Tuple[int, int, int], np.ndarray]:
    """(their latent shape (h, w, C), x_T as float32 numpy) of starting latents x_T (N, h, w, C), checked:
    channels last, N = ``n`` (one per seed; None: any), the size ``shape`` asked for (None: any; asked as
    ``latent_shape`` or as height / width, for the message) and finite values."""
    d, c = downscale, channels
    if not hasattr(x_T, "shape") or len(x_T.shape) != 4:
        got = tuple(x_T.shape) if hasattr(x_T, "shape") else type(x_T).__name__
        raise ValueError(f"x_T must be starting latents (N, h, w, {c}), one per seed; got {got}")
    xs = tuple(int(s) for s in x_T.shape)
    if xs[-1] != c:
        hint = (" (channels first, as diffusers' latents: pass x_T.transpose(0, 2, 3, 1))" if xs[1] == c
                else " (images? x_T are latents, 1/%d of the image size)" % d if xs[-1] == 3 else "")
        raise ValueError(f"x_T must be channels-last latents (N, h, w, {c}); got shape {xs}{hint}")
    if n is not None and xs[0] != n:
        raise ValueError(f"x_T holds {xs[0]} starting latents for {n} seeds: one per seed")
    if shape is not None and xs[1:] != shape:
        asked = f"latent_shape={shape}" if asked_in_latents else \
            f"height={shape[0] * d}, width={shape[1] * d} px = latents {shape}"
        raise ValueError(f"x_T has latents {xs[1:]} but {asked}: pass one of them, or matching ones")
    x_T = np.asarray(x_T, np.float32)
    if not np.isfinite(x_T).all():
        raise ValueError("x_T holds non-finite values")
    return xs[1:], x_T


def latent_size(pipe: StableDiffusion, height: Optional[int] = None, width: Optional[int] = None,
                latent_shape: Optional[Sequence[int]] = None, x_T=None, n: Optional[int] = None
                ) -> Tuple[Tuple[int, int, int], Optional[np.ndarray]]:
    """The latent shape (h, w, C) :func:`generate` samples, and ``x_T`` checked, from at most one of

    * ``height``, ``width``: the image size in pixels (diffusers' convention), each a multiple of
      ``pipe.downscale`` (8 for SD); latents of height / downscale x width / downscale. A missing one
      is the training size (``pipe.latent_shape`` x downscale: 512 for SD 1.x / 2-base, 768 for 2.x);
    * ``latent_shape``: (h, w, C) latents directly;
    * ``x_T``: starting latents (N, h, w, C), channels last, N = ``n`` (one per seed); with height /
      width or latent_shape, they must agree.

    Nothing given: the UNet's training size. Returns ((h, w, C), x_T as float32 numpy or None). Raises
    ValueError, before anything is traced, for sizes that are not multiples of the downscale, pixel
    sizes passed as latents (or the other way round), channels-first latents and mismatched shapes.
    """
    d, (h0, w0, c) = pipe.downscale, pipe.latent_shape
    if latent_shape is not None and (height is not None or width is not None):
        raise ValueError(f"pass the size either in pixels (height={height}, width={width}) or in latents "
                         f"(latent_shape={tuple(latent_shape)}), not both")
    if latent_shape is not None:
        shape = _checked_latent_shape(latent_shape, d, (h0, w0, c))
    elif height is not None or width is not None:
        hp = _pixels("height", h0 * d if height is None else height, d)
        wp = _pixels("width", w0 * d if width is None else width, d)
        shape = (hp // d, wp // d, c)
    else:
        shape = None
    if x_T is not None:
        shape, x_T = _checked_x_T(x_T, n, shape, latent_shape is not None, d, c)
    return shape or (h0, w0, c), x_T


_UNET_SIZES: Dict[Any, Optional[str]] = {}


def check_latent_size(pipe: StableDiffusion, shape: Tuple[int, int, int]) -> None:
    """Raise a ValueError if the UNet cannot denoise latents of ``shape`` (h, w, C).

    Found by evaluating the UNet on abstract values (``jax.eval_shape``: its shapes only, nothing
    compiled or run), once per UNet and shape, so a size the network does not take fails here, with
    the image size in the message, rather than deep inside the sampler's tracing.
    """
    key = (pipe.unet, tuple(shape))
    if key not in _UNET_SIZES:
        spec = lambda s, dt=jnp.float32: jax.ShapeDtypeStruct(s, dt)
        try:
            out = jax.eval_shape(pipe.unet.apply, pipe.unet_params, spec((1,) + tuple(shape)), spec((1,), jnp.int32),
                                 spec((1, pipe.text_encoder.max_positions, pipe.text_encoder.width)))
            _UNET_SIZES[key] = None if tuple(out.shape) == (1,) + tuple(shape) else \
                f"it maps them to {tuple(out.shape[1:])}"
        except Exception as e:                          # the UNet's own refusal or a shape mismatch inside it
            _UNET_SIZES[key] = f"{type(e).__name__}: {e}"
    reason = _UNET_SIZES[key]
    if reason is not None:
        h, w = shape[:2]
        d = pipe.downscale
        levels = len(getattr(pipe.unet, "block_out_channels", ()))
        hint = (f"; {2 ** (levels - 1)} x {2 ** (levels - 1)}-latent multiples ({2 ** (levels - 1) * d} px) fit its "
                f"{levels - 1} downsamplings" if levels > 1 else "")
        raise ValueError(f"this UNet cannot denoise {h} x {w} latents ({h * d} x {w * d} px){hint} ({reason})")


def _check_rule_and_prompts(rule: GuidanceRule, prompt, negative_prompt, positive: bool) -> None:
    """Raise a ValueError unless :func:`generate` takes ``rule`` (``positive``: a rule in the positive mode) with
    these prompts: one string each, a negative prompt for the positive mode and none for NoGuidance."""
    name = type(rule).__name__
    if positive and negative_prompt is None:
        raise ValueError(f"{name} needs a negative prompt (predictions '', prompt and negative prompt)")
    if isinstance(rule, NoGuidance) and negative_prompt is not None:
        raise ValueError("NoGuidance samples the prompt's model alone and does not use a negative prompt: "
                         "ClassifierFreeGuidance(scale) with it is diffusers' negative prompt, a rule in the positive "
                         "mode (e.g. dj.PositiveMode(dj.DynamicNegativeGuidance(...))) guides away from it in three "
                         "passes")
    if not isinstance(rule, (NoGuidance, ClassifierFreeGuidance)) and not positive:
        raise ValueError(f"{name}: text-to-image takes a rule in the positive mode (e.g. "
                         "dj.PositiveMode(dj.DynamicNegativeGuidance(...))), "
                         "ClassifierFreeGuidance (with a negative prompt: diffusers' negative prompt) or NoGuidance")
    for what, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        if text is not None and not isinstance(text, str):
            raise ValueError(f"{what} must be one string (one prompt per call), got {type(text).__name__}")


def _checked_seeds_and_size(pipe: StableDiffusion, seeds: Sequence[int], height, width, latent_shape, x_T):
    """(seeds as an (N,) array, latent shape (h, w, C), x_T as float32 numpy or None), checked (:func:`latent_size`,
    :func:`check_latent_size`) before anything is traced."""
    seeds = np.asarray(list(seeds))
    if seeds.size == 0:
        raise ValueError("no seeds")
    shape, x_T = latent_size(pipe, height, width, latent_shape, x_T, n=seeds.size)
    check_latent_size(pipe, shape)
    return seeds, shape, x_T


def _prompt_denoisers(pipe: StableDiffusion, rule: GuidanceRule, prompt: str, negative_prompt: Optional[str],
                      positive: bool):
    """(denoiser_u, denoiser_c) for :func:`generate`'s rule: ("", (prompt, negative prompt)) in the positive mode,
    (negative prompt or "", prompt) for CFG, (prompt, None) for NoGuidance."""
    if positive:
        return denoisers(pipe, prompt, negative_prompt)
    if isinstance(rule, ClassifierFreeGuidance):
        denoiser_u, (denoiser_c,) = denoisers(pipe, prompt, null_prompt=negative_prompt or "")
        return denoiser_u, denoiser_c
    return text_denoiser(pipe, encode_prompts(pipe, [prompt])[0]), None


def _solver_for_eta(pipe: StableDiffusion, solver: Optional[str], eta: Optional[float]) -> Optional[str]:
    """The ``solver`` :func:`generate` asks :func:`chain` for: eta alone selects DDIM from the folder's config
    (where the folder's scheduler is not DDIM already)."""
    if eta is not None and solver is None and pipe.scheduler_config is not None \
            and pipe.scheduler_config.get("_class_name") != "DDIMScheduler":
        return "ddim"
    return solver


def _scaled_x_T(x_T: Optional[np.ndarray], scale: float, keys, shape: Tuple[int, int, int]):
    """The starting latents (N, h, w, C) in the sampler's variables: x_T -- or the seeds' own N(0, I) draws, as
    the sampler makes them from ``keys`` -- times diffusers' init_noise_sigma ``scale`` (x_T as is at scale 1)."""
    if scale == 1.0:
        return x_T
    if x_T is None:
        x_T = jax.vmap(lambda k: jax.random.normal(jax.random.split(k)[0], shape, jnp.float32))(keys)
    return np.asarray(x_T, np.float32) * np.float32(scale)


def _generate_outputs(pipe: StableDiffusion, out, return_trace: bool, return_latents: bool):
    """:func:`generate`'s return value from the sampler's output (latents[, trace]): the decoded images, or the
    tuple (images[, latents][, trace])."""
    latents, trace = out if return_trace else (out, None)
    images = decode(pipe, latents)
    result = (images,) + ((latents,) if return_latents else ()) + ((trace,) if return_trace else ())
    return result[0] if len(result) == 1 else result


def generate(pipe: StableDiffusion, prompt: str, negative_prompt: Optional[str], seeds: Sequence[int], *,
             rule: GuidanceRule, grid: Optional[Mapping[str, Any]] = None, steps: int = 50, noise: Optional[str] = None,
             eta: Optional[float] = None, solver: Optional[str] = None, height: Optional[int] = None,
             width: Optional[int] = None, latent_shape: Optional[Tuple[int, int, int]] = None, x_T=None,
             chunk_size: Optional[int] = None, return_trace: bool = False, return_latents: bool = False,
             progress: bool = False):
    """Images for ``prompt`` (away from ``negative_prompt``), one per seed and grid point.

    What ``rule`` does with the prompts (the UNet passes per step in brackets):

    * ``dj.ClassifierFreeGuidance(scale)`` [2]: eps = eps_u + scale (eps(prompt) - eps_u) with eps_u =
      eps(negative_prompt), or eps("") without one: diffusers' ``guidance_scale`` and ``negative_prompt``
      (``StableDiffusionPipeline(prompt, negative_prompt=..., guidance_scale=scale)``), the negative prompt replacing
      the unconditional prediction;
    * a rule in the positive mode [3] (``dj.PositiveMode(rule, cfg_scale)`` over ``dj.DynamicNegativeGuidance``,
      ``NegativePrompting`` or ``SafeLatentDiffusion``): predictions "", prompt and negative prompt (required), CFG
      toward the prompt with ``cfg_scale`` and the rule's negative guidance relative to the prompt's prediction (the
      paper's section 4.2);
    * ``dj.NoGuidance()`` [1]: the prompt's model alone (no negative prompt).

    Compilation: the prompts' text features (77, D), the rule's hyperparameters and the grid's values are traced
    arguments of the one compiled sampler, so calls that differ only in prompts, negative prompts, scales or grid
    values (of the same length) reuse it: one compilation per rule class, static options (solver, noise, grid names
    and length, return_trace), steps, latent shape and seed chunk; CFG with and without a negative prompt share one.

    Args:
      seeds: N ints; sample n starts from the N(0, I) draw of seeds[n] (or from ``x_T[n]``) and takes its step
        noise from it.
      grid: rule leaves to sweep, e.g. {"scale": [0, 27]} (scale 0: plain CFG toward the prompt, the unguided
        reference of the same seeds); all points in one compiled call.
      steps: chain length. The folder's scheduler config decides the chain as diffusers' ``set_timesteps``
        would (:func:`chain`: timestep spacing, steps_offset, set_alpha_to_one, rescale_betas_zero_snr; refusals
        name the option): ``solver=None`` steps with the folder's scheduler class, ``solver="ddim" | "ddpm" |
        "dpmpp_2m" | "euler" | "euler_ancestral"`` with that class built from the folder's config (diffusers'
        ``from_config``); a folder whose scheduler is PNDM (SD 1.5, SD 2 base) needs a ``solver``. ``eta``:
        DDIM's (alone it selects DDIM). ``noise``: the ancestral step's variance, by default the config's
        ``variance_type``. DNG on a deterministic solver needs its continuous-time posterior
        (``estimator="stratonovich"``).
      height, width: the image size in pixels, each a multiple of ``pipe.downscale`` (8 for SD, as in
        diffusers); latents (height / 8, width / 8, 4). Default: the UNet's training size.
      latent_shape: (h, w, C) latents instead of height / width (not both).
      x_T: (N, h, w, C) starting latents, channels last (diffusers' NCHW ``latents`` transposed by (0, 2, 3, 1)),
        scaled by the scheduler as diffusers' ``init_noise_sigma`` scales them; their size must agree with
        height / width or latent_shape where given. Sizes are checked (:func:`latent_size`,
        :func:`check_latent_size`) before anything is traced.
    Returns:
      uint8 images (K, N, H, W, 3) (K = grid points, 1 without a grid; H, W in pixels), and with ``return_trace``
      the :class:`dngjax.Trace` (t: (S,) timesteps in sampling order; lambda_t, p_t: (K, S, N)); with
      ``return_latents`` the latents (K, N, h, w, C) as well (images, latents[, trace]).
    """
    positive = getattr(rule, "num_conditions", None) == 2
    _check_rule_and_prompts(rule, prompt, negative_prompt, positive)
    seeds, shape, x_T = _checked_seeds_and_size(pipe, seeds, height, width, latent_shape, x_T)
    denoiser_u, denoiser_c = _prompt_denoisers(pipe, rule, prompt, negative_prompt, positive)
    c = chain(pipe, steps, solver=_solver_for_eta(pipe, solver, eta), eta=eta)   # the folder's config decides
    keys = keys_from_seeds(seeds)
    out = sweep(denoiser_u, c.schedule, keys, shape, rule=rule, grid=grid or {}, denoiser_c=denoiser_c,
                noise=noise or c.noise, eta=c.eta, solver=c.solver, chunk_size=chunk_size, return_trace=return_trace,
                progress=progress, x_T=_scaled_x_T(x_T, c.x_T_scale, keys, shape))
    return _generate_outputs(pipe, out, return_trace, return_latents)
