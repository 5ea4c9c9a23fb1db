"""DDPM noise schedules as pytrees.

A :class:`Schedule` describes the Markov chain that the sampler runs, in the
order of *diffusion time*: index ``i = 0`` is the least noisy step. Every array
has shape ``(num_steps,)``. ``timesteps[i]`` is the timestep index the network
was trained with (for a respaced chain it is a subsequence of ``0..T-1``), and
``betas[i]`` is the variance of this chain's own transition ``i``, so a
respaced chain is again an exact DDPM (Nichol & Dhariwal 2021, eq. 19).

Constructors: :func:`linear_schedule` (Ho et al.), :func:`scaled_linear_schedule`
(Stable Diffusion's), :func:`cosine_schedule` (Nichol & Dhariwal), and
:func:`schedule_from_betas` / :func:`schedule_from_alpha_bars` for any other.
Everything is derived in float64 and stored in float32, including
1 - alpha_bar (near t = 0 it is ~1e-4, and 1 - float32(alpha_bar) would lose
about 1e-4 of it relatively).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import jax.numpy as jnp
from flax import struct

from .renames import renamed_fields

Array = jnp.ndarray


@renamed_fields({"posterior_variances": "beta_tildes"})
@struct.dataclass
class Schedule:
    """Per-step quantities of a DDPM chain; all leaves are float32/int32 arrays of shape (S,).

    Attributes:
      timesteps: int32 network timestep index of step i (float32 for a chain of fractional
        timesteps, see :func:`chain_schedule`).
      betas: beta_i, variance of the transition x_i -> x_{i-1}.
      alphas: 1 - beta_i.
      alpha_bars: prod_{j<=i} alpha_j, so x_i = sqrt(alpha_bar_i) x_0 + sqrt(1-alpha_bar_i) eps.
      alpha_bars_prev: alpha_bar_{i-1} (1 for i = 0); in a :func:`chain_schedule` the alpha_bar step i
        goes to, = alpha_bar_i / alpha_i in every case.
      beta_tildes: beta_tilde_i = beta_i (1 - alpha_bar_{i-1}) / (1 - alpha_bar_i)
        (0 at i = 0 when the chain ends at alpha_bar = 1).
      one_minus_alpha_bars, one_minus_alpha_bars_prev: 1 - alpha_bar_i and 1 - alpha_bar_{i-1},
        computed in float64 (what the samplers' coefficients use).

    ``posterior_variances`` is the deprecated name of ``beta_tildes``.
    """

    timesteps: Array
    betas: Array
    alphas: Array
    alpha_bars: Array
    alpha_bars_prev: Array
    beta_tildes: Array
    one_minus_alpha_bars: Array
    one_minus_alpha_bars_prev: Array

    @property
    def num_steps(self) -> int:
        return int(self.betas.shape[0])


def _from_betas(betas: np.ndarray, timesteps: np.ndarray) -> Schedule:
    betas = np.asarray(betas, np.float64)
    alphas = 1.0 - betas
    alpha_bars = np.cumprod(alphas)
    alpha_bars_prev = np.concatenate([[1.0], alpha_bars[:-1]])
    # 1 - prod(1 - beta) without cancellation: -expm1(sum log1p(-beta))
    one_minus = -np.expm1(np.cumsum(np.log1p(-betas)))
    one_minus_prev = np.concatenate([[0.0], one_minus[:-1]])
    beta_tildes = betas * one_minus_prev / one_minus
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    return Schedule(
        timesteps=jnp.asarray(timesteps, jnp.int32),
        betas=f32(betas),
        alphas=f32(alphas),
        alpha_bars=f32(alpha_bars),
        alpha_bars_prev=f32(alpha_bars_prev),
        beta_tildes=f32(beta_tildes),
        one_minus_alpha_bars=f32(one_minus),
        one_minus_alpha_bars_prev=f32(one_minus_prev),
    )


def schedule_from_betas(betas) -> Schedule:
    """The chain of the given betas (T,), each in (0, 1), at timesteps 0..T-1."""
    b = np.asarray(betas, np.float64)
    if b.ndim != 1 or b.size == 0:
        raise ValueError(f"betas must be a non-empty 1-D array, got shape {b.shape}")
    if not np.all(np.isfinite(b)) or np.any(b <= 0) or np.any(b >= 1):
        raise ValueError(f"betas must lie in (0, 1), got min {np.nanmin(b)}, max {np.nanmax(b)}")
    return _from_betas(b, np.arange(b.size))


def schedule_from_alpha_bars(alpha_bars) -> Schedule:
    """The chain with these cumulative products alpha_bar_t (T,): strictly decreasing, in (0, 1).

    beta_t = 1 - alpha_bar_t / alpha_bar_{t-1} (alpha_bar_{-1} = 1).
    """
    ab = np.asarray(alpha_bars, np.float64)
    if ab.ndim != 1 or ab.size == 0:
        raise ValueError(f"alpha_bars must be a non-empty 1-D array, got shape {ab.shape}")
    if not np.all(np.isfinite(ab)) or np.any(ab <= 0) or np.any(ab >= 1) or np.any(np.diff(ab) >= 0):
        raise ValueError("alpha_bars must be strictly decreasing values in (0, 1)")
    return schedule_from_betas(1.0 - ab / np.concatenate([[1.0], ab[:-1]]))


def linear_schedule(num_timesteps: int = 1000, beta_start: float = 1e-4,
                    beta_end: float = 0.02) -> Schedule:
    """Ho et al.'s linear beta schedule (1e-4 .. 0.02 over T = 1000 by default)."""
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if not 0.0 < beta_start <= beta_end < 1.0:
        raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
    betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
    return _from_betas(betas, np.arange(num_timesteps))


def scaled_linear_schedule(num_timesteps: int = 1000, beta_start: float = 0.00085,
                           beta_end: float = 0.012) -> Schedule:
    """Stable Diffusion's schedule (diffusers' ``scaled_linear``): sqrt(beta) linear in t."""
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if not 0.0 < beta_start <= beta_end < 1.0:
        raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
    betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_timesteps, dtype=np.float64) ** 2
    return _from_betas(betas, np.arange(num_timesteps))


def cosine_schedule(num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Schedule:
    """Nichol & Dhariwal's cosine schedule: alpha_bar(t) = f(t) / f(0), f(t) = cos^2((t/T + s)/(1 + s) pi/2).

    beta_t = min(1 - alpha_bar(t + 1) / alpha_bar(t), max_beta), as in their code and diffusers'
    ``squaredcos_cap_v2``.
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if not (s >= 0 and 0 < max_beta < 1):
        raise ValueError(f"need s >= 0 and 0 < max_beta < 1, got s={s}, max_beta={max_beta}")
    f = lambda u: np.cos((u / num_timesteps + s) / (1 + s) * np.pi / 2) ** 2
    t = np.arange(num_timesteps, dtype=np.float64)
    betas = np.minimum(1.0 - f(t + 1) / f(t), max_beta)
    return _from_betas(betas, np.arange(num_timesteps))


#: ``spaced_timesteps(spacing=...)``: diffusers' timestep spacings (Lin et al. 2024, table 2).
SPACINGS = ("linspace", "leading", "trailing")


def spaced_timesteps(num_train_timesteps: int, num_steps: int, spacing: str = "linspace", steps_offset: int = 0,
                     multistep: bool = False) -> np.ndarray:
    """The timesteps a diffusers scheduler samples, noisiest first, as ``respace(..., timesteps=)`` takes them.

    ``spacing`` and ``steps_offset``: the scheduler config's ``timestep_spacing`` and ``steps_offset``.
    ``multistep=False``: DDIMScheduler and DDPMScheduler (and EulerDiscreteScheduler with "leading" or
    "trailing"; its "linspace" timesteps are fractional); ``multistep=True``: DPMSolverMultistepScheduler,
    which spaces num_steps + 1 points and drops the last. Their final step goes to alpha_bar = 1 as here
    (DDIM: with ``set_alpha_to_one=True``; DPM-Solver++: ``final_sigmas_type="zero"``, the defaults).
    """
    t, n = int(num_train_timesteps), int(num_steps)
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    if not 1 <= n <= t:
        raise ValueError(f"num_steps must be in [1, {t}], got {num_steps}")
    m = n + 1 if multistep else n
    if spacing == "linspace":
        out = np.linspace(0, t - 1, m).round()[::-1]
    elif spacing == "leading":
        out = (np.arange(0, m) * (t // m)).round()[::-1] + steps_offset
    else:
        out = np.round(np.arange(t, 0, -t / n)) - 1
        m = n                                            # trailing: no extra point to drop
    out = out.astype(np.int64)
    out = out[:-1] if m == n + 1 else out
    if out.min() < 0 or out.max() >= t:
        raise ValueError(f"steps_offset={steps_offset} puts timesteps outside [0, {t - 1}]")
    return out


def respace(schedule: Schedule, num_steps: Optional[int] = None, *, timesteps=None) -> Schedule:
    """A shorter chain over ``num_steps`` evenly spaced timesteps of ``schedule`` (or the given ``timesteps``).

    beta'_i = 1 - alpha_bar_{tau_i} / alpha_bar_{tau_{i-1}} (alpha_bar_{tau_{-1}} = 1),
    so the marginals of x at the kept timesteps are unchanged. With ``num_steps``, the first and the
    last original timestep are always kept (round(linspace(0, T - 1, num_steps)): diffusers' "linspace"
    spacing of DDIM / DDPM). ``timesteps``: the kept timestep indices themselves, in any order (e.g. a
    diffusers scheduler's ``timesteps`` after ``set_timesteps``); the chain still ends at alpha_bar = 1.
    The network still receives the original indices ``tau_i`` (``Schedule.timesteps``).
    """
    total = schedule.num_steps
    if (num_steps is None) == (timesteps is None):
        raise ValueError("respace takes num_steps or timesteps (one of them)")
    if timesteps is not None:
        keep = np.unique(np.asarray(timesteps).reshape(-1))
        if keep.size == 0 or not np.issubdtype(keep.dtype, np.integer) and not np.all(keep == np.round(keep)):
            raise ValueError(f"timesteps must be a non-empty sequence of integer indices, got {timesteps!r}")
        keep = keep.astype(np.int64)
        if keep[0] < 0 or keep[-1] >= total:
            raise ValueError(f"timesteps must lie in [0, {total - 1}], got {keep[0]} .. {keep[-1]}")
    else:
        if not 1 <= num_steps <= total:
            raise ValueError(f"num_steps must be in [1, {total}], got {num_steps}")
        keep = np.unique(np.round(np.linspace(0, total - 1, num_steps)).astype(np.int64))
    # float64 from the betas: float32 alpha_bars would cost ~1e-3 relative in beta'.
    # beta'_i = 1 - exp(log alpha_bar_i - log alpha_bar_{i-1}), without cancellation.
    log_ab = np.cumsum(np.log1p(-np.asarray(schedule.betas, np.float64)))[keep]
    betas = -np.expm1(np.diff(np.concatenate([[0.0], log_ab])))
    timesteps = np.asarray(schedule.timesteps)[keep]
    return _from_betas(betas, timesteps)


def chain_schedule(timesteps, alpha_bars, alpha_bars_prev) -> Schedule:
    """A chain given step by step (index 0 = least noisy): step i goes from alpha_bar_i to alpha_bar_prev_i.

    timesteps (S,): the network's timestep of each step (int, or float for fractional timesteps);
    alpha_bars, alpha_bars_prev (S,): 0 < alpha_bar_i <= alpha_bar_prev_i <= 1 (equal: a step that
    leaves x as it is, as diffusers' DDIM at t = 0 with ``set_alpha_to_one=False``). Unlike :func:`respace`,
    alpha_bar_prev_i need not be alpha_bar_{i-1} (diffusers' DDIM steps to t - T // S, which differs
    from the next listed timestep with some spacings) nor 1 at i = 0 (DDIM's ``set_alpha_to_one=False``
    ends at alpha_bar of timestep 0). beta_i = 1 - alpha_bar_i / alpha_bar_prev_i, so the sampler's
    steps (:func:`dngjax.sampler.chain_steps`) go exactly from alpha_bar_i to alpha_bar_prev_i.
    """
    ab = np.asarray(alpha_bars, np.float64)
    ab_prev = np.asarray(alpha_bars_prev, np.float64)
    ts = np.asarray(timesteps)
    if ab.ndim != 1 or ab.size == 0 or ab.shape != ab_prev.shape or ts.shape != ab.shape:
        raise ValueError(f"timesteps, alpha_bars and alpha_bars_prev must be equal-length 1-D arrays, got shapes "
                         f"{ts.shape}, {ab.shape}, {ab_prev.shape}")
    if not (np.all(np.isfinite(ab)) and np.all(ab > 0) and np.all(ab <= ab_prev) and np.all(ab_prev <= 1)):
        raise ValueError("need 0 < alpha_bars <= alpha_bars_prev <= 1 at every step")
    betas = (ab_prev - ab) / ab_prev
    one_minus, one_minus_prev = 1.0 - ab, 1.0 - ab_prev
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    integer = np.issubdtype(ts.dtype, np.integer)
    return Schedule(
        timesteps=jnp.asarray(ts, jnp.int32 if integer else jnp.float32),
        betas=f32(betas),
        alphas=f32(ab / ab_prev),
        alpha_bars=f32(ab),
        alpha_bars_prev=f32(ab_prev),
        beta_tildes=f32(betas * one_minus_prev / one_minus),
        one_minus_alpha_bars=f32(one_minus),
        one_minus_alpha_bars_prev=f32(one_minus_prev),
    )
