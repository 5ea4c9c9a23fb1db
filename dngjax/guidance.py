"""Guidance rules: how two noise predictions are combined at each DDPM step.

A rule is an immutable pytree whose hyperparameters are float32/int32 array
leaves, so ``jax.vmap`` can map over any of them (a grid of guidance scales,
temperatures, ...). Like an optax transformation it is a few pure functions
over a small state, the :class:`Rule` protocol:

* ``init(x) -> state``: the state for a batch ``x`` of shape (B, *sample_shape).
* ``guide(state, x_t, eps_u, eps_c, step) -> (eps, lam, state)``: the guided
  prediction (B, ...), the effective scale lambda_t per sample (B,), and the
  state after guiding (SLD's momentum).
* ``update(state, x_t, x_next, eps_u, eps_c, step) -> state``: after the DDPM
  step x_t -> x_next (DNG's posterior update).
* ``posterior(state, batch) -> p``: p(c- | x_t) per sample (B,), NaN for rules without one.

``eps_u`` and ``eps_c`` are predictions (arrays of the shape of x_t), the outputs
of the sampler's two denoisers at x_t: ``eps_u`` the unconditional one, ``eps_c``
the negative concept's eps(x | c-) for NP, SLD and DNG, the wanted condition's
eps(x | c) for CFG. ``step`` is a :class:`Step` with the chain's quantities.

A new rule subclasses :class:`GuidanceRule` (defaults: no state, no update, no
posterior) and is decorated with :func:`rule_class`, which makes it a frozen
dataclass and a pytree (array fields are leaves, ``static`` fields are not).
The sampler takes any other object that follows the protocol as well (a
NamedTuple of functions, a class of one's own): it needs ``init`` and ``guide``
and takes :class:`GuidanceRule`'s defaults for the members a rule leaves out.

Rules compose like optax transformations: :class:`PositiveMode` turns any rule
over (eps_u, eps_neg) into the positive-prompt mode (predictions null, c+, c-,
with classifier-free guidance toward c+), and :class:`MultiConcept` runs DNG's
tracked posterior for K concepts at once (a rule over K predictions). The
former generated classes (``PositiveDynamicNegativeGuidance``, ...,
``MultiConceptDynamicNegativeGuidance``) remain as deprecated constructors of
the composed rules.

Hyperparameters are checked on construction when they are concrete values:
illegal ones raise ``ValueError`` naming the parameter. (Inside jit/vmap,
with traced values, nothing can be checked.)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, NamedTuple, Optional, Protocol, Tuple, runtime_checkable

import numpy as np
import jax
import jax.numpy as jnp
from flax import struct

from .renames import renamed_fields, variance_value

Array = jnp.ndarray

#: sigma_t^2 of DNG's paper update (``DynamicNegativeGuidance(update_variance=...)``).
VARIANCES = ("beta_tilde", "beta", "step")

#: How tracked DNG estimates log p(c- | x_t) along the chain (``DynamicNegativeGuidance(estimator=...)``):
#: ``"paper"``: Alg. 2, the log-likelihood ratio of two Gaussian transitions (stochastic steps only);
#: ``"stratonovich"``: the continuous-time identity for log p_t(x | c-) / p_t(x) along the path, by the
#: trapezoid rule between the points where the chain evaluates its predictions (any path; the one for
#: deterministic samplers); ``"ito"``: the same identity by the left-point rule, whose divergence term is
#: weighted by (1 - the step's injected variance / its d lambda): ~0 on ancestral steps.
ESTIMATORS = ("paper", "stratonovich", "ito")
#: Where the Stratonovich estimator starts log r at x_T: 0 (``"prior"``, Alg. 1) or the Gaussian estimate.
STARTS = ("prior", "gaussian")
#: How the continuous-time estimators get div(eps_c - eps_u): Hutchinson's estimate v . J v from
#: ``probes`` Rademacher directions (one jvp per prediction and probe), the same from finite differences
#: eps(x + delta v) - eps(x) (one more network evaluation per prediction and probe, batched with the
#: plain one: cheaper than a jvp where the network's forward-mode derivative costs more than a pass), the exact trace (one jvp per
#: dimension: small samples only) or not at all (the Ito estimator on ancestral steps, where its weight is ~0).
DIVERGENCES = ("hutchinson", "finite_difference", "exact", "none")


@renamed_fields({"posterior_variance": "beta_tilde"})
@struct.dataclass
class Step:
    """Quantities of one transition x_t -> x_{t-1} of the chain (scalars; built by
    :func:`dngjax.sampler.chain_steps`).

    index: position in the chain (0 = least noisy). t: network timestep index.
    beta, alpha_bar, alpha_bar_prev, one_minus_alpha_bar, one_minus_alpha_bar_prev,
    beta_tilde: the chain's own values (beta_tilde = beta (1 - alpha_bar_prev) / (1 - alpha_bar);
    ``posterior_variance`` is its deprecated name).
    mean_x, mean_eps: the sampler's step is Gaussian, x_{t-1} ~ N(mean_x x_t + mean_eps eps,
    noise_variance I) (ancestral DDPM or DDIM; see :func:`step_mean`); noise_variance is 0 at the
    final step.
    steps_taken: number of steps already taken (0 at the first, noisiest step).
    is_last: True at the final step (index 0; no noise is added).
    """

    index: Array
    t: Array
    beta: Array
    alpha_bar: Array
    alpha_bar_prev: Array
    one_minus_alpha_bar: Array
    one_minus_alpha_bar_prev: Array
    beta_tilde: Array
    mean_x: Array
    mean_eps: Array
    noise_variance: Array
    steps_taken: Array
    is_last: Array
    mean_x0_prev: Array = 0.0


def step_mean(x: Array, eps: Array, step: Step, x0_prev: Optional[Array] = None) -> Array:
    """Mean of the sampler's step x_t -> x_{t-1} for a prediction eps: mean_x x + mean_eps eps
    (+ mean_x0_prev x0_prev for a multistep solver, x0_prev: the previous step's x_0 prediction).

    Ancestral DDPM: (x - beta / sqrt(1 - alpha_bar) eps) / sqrt(1 - beta).
    """
    mean = step.mean_x * x + step.mean_eps * eps
    return mean if x0_prev is None else mean + step.mean_x0_prev * x0_prev


class Tangents(NamedTuple):
    """Directional derivatives of the predictions at x_t, for rules whose posterior needs a divergence
    (what the sampler passes as ``tangents=`` to a rule whose :meth:`GuidanceRule.tangent_spec` is not None).

    probes: (K, B, *shape) directions v_k (Rademacher, or the basis vectors for the exact trace).
    eps_u: (K, B, *shape) J_u v_k, the derivative of eps_u along v_k. eps_c: the same for eps_c (a tuple
    for rules of several conditions). weight: 1 / K for Hutchinson's estimate, 1 for the exact trace.
    """

    probes: Array
    eps_u: Array
    eps_c: Any
    weight: float

    def divergence(self, du: Array, dc: Array) -> Array:
        """div(eps_c - eps_u) per sample (B,) from the tangents du, dc (K, B, *shape): weight sum_k v_k.(dc_k - du_k)."""
        axes = tuple(range(2, self.probes.ndim))
        return self.weight * jnp.sum(jnp.sum(self.probes * (dc - du), axis=axes), axis=0)


# --------------------------------------------------------------------------- helpers

def _is_concrete(v: Any) -> bool:
    return not isinstance(v, jax.core.Tracer) and isinstance(
        v, (int, float, np.ndarray, np.generic, jax.Array))


def _check(name: str, value: Any, ok: Callable[[np.ndarray], np.ndarray], what: str) -> None:
    if isinstance(value, jax.core.Tracer):
        return                                     # traced (inside jit/vmap): nothing to check
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError):
        arr = np.asarray(None)
    if arr.dtype.kind not in "iuf":        # None, strings, booleans, ragged or mixed lists
        raise ValueError(f"{name} must be a number or an array of numbers, got {value!r}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {value}")
    if not np.all(ok(arr)):
        raise ValueError(f"{name} must be {what}, got {value}")


def rule_class(cls):
    """Class decorator for guidance rules: a frozen dataclass and a pytree whose array fields are
    leaves (vmappable hyperparameters) and whose ``static()`` fields are compile-time constants.

    Unflattening bypasses ``__init__`` so that pytrees built by jax (vmap axes,
    tracers, ``None`` placeholders) are never validated or converted.
    """
    cls = dataclasses.dataclass(frozen=True)(cls)
    fields = dataclasses.fields(cls)
    leaf_names = tuple(f.name for f in fields if not f.metadata.get("static", False))
    static_names = tuple(f.name for f in fields if f.metadata.get("static", False))

    def flatten(obj):
        return (tuple(getattr(obj, n) for n in leaf_names),
                tuple(getattr(obj, n) for n in static_names))

    def unflatten(aux, children):
        obj = object.__new__(cls)
        for n, v in zip(leaf_names, children):
            object.__setattr__(obj, n, v)
        for n, v in zip(static_names, aux):
            object.__setattr__(obj, n, v)
        return obj

    jax.tree_util.register_pytree_node(cls, flatten, unflatten)
    inner_names = tuple(f.name for f in fields if f.metadata.get("rule", False))
    if inner_names:
        # a composed rule: its leaves are its inner rules' leaves (named by them) and its own, in field order
        def composed_leaf_names(self):
            return tuple(name for n in leaf_names
                         for name in (_leaf_names(getattr(self, n)) if n in inner_names else (n,)))
        cls.leaf_names = property(composed_leaf_names)
    else:
        cls.leaf_names = leaf_names
    return cls


def static(default=dataclasses.MISSING):
    """A rule field that is not a pytree leaf (a string option, a function): part of the compiled program."""
    return dataclasses.field(default=default, metadata={"static": True})


def inner(default=dataclasses.MISSING):
    """A rule field holding another rule (what a composed rule such as :class:`PositiveMode` wraps): a pytree
    child whose leaves, under their own names, join the composed rule's ``leaf_names``."""
    return dataclasses.field(default=default, metadata={"rule": True})


def _leaf_names(rule) -> Tuple[str, ...]:
    return tuple(member(rule, "leaf_names"))


def _as_leaf(obj, name: str, dtype=jnp.float32) -> None:
    v = getattr(obj, name)
    if _is_concrete(v) or isinstance(v, (list, tuple)):
        object.__setattr__(obj, name, jnp.asarray(v, dtype))


@runtime_checkable
class Rule(Protocol):
    """The guidance-rule protocol (what the sampler calls; shapes for a batch of B samples).

    The sampler needs ``init`` and ``guide``; for every other member a rule leaves out it takes
    :class:`GuidanceRule`'s default (needs the second prediction, one condition, no state update, no
    posterior, any sampler step, no derivatives, no probe hint; see :func:`member`). The rule is an
    argument of the compiled sampler: its array leaves (a pytree's) are traced, everything else (functions,
    strings, an object that is no pytree) is a compile-time constant and must be hashable. Sweeping a
    grid (:func:`dngjax.sweep`) also needs ``leaf_names`` (the names of its pytree leaves, in order;
    a NamedTuple's fields by default) and ``replace(**leaves)`` (a NamedTuple's ``_replace`` does).

    Attributes:
      needs_second_prediction: whether ``guide``/``update`` use eps_c (else the sampler skips the
        second network call and passes eps_u twice).
      num_conditions: None for rules of one second prediction (eps_c is an array); K >= 1 for rules
        of K conditional predictions (the sampler takes K denoisers as ``denoiser_c`` and eps_c is a
        tuple of K predictions): K concepts to avoid, or (c+, c-) in the positive-prompt mode.
      leaf_names: the hyperparameters that are pytree leaves (what ``sweep`` can grid over).
    """

    needs_second_prediction: bool
    num_conditions: Any
    leaf_names: Tuple[str, ...]

    def init(self, x: Array) -> Any:
        """Initial state for the batch x_T (B, *shape): e.g. DNG's log prior (B,), SLD's zero momentum."""

    def guide(self, state: Any, x_t: Array, eps_u: Array, eps_c: Array, step: "Step") -> Tuple[Array, Array, Any]:
        """(eps (B, *shape), lambda_t (B,), state): the prediction the step uses at x_t."""

    def update(self, state: Any, x_t: Array, x_next: Array, eps_u: Array, eps_c: Array, step: "Step") -> Any:
        """The state after the transition x_t -> x_next (DNG: the posterior update of Alg. 2)."""

    def posterior(self, state: Any, batch: int) -> Array:
        """p(c- | x_t) (B,) that the last ``guide`` used; NaN for rules that track none."""

    def check_sampler(self, noise: str, eta: Any) -> None:
        """Raise ValueError, before sampling, if the rule cannot run on this sampler step
        (``noise``/``eta`` of :func:`dngjax.sample`); e.g. DNG's update on a deterministic step."""

    def tangent_spec(self) -> Optional[Tuple[str, int]]:
        """None, or what the rule needs of the predictions' derivatives: ("hutchinson", K),
        ("finite_difference", K) or ("exact", 0). The sampler then also passes ``tangents=`` (a
        :class:`Tangents`) to ``guide`` and ``update``."""

    def probe_hint(self, state: Any) -> Optional[Array]:
        """None, or a direction (B, *shape) that Hutchinson's probes should contain (see ``sampler._probes``)."""


class GuidanceRule:
    """Base class of the shipped rules (implements :class:`Rule`): no state, no update, no posterior."""

    #: whether the rule needs the second prediction eps_c (the sampler skips that call if not).
    needs_second_prediction: ClassVar[bool] = True
    #: None: eps_c is one prediction; K: a tuple of K predictions (multi-concept, positive-prompt mode).
    num_conditions = None

    def init(self, x: Array) -> Any:
        return ()

    def guide(self, state, x_t: Array, eps_u: Array, eps_c: Array, step: Step) -> Tuple[Array, Array, Any]:
        raise NotImplementedError

    def update(self, state, x_t: Array, x_next: Array, eps_u: Array, eps_c: Array, step: Step) -> Any:
        return state

    def posterior(self, state, batch: int) -> Array:
        """p(c- | x_t) per sample (B,) for rules that track it; NaN otherwise."""
        return jnp.full((batch,), jnp.nan, jnp.float32)

    def check_sampler(self, noise: str, eta: Any) -> None:
        """Every sampler step is fine (rules whose state depends on the step's noise override this)."""

    def tangent_spec(self) -> Optional[Tuple[str, int]]:
        """No derivatives of the predictions needed."""
        return None

    def probe_hint(self, state) -> Optional[Array]:
        """No preferred probe direction."""
        return None

    def replace(self, **changes):
        """A copy with some hyperparameters changed (validated like the constructor)."""
        return dataclasses.replace(self, **changes)


_MEMBER_DEFAULTS = {"needs_second_prediction": True, "num_conditions": None}


def member(rule, name: str):
    """``rule``'s :class:`Rule` member ``name``, or :class:`GuidanceRule`'s default where the rule has none
    (for rules that follow the protocol without subclassing :class:`GuidanceRule`; methods come back bound)."""
    value = getattr(rule, name, None)
    if value is not None:
        return value
    if name in _MEMBER_DEFAULTS:
        return _MEMBER_DEFAULTS[name]
    is_named_tuple = isinstance(rule, tuple) and hasattr(rule, "_fields")
    if name == "leaf_names":
        return tuple(rule._fields) if is_named_tuple else ()
    if name == "replace" and is_named_tuple:
        return rule._replace
    return getattr(GuidanceRule, name).__get__(rule)


def follows_protocol(rule) -> bool:
    """Whether ``rule`` has what the sampler needs of a :class:`Rule`: callable ``init`` and ``guide``."""
    return callable(getattr(rule, "init", None)) and callable(getattr(rule, "guide", None))


def _per_sample(scale: Array, like: Array) -> Array:
    """Broadcast a scalar or (B,) scale against a (B, ...) array."""
    scale = jnp.asarray(scale)
    return scale.reshape(scale.shape + (1,) * (like.ndim - scale.ndim))


# --------------------------------------------------------------------------- rules

@rule_class
class NoGuidance(GuidanceRule):
    """eps = eps_u; lambda_t = 0."""

    needs_second_prediction: ClassVar[bool] = False

    def guide(self, state, x_t, eps_u, eps_c, step):
        return eps_u, jnp.zeros((eps_u.shape[0],), jnp.float32), state


@rule_class
class NegativePrompting(GuidanceRule):
    """Negative prompting: eps = eps_u - scale (eps_neg - eps_u), lambda_t = scale."""

    scale: Any = 1.0

    def __post_init__(self):
        _check("scale", self.scale, lambda a: a >= 0, ">= 0")
        _as_leaf(self, "scale")

    def guide(self, state, x_t, eps_u, eps_c, step):
        eps = eps_u - _per_sample(self.scale, eps_u) * (eps_c - eps_u)
        return eps, jnp.broadcast_to(self.scale, (eps_u.shape[0],)).astype(jnp.float32), state


@rule_class
class ClassifierFreeGuidance(GuidanceRule):
    """Classifier-free guidance toward a condition: eps = eps_u + scale (eps_cond - eps_u)."""

    scale: Any = 1.0

    def __post_init__(self):
        _check("scale", self.scale, lambda a: a >= 0, ">= 0")
        _as_leaf(self, "scale")

    def guide(self, state, x_t, eps_u, eps_c, step):
        eps = eps_u + _per_sample(self.scale, eps_u) * (eps_c - eps_u)
        return eps, jnp.broadcast_to(self.scale, (eps_u.shape[0],)).astype(jnp.float32), state


@rule_class
class SafeLatentDiffusion(GuidanceRule):
    """Safe Latent Diffusion (Schramowski et al. 2023), as in the DNG paper's appendix E.

    d = eps_u - eps_neg; mask = where(d < threshold, min(1, s_s |d|), 0) element-wise;
    corr = -mask d + s_m m; m <- beta_m m + (1 - beta_m) corr; eps = eps_u - scale corr,
    except during the first ``warmup`` steps where eps = eps_u (the momentum still
    accumulates, as in the reference implementation). State: the momentum m, shape of x.
    The reported lambda_t is scale * mean(mask) per sample (0 during warm-up).
    """

    scale: Any = 1.0
    threshold: Any = 0.04
    s_s: Any = 100.0
    beta_m: Any = 0.2
    s_m: Any = 0.1
    warmup: Any = 0

    def __post_init__(self):
        _check("scale", self.scale, lambda a: a >= 0, ">= 0")
        _check("threshold", self.threshold, lambda a: np.ones_like(a, bool), "a number")
        _check("s_s", self.s_s, lambda a: a >= 0, ">= 0")
        _check("beta_m", self.beta_m, lambda a: (a >= 0) & (a <= 1), "in [0, 1]")
        _check("s_m", self.s_m, lambda a: a >= 0, ">= 0")
        _check("warmup", self.warmup, lambda a: (a >= 0) & (a == np.round(a)), "an integer >= 0")
        for n in ("scale", "threshold", "s_s", "beta_m", "s_m"):
            _as_leaf(self, n)
        _as_leaf(self, "warmup", jnp.int32)

    def init(self, x):
        return jnp.zeros_like(x)

    def guide(self, momentum, x_t, eps_u, eps_c, step):
        d = eps_u - eps_c
        mask = jnp.where(d < _per_sample(self.threshold, d),
                         jnp.minimum(1.0, _per_sample(self.s_s, d) * jnp.abs(d)), 0.0)
        corr = -mask * d + _per_sample(self.s_m, d) * momentum
        beta_m = _per_sample(self.beta_m, d)
        momentum = beta_m * momentum + (1.0 - beta_m) * corr
        active = step.steps_taken >= self.warmup
        scale = jnp.where(active, self.scale, 0.0)
        eps = eps_u - _per_sample(scale, eps_u) * corr
        lam = jnp.broadcast_to(scale, (eps_u.shape[0],)) * mask.reshape(mask.shape[0], -1).mean(-1)
        return eps, lam.astype(jnp.float32), momentum


@renamed_fields({"variance": "update_variance"})
@rule_class
class DynamicNegativeGuidance(GuidanceRule):
    """Dynamic Negative Guidance (Koulischer et al., ICLR 2025, Alg. 1-2), with a choice of posterior estimator.

    State: log p(c- | x_t) per sample, initialised to log(prior) at x_T.
    Guidance: eps = eps_u - lambda_t (eps_neg - eps_u), lambda_t = scale p / (1 - p) (Eq. 10).
    The tracked log p is clamped to [log p_min, log p_max] after every update.

    ``estimator="paper"`` (default; Alg. 2): after x_t -> x_{t-1}, with mu_u, mu_neg the means of the
    sampler's step (ancestral DDPM or DDIM, :func:`step_mean`) for eps_u, eps_neg at x_t,
        log p += (-temperature (|x_{t-1} - mu_neg|^2 - |x_{t-1} - mu_u|^2) + offset) / (2 sigma_t^2).
    ``update_variance`` chooses sigma_t^2 (``variance`` and the value ``"posterior"`` are its deprecated
    spellings):
      * ``"beta_tilde"`` (default): beta_tilde_t = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t),
        and beta_t at the final step (where beta_tilde is 0) -- what the authors' code uses
        and what produced the paper's numbers;
      * ``"beta"``: beta_t, as written in the paper's Alg. 2;
      * ``"step"``: the variance of the step actually sampled (beta_t or beta_tilde_t for the
        ancestral step, eta^2 beta_tilde_t for DDIM; beta_t at the final step): the exact
        log-likelihood ratio of the two Gaussian transitions.
    It needs a stochastic step: on DDIM with eta = 0 x_{t-1} - mu_u is the guidance's own shift, the
    update carries no evidence about c-, and the sampler refuses it there.

    ``estimator="stratonovich"`` or ``"ito"`` (continuous time; any sampler, deterministic ones included).
    With r_t(x) = p_t(x | c-) / p_t(x), lambda = -log alpha_bar and the scores s = -eps / sqrt(1 - alpha_bar),
    both densities obey the Fokker-Planck equation of the forward process, so along any path x(lambda)
        d log r = g . dx + h d lambda,  g = s_neg - s_u,  h = 1/2 [g . (x + s_neg + s_u) + div g]
    (Stratonovich calculus; docs/samplers.md derives it), and log p = log prior + log r, started at x_T
    (``start``) from log r_T = 0 as in Alg. 1 (``"prior"``, the default) or from the Gaussian estimate
    log r_T ~ (|s_u|^2 - |s_c|^2) / 2 (``"gaussian"``: both noised densities ~ Gaussian of covariance I there;
    exact to O(alpha_bar_T) for consistent scores, e.g. analytic mixtures, whose deterministic paths keep any
    start error to the end; from two learned networks it carries their error times |x_T| ~ sqrt(d):
    4.7 units of log r too low on MNIST's removed class, docs/samplers.md).
      * ``"stratonovich"``: the trapezoid rule between consecutive points where the chain evaluates its
        predictions: at x_k, log p += temperature [1/2 (g_{k-1} + g_k) . (x_k - x_{k-1})
        + 1/2 (h_{k-1} + h_k) (lambda_k - lambda_{k-1})], so the posterior that guides step k is already
        the one at x_k. Valid on every path (second order on smooth, deterministic ones).
      * ``"ito"``: the left-point rule after each step x_t -> x_{t-1}, the injected noise's variance
        sigma^2 taking part of the divergence: log p += temperature [g_t . (x_{t-1} - x_t)
        + 1/2 g_t . (x_t + s_neg + s_u) d lambda + 1/2 div g_t (d lambda + sigma^2)], d lambda < 0.
        On ancestral steps (sigma^2 = beta_t ~ -d lambda) the divergence drops out: the paper's update
        is this estimator to first order.
    The divergence div g = -div(eps_neg - eps_u) / sqrt(1 - alpha_bar) comes from the sampler as jvps of the
    two predictions (``divergence="hutchinson"``: Hutchinson's estimate from ``probes`` Rademacher
    directions per sample and step, shared by the two predictions; ``"finite_difference"``: the same
    estimate with (eps(x + delta v) - eps(x)) / delta in place of the jvp, delta = 1e-2 sqrt(1 - alpha_bar),
    the extra evaluations batched with the plain ones; ``"exact"``: one jvp per dimension,
    small samples only; ``"none"``: dropped, for the Ito estimator on ancestral steps). The cost per step
    is the predictions' jvps instead of their plain evaluation. ``hold_below``: a noise level
    sigma = sqrt(1 - alpha_bar) under which the posterior is held (no increments from points with
    sigma < hold_below): the identity's terms grow like 1 / sigma^2 while two learned networks' eps differ
    by their own errors there, so at low noise the increments measure the networks, not the concept
    (docs/samplers.md); 0 (the default) tracks to the end. ``temperature`` scales the increments
    (1 = the identity, the default to use); ``offset`` and ``update_variance`` belong to the paper's update and
    must keep their defaults. The state also carries the previous point's x, g and h (Stratonovich).

    Degenerate settings: ``temperature=0`` (with offset 0) freezes p at the prior: DNG is then NP with
    lambda = scale prior / (1 - prior); ``scale=0`` is no guidance (p is still tracked and traced).
    """

    scale: Any = 1.0
    prior: Any = 0.25
    temperature: Any = 0.25
    offset: Any = 0.0
    p_min: Any = 1e-6
    p_max: Any = 0.99
    hold_below: Any = 0.0
    update_variance: str = static("beta_tilde")
    estimator: str = static("paper")
    divergence: str = static("finite_difference")
    probes: int = static(1)
    start: str = static("prior")

    def __post_init__(self):
        _check_dng_leaves(self)

    def init(self, x):
        log_p = jnp.broadcast_to(jnp.log(self.prior), (x.shape[0],)).astype(jnp.float32)
        if self.estimator != "stratonovich":
            return log_p
        zeros = jnp.zeros((x.shape[0],), jnp.float32)
        return (log_p, jnp.zeros_like(x), jnp.zeros_like(x), zeros, zeros)    # log p, x_prev, g_prev, h_prev, lambda_prev

    def tangent_spec(self):
        if self.estimator == "paper" or self.divergence == "none":
            return None
        return ("exact", 0) if self.divergence == "exact" else (self.divergence, int(self.probes))

    def probe_hint(self, state):
        """Stratonovich: g = s_neg - s_u at the previous point, the direction in which the posterior is sharp."""
        return state[2] if self.estimator == "stratonovich" and self.divergence != "exact" else None

    def guide(self, state, x_t, eps_u, eps_c, step, tangents=None):
        if self.estimator == "stratonovich":
            log_p, x_prev, g_prev, h_prev, lam_prev = state
            g, h, lam_now = _path_terms(self, x_t, eps_u, eps_c, step, tangents)
            axes = tuple(range(1, x_t.ndim))
            inc = (0.5 * jnp.sum((g_prev + g) * (x_t - x_prev), axis=axes)
                   + 0.5 * (h_prev + h) * (lam_now - lam_prev))
            if self.start == "gaussian":
                # both noised densities ~ Gaussian of covariance ~ I at x_T (s = m - x):
                # log r_T(x) ~ -(|x - m_c|^2 - |x - m_u|^2) / 2 = (|s_u|^2 - |s_c|^2) / 2
                first = 0.5 * jnp.sum((eps_u * eps_u - eps_c * eps_c), axis=axes) / step.one_minus_alpha_bar
            else:
                first = jnp.zeros_like(inc)                # log r_T = 0: p_T = prior (Alg. 1)
            inc = jnp.where(step.steps_taken > 0, inc, first)
            held = (step.steps_taken > 0) & (step.one_minus_alpha_bar < self.hold_below ** 2)
            inc = _finite_or_zero(self.temperature * jnp.where(held, 0.0, inc))
            log_p = jnp.clip(log_p + inc, jnp.log(self.p_min), jnp.log(self.p_max))
            state = (log_p, x_t, g, h, jnp.broadcast_to(lam_now, log_p.shape).astype(jnp.float32))
        else:
            log_p = state
        lam = self.scale * _odds(log_p)
        eps = eps_u - _per_sample(lam, eps_u) * (eps_c - eps_u)
        return eps, lam.astype(jnp.float32), state

    def check_sampler(self, noise, eta):
        if self.estimator == "paper" and eta is not None and float(eta) == 0.0:
            raise ValueError(f"{type(self).__name__} with the paper's estimator needs a stochastic step: DDIM with "
                             "eta = 0 adds no noise, so its posterior update would see no evidence; use "
                             "estimator='stratonovich' (the continuous-time posterior, any sampler) or eta > 0")

    def update(self, state, x_t, x_next, eps_u, eps_c, step, tangents=None):
        if self.estimator == "stratonovich":
            return state                                   # updated at the next point, in guide
        if self.estimator == "ito":
            g, h, lam_now = _path_terms(self, x_t, eps_u, eps_c, step, tangents, divergence_weight=False)
            d_lam = -jnp.log(step.alpha_bar_prev) - lam_now
            axes = tuple(range(1, x_t.ndim))
            inc = jnp.sum(g * (x_next - x_t), axis=axes) + h * d_lam
            if tangents is not None:
                inc = inc + 0.5 * _div_g(x_t, eps_u, eps_c, step, tangents) * (d_lam + step.noise_variance)
            held = step.one_minus_alpha_bar_prev < self.hold_below ** 2
            increment = _finite_or_zero(self.temperature * jnp.where(held, 0.0, inc))
        else:
            increment = _log_likelihood_ratio(self, x_t, x_next, eps_u, eps_c, step)
        return jnp.clip(state + increment, jnp.log(self.p_min), jnp.log(self.p_max))

    def posterior(self, state, batch):
        return jnp.exp(state[0] if isinstance(state, tuple) else state)


def _finite_or_zero(a: Array) -> Array:
    """NaN increments (from non-finite predictions) leave log p unchanged; +-inf are absorbed by the clamp."""
    return jnp.where(jnp.isnan(a), 0.0, a)


def _div_g(x_t, eps_u, eps_c, step, tangents: Tangents) -> Array:
    """div g = div(s_neg - s_u) = -div(eps_neg - eps_u) / sqrt(1 - alpha_bar), per sample (B,)."""
    return -tangents.divergence(tangents.eps_u, tangents.eps_c) / jnp.sqrt(step.one_minus_alpha_bar)


def _path_terms(rule, x_t, eps_u, eps_c, step, tangents, divergence_weight: bool = True):
    """(g (B, *shape), h (B,), lambda ()) of the continuous-time identity at x_t (see DynamicNegativeGuidance).

    g = s_neg - s_u; h = 1/2 [g . (x + s_neg + s_u) + div g] (without the divergence when
    ``divergence_weight`` is False or the rule takes none); lambda = -log alpha_bar.
    """
    inv_sigma = 1.0 / jnp.sqrt(step.one_minus_alpha_bar)
    g = -(eps_c - eps_u) * inv_sigma
    s_sum = -(eps_c + eps_u) * inv_sigma
    h = 0.5 * jnp.sum(g * (x_t + s_sum), axis=tuple(range(1, x_t.ndim)))
    if divergence_weight and tangents is not None:
        h = h + 0.5 * _div_g(x_t, eps_u, eps_c, step, tangents)
    return g, h, -jnp.log(step.alpha_bar)


def _check_dng_leaves(rule) -> None:
    """Validation shared by the tracked DNG rules (one concept or several)."""
    _check("scale", rule.scale, lambda a: a >= 0, ">= 0")
    _check("prior", rule.prior, lambda a: (a > 0) & (a < 1), "in (0, 1)")
    _check("temperature", rule.temperature, lambda a: a >= 0, ">= 0")
    _check("offset", rule.offset, lambda a: np.ones_like(a, bool), "a number")
    _check("p_min", rule.p_min, lambda a: a > 0, "> 0")
    _check("p_max", rule.p_max, lambda a: a < 1, "< 1")
    if _is_concrete(rule.p_min) and _is_concrete(rule.p_max):
        if np.any(np.asarray(rule.p_min) >= np.asarray(rule.p_max)):
            raise ValueError(f"p_min must be < p_max, got p_min={rule.p_min}, p_max={rule.p_max}")
        if _is_concrete(rule.prior) and np.any((np.asarray(rule.prior) > np.asarray(rule.p_max))
                                               | (np.asarray(rule.prior) < np.asarray(rule.p_min))):
            raise ValueError(f"prior must lie in [p_min, p_max] = [{rule.p_min}, {rule.p_max}] (the clamp of "
                             f"the tracked posterior), got prior={rule.prior}")
    object.__setattr__(rule, "update_variance", variance_value(rule.update_variance, "update_variance", 5))
    if rule.update_variance not in VARIANCES:
        raise ValueError(f"update_variance must be one of {VARIANCES}, got {rule.update_variance!r}")
    estimator = getattr(rule, "estimator", "paper")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    divergence = getattr(rule, "divergence", "finite_difference")
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    probes = getattr(rule, "probes", 1)
    if not isinstance(probes, (int, np.integer)) or isinstance(probes, bool) or probes < 1:
        raise ValueError(f"probes must be an integer >= 1 (Hutchinson directions per sample and step), got {probes!r}")
    if estimator != "paper":
        if _is_concrete(rule.offset) and np.any(np.asarray(rule.offset) != 0):
            raise ValueError(f"offset belongs to the paper's update; estimator={estimator!r} takes none (got "
                             f"offset={rule.offset}): leave it at 0")
        if rule.update_variance != "beta_tilde":
            raise ValueError(f"update_variance belongs to the paper's update; estimator={estimator!r} takes none (got "
                             f"update_variance={rule.update_variance!r}): leave the default")
        if estimator == "stratonovich" and divergence == "none":
            raise ValueError("estimator='stratonovich' needs the divergence at full weight on every path: "
                             "divergence='hutchinson' or 'exact' (only 'ito' on ancestral steps may drop it)")
    start = getattr(rule, "start", "prior")
    if start not in STARTS:
        raise ValueError(f"start must be one of {STARTS}, got {start!r}")
    if start != "prior" and estimator != "stratonovich":
        raise ValueError(f"start={start!r} belongs to estimator='stratonovich' (the others start at the prior)")
    hold = getattr(rule, "hold_below", 0.0)
    _check("hold_below", hold, lambda a: (a >= 0) & (a < 1), "a noise level sqrt(1 - alpha_bar) in [0, 1)")
    if estimator == "paper" and _is_concrete(hold) and np.any(np.asarray(hold) != 0):
        raise ValueError(f"hold_below belongs to the continuous-time estimators (got hold_below={hold} with "
                         "estimator='paper'): leave it at 0")
    for n in ("scale", "prior", "temperature", "offset", "p_min", "p_max") + (("hold_below",) if hasattr(rule, "hold_below") else ()):
        _as_leaf(rule, n)


def _log_likelihood_ratio(rule, x_t, x_next, eps_u, eps_c, step) -> Array:
    """Alg. 2's increment of log p(c | x) for the transition x_t -> x_next, per sample (B,)."""
    # |x' - mu_c|^2 - |x' - mu_u|^2 = b.(2a + b) with a = x' - mu_u, b = mu_u - mu_c
    # = -mean_eps (eps_c - eps_u): no cancellation between two nearly equal squared norms.
    a = x_next - step_mean(x_t, eps_u, step)
    b = -step.mean_eps * (eps_c - eps_u)
    sq_diff = jnp.sum(b * (2.0 * a + b), axis=tuple(range(1, x_t.ndim)))
    sigma2 = transition_variance(step, rule.update_variance)
    # +-inf increments (possible when sigma2 is tiny) are absorbed by the clamp; NaN never arises
    # from finite inputs, but is mapped to "no change" rather than poisoning the chain.
    return _finite_or_zero((-rule.temperature * sq_diff + rule.offset) / (2.0 * sigma2))


def _cap_total(log_p: Array, log_p_max) -> Tuple[Array, Array]:
    """(log p_k scaled down together so that P = sum_k p_k <= p_max, log P after the cap); log_p (B, K)."""
    lse = jax.scipy.special.logsumexp(log_p, axis=-1)                  # log P
    return log_p - jnp.maximum(lse - log_p_max, 0.0)[:, None], jnp.minimum(lse, log_p_max)


def _guide_concepts(scale, log_p: Array, log_p_max, eps_u: Array, eps_c: Tuple[Array, ...]):
    """eps_u - sum_k lambda_k (eps_k - eps_u), lambda_k = scale p_k / (1 - P), P = sum_k p_k <= p_max.

    log_p: (B, K). Returns (eps, sum_k lambda_k (B,), log P after the cap (B,)).
    """
    log_p, log_total = _cap_total(log_p, log_p_max)
    log_total = jnp.minimum(log_total, -1e-12)
    scale = jnp.asarray(scale)
    scale = scale[:, None] if scale.ndim else scale                      # () or (B,) -> against (B, K)
    lam = scale * jnp.exp(log_p - jnp.log(-jnp.expm1(log_total))[:, None])
    eps = eps_u
    for k, e in enumerate(eps_c):
        eps = eps - _per_sample(lam[:, k], eps_u) * (e - eps_u)
    return eps, lam.sum(-1), log_total


def _check_concepts(k) -> None:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ValueError(f"num_concepts must be an integer >= 1 (one denoiser per concept), got {k!r}")


@rule_class
class ExactMultiConceptDynamicNegativeGuidance(GuidanceRule):
    """Multi-concept DNG with given exact posteriors (analytic models): lambda_k = scale p_k / (1 - P).

    ``posterior_fn(x, t) -> log p`` of shape (B, K), log p(c_k | x_t) per concept (t: network timestep
    index (B,)). P = sum_k p_k is capped at ``p_max``. At scale 1 with exact posteriors and exact
    predictions, eps is the prediction of p(x | none of the concepts).
    """

    scale: Any = 1.0
    posterior_fn: Callable = static(None)
    p_max: Any = 1.0 - 1e-6
    num_concepts: int = static(2)

    def __post_init__(self):
        _check_concepts(self.num_concepts)
        _check("scale", self.scale, lambda a: a >= 0, ">= 0")
        _check("p_max", self.p_max, lambda a: (a > 0) & (a < 1), "in (0, 1)")
        if not callable(self.posterior_fn):
            raise ValueError("posterior_fn must be a callable posterior_fn(x, t) -> log p (B, K)")
        _as_leaf(self, "scale")
        _as_leaf(self, "p_max")

    @property
    def num_conditions(self) -> int:
        return self.num_concepts

    def init(self, x):
        return jnp.zeros((x.shape[0],), jnp.float32)     # P at the last guided step, for traces

    def guide(self, state, x_t, eps_u, eps_c, step):
        log_p = self.posterior_fn(x_t, jnp.broadcast_to(step.t, (x_t.shape[0],))).astype(jnp.float32)
        eps, lam, log_total = _guide_concepts(self.scale, log_p, jnp.log(self.p_max), eps_u, eps_c)
        return eps, lam.astype(jnp.float32), jnp.exp(log_total)

    def posterior(self, state, batch):
        return state


def transition_variance(step: Step, variance: str) -> Array:
    """sigma_t^2 used by DNG's posterior update (see :class:`DynamicNegativeGuidance`)."""
    if variance == "beta":
        return step.beta
    if variance == "step":
        return jnp.where(step.is_last, step.beta, step.noise_variance)
    return jnp.where(step.is_last, step.beta, step.beta_tilde)


def _odds(log_p: Array) -> Array:
    """p / (1 - p) from log p < 0, without overflow for p close to 1."""
    log_p = jnp.minimum(log_p, -1e-12)
    return jnp.exp(log_p - jnp.log(-jnp.expm1(log_p)))


@rule_class
class ExactDynamicNegativeGuidance(GuidanceRule):
    """DNG with a given exact posterior (analytic models): lambda_t = scale p / (1 - p).

    ``posterior_fn(x, t) -> p`` of shape (B,) where t is the network timestep index (B,).
    It may instead return log p (set ``log_space=True``), which avoids rounding p to 1.
    p is capped at ``p_max`` so that lambda_t stays finite.
    """

    scale: Any = 1.0
    posterior_fn: Callable = static(None)
    p_max: Any = 1.0 - 1e-6
    log_space: bool = static(False)

    def __post_init__(self):
        _check("scale", self.scale, lambda a: a >= 0, ">= 0")
        _check("p_max", self.p_max, lambda a: (a > 0) & (a < 1), "in (0, 1)")
        if not callable(self.posterior_fn):
            raise ValueError("posterior_fn must be a callable posterior_fn(x, t) -> p (B,)")
        _as_leaf(self, "scale")
        _as_leaf(self, "p_max")

    def init(self, x):
        return jnp.zeros((x.shape[0],), jnp.float32)  # the posterior at the last guided step, for traces

    def _log_p(self, x, t):
        out = self.posterior_fn(x, jnp.broadcast_to(t, (x.shape[0],)))
        log_p = out if self.log_space else jnp.log(out)
        return jnp.minimum(log_p.astype(jnp.float32), jnp.log(self.p_max))

    def guide(self, state, x_t, eps_u, eps_c, step):
        log_p = self._log_p(x_t, step.t)
        lam = self.scale * _odds(log_p)
        eps = eps_u - _per_sample(lam, eps_u) * (eps_c - eps_u)
        return eps, lam.astype(jnp.float32), jnp.exp(log_p)

    def posterior(self, state, batch):
        return state


# --------------------------------------------------------------------------- composed rules

class ComposedRule(GuidanceRule):
    """Base of the rules built around another rule (their :func:`inner` field ``rule``).

    Reading an attribute the composed rule lacks reads the inner rule's (``PositiveMode(dng).prior``);
    :meth:`replace` sends the inner rule's hyperparameters to it and validates the result as the
    constructors do. The composed rule's ``leaf_names`` are the inner rule's followed by its own.
    """

    def __getattr__(self, name):
        if name.startswith("_") or name == "rule":
            raise AttributeError(name)
        try:
            wrapped = object.__getattribute__(self, "rule")
        except AttributeError:
            raise AttributeError(name) from None
        try:
            return getattr(wrapped, name)
        except AttributeError:
            raise AttributeError(f"{type(self).__name__} (over {type(wrapped).__name__}) has no attribute "
                                 f"{name!r}") from None

    def replace(self, **changes):
        """A copy with some hyperparameters changed, its own or the inner rule's (validated like the constructor)."""
        own = {f.name for f in dataclasses.fields(self)}
        new = object.__new__(type(self))
        for f in dataclasses.fields(self):
            object.__setattr__(new, f.name, changes.get(f.name, getattr(self, f.name)))
        theirs = {k: v for k, v in changes.items() if k not in own}
        if theirs:
            object.__setattr__(new, "rule", member(new.rule, "replace")(**theirs))
        new.__post_init__()
        return new


def _check_wrapped(composed, rule) -> None:
    if not follows_protocol(rule):
        raise ValueError(f"{type(composed).__name__} wraps a guidance rule (an object with init and guide, see "
                         f"dngjax.Rule), got {type(rule).__name__}")


@rule_class
class PositiveMode(ComposedRule):
    """``rule`` in the positive-prompt mode (the paper's section 4.2, its Stable Diffusion setting).

    Predictions (null, c+, c-): ``denoiser_u`` the unconditional model, ``denoiser_c=(denoiser_pos,
    denoiser_neg)``. ``rule`` is any negative rule over (eps_u, eps_neg) (NP, SLD, DNG, exact DNG, one of
    one's own); it runs with eps_pos in the place of its "unconditional" prediction, and classifier-free
    guidance toward c+ is added:
        eps = eps_null + cfg_scale (eps_pos - eps_null) + [rule's eps from (eps_pos, eps_neg)] - eps_pos,
    i.e. for NP and DNG
        eps = eps_null + cfg_scale (eps_pos - eps_null) - lambda_t (eps_neg - eps_pos).
    The rule's state update sees (eps_pos, eps_neg) as well: DNG's posterior p(c- | x_t, c+) is tracked
    from the transitions of eps(x | c+) and eps(x | c-) (Alg. 2 with s_theta replaced by s_theta,c+), and
    its continuous-time estimators get the derivatives of those two. cfg_scale = 1: no classifier-free
    guidance toward c+ beyond sampling from it. A rule over K negative predictions (:class:`MultiConcept`)
    takes ``denoiser_c=(denoiser_pos, denoiser_neg_1, ..., denoiser_neg_K)``.

    Hyperparameters: the rule's (under their names: ``PositiveMode(dng).replace(scale=2.0)``, a sweep's
    ``grid={"scale": ...}``) and ``cfg_scale``.
    """

    rule: Any = inner()
    cfg_scale: Any = 1.0

    def __post_init__(self):
        _check_wrapped(self, self.rule)
        if "cfg_scale" in _leaf_names(self.rule):
            raise ValueError(f"{type(self).__name__} adds cfg_scale; {type(self.rule).__name__} has one already "
                             "(a rule in the positive mode cannot be put in it again)")
        _check("cfg_scale", self.cfg_scale, lambda a: a >= 0, ">= 0")
        _as_leaf(self, "cfg_scale")

    @property
    def num_conditions(self) -> int:
        k = member(self.rule, "num_conditions")
        return 2 if k is None else 1 + k

    def _negative(self, eps_c):
        """The inner rule's second prediction(s) from (eps_pos, eps_neg[, ...])."""
        return eps_c[1] if member(self.rule, "num_conditions") is None else tuple(eps_c[1:])

    def _tangents(self, kw):
        """The tangents as the inner rule sees them: eps_pos's in the place of eps_u's."""
        t = kw.get("tangents")
        return {} if t is None else {"tangents": t._replace(eps_u=t.eps_c[0], eps_c=self._negative(t.eps_c))}

    def init(self, x):
        return self.rule.init(x)

    def guide(self, state, x_t, eps_u, eps_c, step, **tangents):
        eps_pos = eps_c[0]
        eps, lam, state = self.rule.guide(state, x_t, eps_pos, self._negative(eps_c), step, **self._tangents(tangents))
        return eps + _per_sample(self.cfg_scale - 1.0, eps_u) * (eps_pos - eps_u), lam, state

    def update(self, state, x_t, x_next, eps_u, eps_c, step, **tangents):
        return member(self.rule, "update")(state, x_t, x_next, eps_c[0], self._negative(eps_c), step,
                                           **self._tangents(tangents))

    def posterior(self, state, batch):
        return member(self.rule, "posterior")(state, batch)

    def check_sampler(self, noise, eta):
        member(self.rule, "check_sampler")(noise, eta)

    def tangent_spec(self):
        return member(self.rule, "tangent_spec")()

    def probe_hint(self, state):
        return member(self.rule, "probe_hint")(state)


@rule_class
class MultiConcept(ComposedRule):
    """DNG away from K concepts at once, each with its own tracked posterior: a rule over K predictions
    (``denoiser_c``: a sequence of K denoisers) built on one concept's :class:`DynamicNegativeGuidance`.

    ``MultiConcept(DynamicNegativeGuidance(scale, prior=..., temperature=..., ...), num_concepts=K)``.
    With p_k = p(c_k | x_t) and P = sum_k p_k, the score of p(x | none of the concepts) is
    s_u - sum_k [p_k / (1 - P)] (s_k - s_u), so
        eps = eps_u - sum_k lambda_k (eps_k - eps_u),   lambda_k = scale p_k / (1 - P).
    State: log p_k (B, K), each initialised to log(prior) and updated after every step as the wrapped
    rule's update would from its own prediction (Alg. 2; the paper's estimator only), clamped to [p_min, p_max];
    P is capped at p_max (all p_k scaled down together) so that 1 - P stays positive.
    The concepts share the wrapped rule's hyperparameters (this rule's leaves, under their names). The
    traces report sum_k lambda_k and P. With K = 1 it is :class:`DynamicNegativeGuidance`.
    """

    rule: Any = inner()
    num_concepts: int = static(2)

    def __post_init__(self):
        _check_concepts(self.num_concepts)
        if not isinstance(self.rule, DynamicNegativeGuidance):
            raise ValueError(f"{type(self).__name__} runs one concept's DynamicNegativeGuidance per concept, got "
                             f"{type(self.rule).__name__}")
        if self.rule.estimator != "paper":
            raise ValueError(f"{type(self).__name__} tracks its posteriors with the paper's update only; "
                             f"estimator={self.rule.estimator!r} is for one concept (DynamicNegativeGuidance)")
        prior, p_max = self.rule.prior, self.rule.p_max
        if _is_concrete(prior) and _is_concrete(p_max) and np.any(
                self.num_concepts * np.asarray(prior) > np.asarray(p_max)):
            raise ValueError(f"num_concepts x prior = {self.num_concepts} x {prior} exceeds p_max = {p_max}: "
                             "the concepts' prior probabilities must sum below p_max")

    @property
    def num_conditions(self) -> int:
        return self.num_concepts

    def init(self, x):
        return jnp.broadcast_to(jnp.log(self.rule.prior), (x.shape[0], self.num_concepts)).astype(jnp.float32)

    def guide(self, log_p, x_t, eps_u, eps_c, step):
        eps, lam, _ = _guide_concepts(self.rule.scale, log_p, jnp.log(self.rule.p_max), eps_u, eps_c)
        return eps, lam.astype(jnp.float32), log_p

    def update(self, log_p, x_t, x_next, eps_u, eps_c, step):
        # the wrapped rule's update (Alg. 2's increment, then the clamp) on the K posteriors at once
        inc = jnp.stack([_log_likelihood_ratio(self.rule, x_t, x_next, eps_u, e, step) for e in eps_c], axis=-1)
        log_p = jnp.clip(log_p + inc, jnp.log(self.rule.p_min), jnp.log(self.rule.p_max))
        return _cap_total(log_p, jnp.log(self.rule.p_max))[0]

    def posterior(self, log_p, batch):
        return jnp.exp(jax.scipy.special.logsumexp(log_p, axis=-1))

    def check_sampler(self, noise, eta):
        self.rule.check_sampler(noise, eta)


# --------------------------------------------------------------------------- deprecated names

def _deprecated(old: str, new: str) -> None:
    import warnings
    warnings.warn(f"dngjax.{old} is deprecated: it builds {new}", DeprecationWarning, stacklevel=3)


def _positional_tail(base, args, kw, name):
    """The old generated classes took their own last field after the base rule's fields: (base args, kw)."""
    n = len([f for f in dataclasses.fields(base) if f.init])
    if len(args) > n + 1:
        raise TypeError(f"too many positional arguments ({len(args)})")
    if len(args) == n + 1:
        if name in kw:
            raise TypeError(f"got multiple values for argument {name!r}")
        kw[name] = args[n]
    return args[:n], kw


def _positive_alias(base):
    name = "Positive" + base.__name__

    def __init__(self, *args, **kwargs):
        args, kwargs = _positional_tail(base, args, kwargs, "cfg_scale")
        _deprecated(name, f"PositiveMode({base.__name__}(...), cfg_scale)")
        cfg_scale = kwargs.pop("cfg_scale", 1.0)
        PositiveMode.__init__(self, base(*args, **kwargs), cfg_scale)

    doc = (f"Deprecated: ``PositiveMode({base.__name__}(...), cfg_scale=...)``, which it builds (the same rule, "
           f"under this type name; a :class:`PositiveMode`). Takes {base.__name__}'s arguments and ``cfg_scale``.")
    cls = type(name, (PositiveMode,), {"__init__": __init__, "__doc__": doc, "__module__": __name__,
                                       "__qualname__": name})
    return rule_class(cls)


PositiveNegativePrompting = _positive_alias(NegativePrompting)
PositiveSafeLatentDiffusion = _positive_alias(SafeLatentDiffusion)
PositiveDynamicNegativeGuidance = _positive_alias(DynamicNegativeGuidance)
PositiveExactDynamicNegativeGuidance = _positive_alias(ExactDynamicNegativeGuidance)


@rule_class
class MultiConceptDynamicNegativeGuidance(MultiConcept):
    """Deprecated: ``MultiConcept(DynamicNegativeGuidance(...), num_concepts=K)``, which it builds (the same rule,
    under this type name; a :class:`MultiConcept`). Takes DynamicNegativeGuidance's arguments and ``num_concepts``."""

    def __init__(self, *args, **kwargs):
        args, kwargs = _positional_tail(DynamicNegativeGuidance, args, kwargs, "num_concepts")
        _deprecated("MultiConceptDynamicNegativeGuidance", "MultiConcept(DynamicNegativeGuidance(...), num_concepts)")
        num_concepts = kwargs.pop("num_concepts", 2)
        _check_concepts(num_concepts)
        MultiConcept.__init__(self, DynamicNegativeGuidance(*args, **kwargs), num_concepts)
