"""Analytic Gaussian mixtures under the DDPM (VP) forward process.

A mixture ``p_0 = sum_i c_i N(mu_i, s_i^2 I)`` in d dimensions, diffused by
``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps``, stays a mixture:

    p_t(x) = sum_i c_i N(x; sqrt(alpha_bar_t) mu_i, (1 - alpha_bar_t + alpha_bar_t s_i^2) I).

Everything the DNG paper needs is therefore exact and cheap:

* the score ``grad log p_t`` and the noise prediction
  ``eps(x, t) = -sqrt(1 - alpha_bar_t) grad log p_t(x)`` of the full mixture, of the
  negative concept's sub-mixture and of the to-remember sub-mixture (weights renormalised);
* the posterior of the negative concept ``p(c- | x, t) = c_- p_-,t(x) / p_t(x)``.

All of it is computed in log space with log-sum-exp (no underflow far from the
modes), is pure, and works under ``jit`` / ``vmap`` / ``grad``.

Typical use with the sampler::

    sched = linear_schedule()
    lab = NegativeSplit(*toy_1d(), sched)               # modes -3 / 0 / 3, the middle one negative
    keys = keys_from_seeds(range(10_000))
    x0 = sample(lab.denoiser_full, sched, keys, (1,), rule=lab.exact_dng(1.0), denoiser_c=lab.denoiser_neg)

The denoisers are :class:`dngjax.denoiser.Denoiser` objects whose ``params`` are the
mixture and an alpha_bar table (pytree leaves, so nothing is baked into the compiled
program and a new mixture of the same shape does not recompile). ``posterior_fn``
must be hashable for :class:`~dngjax.guidance.ExactDynamicNegativeGuidance` (it is a
static field there), so :class:`ExactNegativePosterior` holds concrete numpy copies and
hashes them by value.
"""

from __future__ import annotations

import hashlib
import math
from typing import Sequence, Tuple

import numpy as np
import jax
import jax.numpy as jnp
from flax import struct

from .denoiser import Denoiser
from .guidance import (DynamicNegativeGuidance, ExactDynamicNegativeGuidance, ExactMultiConceptDynamicNegativeGuidance,
                       MultiConcept)
from .renames import no_other_keywords, renamed_keyword, warn_renamed
from .schedules import Schedule

Array = jnp.ndarray

_LOG_2PI = math.log(2.0 * math.pi)


# --------------------------------------------------------------------------- the mixture

def _weighted_sum(coef: Array, diff: Array) -> Array:
    """sum_k coef[k, b] diff[k, :, b] -> (B, d).

    Not written as ``jnp.sum(coef[:, None] * diff, axis=0)``: under jit, XLA:CPU (jaxlib
    0.10.2) miscomputes that reduction for d >= 2 once B > 16384 (errors of order 10; see
    tests/test_gmm.py::test_large_batches_under_jit). An unrolled sum over the few
    components is correct and also ~3x faster; einsum for many components.
    """
    k = coef.shape[0]
    if k > 16:
        return jnp.einsum("kb,kdb->bd", coef, diff)
    out = coef[0][None] * diff[0]
    for i in range(1, k):
        out = out + coef[i][None] * diff[i]
    return out.T


@struct.dataclass
class GaussianMixture:
    """``sum_i c_i N(mu_i, s_i^2 I)`` in d dimensions; a pytree of float32 arrays.

    Attributes:
      log_weights: (K,) log c_i, normalised (logsumexp = 0).
      means: (K, d) mu_i.
      stds: (K,) isotropic standard deviations s_i (> 0).
    """

    log_weights: Array
    means: Array
    stds: Array

    # ---------------------------------------------------------------- construction
    @classmethod
    def create(cls, weights: Sequence[float], means, stds) -> "GaussianMixture":
        """From weights (K,) (normalised here), means (K,) or (K, d), stds (K,) or a scalar."""
        w = np.asarray(weights, np.float64).reshape(-1)
        if w.size == 0 or np.any(~np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError(f"weights must be non-negative, finite and not all zero, got {weights}")
        m = np.asarray(means, np.float64)
        if m.ndim == 1:
            m = m[:, None]
        if m.ndim != 2 or m.shape[0] != w.size:
            raise ValueError(f"means must be (K,) or (K, d) with K = {w.size}, got shape {m.shape}")
        s = np.broadcast_to(np.asarray(stds, np.float64), (w.size,)).copy()
        if np.any(~np.isfinite(s)) or np.any(s <= 0):
            raise ValueError(f"stds must be positive and finite, got {stds}")
        with np.errstate(divide="ignore"):
            lw = np.log(w / w.sum())
        return cls(log_weights=jnp.asarray(lw, jnp.float32), means=jnp.asarray(m, jnp.float32),
                   stds=jnp.asarray(s, jnp.float32))

    @property
    def num_components(self) -> int:
        return int(self.means.shape[0])

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    @property
    def weights(self) -> Array:
        return jnp.exp(self.log_weights)

    def subset(self, indices: Sequence[int]) -> "GaussianMixture":
        """The sub-mixture of the given components, weights renormalised."""
        idx = np.asarray(indices, np.int64).reshape(-1)
        if idx.size == 0:
            raise ValueError("a sub-mixture needs at least one component")
        lw = self.log_weights[idx]
        return GaussianMixture(log_weights=lw - jax.scipy.special.logsumexp(lw),
                               means=self.means[idx], stds=self.stds[idx])

    # ---------------------------------------------------------------- diffused densities
    def _terms(self, x: Array, alpha_bar):
        """Shared pieces, laid out (K, ..., B) so that the long batch axis is the minor one.

        Returns diff (K, d, B) = x - sqrt(ab) mu_i, var (K, B) and the joint log densities
        log c_i + log N(x; sqrt(ab) mu_i, var_i I) (K, B).
        """
        x = jnp.asarray(x, jnp.float32)
        ab = jnp.broadcast_to(jnp.asarray(alpha_bar, jnp.float32), x.shape[:1])     # (B,)
        var = 1.0 - ab[None] + ab[None] * jnp.square(self.stds)[:, None]              # (K, B)
        diff = x.T[None] - jnp.sqrt(ab)[None, None] * self.means[:, :, None]          # (K, d, B)
        sq = jnp.sum(jnp.square(diff), axis=1)                                         # (K, B)
        d = x.shape[-1]
        joint = self.log_weights[:, None] - 0.5 * (sq / var + d * (jnp.log(var) + _LOG_2PI))
        return diff, var, joint, ab

    def component_log_probs(self, x: Array, alpha_bar) -> Array:
        """log N(x; sqrt(ab) mu_i, (1 - ab + ab s_i^2) I) for x (B, d), ab scalar or (B,) -> (B, K)."""
        _, _, joint, _ = self._terms(x, alpha_bar)
        return (joint - self.log_weights[:, None]).T

    def joint_log_probs(self, x: Array, alpha_bar) -> Array:
        """log c_i + log N_i,t(x) (B, K)."""
        return self._terms(x, alpha_bar)[2].T

    def responsibilities(self, x: Array, alpha_bar) -> Array:
        """p(component i | x_t) (B, K)."""
        return jax.nn.softmax(self._terms(x, alpha_bar)[2], axis=0).T

    def log_prob(self, x: Array, alpha_bar=1.0) -> Array:
        """log p_t(x) (B,); ``alpha_bar = 1`` is the data density p_0."""
        return jax.scipy.special.logsumexp(self._terms(x, alpha_bar)[2], axis=0)

    def score(self, x: Array, alpha_bar=1.0) -> Array:
        """grad_x log p_t(x) (B, d) = sum_i r_i(x) (sqrt(ab) mu_i - x) / var_i."""
        diff, var, joint, _ = self._terms(x, alpha_bar)
        r = jax.nn.softmax(joint, axis=0)
        return -_weighted_sum(r / var, diff)

    def eps(self, x: Array, alpha_bar) -> Array:
        """The exact noise prediction E[eps | x_t] = -sqrt(1 - ab) grad log p_t(x) (B, d).

        Written per component as sqrt(1 - ab) r_i (x - sqrt(ab) mu_i) / var_i, which is
        bounded (and exactly 0 at ab = 1) instead of a product of a tiny and a huge number.
        """
        diff, var, joint, ab = self._terms(x, alpha_bar)
        r = jax.nn.softmax(joint, axis=0)
        coef = r * jnp.sqrt(1.0 - ab)[None] / var                                     # (K, B)
        return _weighted_sum(coef, diff)

    # ---------------------------------------------------------------- data
    def sample(self, key: Array, n: int) -> Array:
        """n exact samples of p_0, (n, d) float32."""
        k1, k2 = jax.random.split(key)
        comp = jax.random.categorical(k1, self.log_weights, shape=(n,))
        z = jax.random.normal(k2, (n, self.dim), jnp.float32)
        return self.means[comp] + self.stds[comp][:, None] * z

    def classify(self, x: Array, alpha_bar=1.0) -> Array:
        """The most probable component of each x (B,) int32."""
        return jnp.argmax(self.joint_log_probs(x, alpha_bar), axis=-1)

    def density_1d(self, grid) -> np.ndarray:
        """p_0 on a 1-D grid (float64 numpy, for plots and metrics); only for d = 1."""
        self._check_1d()
        g = np.asarray(grid, np.float64)[..., None]
        w, m, s = (np.exp(np.asarray(self.log_weights, np.float64)), np.asarray(self.means, np.float64)[:, 0],
                   np.asarray(self.stds, np.float64))
        return np.sum(w * np.exp(-0.5 * ((g - m) / s) ** 2) / (s * math.sqrt(2 * math.pi)), axis=-1)

    def cdf_1d(self, grid) -> np.ndarray:
        """The CDF of p_0 on a 1-D grid (float64 numpy); only for d = 1."""
        from scipy.special import ndtr
        self._check_1d()
        g = np.asarray(grid, np.float64)[..., None]
        w, m, s = (np.exp(np.asarray(self.log_weights, np.float64)), np.asarray(self.means, np.float64)[:, 0],
                   np.asarray(self.stds, np.float64))
        return np.sum(w * ndtr((g - m) / s), axis=-1)

    def _check_1d(self):
        if self.dim != 1:
            raise ValueError(f"only defined for a 1-D mixture, this one has d = {self.dim}")


def wasserstein1_1d(samples, mixture: GaussianMixture, num_grid: int = 200_001) -> float:
    """W1 between the empirical distribution of 1-D samples and the mixture's p_0 (exact law).

    W1 = int |F_n(x) - F(x)| dx, integrated with the trapezoid rule on a uniform grid
    spanning the samples and 8 standard deviations around every mode (grid error << 1e-4
    for the default grid). Comparing with the exact CDF, not with a second sample set,
    keeps the reference free of sampling noise.
    """
    x = np.sort(np.asarray(samples, np.float64).reshape(-1))
    if x.size == 0 or not np.all(np.isfinite(x)):
        raise ValueError("samples must be a non-empty array of finite numbers")
    m = np.asarray(mixture.means, np.float64)[:, 0]
    s = np.asarray(mixture.stds, np.float64)
    lo = min(x[0], np.min(m - 8 * s)) - 1e-3
    hi = max(x[-1], np.max(m + 8 * s)) + 1e-3
    grid = np.linspace(lo, hi, num_grid)
    f_n = np.searchsorted(x, grid, side="right") / x.size
    return float(np.trapezoid(np.abs(f_n - mixture.cdf_1d(grid)), grid))


# --------------------------------------------------------------------------- denoisers

def alpha_bar_table(schedule: Schedule) -> Array:
    """alpha_bar indexed by network timestep: (max timestep + 1,) float32.

    For a respaced chain only its own timesteps are filled (the others are NaN, and
    the sampler never asks for them); respacing keeps alpha_bar at those timesteps,
    so the table agrees with the full schedule's there.
    """
    ts = np.asarray(schedule.timesteps, np.int64)
    table = np.full(int(ts.max()) + 1, np.nan, np.float32)
    table[ts] = np.asarray(schedule.alpha_bars, np.float32)
    return jnp.asarray(table)


def _mixture_eps(params, x, t):
    mixture, table = params
    return mixture.eps(x, table[t])


def _mixture_score(params, x, t):
    mixture, table = params
    return mixture.score(x, table[t])


def mixture_denoiser(mixture: GaussianMixture, schedule: Schedule) -> Denoiser:
    """The exact eps(x, t) of ``mixture`` under ``schedule``, as a sampler-ready Denoiser."""
    return Denoiser(apply_fn=_mixture_eps, params=(mixture, alpha_bar_table(schedule)))


def mixture_score_fn(mixture: GaussianMixture, schedule: Schedule) -> Denoiser:
    """The exact score grad log p_t(x) at network timestep t (same calling convention)."""
    return Denoiser(apply_fn=_mixture_score, params=(mixture, alpha_bar_table(schedule)))


def log_posterior(mixture: GaussianMixture, negative: Sequence[int], x: Array, alpha_bar) -> Array:
    """``log p(c- | x_t) = log(c_- p_-,t(x)) - log p_t(x)``, shape (B,); ``c_-`` the negative components' weight."""
    negative = np.asarray(negative, np.int64).reshape(-1)
    joint = mixture._terms(x, alpha_bar)[2]                                      # (K, B)
    lse = jax.scipy.special.logsumexp
    return jnp.minimum(lse(joint[negative], axis=0) - lse(joint, axis=0), 0.0)


class ExactNegativePosterior:
    """Hashable ``posterior_fn(x, t) -> log p(c- | x_t)`` for ExactDynamicNegativeGuidance.

    Use with ``log_space=True``. The mixture and the alpha_bar table are held as numpy
    copies (compile-time constants; hashed by value, so equal labs share one compilation).
    """

    def __init__(self, mixture: GaussianMixture, negative: Sequence[int], schedule_or_table):
        self.mixture = jax.tree.map(lambda a: np.asarray(a, np.float32), mixture)
        self.negative = tuple(int(i) for i in np.asarray(negative).reshape(-1))
        table = (alpha_bar_table(schedule_or_table) if isinstance(schedule_or_table, Schedule)
                 else schedule_or_table)
        self.table = np.asarray(table, np.float32)
        h = hashlib.sha1()
        for a in (self.mixture.log_weights, self.mixture.means, self.mixture.stds, self.table):
            h.update(np.ascontiguousarray(a).tobytes())
            h.update(str(a.shape).encode())
        h.update(str(self.negative).encode())
        self._key = h.hexdigest()

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, ExactNegativePosterior) and other._key == self._key

    def __call__(self, x: Array, t: Array) -> Array:
        mixture = jax.tree.map(jnp.asarray, self.mixture)
        ab = jnp.asarray(self.table)[t]
        return log_posterior(mixture, self.negative, x.reshape(x.shape[0], -1), ab)

    def __repr__(self):
        return f"ExactNegativePosterior(K={self.mixture.means.shape[0]}, negative={self.negative})"


# --------------------------------------------------------------------------- a lab

class NegativeSplit:
    """A mixture split into the negative concept's components (c-) and the components to remember, under
    one schedule.

    Attributes:
      full, negative_mixture, remember_mixture: the mixtures (sub-mixtures renormalised).
      negative: the negative components; remember: the others.
      negative_weight: ``c_-``, the prior probability of the negative concept.
      denoiser_full, denoiser_neg, denoiser_remember: exact Denoisers eps(x, t).
      posterior_fn: hashable log p(c- | x_t) for ExactDynamicNegativeGuidance(log_space=True).

    ``ForgetSplit`` and the attributes ``forget``, ``forget_mixture``, ``forget_weight``, ``denoiser_forget``,
    ``in_forget`` are the deprecated names of this class and of these.
    """

    def __init__(self, mixture: GaussianMixture, negative: Sequence[int], schedule: Schedule):
        k = mixture.num_components
        negative = sorted({int(i) for i in np.asarray(negative).reshape(-1)})
        if not negative or any(i < 0 or i >= k for i in negative) or len(negative) == k:
            raise ValueError(f"negative must name some but not all of the {k} components, got {negative}")
        self.full = mixture
        self.negative = tuple(negative)
        self.remember = tuple(i for i in range(k) if i not in negative)
        self.negative_mixture = mixture.subset(self.negative)
        self.remember_mixture = mixture.subset(self.remember)
        self.negative_weight = float(np.exp(np.asarray(mixture.log_weights))[list(self.negative)].sum())
        self.schedule = schedule
        self.denoiser_full = mixture_denoiser(mixture, schedule)
        self.denoiser_neg = mixture_denoiser(self.negative_mixture, schedule)
        self.denoiser_remember = mixture_denoiser(self.remember_mixture, schedule)
        self.posterior_fn = ExactNegativePosterior(mixture, self.negative, schedule)

    def log_posterior(self, x: Array, alpha_bar) -> Array:
        return log_posterior(self.full, self.negative, x, alpha_bar)

    def in_negative(self, x: Array) -> np.ndarray:
        """Whether each x_0 is closest (most probable component at t = 0) to a negative mode."""
        comp = np.asarray(self.full.classify(jnp.asarray(x).reshape(x.shape[0], -1)))
        return np.isin(comp, self.negative)

    def exact_dng(self, scale=1.0, p_max=1.0 - 1e-6) -> ExactDynamicNegativeGuidance:
        """DNG with this lab's exact posterior (log space); at scale 1 eps == denoiser_remember."""
        return ExactDynamicNegativeGuidance(scale=scale, posterior_fn=self.posterior_fn, p_max=p_max,
                                            log_space=True)

    def approximate_dng(self, scale=1.0, temperature=1.0, offset=0.0, p_min=1e-6, p_max=0.99,
                        update_variance: str = "beta", **deprecated) -> DynamicNegativeGuidance:
        """DNG with the Markov-chain posterior estimate, prior = ``c_-``.

        The defaults are the estimator with nothing tuned: the prior is the true negative
        weight, temperature 1 and offset 0 make each update the exact log-likelihood
        ratio of the two Gaussian transitions, and ``update_variance="beta"`` uses the variance
        the sampler really adds (beta_t). ``variance=`` is the deprecated spelling of ``update_variance=``.
        """
        update_variance = renamed_keyword(deprecated, "variance", "update_variance", update_variance, "approximate_dng")
        no_other_keywords(deprecated, "approximate_dng")
        return DynamicNegativeGuidance(scale=scale, prior=self.negative_weight, temperature=temperature,
                                       offset=offset, p_min=p_min, p_max=p_max, update_variance=update_variance)

    def remember_fractions(self, x: Array) -> np.ndarray:
        """Fraction of the samples that are not negative assigned to each remembered mode."""
        comp = np.asarray(self.full.classify(jnp.asarray(x).reshape(x.shape[0], -1)))
        counts = np.array([(comp == i).sum() for i in self.remember], np.float64)
        return counts / max(counts.sum(), 1.0)


class ExactConceptPosteriors:
    """Hashable ``posterior_fn(x, t) -> log p(c_k | x_t)`` (B, K) for ExactMultiConceptDynamicNegativeGuidance."""

    def __init__(self, posteriors: Sequence[ExactNegativePosterior]):
        self.posteriors = tuple(posteriors)

    def __hash__(self):
        return hash(self.posteriors)

    def __eq__(self, other):
        return isinstance(other, ExactConceptPosteriors) and other.posteriors == self.posteriors

    def __call__(self, x: Array, t: Array) -> Array:
        return jnp.stack([f(x, t) for f in self.posteriors], axis=-1)


class ConceptSplit:
    """A mixture with K disjoint negative concepts (each a set of components), under one schedule.

    Attributes:
      concepts: one :class:`NegativeSplit` per concept (its denoiser_neg is eps(x | c_k), its
        posterior_fn log p(c_k | x_t)).
      union: the :class:`NegativeSplit` of all negative components together: its remember_mixture is
        the target p(x | none of the concepts), its denoiser_remember that target's exact eps.
      denoisers_concepts: the K concept denoisers, as the sampler's ``denoiser_c``.
    """

    def __init__(self, mixture: GaussianMixture, concepts: Sequence[Sequence[int]], schedule: Schedule):
        sets = [sorted({int(i) for i in np.asarray(c).reshape(-1)}) for c in concepts]
        flat = [i for c in sets for i in c]
        if len(sets) < 1 or any(not c for c in sets) or len(flat) != len(set(flat)):
            raise ValueError(f"concepts must be non-empty, disjoint sets of components, got {sets}")
        self.full = mixture
        self.concepts = tuple(NegativeSplit(mixture, c, schedule) for c in sets)
        self.union = NegativeSplit(mixture, flat, schedule)
        self.schedule = schedule
        self.denoiser_full = self.union.denoiser_full
        self.denoisers_concepts = tuple(c.denoiser_neg for c in self.concepts)
        self.posterior_fn = ExactConceptPosteriors([c.posterior_fn for c in self.concepts])

    def exact_dng(self, scale=1.0, p_max=1.0 - 1e-6) -> ExactMultiConceptDynamicNegativeGuidance:
        """Multi-concept DNG with the exact posteriors; at scale 1 eps == union.denoiser_remember."""
        return ExactMultiConceptDynamicNegativeGuidance(scale=scale, posterior_fn=self.posterior_fn, p_max=p_max,
                                                        num_concepts=len(self.concepts))

    def approximate_dng(self, scale=1.0, temperature=1.0, offset=0.0, p_min=1e-6, p_max=0.99,
                        update_variance: str = "beta", **deprecated) -> MultiConcept:
        """Multi-concept DNG with tracked posteriors; prior = the concepts' mean weight (equal weights: exact)."""
        update_variance = renamed_keyword(deprecated, "variance", "update_variance", update_variance, "approximate_dng")
        no_other_keywords(deprecated, "approximate_dng")
        prior = float(np.mean([c.negative_weight for c in self.concepts]))
        return MultiConcept(DynamicNegativeGuidance(scale=scale, prior=prior, temperature=temperature, offset=offset,
                                                    p_min=p_min, p_max=p_max, update_variance=update_variance),
                            num_concepts=len(self.concepts))


# --------------------------------------------------------------------------- the lab's mixtures

def toy_1d() -> Tuple[GaussianMixture, Tuple[int, ...]]:
    """The 1-D lab mixture: modes at -3, 0, 3 (weights .25/.35/.40, stds .35/.50/.40); the middle one negative.

    The remembered modes keep weights .3846/.6154; the exact target puts 2.9e-4 of its
    mass closer to the forbidden mode (the classification floor of every "forbidden
    mass" number).
    """
    return GaussianMixture.create([0.25, 0.35, 0.40], [-3.0, 0.0, 3.0], [0.35, 0.50, 0.40]), (1,)


def toy_2d_two_concepts() -> Tuple[GaussianMixture, Tuple[Tuple[int, ...], ...]]:
    """Four equal modes (std .5) at (+-2, +-2); forbid the two upper ones as two separate concepts."""
    return (GaussianMixture.create([0.25] * 4, [[-2.0, -2.0], [2.0, -2.0], [-2.0, 2.0], [2.0, 2.0]], [0.5] * 4),
            ((2,), (3,)))


def toy_2d() -> Tuple[GaussianMixture, Tuple[int, ...]]:
    """The 2-D lab mixture: three equal modes (std .5) at (-2, -1.2), (2, -1.2), (0, 2); the top one negative."""
    return GaussianMixture.create([1 / 3, 1 / 3, 1 / 3], [[-2.0, -1.2], [2.0, -1.2], [0.0, 2.0]],
                                  [0.5, 0.5, 0.5]), (2,)


# --------------------------------------------------------------------------- deprecated names

def _deprecated_attribute(old: str, new: str):
    def read(self):
        warn_renamed(f"{type(self).__name__}.{old}", f"{type(self).__name__}.{new}")
        return getattr(self, new)
    return property(read)


for _old, _new in (("forget", "negative"), ("forget_mixture", "negative_mixture"), ("forget_weight", "negative_weight"),
                   ("denoiser_forget", "denoiser_neg"), ("in_forget", "in_negative")):
    setattr(NegativeSplit, _old, _deprecated_attribute(_old, _new))


class ForgetSplit(NegativeSplit):
    """Deprecated name of :class:`NegativeSplit`."""

    def __init__(self, *args, **kwargs):
        warn_renamed("dngjax.gmm.ForgetSplit", "dngjax.gmm.NegativeSplit")
        super().__init__(*args, **kwargs)


class ExactForgetPosterior(ExactNegativePosterior):
    """Deprecated name of :class:`ExactNegativePosterior`."""

    def __init__(self, *args, **kwargs):
        warn_renamed("dngjax.gmm.ExactForgetPosterior", "dngjax.gmm.ExactNegativePosterior")
        super().__init__(*args, **kwargs)
