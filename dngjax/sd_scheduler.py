"""A diffusers scheduler config -> the chain the sampler runs, as diffusers' scheduler would step it.

:func:`scheduler_chain` reads a ``scheduler/scheduler_config.json`` dict (the folder's scheduler class,
or another class built from the same config as ``XScheduler.from_config(config)`` does) and returns the
:class:`Chain`: the respaced :class:`~dngjax.schedules.Schedule` with diffusers' timesteps and per-step
alpha_bar_t -> alpha_bar_prev, the sampler's ``solver`` / ``eta`` / ``noise``, and the scale of the starting
latents. Every config key of the supported classes is either followed or refused by name
(:data:`SCHEDULER_DEFAULTS` lists them; ``tests/test_sd_scheduler.py`` checks the list against diffusers'
signatures and the chain against diffusers' ``step``).

Supported classes and the sampler's step they map to:

* ``DDIMScheduler`` -> ``"ddim"`` (eta from the caller, default 0 as in diffusers' pipelines). Its
  previous timestep is ``t - T // steps`` (not the next listed timestep: with "linspace" or "trailing"
  spacing the two differ, and the chain follows diffusers), ``final_alpha_cumprod`` 1 or alpha_bar_0
  (``set_alpha_to_one``);
* ``DDPMScheduler`` -> ``"ddpm"`` (ancestral; ``variance_type`` "fixed_small" -> noise beta_tilde,
  "fixed_large" -> beta);
* ``DPMSolverMultistepScheduler`` -> ``"dpmpp_2m"`` (``algorithm_type="dpmsolver++"``, ``solver_order=2``,
  ``solver_type="midpoint"``, ``final_sigmas_type="zero"``);
* ``EulerDiscreteScheduler`` -> ``"euler"`` and ``EulerAncestralDiscreteScheduler`` -> ``"euler_ancestral"``
  (DDIM at eta 0 / 1 in x-space; "linspace" spacing gives fractional timesteps, whose sigma diffusers
  interpolates linearly in t: the chain's timesteps are then float32, and the UNet receives them as they
  are). Their starting latents are ``init_noise_sigma`` N(0, I) in sigma-space, i.e. x_T = sqrt(1 -
  alpha_bar_T) N(0, I) with "linspace" / "trailing" spacing (``Chain.x_T_scale``), N(0, I) with "leading".

Refused by name: ``PNDMScheduler`` (PLMS; SD 1.x's and SD 2 base's folders ship it: pass another solver,
which builds that class from the same config) and any other class; ``clip_sample=True``,
``thresholding=True`` (the x_0 clipping / dynamic thresholding of pixel-space models; Stable Diffusion's
folders set both false); beta schedules other than "linear" / "scaled_linear" / ``trained_betas``;
Karras / exponential / beta / Lu / flow sigmas, other DPM-Solver variants, ``final_sigmas_type="sigma_min"``,
learned variances.

``rescale_betas_zero_snr=True`` (Lin et al. 2024) rescales the betas to zero terminal SNR as diffusers'
``rescale_zero_terminal_snr``; it needs ``prediction_type="v_prediction"`` (an eps prediction carries no
information at alpha_bar = 0). The chain works in eps-space, where alpha_bar = 0 is singular, so alpha_bar
of the last training step is set to 2**-24, as diffusers' Euler and DPM-Solver schedulers do; DDIM and
DDPM in diffusers step from exactly 0 there, a difference of about sqrt(2**-24) = 2.4e-4 of the first
step's prediction when the chain starts at t = T - 1 (trailing spacing).

This module is also the project's one reader of what a scheduler config says of the model's training
(:func:`parse_training`: betas, T, prediction type, with diffusers' defaults): :func:`training_schedule`
gives the full training chain and prediction of a Stable Diffusion folder (``stable_diffusion.load``),
:func:`card_diffusion` the ``diffusion`` entry of a model card (the diffusers converter,
``python -m dngjax.convert``), and :func:`beta_schedule` the chain of such an entry
(``checkpoint.schedule_of``).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, NamedTuple, Optional, Tuple

import numpy as np

from .schedules import (SPACINGS, Schedule, chain_schedule, cosine_schedule, linear_schedule, scaled_linear_schedule,
                        schedule_from_alpha_bars, spaced_timesteps)

_COMMON = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None)
_THRESH = dict(thresholding=False, dynamic_thresholding_ratio=0.995, sample_max_value=1.0)

#: Every ``__init__`` parameter of the known diffusers (0.42) scheduler classes with its default: what a
#: class built from a config takes from it (keys of other classes are ignored, as ``from_config`` does).
SCHEDULER_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "DDIMScheduler": dict(_COMMON, clip_sample=True, set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon",
                          **_THRESH, clip_sample_range=1.0, timestep_spacing="leading", rescale_betas_zero_snr=False),
    "DDPMScheduler": dict(_COMMON, variance_type="fixed_small", clip_sample=True, prediction_type="epsilon", **_THRESH,
                          clip_sample_range=1.0, timestep_spacing="leading", steps_offset=0,
                          rescale_betas_zero_snr=False),
    "EulerDiscreteScheduler": dict(_COMMON, prediction_type="epsilon", interpolation_type="linear",
                                   use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
                                   sigma_min=None, sigma_max=None, timestep_spacing="linspace",
                                   timestep_type="discrete", steps_offset=0, rescale_betas_zero_snr=False,
                                   final_sigmas_type="zero"),
    "EulerAncestralDiscreteScheduler": dict(_COMMON, prediction_type="epsilon", timestep_spacing="linspace",
                                            steps_offset=0, rescale_betas_zero_snr=False),
    "DPMSolverMultistepScheduler": dict(_COMMON, solver_order=2, prediction_type="epsilon", **_THRESH,
                                        algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True,
                                        euler_at_final=False, use_karras_sigmas=False, use_exponential_sigmas=False,
                                        use_beta_sigmas=False, use_lu_lambdas=False, use_flow_sigmas=False,
                                        flow_shift=1.0, final_sigmas_type="zero", lambda_min_clipped=-math.inf,
                                        variance_type=None, timestep_spacing="linspace", steps_offset=0,
                                        rescale_betas_zero_snr=False, use_dynamic_shifting=False,
                                        time_shift_type="exponential"),
    "PNDMScheduler": dict(_COMMON, skip_prk_steps=False, set_alpha_to_one=False, prediction_type="epsilon",
                          timestep_spacing="leading", steps_offset=0),
}

#: The sampler's ``solver=`` of each supported class (PNDMScheduler has none: refused).
SOLVER_OF_CLASS = {"DDIMScheduler": "ddim", "DDPMScheduler": "ddpm", "DPMSolverMultistepScheduler": "dpmpp_2m",
                   "EulerDiscreteScheduler": "euler", "EulerAncestralDiscreteScheduler": "euler_ancestral"}
CLASS_OF_SOLVER = {v: k for k, v in SOLVER_OF_CLASS.items()}
#: diffusers' ``prediction_type`` -> the :class:`~dngjax.denoiser.Denoiser`'s ``prediction`` (all of
#: :data:`dngjax.denoiser.PREDICTIONS`); any other type is refused by name
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
#: the beta schedules a model card's ``diffusion.schedule`` names (diffusers' ``beta_schedule`` names, and
#: "cosine" for "squaredcos_cap_v2") -> (constructor kind, default (beta_start, beta_end))
CARD_SCHEDULES = {"linear": ("linear", (1e-4, 0.02)), "scaled_linear": ("scaled_linear", (0.00085, 0.012)),
                  "squaredcos_cap_v2": ("cosine", None), "cosine": ("cosine", None)}

_ANY = object()
#: Values the chain implements, per key (a set of allowed values; keys not listed take any value: the
#: beta parameters, steps_offset, and options that act only together with a refused one).
_ALLOWED = {
    "beta_schedule": {"linear", "scaled_linear"},
    "prediction_type": set(PREDICTIONS),
    "timestep_spacing": set(SPACINGS),
    "clip_sample": {False},
    "thresholding": {False},
    "variance_type": {"fixed_small", "fixed_large", None},
    "interpolation_type": {"linear"},
    "use_karras_sigmas": {False, None},
    "use_exponential_sigmas": {False, None},
    "use_beta_sigmas": {False, None},
    "use_lu_lambdas": {False},
    "use_flow_sigmas": {False},
    "use_dynamic_shifting": {False},
    "timestep_type": {"discrete"},
    "final_sigmas_type": {"zero"},
    "solver_order": {2},
    "algorithm_type": {"dpmsolver++"},
    "solver_type": {"midpoint"},
    "lambda_min_clipped": {-math.inf},
}
_WHY = {
    "clip_sample": "clipping the x_0 prediction to [-clip_sample_range, clip_sample_range] is for pixel-space "
                   "models and not implemented (Stable Diffusion's folders set clip_sample false)",
    "thresholding": "dynamic thresholding of the x_0 prediction is for pixel-space models and not implemented",
    "beta_schedule": "the chain implements 'linear', 'scaled_linear' and trained_betas",
    "variance_type": "the ancestral step implements 'fixed_small' (beta_tilde) and 'fixed_large' (beta)",
    "solver_order": "the sampler has DPM-Solver++(2M) only",
    "algorithm_type": "the sampler has DPM-Solver++(2M) only",
    "solver_type": "the sampler has DPM-Solver++(2M) with the midpoint rule only",
    "final_sigmas_type": "the chain ends at sigma = 0",
    "lambda_min_clipped": "the chain does not clip lambda",
}


class Training(NamedTuple):
    """What a scheduler config says of the model's training (the keys all diffusers schedulers share),
    values as the config gives them, diffusers' defaults for the missing ones.

    num_timesteps: T (``num_train_timesteps``). beta_schedule, beta_start, beta_end, trained_betas,
    rescale_betas_zero_snr: diffusers' keys. prediction: the Denoiser's ("eps", "v" or "x0", from
    ``prediction_type``).
    """

    num_timesteps: int
    beta_schedule: str
    beta_start: float
    beta_end: float
    trained_betas: Optional[Any]
    rescale_betas_zero_snr: bool
    prediction: str


def parse_training(config: Mapping[str, Any]) -> Training:
    """The :class:`Training` of a diffusers ``scheduler_config.json`` dict (any scheduler class).

    Raises ValueError for a ``prediction_type`` other than "epsilon", "v_prediction" and "sample" (named),
    and for ``rescale_betas_zero_snr`` without "v_prediction". The beta schedule is checked by its user
    (:func:`training_schedule`, :func:`card_diffusion`: they implement different ones).
    """
    pred = config.get("prediction_type", "epsilon")
    if pred not in PREDICTIONS:
        raise ValueError(f"prediction_type={pred!r} is not supported ({sorted(PREDICTIONS)})")
    if config.get("rescale_betas_zero_snr") and pred != "v_prediction":
        raise ValueError(f"rescale_betas_zero_snr=True with prediction_type={pred!r}: zero terminal SNR needs "
                         "'v_prediction' (at alpha_bar = 0 an eps or x_0 prediction is singular)")
    get = lambda key: config.get(key, _COMMON[key])
    return Training(num_timesteps=get("num_train_timesteps"), beta_schedule=get("beta_schedule"),
                    beta_start=get("beta_start"), beta_end=get("beta_end"), trained_betas=get("trained_betas"),
                    rescale_betas_zero_snr=bool(config.get("rescale_betas_zero_snr", False)),
                    prediction=PREDICTIONS[pred])


def training_schedule(config: Mapping[str, Any]) -> Tuple[Schedule, str]:
    """(the full training chain, prediction "eps" / "v" / "x0") of a scheduler config, as the scheduler
    computes its alpha_bars (:func:`train_alpha_bars`: "linear", "scaled_linear", ``trained_betas``, zero
    terminal SNR); ValueError naming what is not implemented (the class's options: :func:`scheduler_chain`)."""
    training = parse_training(config)
    return schedule_from_alpha_bars(train_alpha_bars(config)), training.prediction


def card_diffusion(config: Mapping[str, Any]) -> Dict[str, Any]:
    """The ``diffusion`` entry of a model card (:mod:`dngjax.checkpoint`) of a model trained with this
    scheduler config: num_timesteps, beta_start, beta_end, schedule (diffusers' ``beta_schedule`` name),
    prediction. ValueError, naming the key, for what a card cannot say (``trained_betas``,
    ``rescale_betas_zero_snr``, a beta schedule outside :data:`CARD_SCHEDULES`) or a refused prediction type."""
    t = parse_training(config)
    if t.trained_betas is not None and len(t.trained_betas):
        raise ValueError("trained_betas: a model card names its beta schedule (one of "
                         f"{sorted(CARD_SCHEDULES)}); a list of betas is not supported")
    if t.rescale_betas_zero_snr:
        raise ValueError("rescale_betas_zero_snr=True: a model card's schedule has no zero-terminal-SNR option")
    if t.beta_schedule not in CARD_SCHEDULES:
        raise ValueError(f"beta_schedule={t.beta_schedule!r} is not supported (supported: {sorted(CARD_SCHEDULES)})")
    return {"num_timesteps": t.num_timesteps, "beta_start": t.beta_start, "beta_end": t.beta_end,
            "schedule": t.beta_schedule, "prediction": t.prediction}


def beta_schedule(name: str, num_timesteps: int = 1000, beta_start: Optional[float] = None,
                  beta_end: Optional[float] = None) -> Schedule:
    """The training chain of a named beta schedule (:data:`CARD_SCHEDULES`: diffusers' "linear",
    "scaled_linear", "squaredcos_cap_v2" or "cosine"), each with its own default betas where none are given
    (the cosine schedule takes none). KeyError for an unknown name."""
    kind, defaults = CARD_SCHEDULES[name]
    if kind == "cosine":
        return cosine_schedule(num_timesteps)
    make = linear_schedule if kind == "linear" else scaled_linear_schedule
    return make(num_timesteps, float(defaults[0] if beta_start is None else beta_start),
                float(defaults[1] if beta_end is None else beta_end))


class Chain(NamedTuple):
    """What :func:`dngjax.sample` needs to run a diffusers scheduler's chain.

    schedule: the respaced chain (S = steps; index 0 = least noisy step), timesteps as the scheduler's.
    solver: the sampler's ``solver=`` ("ddim", "ddpm", "dpmpp_2m", "euler", "euler_ancestral").
    eta: DDIM's eta (a float) for "ddim", else None. noise: the sampler's ``noise=`` ("beta_tilde" for
    DDPM's "fixed_small", else "beta"). x_T_scale: the starting latents are x_T_scale * N(0, I) (1 but for
    Euler / Euler ancestral with "linspace" or "trailing" spacing: sqrt(1 - alpha_bar_T)).
    scheduler: the diffusers class whose step this is; config: its full config (defaults filled in).
    """

    schedule: Schedule
    solver: str
    eta: Optional[float]
    noise: str
    x_T_scale: float
    scheduler: str
    config: Dict[str, Any]


def resolve_config(config: Mapping[str, Any], solver: Optional[str] = None) -> Tuple[str, Dict[str, Any]]:
    """(class name, full config) of the scheduler that samples: the folder's class (``solver=None``) or
    the class of ``solver`` built from the folder's config as diffusers' ``from_config`` does (the keys
    that class takes, its defaults for the others). Refusals raise ValueError naming the class or key."""
    if solver is None:
        name = config.get("_class_name", "DDPMScheduler")
        if name == "PNDMScheduler":
            raise ValueError("the folder's scheduler is PNDMScheduler (PLMS), which is not implemented: pass "
                             f"solver= one of {sorted(CLASS_OF_SOLVER)} to sample with that scheduler built from "
                             "this config (as diffusers' XScheduler.from_config(pipe.scheduler.config) does)")
        if name not in SOLVER_OF_CLASS:
            raise ValueError(f"scheduler class {name!r} is not supported: one of {sorted(SOLVER_OF_CLASS)}, or pass "
                             f"solver= one of {sorted(CLASS_OF_SOLVER)} to use that scheduler with this config")
    else:
        if solver not in CLASS_OF_SOLVER:
            raise ValueError(f"solver must be one of {sorted(CLASS_OF_SOLVER)} (or None: the folder's scheduler), "
                             f"got {solver!r}")
        name = CLASS_OF_SOLVER[solver]
    defaults = SCHEDULER_DEFAULTS[name]
    full = {k: (config[k] if k in config else v) for k, v in defaults.items()}
    check_config(name, full)
    return name, full


def check_config(name: str, cfg: Mapping[str, Any]) -> None:
    """ValueError naming every key of ``cfg`` (a full config of class ``name``) the chain does not implement."""
    bad = []
    for key, allowed in _ALLOWED.items():
        if key in SCHEDULER_DEFAULTS[name] and cfg.get(key) not in allowed:
            why = _WHY.get(key, f"supported: {sorted(allowed, key=repr)}")
            bad.append(f"{key}={cfg.get(key)!r} ({why})")
    if cfg.get("rescale_betas_zero_snr") and cfg.get("prediction_type") != "v_prediction":
        bad.append(f"rescale_betas_zero_snr=True with prediction_type={cfg.get('prediction_type')!r} (zero terminal "
                   "SNR needs 'v_prediction': at alpha_bar = 0 an eps or x_0 prediction is singular)")
    if bad:
        raise ValueError(f"{name} config: not supported: " + "; ".join(bad))
    if not int(cfg["num_train_timesteps"]) >= 1:
        raise ValueError(f"{name} config: num_train_timesteps={cfg['num_train_timesteps']!r} must be >= 1")


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """diffusers' ``rescale_zero_terminal_snr`` (Lin et al. 2024, algorithm 1): betas (T,) -> betas (T,)
    whose sqrt(alpha_bar) is shifted and scaled to end at exactly 0 and keep its first value."""
    ab_sqrt = np.sqrt(np.cumprod(1.0 - np.asarray(betas, np.float64)))
    first, last = ab_sqrt[0], ab_sqrt[-1]
    ab_sqrt = (ab_sqrt - last) * (first / (first - last))
    ab = ab_sqrt ** 2
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return 1.0 - alphas


def train_alpha_bars(cfg: Mapping[str, Any]) -> np.ndarray:
    """alpha_bar_t (T,) float64 of a scheduler config: betas from ``trained_betas`` or ``beta_schedule``
    ("linear", "scaled_linear"), zero-terminal-SNR rescaled if asked (the last value then 2**-24, see the
    module docstring)."""
    t = int(cfg.get("num_train_timesteps", 1000))
    if cfg.get("trained_betas") is not None and len(cfg["trained_betas"]):
        betas = np.asarray(np.asarray(cfg["trained_betas"], np.float32), np.float64)   # diffusers: float32
        if betas.shape != (t,):
            raise ValueError(f"trained_betas has {betas.size} values, num_train_timesteps={t}")
    else:
        kind = cfg.get("beta_schedule", "linear")
        start, end = float(cfg.get("beta_start", 1e-4)), float(cfg.get("beta_end", 0.02))
        if kind == "linear":
            betas = np.linspace(start, end, t, dtype=np.float64)
        elif kind == "scaled_linear":
            betas = np.linspace(start ** 0.5, end ** 0.5, t, dtype=np.float64) ** 2
        else:
            raise ValueError(f"beta_schedule={kind!r} is not supported (scaled_linear or linear)")
    if cfg.get("rescale_betas_zero_snr"):
        betas = rescale_zero_terminal_snr(betas)
    if not np.all(np.isfinite(betas)) or np.any(betas <= 0) or np.any(betas > 1):
        raise ValueError("the scheduler's betas must lie in (0, 1]")
    ab = np.cumprod(1.0 - betas)
    if cfg.get("rescale_betas_zero_snr"):
        ab[-1] = 2.0 ** -24
    return ab


def scheduler_chain(config: Mapping[str, Any], steps: int, solver: Optional[str] = None,
                    eta: Optional[float] = None) -> Chain:
    """The :class:`Chain` of ``steps`` inference steps of a scheduler config (see the module docstring).

    ``solver``: None (the config's own class) or a solver name, whose diffusers class is built from the
    config (``from_config``). ``eta``: DDIM's eta (default 0.0, as diffusers' pipelines); refused for the
    other solvers. Raises ValueError (naming the key, class or value) for anything not implemented.
    """
    name, cfg = resolve_config(config, solver)
    solver = SOLVER_OF_CLASS[name]
    if eta is not None and solver != "ddim":
        raise ValueError(f"eta={eta!r}: {name} has no eta (only DDIMScheduler does)")
    eta = (0.0 if eta is None else float(eta)) if solver == "ddim" else None
    if eta is not None and not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must lie in [0, 1], got {eta}")
    ab = train_alpha_bars(cfg)
    big_t = ab.size
    n = int(steps)
    spacing, offset = cfg["timestep_spacing"], int(cfg["steps_offset"])
    euler = name in ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler")
    if euler and spacing == "linspace":
        if not 1 <= n <= big_t:
            raise ValueError(f"steps must be in [1, {big_t}], got {steps}")
        ts = np.linspace(0, big_t - 1, n, dtype=np.float32)[::-1].astype(np.float64)
    else:
        ts = spaced_timesteps(big_t, n, spacing, offset, multistep=(name == "DPMSolverMultistepScheduler"))
    # alpha_bar at the step's timesteps (Euler: sigma interpolated linearly in t, as diffusers does)
    sigma = np.sqrt((1.0 - ab) / ab)
    if euler or name == "DPMSolverMultistepScheduler":
        s = np.interp(ts, np.arange(big_t), sigma)
        ab_t = 1.0 / (1.0 + s * s)
    else:
        ab_t = ab[ts.astype(np.int64)]
    if name == "DDIMScheduler":                 # prev = t - T // steps (diffusers' DDIM), else final alpha
        final = 1.0 if cfg["set_alpha_to_one"] else ab[0]
        prev = ts.astype(np.int64) - big_t // n
        ab_prev = np.where(prev >= 0, ab[np.maximum(prev, 0)], final)
    else:                                       # the next listed timestep, the last step to alpha_bar = 1
        ab_prev = np.concatenate([ab_t[1:], [1.0]])
    fractional = np.any(ts != np.round(ts))
    timesteps = ts.astype(np.float32) if fractional else ts.astype(np.int64)
    schedule = chain_schedule(timesteps[::-1], ab_t[::-1], ab_prev[::-1])
    noise = "beta_tilde" if name == "DDPMScheduler" and cfg["variance_type"] in ("fixed_small", None) else "beta"
    x_T_scale = 1.0
    if euler and spacing in ("linspace", "trailing"):
        x_T_scale = float(np.sqrt(1.0 - ab_t[0]))
    return Chain(schedule=schedule, solver=solver, eta=eta, noise=noise, x_T_scale=x_T_scale, scheduler=name,
                 config=cfg)
