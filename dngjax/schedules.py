"""DDPM noise schedules as pytrees.

A :class:`Schedule` describes the Markov chain that the sampler runs, in the
order of *diffusion time*: index ``i = 0`` is the least noisy step. Every array
has shape ``(num_steps,)``. ``timesteps[i]`` is the timestep index the network
was trained with (for a respaced chain it is a subsequence of ``0..T-1``), and
``betas[i]`` is the variance of this chain's own transition ``i``, so a
respaced chain is again an exact DDPM (Nichol & Dhariwal 2021, eq. 19).
"""

from __future__ import annotations

import numpy as np
import jax.numpy as jnp
from flax import struct

Array = jnp.ndarray


@struct.dataclass
class Schedule:
    """Per-step quantities of a DDPM chain; all leaves are float32/int32 arrays of shape (S,).

    Attributes:
      timesteps: int32 network timestep index of step i.
      betas: beta_i, variance of the transition x_i -> x_{i-1}.
      alphas: 1 - beta_i.
      alpha_bars: prod_{j<=i} alpha_j, so x_i = sqrt(alpha_bar_i) x_0 + sqrt(1-alpha_bar_i) eps.
      alpha_bars_prev: alpha_bar_{i-1} (1 for i = 0).
      posterior_variances: beta_tilde_i = beta_i (1 - alpha_bar_{i-1}) / (1 - alpha_bar_i)
        (0 at i = 0).
    """

    timesteps: Array
    betas: Array
    alphas: Array
    alpha_bars: Array
    alpha_bars_prev: Array
    posterior_variances: Array

    @property
    def num_steps(self) -> int:
        return int(self.betas.shape[0])


def _from_betas(betas: np.ndarray, timesteps: np.ndarray) -> Schedule:
    betas = np.asarray(betas, np.float64)
    alphas = 1.0 - betas
    alpha_bars = np.cumprod(alphas)
    alpha_bars_prev = np.concatenate([[1.0], alpha_bars[:-1]])
    post_var = betas * (1.0 - alpha_bars_prev) / (1.0 - alpha_bars)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    return Schedule(
        timesteps=jnp.asarray(timesteps, jnp.int32),
        betas=f32(betas),
        alphas=f32(alphas),
        alpha_bars=f32(alpha_bars),
        alpha_bars_prev=f32(alpha_bars_prev),
        posterior_variances=f32(post_var),
    )


def linear_schedule(num_timesteps: int = 1000, beta_start: float = 1e-4,
                    beta_end: float = 0.02) -> Schedule:
    """Ho et al.'s linear beta schedule (1e-4 .. 0.02 over T = 1000 by default)."""
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if not 0.0 < beta_start <= beta_end < 1.0:
        raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
    betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
    return _from_betas(betas, np.arange(num_timesteps))


def respace(schedule: Schedule, num_steps: int) -> Schedule:
    """A shorter chain over ``num_steps`` evenly spaced timesteps of ``schedule``.

    beta'_i = 1 - alpha_bar_{tau_i} / alpha_bar_{tau_{i-1}} (alpha_bar_{tau_{-1}} = 1),
    so the marginals of x at the kept timesteps are unchanged. The first and the
    last original timestep are always kept. The network still receives the
    original indices ``tau_i`` (``Schedule.timesteps``).
    """
    total = schedule.num_steps
    if not 1 <= num_steps <= total:
        raise ValueError(f"num_steps must be in [1, {total}], got {num_steps}")
    keep = np.unique(np.round(np.linspace(0, total - 1, num_steps)).astype(np.int64))
    # float64 cumulative product from the betas: float32 alpha_bars would cost ~1e-3 relative in beta'.
    alpha_bars = np.cumprod(1.0 - np.asarray(schedule.betas, np.float64))[keep]
    prev = np.concatenate([[1.0], alpha_bars[:-1]])
    betas = 1.0 - alpha_bars / prev
    timesteps = np.asarray(schedule.timesteps)[keep]
    return _from_betas(betas, timesteps)
