"""Compiled ancestral DDPM sampling with guidance, and vmapped sweeps.

The whole trajectory is one ``jax.lax.scan`` inside one ``jax.jit``: the carry
holds the sample x (B, *shape), the guidance state (DNG's log-posterior (B,),
SLD's momentum (B, *shape)) and the per-sample PRNG keys (B,). Compiled once
per sample shape, denoiser function, rule type (and static fields) and chain
length; hyperparameters, params and keys are traced.

Sample i depends only on keys[i] and the rule's hyperparameters: x_T and every
step's noise are drawn from keys[i] alone, so results never depend on batch
size, position in the batch or other samples.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .denoiser import Denoiser, as_denoiser
from .guidance import VARIANCES, GuidanceRule, NoGuidance, Step, ddpm_mean, transition_variance
from .schedules import Schedule

Array = jnp.ndarray

_TRACES = {"sample": 0}


def trace_count() -> int:
    """How many times the sampler's body has been traced (each trace precedes one compilation)."""
    return _TRACES["sample"]


class Trace(NamedTuple):
    """Per-step record, in sampling order (first row = noisiest step).

    t: (S,) network timestep index. lam: (S, B) effective guidance scale lambda_t.
    p: (S, B) posterior p(c- | x_t) used at that step (NaN for rules without one).
    """

    t: Array
    lam: Array
    p: Array


def keys_from_seeds(seeds: Sequence[int] | np.ndarray) -> Array:
    """One PRNG key per sample from integer seeds: (N,) ints -> (N,) keys."""
    seeds = np.asarray(seeds)
    if seeds.ndim != 1:
        raise ValueError(f"seeds must be a 1-D sequence of ints, got shape {seeds.shape}")
    return jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))


def _as_keys(keys: Any) -> Array:
    keys = jnp.asarray(keys) if not isinstance(keys, jax.Array) else keys
    if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
        if keys.ndim != 1:
            raise ValueError(f"keys must be a 1-D batch of PRNG keys (one per sample), got shape {keys.shape}")
        return keys
    if keys.dtype == jnp.uint32 and keys.ndim == 2:
        return jax.random.wrap_key_data(keys)
    raise ValueError("keys must be (N,) typed PRNG keys (e.g. keys_from_seeds(range(N)) or "
                     f"jax.random.split(key, N)) or (N, 2) uint32 raw keys; got {keys.dtype} {keys.shape}")


def _check_prediction(name: str, eps: Array, x: Array) -> None:
    if eps.shape != x.shape:
        raise ValueError(f"denoiser {name} returned shape {eps.shape} for x of shape {x.shape}; "
                         "eps(x, t) must have the shape of x")


def _sample_impl(eps_u: Denoiser, eps_c: Optional[Denoiser], rule: GuidanceRule,
                 schedule: Schedule, keys: Array, shape: Tuple[int, ...],
                 return_trace: bool, variance: str):
    _TRACES["sample"] += 1
    batch = keys.shape[0]
    split = jax.vmap(jax.random.split)                       # (B,) -> (B, 2)
    normal = jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))

    keys = split(keys)
    x = normal(keys[:, 0])
    keys = keys[:, 1]
    state = rule.init(x)
    n = schedule.num_steps
    steps = Step(index=jnp.arange(n), t=schedule.timesteps, beta=schedule.betas,
                 alpha_bar=schedule.alpha_bars, alpha_bar_prev=schedule.alpha_bars_prev,
                 posterior_variance=schedule.posterior_variances,
                 warm=n - 1 - jnp.arange(n), is_last=jnp.arange(n) == 0)
    steps = jax.tree.map(lambda a: a[::-1], steps)           # noisiest step first

    def body(carry, step: Step):
        x, state, keys = carry
        t = jnp.broadcast_to(step.t, (batch,))
        e_u = eps_u(x, t)
        _check_prediction("eps_u", e_u, x)
        if rule.needs_second_prediction:
            e_c = eps_c(x, t)
            _check_prediction("eps_c", e_c, x)
        else:
            e_c = e_u
        eps, lam, state = rule.guide(state, x, e_u, e_c, step)
        p = rule.posterior(state, batch)                    # the posterior this step used
        keys = split(keys)
        z = normal(keys[:, 1])
        noise_scale = jnp.where(step.is_last, 0.0, jnp.sqrt(transition_variance(step, variance)))
        x_next = ddpm_mean(x, eps, step) + noise_scale * z
        state = rule.update(state, x, x_next, e_u, e_c, step)
        out = (lam, p) if return_trace else None
        return (x_next, state, keys[:, 0]), out

    (x, _, _), out = jax.lax.scan(body, (x, state, keys), steps)
    if return_trace:
        return x, Trace(t=steps.t, lam=out[0], p=out[1])
    return x


_sample_jit = jax.jit(_sample_impl, static_argnames=("shape", "return_trace", "variance"))


def _prepare(eps_u, eps_c, rule, shape, variance):
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
    eps_u = as_denoiser(eps_u)
    if not isinstance(rule, GuidanceRule):
        raise TypeError(f"rule must be a guidance rule from dngjax.guidance, got {type(rule).__name__}")
    if rule.needs_second_prediction:
        if eps_c is None:
            raise ValueError(f"{type(rule).__name__} combines two predictions: pass eps_c "
                             "(the unwanted concept's denoiser for NP/SLD/DNG, the condition's for CFG)")
        eps_c = as_denoiser(eps_c)
    else:
        eps_c = None
    shape = tuple(int(s) for s in shape)
    return eps_u, eps_c, shape


def sample(eps_u, schedule: Schedule, keys, shape: Sequence[int], *,
           rule: GuidanceRule = NoGuidance(), eps_c=None, return_trace: bool = False,
           variance: str = "beta"):
    """Ancestral DDPM sampling from x_T ~ N(0, I) with a guidance rule.

    x_{t-1} = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_t) + sigma_t z,
    with no noise at the final step, eps the rule's combination of eps_u and eps_c.

    Args:
      eps_u: unconditional denoiser eps(x, t) (a :class:`Denoiser` or a pure function).
      schedule: the chain, e.g. ``respace(linear_schedule(), 100)``.
      keys: (B,) PRNG keys, one per sample (see :func:`keys_from_seeds`).
      shape: per-sample shape, e.g. (28, 28, 1) or (d,).
      rule: guidance rule (default: none).
      eps_c: second denoiser (c- for NP/SLD/DNG, c for CFG); unused by NoGuidance.
      return_trace: also return a :class:`Trace` of lambda_t and p_t, (S, B) each.
      variance: the reverse step's noise variance sigma_t^2: ``"beta"`` (default) beta_t,
        DDPM's upper bound; ``"posterior"`` beta_tilde_t = beta_t (1 - alpha_bar_{t-1}) /
        (1 - alpha_bar_t), the lower bound, which leaves less residual noise on short
        respaced chains. Both are the chain's own (respaced) values.

    Returns:
      x_0 of shape (B, *shape), float32 (and the Trace).
    """
    eps_u, eps_c, shape = _prepare(eps_u, eps_c, rule, shape, variance)
    return _sample_jit(eps_u, eps_c, rule, schedule, _as_keys(keys), shape, return_trace, variance)


# --------------------------------------------------------------------------- sweeps

def _sweep_impl(eps_u, eps_c, rule, schedule, keys, shape, return_trace, grid_names, variance):
    axes = jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(rule),
        [0 if name in grid_names else None for name in rule.leaf_names])
    run = lambda r: _sample_impl(eps_u, eps_c, r, schedule, keys, shape, return_trace, variance)
    return jax.vmap(run, in_axes=(axes,))(rule)


_sweep_jit = jax.jit(_sweep_impl, static_argnames=("shape", "return_trace", "grid_names", "variance"))


def grid_rules(rule: GuidanceRule, grid: Mapping[str, Any]) -> Tuple[GuidanceRule, int]:
    """``rule`` with the leaves named in ``grid`` replaced by (K,) arrays; returns (rule, K)."""
    if not grid:
        raise ValueError("grid is empty: give at least one hyperparameter, e.g. grid={'scale': [1, 2, 4]}")
    unknown = [n for n in grid if n not in rule.leaf_names]
    if unknown:
        raise ValueError(f"{type(rule).__name__} has no hyperparameter {unknown}; "
                         f"choose among {list(rule.leaf_names)}")
    values = {n: np.asarray(v) for n, v in grid.items()}
    bad = {n: v.shape for n, v in values.items() if v.ndim != 1 or v.shape[0] == 0}
    if bad:
        raise ValueError(f"grid values must be non-empty 1-D arrays, got shapes {bad}")
    lengths = {n: v.shape[0] for n, v in values.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"grid leaves have mismatched lengths {lengths}: every swept "
                         "hyperparameter needs one value per grid point")
    return rule.replace(**values), next(iter(lengths.values()))


def sweep(eps_u, schedule: Schedule, keys, shape: Sequence[int], *, rule: GuidanceRule,
          grid: Mapping[str, Any], eps_c=None, chunk_size: Optional[int] = None,
          return_trace: bool = False, progress: bool = False, variance: str = "beta"):
    """Sample a K-point grid of hyperparameters times N seeds; result indexed [k, n].

    Every grid point uses the same N keys. All K x chunk samples run in one
    compiled, vmapped call; N is processed in chunks of ``chunk_size`` (the
    last chunk padded, so there is one compilation). With several devices the
    seed axis of each chunk is sharded over them.

    Args:
      grid: {hyperparameter name: (K,) values}, e.g. {"scale": [0, 1, 2, 4]}; all of length K.
      chunk_size: seeds per call (default: all N at once).
      progress: show a tqdm bar over chunks.
      variance: the reverse step's noise variance, as in :func:`sample`.
    Returns:
      numpy x of shape (K, N, *shape) (and a Trace with lam, p of shape (K, S, N)).
    """
    eps_u, eps_c, shape = _prepare(eps_u, eps_c, rule, shape, variance)
    rules, k = grid_rules(rule, grid)
    keys = _as_keys(keys)
    n = keys.shape[0]
    ndev = jax.device_count()
    chunk = n if chunk_size is None else int(chunk_size)
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    chunk = min(chunk, n)
    chunk = -(-chunk // ndev) * ndev                          # a multiple of the device count
    n_chunks = -(-n // chunk)
    sharding = None
    if ndev > 1:
        mesh = Mesh(np.asarray(jax.devices()), ("n",))
        sharding = NamedSharding(mesh, PartitionSpec("n"))
    names = tuple(sorted(grid))

    xs, lams, ps = [], [], []
    it = range(n_chunks)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc=f"sweep {type(rule).__name__} K={k} N={n}", unit="chunk")
    for c in it:
        idx = np.arange(c * chunk, (c + 1) * chunk) % n       # pad the last chunk by wrapping
        kc = keys[idx]
        if sharding is not None:
            kc = jax.device_put(kc, sharding)
        out = _sweep_jit(eps_u, eps_c, rules, schedule, kc, shape, return_trace, names, variance)
        valid = min(chunk, n - c * chunk)
        if return_trace:
            x, tr = out
            lams.append(np.asarray(tr.lam)[:, :, :valid])
            ps.append(np.asarray(tr.p)[:, :, :valid])
        else:
            x = out
        xs.append(np.asarray(x)[:, :valid])
    x = np.concatenate(xs, axis=1)
    if return_trace:
        t = np.asarray(schedule.timesteps)[::-1]
        return x, Trace(t=t, lam=np.concatenate(lams, axis=2), p=np.concatenate(ps, axis=2))
    return x
