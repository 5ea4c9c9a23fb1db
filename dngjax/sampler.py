"""Compiled guided sampling (ancestral DDPM or DDIM): one entry point for N seeds, and vmapped sweeps.

The whole trajectory is one ``jax.lax.scan`` inside one ``jax.jit``: the carry
holds the sample x (B, *shape), the guidance state (DNG's log-posterior (B,),
SLD's momentum (B, *shape)) and the per-sample PRNG keys (B,). Compiled once
per sample shape, denoiser function, rule type (and static fields) and chain
length; hyperparameters, params and keys are traced.

Sample i depends only on keys[i] and the rule's hyperparameters: x_T and every
step's noise are drawn from keys[i] alone, so results never depend on batch
size, chunking, position in the batch or other samples (up to float32 rounding
of the batched network: ``sweep(...)[k, n]`` and ``sample`` of seed n agree to
~1e-3 after 1000 steps, not bit for bit).

:func:`sample` and :func:`sweep` are the only sampling loops of the project:
with ``chunk_size`` they process the seeds in chunks of one compiled shape (the
last chunk padded), shard each chunk's seed axis over the devices (all the
processes' devices when several processes run the job, see :mod:`dngjax.distributed`),
and show a progress bar; :func:`sample_chunks` yields the chunks one by one for
callers that reduce them on the fly.
"""

from __future__ import annotations

import functools
from typing import Any, Iterator, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .denoiser import Denoiser, as_denoiser, to_eps
from .distributed import put_global, to_host
from .guidance import NoGuidance, PositiveMode, Rule, Step, Tangents, follows_protocol, member, step_mean
from .renames import variance_value
from .schedules import Schedule

Array = jnp.ndarray

#: Noise variance of the reverse step, ``noise=`` of :func:`sample` (see there; ``"posterior"`` is the
#: deprecated spelling of ``"beta_tilde"``).
NOISES = ("beta", "beta_tilde")
#: Largest sample size (number of values) for which a rule may ask for the exact divergence (one jvp each).
EXACT_DIVERGENCE_MAX_DIM = 256
#: divergence="finite_difference": the probe step delta = FD_STEP sqrt(1 - alpha_bar_t), small against the
#: noise level (the scale on which eps varies) and large against float32 rounding of eps.
FD_STEP = 1e-2


class Trace(NamedTuple):
    """Per-step record, in sampling order (first row = noisiest step).

    t: (S,) network timestep index. lam: (S, B) effective guidance scale lambda_t.
    p: (S, B) posterior p(c- | x_t) used at that step (NaN for rules without one).
    nonfinite: (S,) number of samples holding a non-finite value after that step (None where not recorded).
    (From :func:`sweep`: lam and p are (K, S, N), nonfinite (K, S).)
    """

    t: Array
    lam: Array
    p: Array
    nonfinite: Optional[Array] = None


class Chunk(NamedTuple):
    """One chunk of :func:`sample_chunks`: seeds ``start .. start + len - 1``.

    x: (m, *shape) -- or (K, m, *shape) for a grid. trace: a :class:`Trace` with lam, p of shape
    (S, m) -- or (K, S, m) -- when requested, else None. numpy arrays.
    """

    start: int
    x: np.ndarray
    trace: Optional[Trace]


def keys_from_seeds(seeds: Sequence[int] | np.ndarray) -> Array:
    """One PRNG key per sample from integer seeds in [0, 2^32): (N,) ints -> (N,) keys."""
    arr = np.asarray(seeds)
    if arr.ndim != 1:
        raise ValueError(f"seeds must be a 1-D sequence of ints, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"seeds must be integers, got {arr.dtype} values such as {arr.ravel()[:3].tolist()}")
    if arr.size and (arr.min() < 0 or arr.max() >= 2 ** 32):
        raise ValueError(f"seeds must lie in [0, 2^32) (a larger seed would wrap onto a smaller one's key); "
                         f"got min {arr.min()}, max {arr.max()}")
    return jax.vmap(jax.random.key)(jnp.asarray(arr.astype(np.uint32)))


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


def _prediction(name: str, fn: Denoiser, x: Array, t: Array, step: Step) -> Array:
    out = fn(x, t)
    if not hasattr(out, "shape") or out.shape != x.shape:
        got = f"shape {out.shape}" if hasattr(out, "shape") else f"a {type(out).__name__}"
        raise ValueError(f"{name} returned {got} for x of shape {x.shape}; "
                         "a denoiser eps(x, t) must return one array of the shape of x")
    return to_eps(out, x, fn.prediction, step.alpha_bar, step.one_minus_alpha_bar)


def chain_steps(schedule: Schedule, noise: str = "beta", eta: Optional[float] = None,
                solver: Optional[str] = None) -> Step:
    """The chain's transitions as a :class:`Step` of (S,) arrays, index 0 = least noisy step.

    The step x_t -> x_{t-1} is x_{t-1} = mean_x x_t + mean_eps eps + mean_x0_prev x0_prev + noise of
    variance noise_variance (x0_prev: the previous step's x_0 prediction; 0 but for DPM-Solver++(2M)).
      * ancestral DDPM (``eta=None``): mean_x = 1 / sqrt(alpha_t), mean_eps = -beta_t / (sqrt(1 - ab_t)
        sqrt(alpha_t)); variance beta_t (``noise="beta"``) or beta_tilde_t (``noise="beta_tilde"``);
      * DDIM (Song et al. 2021, eq. 12) with ``eta`` in [0, 1]: sigma^2 = eta^2 beta_tilde_t,
        x_{t-1} = sqrt(ab_{t-1}) x0_hat + sqrt(1 - ab_{t-1} - sigma^2) eps + sigma z, i.e.
        mean_x = 1 / sqrt(alpha_t), mean_eps = -(sigma^2 + beta_t / alpha_t) / (sqrt(1 - ab_{t-1} - sigma^2)
        + sqrt(1 - ab_t) / sqrt(alpha_t)) (the difference of the two eps terms, written without
        cancellation). eta = 1 is the ancestral step with ``noise="beta_tilde"``; eta = 0 is deterministic.
        k-diffusion's Euler and Euler ancestral steps are DDIM at eta = 0 and eta = 1 (the same steps,
        written in sigma = sqrt((1 - ab) / ab) and x / sqrt(ab)).
      * DPM-Solver++(2M) (``solver="dpmpp_2m"``; Lu et al. 2022, diffusers' DPMSolverMultistepScheduler with
        its defaults: midpoint, final step to sigma = 0 of first order): with a = sqrt(ab), s = sqrt(1 - ab),
        l = log(a / s), h = l_{t-1} - l_t, r = h_prev / h,
        x_{t-1} = (s_{t-1} / s_t) x_t + a_{t-1} (1 - e^-h) [(1 + 1/(2r)) x0_t - 1/(2r) x0_prev];
        first order (DDIM at eta = 0) at the first step and at the final step (to sigma = 0).
    No noise at the final step (index 0) in every case. Works on traced schedules (inside jit).
    """
    noise = variance_value(noise, "noise")
    n = schedule.num_steps
    beta, alpha = schedule.betas, schedule.alphas
    om, om_prev = schedule.one_minus_alpha_bars, schedule.one_minus_alpha_bars_prev
    beta_tilde = schedule.beta_tildes
    is_last = jnp.arange(n) == 0
    mean_x = 1.0 / jnp.sqrt(alpha)
    x0_prev = jnp.zeros((n,), jnp.float32)
    if solver == "dpmpp_2m":
        a, s, a_next, s_next = (jnp.sqrt(schedule.alpha_bars), jnp.sqrt(om), jnp.sqrt(schedule.alpha_bars_prev),
                                jnp.sqrt(om_prev))
        l_now = jnp.log(a) - jnp.log(s)
        h = jnp.log(a_next) - jnp.log(s_next) - l_now                 # +inf at the final step
        h_prev = jnp.concatenate([h[1:], jnp.full((1,), jnp.inf)])      # the previous step's h (noisier neighbour)
        first_order = (jnp.arange(n) == n - 1) | is_last
        c = jnp.where(first_order, 0.0, 0.5 * h / jnp.where(first_order, 1.0, h_prev))   # 1 / (2 r)
        k = a_next * -jnp.expm1(-h)                                    # a_{t-1} (1 - e^-h)
        mean_x = s_next / s + k * (1.0 + c) / a
        mean_eps = -k * (1.0 + c) * s / a
        x0_prev = -k * c
        var = jnp.zeros((n,), jnp.float32)
    elif eta is None:
        mean_eps = -beta / (jnp.sqrt(om) * jnp.sqrt(alpha))
        var = beta if noise == "beta" else beta_tilde
    else:
        var = float(eta) ** 2 * beta_tilde
        keep = jnp.maximum(om_prev * (1.0 - float(eta) ** 2 * beta / om), 0.0)   # 1 - ab_{t-1} - sigma^2
        mean_eps = -(var + beta / alpha) / (jnp.sqrt(keep) + jnp.sqrt(om) / jnp.sqrt(alpha))
    return Step(index=jnp.arange(n), t=schedule.timesteps, beta=beta, alpha_bar=schedule.alpha_bars,
                alpha_bar_prev=schedule.alpha_bars_prev, one_minus_alpha_bar=om, one_minus_alpha_bar_prev=om_prev,
                beta_tilde=beta_tilde, mean_x=mean_x, mean_eps=mean_eps,
                noise_variance=jnp.where(is_last, 0.0, var), steps_taken=n - 1 - jnp.arange(n), is_last=is_last,
                mean_x0_prev=x0_prev)


def _predictions(denoiser_u: Denoiser, denoiser_c, second: bool, k_cond: Optional[int], x: Array, t: Array,
                 step: Step):
    """(eps_u, eps_c) at x (B, *shape): the predictions a rule combines (the second network call only if it
    needs one; eps_c a tuple of K predictions for a rule over ``k_cond`` conditions)."""
    eps_u = _prediction("denoiser_u", denoiser_u, x, t, step)
    if not second:
        return eps_u, eps_u
    if k_cond is None:
        return eps_u, _prediction("denoiser_c", denoiser_c, x, t, step)
    return eps_u, tuple(_prediction(f"denoiser_c[{k}]", d, x, t, step) for k, d in enumerate(denoiser_c))


def _probe_keys(keys: Array) -> Array:
    """The probe directions' keys of a step: (B, 2) split keys -> (B,) keys (apart from the step noise's)."""
    return jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys[:, 1])


def _finite_difference_tangents(predictions, num_probes: int, probe_hint, state, x: Array, step: Step,
                                keys: Array):
    """(eps_u, eps_c, tangents) from finite differences eps(x + delta v) - eps(x), delta = FD_STEP
    sqrt(1 - alpha_bar): one batch of (K + 1) B images. keys: the step's (B, 2) split keys."""
    probes, weight = _probes(("hutchinson", num_probes), _probe_keys(keys), x, probe_hint(state))
    k = probes.shape[0]
    delta = FD_STEP * jnp.sqrt(step.one_minus_alpha_bar)
    xs = jnp.concatenate([x[None], x[None] + delta * probes]).reshape((-1,) + x.shape[1:])
    big_u, big_c = predictions(xs, jnp.broadcast_to(step.t, (xs.shape[0],)), step)
    split_k = lambda a: a.reshape((k + 1,) + x.shape)
    fd = lambda a: (split_k(a)[1:] - split_k(a)[:1]) / delta
    eps_u = split_k(big_u)[0]
    eps_c = jax.tree.map(lambda a: split_k(a)[0], big_c)
    return eps_u, eps_c, Tangents(probes, fd(big_u), jax.tree.map(fd, big_c), weight)


def _predictions_and_tangents(predictions, spec, probe_hint, state, x: Array, t: Array, step: Step, keys: Array):
    """(eps_u, eps_c, extra): the predictions at x_t (B, *shape) and the rule's extra ``guide`` arguments.

    For a rule that needs div(eps_c - eps_u) (the continuous-time DNG posterior; ``spec`` its tangent_spec)
    extra holds their derivatives along probe directions v_k (finite differences, or one jvp per prediction
    and probe), else it is {}. keys: the step's (B, 2) split keys (the probes use column 1).
    """
    if spec is None:
        eps_u, eps_c = predictions(x, t, step)
        return eps_u, eps_c, {}
    if spec[0] == "finite_difference":
        eps_u, eps_c, tangents = _finite_difference_tangents(predictions, spec[1], probe_hint, state, x, step, keys)
        return eps_u, eps_c, {"tangents": tangents}
    probes, weight = _probes(spec, _probe_keys(keys), x, probe_hint(state))
    f = lambda y: predictions(y, t, step)
    (eps_u, eps_c), (du, dc) = jax.vmap(lambda v: jax.jvp(f, (x,), (v,)), out_axes=(None, 0))(probes)
    return eps_u, eps_c, {"tangents": Tangents(probes, du, dc, weight)}


def _sample_impl(denoiser_u: Denoiser, denoiser_c: Optional[Denoiser], rule: Rule,
                 schedule: Schedule, keys: Array, shape: Tuple[int, ...], return_trace: bool, noise: str,
                 eta: Optional[float], x_T: Optional[Array] = None, solver: Optional[str] = None):
    """The whole guided chain as one scan: (x_0 (B, *shape), Trace) or (x_0, (S, B) non-finite flags)."""
    batch = keys.shape[0]
    split = jax.vmap(jax.random.split)                       # (B,) -> (B, 2)
    normal = jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))

    # x_T ~ N(0, I) from each sample's own key (or the x_T given); the rest of the key drives the step noise.
    keys = split(keys)
    x = normal(keys[:, 0]) if x_T is None else x_T.astype(jnp.float32)
    keys = keys[:, 1]
    state = rule.init(x)
    steps = jax.tree.map(lambda a: a[::-1], chain_steps(schedule, noise, eta, solver))   # noisiest step first

    spec = member(rule, "tangent_spec")()
    predictions = functools.partial(_predictions, denoiser_u, denoiser_c, member(rule, "needs_second_prediction"),
                                    member(rule, "num_conditions"))
    probe_hint, update, posterior = (member(rule, n) for n in ("probe_hint", "update", "posterior"))

    def body(carry, step: Step):
        x, state, keys, x0_prev = carry
        t = jnp.broadcast_to(step.t, (batch,))
        keys = split(keys)
        # 1. the predictions at x_t (and, for a rule that needs div(eps_c - eps_u), their tangents)
        eps_u, eps_c, extra = _predictions_and_tangents(predictions, spec, probe_hint, state, x, t, step, keys)
        # 2. the guided prediction, and the posterior the rule used for it (traces)
        eps, lam, state = rule.guide(state, x, eps_u, eps_c, step, **extra)
        p = posterior(state, batch)
        # 3. the step x_t -> x_{t-1} (ancestral DDPM, DDIM or DPM-Solver++(2M)): its mean plus noise (none at the end)
        z = normal(keys[:, 1])
        x_next = step_mean(x, eps, step, x0_prev) + jnp.sqrt(step.noise_variance) * z
        # 4. the rule sees the transition it caused (DNG's posterior update)
        state = update(state, x, x_next, eps_u, eps_c, step, **extra)
        # the x_0 prediction of this step, for the multistep solver's next step (only it carries one)
        x0 = None if x0_prev is None else (x - jnp.sqrt(step.one_minus_alpha_bar) * eps) / jnp.sqrt(step.alpha_bar)
        # samples with a non-finite value after this step (reported, never hidden)
        bad = ~jnp.all(jnp.isfinite(x_next.reshape(batch, -1)), axis=-1)
        return (x_next, state, keys[:, 0], x0), ((lam, p, bad) if return_trace else bad)

    x0_init = jnp.zeros_like(x) if solver == "dpmpp_2m" else None
    (x, _, _, _), out = jax.lax.scan(body, (x, state, keys, x0_init), steps)
    if return_trace:
        return x, Trace(t=steps.t, lam=out[0], p=out[1], nonfinite=out[2])   # nonfinite: (S, B) flags here
    return x, out                                                          # out: (S, B) non-finite flags


def _probes(spec, keys: Array, x: Array, hint: Optional[Array] = None):
    """(K, B, *shape) probe directions and the weight of their sum, for a rule's ``tangent_spec``.

    Hutchinson: Rademacher v_k, or with a rule's ``hint`` direction u (unit, per sample) w_k = u + P v_k,
    P = I - u u^T: still E[w^T J w] = u^T J u + tr(P J) = tr J, and where u is close to an eigenvector
    of J with a large eigenvalue (the posterior's sharp direction) its share of the estimate's variance
    (the off-diagonal of J along u) is gone.
    """
    kind, k = spec
    if kind == "exact":                                       # the basis vectors: the exact trace
        d = int(np.prod(x.shape[1:]))
        eye = jnp.eye(d, dtype=x.dtype).reshape((d, 1) + x.shape[1:])
        return jnp.broadcast_to(eye, (d,) + x.shape), 1.0
    draw = lambda key: jax.random.rademacher(key, (k,) + x.shape[1:], jnp.float32)
    v = jnp.swapaxes(jax.vmap(draw)(keys), 0, 1)
    if hint is not None:
        axes = tuple(range(1, x.ndim))
        norm = jnp.sqrt(jnp.sum(hint * hint, axis=axes, keepdims=True))
        u = jnp.where(norm > 0, hint / jnp.where(norm > 0, norm, 1.0), 0.0)          # (B, *shape)
        v = u[None] + v - jnp.sum(v * u[None], axis=tuple(range(2, v.ndim)), keepdims=True) * u[None]
    return v, 1.0 / k


class _RuleSplit(NamedTuple):
    """What of a rule is a compile-time constant (hashable): its tree structure (static fields included), its
    leaves that are no arrays (functions, strings, an object that is no pytree) by position, and for each
    array leaf whether a grid maps it."""

    treedef: Any
    constants: Tuple[Tuple[int, Any], ...]
    mapped: Tuple[bool, ...]

    def merge(self, arrays: Sequence[Any]):
        leaves = list(arrays)
        for i, leaf in self.constants:                      # ascending positions
            leaves.insert(i, leaf)
        return jax.tree_util.tree_unflatten(self.treedef, leaves)


def _is_array_leaf(leaf) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic, int, float, complex))


def _split_rule(rule, grid_names: Tuple[str, ...] = ()) -> Tuple[list, _RuleSplit]:
    """(array leaves, the rest) of a rule: the arrays are traced arguments of the compiled sampler, the rest
    is static, so any object that follows the :class:`~dngjax.guidance.Rule` protocol can be passed."""
    leaves, treedef = jax.tree_util.tree_flatten(rule)
    arrays = [i for i, leaf in enumerate(leaves) if _is_array_leaf(leaf)]
    constants = tuple((i, leaf) for i, leaf in enumerate(leaves) if not _is_array_leaf(leaf))
    mapped = (False,) * len(arrays)
    if grid_names:
        names = tuple(member(rule, "leaf_names"))
        if len(names) != len(leaves):
            raise ValueError(f"{type(rule).__name__}.leaf_names names {len(names)} leaves, its pytree has "
                             f"{len(leaves)}: a grid needs the names of its leaves, in order")
        mapped = tuple(names[i] in grid_names for i in arrays)
    try:
        hash(constants)
    except TypeError:
        raise TypeError(f"rule {type(rule).__name__}: its parts that are no arrays (here "
                        f"{[type(c).__name__ for _, c in constants]}) are compile-time constants and must be "
                        "hashable (make the rule a pytree whose hyperparameters are array leaves, or "
                        "hashable)") from None
    return [leaves[i] for i in arrays], _RuleSplit(treedef, constants, mapped)


def _grid_impl(denoiser_u, denoiser_c, rule_arrays, schedule, keys, shape, return_trace, noise, eta, grid_names,
               x_T=None, solver=None, rule_split: Optional[_RuleSplit] = None):
    """``_sample_impl`` vmapped over the rule leaves named in grid_names (none: no vmap); the rule is
    ``rule_split.merge(rule_arrays)`` (see :func:`_split_rule`)."""
    run = lambda arrays: _sample_impl(denoiser_u, denoiser_c, rule_split.merge(arrays), schedule, keys, shape,
                                      return_trace, noise, eta, x_T, solver)
    if not grid_names:
        return run(rule_arrays)
    return jax.vmap(run, in_axes=([0 if m else None for m in rule_split.mapped],))(rule_arrays)


_grid_impl_jit = jax.jit(_grid_impl, static_argnames=("shape", "return_trace", "noise", "eta", "grid_names", "solver",
                                                      "rule_split"))


class _GridJit:
    """The compiled sampler, called with a rule: ``_grid_jit(denoiser_u, denoiser_c, rule, schedule, keys, shape,
    return_trace, noise, eta, grid_names, x_T=None, solver=None)`` (and ``.lower`` with the same arguments).
    The rule's array leaves are traced, the rest of it is static (:func:`_split_rule`)."""

    @staticmethod
    def _args(denoiser_u, denoiser_c, rule, *args, **kwargs):
        names = kwargs["grid_names"] if "grid_names" in kwargs else args[6]
        arrays, split = _split_rule(rule, names)
        return (denoiser_u, denoiser_c, arrays) + args, dict(kwargs, rule_split=split)

    def __call__(self, *args, **kwargs):
        args, kwargs = self._args(*args, **kwargs)
        return _grid_impl_jit(*args, **kwargs)

    def lower(self, *args, **kwargs):
        args, kwargs = self._args(*args, **kwargs)
        return _grid_impl_jit.lower(*args, **kwargs)


_grid_jit = _GridJit()

#: ``solver=`` of :func:`sample`: the chain's step (see :func:`chain_steps`). None: ancestral DDPM, or DDIM
#: when ``eta`` is given. "euler" and "euler_ancestral" are DDIM at eta = 0 and 1 (the same steps).
SOLVERS = ("ddpm", "ddim", "dpmpp_2m", "euler", "euler_ancestral")


def _check_eta(eta, noise, solver=None):
    """(eta, solver) normalised: eta a float or None (ancestral step), solver None or "dpmpp_2m".

    DDIM takes its noise from eta, not from ``noise``; "ddim" without eta is eta = 0; "euler" is DDIM at
    eta = 0, "euler_ancestral" at eta = 1; "ddpm" is the ancestral step (no eta)."""
    if noise not in NOISES:
        raise ValueError(f"noise must be one of {NOISES}, got {noise!r}")
    if solver is not None:
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS} (or None), got {solver!r}")
        fixed = {"euler": 0.0, "euler_ancestral": 1.0, "dpmpp_2m": None, "ddpm": None}
        if solver in fixed and eta is not None:
            raise ValueError(f"solver={solver!r} has no eta (got eta={eta!r}): "
                             + ("it is DDIM at eta = %g" % fixed[solver] if fixed[solver] is not None
                                else "it is deterministic" if solver == "dpmpp_2m" else "it is the ancestral step"))
        if solver in ("dpmpp_2m", "ddpm"):
            if solver == "dpmpp_2m" and noise != "beta":
                raise ValueError(f"noise={noise!r} sets the ancestral step's variance; solver='dpmpp_2m' is deterministic")
            return None, (None if solver == "ddpm" else solver)
        eta = fixed.get(solver, 0.0 if eta is None else eta)
    if eta is None:
        return None, None
    try:
        eta = float(eta)
    except (TypeError, ValueError):
        raise ValueError(f"eta must be a number in [0, 1] (DDIM) or None (ancestral step), got {eta!r}") from None
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must lie in [0, 1], got {eta}")
    if noise != "beta":
        raise ValueError(f"noise={noise!r} sets the ancestral step's variance; DDIM's is eta^2 beta_tilde "
                         "(eta = 1 is noise='beta_tilde'): pass one of them")
    return eta, None


def _prepare(denoiser_u, denoiser_c, rule, shape, noise, eta, solver=None):
    eta, solver = _check_eta(eta, noise, solver)
    denoiser_u = as_denoiser(denoiser_u)
    if not follows_protocol(rule):
        raise TypeError(f"rule must follow the dngjax.Rule protocol (init(x) and guide(state, x_t, eps_u, eps_c, "
                        f"step) at least; e.g. a rule of dngjax.guidance), got {type(rule).__name__}")
    member(rule, "check_sampler")(noise, 0.0 if solver == "dpmpp_2m" else eta)   # (DPM-Solver++ is deterministic)
    if member(rule, "needs_second_prediction"):
        if denoiser_c is None:
            raise ValueError(f"{type(rule).__name__} combines two predictions: pass denoiser_c "
                             "(the negative concept's denoiser for NP/SLD/DNG, the condition's for CFG)")
        many = isinstance(denoiser_c, (list, tuple))
        k = member(rule, "num_conditions")
        if k is None:
            if many:
                raise ValueError(f"{type(rule).__name__} takes one denoiser_c, got a sequence of {len(denoiser_c)} "
                                 "(several concepts: MultiConcept(DynamicNegativeGuidance(...), K); c+ and c-: "
                                 "PositiveMode(rule))")
            denoiser_c = as_denoiser(denoiser_c)
        else:
            if not many or len(denoiser_c) != k:
                got = f"{len(denoiser_c)} denoisers" if many else "one denoiser"
                raise ValueError(f"{type(rule).__name__} needs denoiser_c = a sequence of {k} denoisers "
                                 f"({'c+ and c-' if isinstance(rule, PositiveMode) else 'one per concept'}); "
                                 f"got {got}")
            denoiser_c = tuple(as_denoiser(d) for d in denoiser_c)
    else:
        denoiser_c = None
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise ValueError(f"shape must be the per-sample shape, a sequence of ints, got {shape!r}") from None
    if not shape or min(shape) < 1:
        raise ValueError(f"shape must be a non-empty per-sample shape of positive sizes, got {shape}")
    spec = member(rule, "tangent_spec")()
    if spec is not None and spec[0] == "exact" and int(np.prod(shape)) > EXACT_DIVERGENCE_MAX_DIM:
        raise ValueError(f"divergence='exact' costs one jvp per dimension: {int(np.prod(shape))} for shape {shape}, "
                         f"above {EXACT_DIVERGENCE_MAX_DIM}; use divergence='hutchinson' (probes=K)")
    return denoiser_u, denoiser_c, shape, eta, solver


def grid_rules(rule: Rule, grid: Optional[Mapping[str, Any]]) -> Tuple[Rule, int, Tuple[str, ...]]:
    """``rule`` with the leaves named in ``grid`` replaced by (K,) arrays: (rule, K, sorted names).

    An empty grid is the rule itself: K = 1, no names.
    """
    if not grid:
        return rule, 1, ()
    leaf_names = member(rule, "leaf_names")
    unknown = [n for n in grid if n not in leaf_names]
    if unknown:
        raise ValueError(f"{type(rule).__name__} has no hyperparameter {unknown}; "
                         f"choose among {list(leaf_names)}")
    values = {n: np.asarray(v) for n, v in grid.items()}
    bad = {n: v.shape for n, v in values.items() if v.ndim != 1 or v.shape[0] == 0}
    if bad:
        raise ValueError(f"grid values must be non-empty 1-D arrays, got shapes {bad}")
    lengths = {n: v.shape[0] for n, v in values.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"grid leaves have mismatched lengths {lengths}: every swept "
                         "hyperparameter needs one value per grid point")
    return member(rule, "replace")(**values), next(iter(lengths.values())), tuple(sorted(grid))


def sample_chunks(denoiser_u, schedule: Schedule, keys, shape: Sequence[int], *,
                  rule: Rule = NoGuidance(), denoiser_c=None, grid: Optional[Mapping[str, Any]] = None,
                  chunk_size: Optional[int] = None, noise: str = "beta", eta: Optional[float] = None,
                  solver: Optional[str] = None,
                  return_trace: bool = False, progress: bool = False, desc: Optional[str] = None,
                  x_T=None) -> Iterator[Chunk]:
    """The samples of ``keys`` chunk by chunk, as :class:`Chunk` s (numpy), in seed order.

    Every chunk has the same compiled shape (``chunk_size`` seeds, rounded up to a multiple of the
    device count; the last chunk is padded by wrapping and cut back), so N seeds cost one
    compilation. With several devices each chunk's seed axis is sharded over them: over every process's
    devices when several processes run the job (:mod:`dngjax.distributed`; each process passes the same
    keys, every process gets the whole chunk back, and each seed's sample is the one a single process
    makes on as many devices). ``grid``: as in
    :func:`sweep` (then x is (K, m, ...)). ``x_T``: as in :func:`sample`. Arguments are validated
    before the first chunk runs.
    """
    noise = variance_value(noise, "noise")
    denoiser_u, denoiser_c, shape, eta, solver = _prepare(denoiser_u, denoiser_c, rule, shape, noise, eta, solver)
    rules, k, names = grid_rules(rule, grid)
    keys = _as_keys(keys)
    n = keys.shape[0]
    if n == 0:
        raise ValueError("keys is empty: nothing to sample")
    x_T = _check_x_T(x_T, n, shape)
    ndev = jax.device_count()                                  # every process's devices (one process: local)
    chunk = n if chunk_size is None else int(chunk_size)
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    chunk = -(-min(chunk, n) // ndev) * ndev                   # a multiple of the device count
    sharding = None
    if ndev > 1:
        sharding = NamedSharding(Mesh(np.asarray(jax.devices()), ("n",)), PartitionSpec("n"))
    axis = 1 if names else 0                                   # the seed axis of x (trace: axis + 1)
    t_order = np.asarray(schedule.timesteps)[::-1]            # sampling order
    starts = range(0, n, chunk)
    if progress:
        from tqdm.auto import tqdm
        label = desc or f"{type(rule).__name__}" + (f" K={k}" if names else "")
        starts = tqdm(starts, desc=f"{label} N={n}", unit="chunk", leave=False)
    for start in starts:
        idx = np.arange(start, start + chunk) % n              # pad the last chunk by wrapping
        kc = keys[idx]
        xc = None if x_T is None else x_T[idx]
        if sharding is not None:
            kc = put_global(kc, sharding)
            xc = None if xc is None else put_global(xc, sharding)
        out = _grid_jit(denoiser_u, denoiser_c, rules, schedule, kc, shape, return_trace, noise, eta, names, xc,
                        solver)
        m = min(chunk, n - start)
        cut = lambda a, ax: np.take(np.asarray(a), np.arange(m), axis=ax)
        x, tr = to_host(out)                                   # several processes: every one gets the whole chunk
        flags = cut(tr.nonfinite if return_trace else tr, axis + 1)        # (S, m) or (K, S, m)
        _warn_nonfinite(flags, t_order, start, m)
        if return_trace:
            yield Chunk(start, cut(x, axis), Trace(t=t_order, lam=cut(tr.lam, axis + 1), p=cut(tr.p, axis + 1),
                                                   nonfinite=flags.sum(-1)))
        else:
            yield Chunk(start, cut(x, axis), None)


class NonFiniteSamplesWarning(RuntimeWarning):
    """Some samples hold NaN or inf: the denoiser (or a guidance scale far too large) produced them."""


def _warn_nonfinite(flags: np.ndarray, t_order: np.ndarray, start: int, m: int) -> None:
    """Warn, naming the step where they first appear, if any sample of a chunk became non-finite.

    flags: (S, m) or (K, S, m) booleans, sample became non-finite after that step (sampling order).
    """
    flags = np.asarray(flags)
    per_sample = flags.any(axis=-2)                          # (m,) or (K, m)
    if not per_sample.any():
        return
    first = int(np.argmax(flags.reshape(-1, *flags.shape[-2:]).any(axis=(0, 2))))
    where = "" if flags.ndim == 2 else f" (at {int(per_sample.any(-1).sum())} of {flags.shape[0]} grid points)"
    import warnings
    warnings.warn(f"{int(per_sample.sum())} of {per_sample.size} samples (seeds {start}..{start + m - 1}){where} hold "
                  f"non-finite values, first after step {first + 1} of {flags.shape[-2]} (timestep {int(t_order[first])}): "
                  "a denoiser returned NaN/inf or a guidance scale is far too large",
                  NonFiniteSamplesWarning, stacklevel=3)


def _check_x_T(x_T, n: int, shape: Tuple[int, ...]):
    """x_T as a float32 array of shape (n, *shape), or None."""
    if x_T is None:
        return None
    if not hasattr(x_T, "shape") or tuple(x_T.shape) != (n, *shape):
        got = tuple(x_T.shape) if hasattr(x_T, "shape") else type(x_T).__name__
        raise ValueError(f"x_T must be one starting sample per key, shape {(n, *shape)}; got {got}")
    return jnp.asarray(x_T, jnp.float32) if isinstance(x_T, jax.Array) else np.asarray(x_T, np.float32)


def _gather(chunks: Iterator[Chunk], axis: int, return_trace: bool):
    parts = list(chunks)
    x = np.concatenate([c.x for c in parts], axis=axis)
    if not return_trace:
        return x
    t = parts[0].trace.t
    return x, Trace(t=t, lam=np.concatenate([c.trace.lam for c in parts], axis=axis + 1),
                    p=np.concatenate([c.trace.p for c in parts], axis=axis + 1),
                    nonfinite=sum(c.trace.nonfinite for c in parts))


def _sample_in_one_call(denoiser_u, denoiser_c, rule, schedule, keys, shape, return_trace, noise, eta, x_T, solver):
    """:func:`sample` without chunks, on one device (jax arrays; usable inside ``jax.jit``): (x_0 (N, *shape),
    the trace or None, the (S, N) non-finite flags), after the arguments' checks."""
    denoiser_u, denoiser_c, shape, eta, solver = _prepare(denoiser_u, denoiser_c, rule, shape, noise, eta, solver)
    keys = _as_keys(keys)
    x_T = _check_x_T(x_T, keys.shape[0], shape)
    x, tr = _grid_jit(denoiser_u, denoiser_c, rule, schedule, keys, shape, return_trace, noise, eta, (), x_T, solver)
    return (x, tr, tr.nonfinite) if return_trace else (x, None, tr)


def sample(denoiser_u, schedule: Schedule, keys, shape: Sequence[int], *,
           rule: Rule = NoGuidance(), denoiser_c=None, noise: str = "beta", eta: Optional[float] = None,
           solver: Optional[str] = None,
           return_trace: bool = False, chunk_size: Optional[int] = None, progress: bool = False, x_T=None):
    """Ancestral DDPM (or DDIM) sampling from x_T ~ N(0, I) with a guidance rule, one sample per key.

    x_{t-1} = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_t) + sigma_t z,
    with no noise at the final step, eps the rule's combination of eps_u = denoiser_u(x_t, t)
    and eps_c = denoiser_c(x_t, t) (converted to eps first if the denoisers predict x0 or v).
    With ``eta``, the DDIM step instead (:func:`chain_steps`).

    Args:
      denoiser_u: the unconditional denoiser eps(x, t) (a :class:`Denoiser` or a pure function).
      schedule: the chain, e.g. ``respace(linear_schedule(), 100)``.
      keys: (N,) PRNG keys, one per sample (see :func:`keys_from_seeds`).
      shape: per-sample shape, e.g. (28, 28, 1) or (d,).
      rule: the guidance rule (default: none): a rule of :mod:`dngjax.guidance`, a composition of them
        (:class:`~dngjax.guidance.PositiveMode`, :class:`~dngjax.guidance.MultiConcept`) or any object
        that follows the :class:`~dngjax.guidance.Rule` protocol.
      denoiser_c: the second denoiser (c- for NP/SLD/DNG, c for CFG); unused by NoGuidance; for a
        multi-concept or positive-mode rule a sequence of ``rule.num_conditions`` denoisers.
      noise: the reverse step's noise variance sigma_t^2: ``"beta"`` (default) beta_t, DDPM's
        upper bound; ``"beta_tilde"`` beta_tilde_t = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t),
        the lower bound, which leaves less residual noise on short respaced chains (``"posterior"``:
        its deprecated spelling). Both are the chain's own (respaced) values. (Not DNG's
        ``update_variance``: that is its update's sigma^2.)
      eta: None (default) for the ancestral step; a number in [0, 1] for DDIM with noise variance
        eta^2 beta_tilde_t (eta = 1 equals ``noise="beta_tilde"``; eta = 0 is deterministic, and
        refused by DNG's paper estimator, whose update needs the step's noise; its continuous-time
        estimators run there).
      solver: None (the ancestral step, or DDIM when ``eta`` is given), or one of "ddpm", "ddim" (eta
        default 0), "dpmpp_2m" (DPM-Solver++(2M), deterministic), "euler" / "euler_ancestral"
        (k-diffusion's steps: DDIM at eta = 0 / 1); see :func:`chain_steps`.
      return_trace: also return a :class:`Trace` of lambda_t and p_t, (S, N) each.
      chunk_size: process the seeds in chunks of this many (one compilation; sharded over the
        devices; see :func:`sample_chunks`). Default: all N in one call.
      progress: a progress bar over chunks.
      x_T: optional (N, *shape) starting samples instead of the N(0, I) draws of the keys (e.g. the
        latents another implementation started from); the keys still drive the step noise, which is
        the same as without x_T.

    Returns:
      x_0 of shape (N, *shape), float32 (and the Trace): jax arrays from one call when
      ``chunk_size`` is None, no progress bar and one device (usable inside ``jax.jit``); numpy
      arrays gathered from the chunks otherwise.
    """
    noise = variance_value(noise, "noise")
    if chunk_size is None and not progress and jax.device_count() == 1:
        x, tr, flags = _sample_in_one_call(denoiser_u, denoiser_c, rule, schedule, keys, shape, return_trace, noise,
                                           eta, x_T, solver)
        if not isinstance(flags, jax.core.Tracer):             # inside jit nothing can be checked
            _warn_nonfinite(np.asarray(flags), np.asarray(schedule.timesteps)[::-1], 0, flags.shape[-1])
        return (x, tr._replace(nonfinite=flags.sum(-1))) if return_trace else x
    chunks = sample_chunks(denoiser_u, schedule, keys, shape, rule=rule, denoiser_c=denoiser_c,
                           chunk_size=chunk_size, noise=noise, eta=eta, solver=solver, return_trace=return_trace,
                           progress=progress, x_T=x_T)
    return _gather(chunks, 0, return_trace)


def sweep(denoiser_u, schedule: Schedule, keys, shape: Sequence[int], *, rule: Rule,
          grid: Optional[Mapping[str, Any]], denoiser_c=None, noise: str = "beta", eta: Optional[float] = None,
          solver: Optional[str] = None,
          return_trace: bool = False, chunk_size: Optional[int] = None, progress: bool = False, x_T=None):
    """Sample a K-point grid of hyperparameters times N seeds; result indexed [k, n].

    Every grid point uses the same N keys. All K x chunk samples run in one compiled,
    vmapped call (see :func:`sample_chunks` for chunking and devices).

    Args:
      grid: {hyperparameter name: (K,) values}, e.g. {"scale": [0, 1, 2, 4]}; all of length K.
        An empty grid ({} or None) is the rule itself: K = 1.
      others: as in :func:`sample`.
    Returns:
      numpy x of shape (K, N, *shape) (and a Trace with lam, p of shape (K, S, N)).
    """
    chunks = sample_chunks(denoiser_u, schedule, keys, shape, rule=rule, denoiser_c=denoiser_c, grid=grid,
                           chunk_size=chunk_size, noise=noise, eta=eta, solver=solver, return_trace=return_trace,
                           progress=progress, x_T=x_T)
    if grid:
        return _gather(chunks, 1, return_trace)
    out = _gather(chunks, 0, return_trace)                    # no grid axis: add K = 1
    if return_trace:
        x, tr = out
        return x[None], Trace(t=tr.t, lam=tr.lam[None], p=tr.p[None], nonfinite=tr.nonfinite[None])
    return out[None]
