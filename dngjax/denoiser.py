"""Denoisers: the callables ``eps(x_t, t)`` that samplers take.

A sampler needs a function ``eps(x, t) -> eps_hat`` with ``x`` of shape
``(B, *sample_shape)`` and ``t`` int32 of shape ``(B,)`` (the network's
timestep index; float32 for a chain of fractional timesteps, e.g. diffusers' Euler with "linspace"
spacing, which a Denoiser passes on as they are). Any pure Python function with that signature works. A
:class:`Denoiser` wraps a model's ``apply(params, x, t, ...)`` so that the
parameters travel as a pytree leaf (not baked into the compiled program as
constants): ``jit`` recompiles only when the *function* changes.

Networks that predict x_0 or v (Salimans & Ho 2022) instead of eps declare it
with ``prediction=``; the sampler converts their output to eps once, at this
boundary (:func:`to_eps`), with the alpha_bar of the timestep, so the guidance
rules always combine eps predictions.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
from flax import struct

Array = jnp.ndarray

#: What a network predicts: the noise eps, the clean sample x_0, or v = sqrt(ab) eps - sqrt(1 - ab) x_0.
PREDICTIONS = ("eps", "x0", "v")

#: ``denoiser(..., micro_batch="auto")`` on a CPU backend: XLA:CPU's convolutions cost more per image
#: in batches larger than this (their working set outgrows the caches; bench/sampler.py, docs/benchmarks.md).
CPU_MICRO_BATCH = 16


def to_eps(output: Array, x: Array, prediction: str, alpha_bar: Array, one_minus_alpha_bar: Array) -> Array:
    """The eps prediction equivalent to a network ``output`` at x_t = sqrt(ab) x_0 + sqrt(1 - ab) eps.

    x0: eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab); v: eps = sqrt(1 - ab) x_t + sqrt(ab) v.
    alpha_bar, one_minus_alpha_bar: scalars or (B,) (1 - ab passed separately: it is small near t = 0).
    """
    if prediction == "eps":
        return output
    per_sample = lambda a: jnp.sqrt(jnp.asarray(a, jnp.float32)).reshape(jnp.shape(a) + (1,) * (x.ndim - jnp.ndim(a)))
    sa, so = per_sample(alpha_bar), per_sample(one_minus_alpha_bar)
    if prediction == "x0":
        return (x - sa * output) / so
    if prediction == "v":
        return so * x + sa * output
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


@dataclasses.dataclass(frozen=True)
class ModuleApply:
    """Hashable ``module.apply``: equal modules (same config) give equal keys, so no recompiles."""

    module: Any

    def __call__(self, params, x, t, **kwargs):
        return self.module.apply(params, x, t, **kwargs)


@struct.dataclass
class Denoiser:
    """``eps(x, t)`` from ``apply_fn(params, x, t, **kwargs)``; params (and label) are leaves.

    Attributes:
      apply_fn: static, e.g. ``module.apply``; must be hashable.
      params: pytree of arrays (or None for a parameter-free function).
      label: optional int class label(s), () or (B,); passed as ``label=``.
      prediction: static, what the network predicts: ``"eps"``, ``"x0"`` or ``"v"`` (the sampler
        converts to eps with :func:`to_eps`; calling the Denoiser returns the raw output).
      micro_batch: static; a batch larger than this is run through the network this many images at a
        time (``lax.map``; the last part padded), the same function per image: faster on a CPU for
        convolutional networks; also under ``vmap`` (a sweep), whose axis is folded into the batch.
        Differentiable: derivatives (``jax.grad``, ``jax.jvp``) go through the whole batch at once (a
        backward pass inside ``lax.map`` is slow on XLA:CPU). None: the whole batch in one call.
    """

    apply_fn: Callable = struct.field(pytree_node=False)
    params: Any = None
    label: Optional[Array] = None
    prediction: str = struct.field(pytree_node=False, default="eps")
    micro_batch: Optional[int] = struct.field(pytree_node=False, default=None)

    def __call__(self, x: Array, t: Array) -> Array:
        t = jnp.asarray(t)                      # int32 indices; float32 kept (fractional timesteps of a chain)
        t = jnp.broadcast_to(t if jnp.issubdtype(t.dtype, jnp.floating) else t.astype(jnp.int32), (x.shape[0],))
        if not self.micro_batch:
            return self._apply(x, t, self.label)
        # the label travels as its own argument (folded by the vmap rule), not inside the denoiser
        return _micro_batched_diff(self.replace(label=None), x, t, self.label)

    def _apply(self, x: Array, t: Array, label: Optional[Array]) -> Array:
        if self.params is None and label is None:
            return self.apply_fn(x, t)
        if label is None:
            return self.apply_fn(self.params, x, t)
        return self.apply_fn(self.params, x, t, label=label)


def _split_apply(d: "Denoiser", x: Array, t: Array, label: Optional[Array]) -> Array:
    """d's network over (B, ...) in parts of d.micro_batch (``lax.map``; the last part padded with copies)."""
    b, m = x.shape[0], d.micro_batch
    if b <= m:
        return d._apply(x, t, label)
    n = -(-b // m)
    split = lambda a: jnp.pad(a, [(0, n * m - b)] + [(0, 0)] * (a.ndim - 1), mode="edge").reshape((n, m) + a.shape[1:])
    per_image = label is not None and jnp.ndim(label) == 1
    parts = (split(x), split(t), split(label) if per_image else None)
    out = jax.lax.map(lambda p: d._apply(p[0], p[1], p[2] if per_image else label), parts)
    return out.reshape((n * m,) + out.shape[2:])[:b]


@jax.custom_batching.custom_vmap
def _micro_batched(d, x, t, label):
    return _split_apply(d, x, t, label)


@_micro_batched.def_vmap
def _micro_batched_vmap(axis_size, in_batched, d, x, t, label):
    # Under vmap (a sweep over guidance scales) the network would see axis_size x B images at once:
    # fold the vmapped axis into the batch, so the micro-batches cover all of them.
    d_b, x_b, t_b, l_b = in_batched
    if any(jax.tree.leaves(d_b)):  # batched parameters: no folding, the plain vmap
        axes = jax.tree.map(lambda batched: 0 if batched else None, d_b)
        return jax.vmap(_split_apply, in_axes=(axes, 0 if x_b else None, 0 if t_b else None,
                                               0 if (label is not None and l_b) else None))(d, x, t, label), True
    b = x.shape[1] if x_b else x.shape[0]
    x = x if x_b else jnp.broadcast_to(x, (axis_size,) + x.shape)
    t = t if t_b else jnp.broadcast_to(t, (axis_size,) + t.shape)
    if label is not None and (l_b or jnp.ndim(label) == 1):
        lab = label if l_b else jnp.broadcast_to(label, (axis_size,) + label.shape)
        lab = jnp.broadcast_to(lab.reshape((axis_size, -1)), (axis_size, b)).reshape(axis_size * b)
    else:
        lab = label
    out = _micro_batched(d, x.reshape((axis_size * b,) + x.shape[2:]), t.reshape(axis_size * b), lab)
    return out.reshape((axis_size, b) + out.shape[1:]), True


@jax.custom_jvp
def _micro_batched_diff(d, x, t, label):
    """:func:`_micro_batched` with derivatives: custom_vmap has no autodiff rule of its own."""
    return _micro_batched(d, x, t, label)


@_micro_batched_diff.defjvp
def _micro_batched_jvp(primals, tangents):
    # the same function on the whole batch: its forward and backward passes without micro-batches
    return jax.jvp(lambda d, x, t, label: d._apply(x, t, label), primals, tangents)


def denoiser(module_or_fn: Any, params: Any = None, label: Optional[int] = None,
             prediction: str = "eps", micro_batch: Union[int, str, None] = "auto") -> Denoiser:
    """Turn a Flax module + params (or a pure ``fn(x, t)``) into a :class:`Denoiser`.

    ``denoiser(unet, params)`` -> eps(x, t) = unet.apply(params, x, t);
    ``denoiser(unet, params, label=3)`` -> the class-conditional eps(x, t | 3);
    ``denoiser(fn)`` -> fn itself, wrapped (fn must be hashable: a function, not a lambda made per call);
    ``denoiser(fn, prediction="v")`` -> a v-predicting network (the sampler converts to eps).

    ``micro_batch``: run larger batches through the network this many images at a time (see
    :class:`Denoiser`; the function must treat the images of a batch independently, as a network in
    inference mode does); ``"auto"`` (default): ``CPU_MICRO_BATCH`` (16) for a Flax module when JAX's
    default backend is the CPU, else None (the whole batch: accelerators want large batches, and a
    plain function is taken as it is).
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    is_module = hasattr(module_or_fn, "apply") and hasattr(module_or_fn, "init")
    if isinstance(micro_batch, str) and micro_batch == "auto":
        micro_batch = CPU_MICRO_BATCH if is_module and jax.default_backend() == "cpu" else None
    elif micro_batch is not None and (isinstance(micro_batch, bool) or not isinstance(micro_batch, numbers.Real)
                                      or int(micro_batch) != micro_batch or micro_batch < 1):
        raise ValueError(f"micro_batch must be a positive int, None or 'auto', got {micro_batch!r}")
    if is_module:
        if params is None:
            raise ValueError("a Flax module needs its params: denoiser(module, params)")
        apply_fn = ModuleApply(module_or_fn)
    elif callable(module_or_fn):
        apply_fn = module_or_fn
    else:
        raise TypeError(f"expected a Flax module or a callable, got {type(module_or_fn).__name__}")
    lab = None if label is None else jnp.asarray(label, jnp.int32)
    return Denoiser(apply_fn=apply_fn, params=params, label=lab, prediction=prediction,
                    micro_batch=None if micro_batch is None else int(micro_batch))


def as_denoiser(fn: Any) -> Denoiser:
    """Pass a Denoiser through; wrap a plain ``fn(x, t)``."""
    if isinstance(fn, Denoiser):
        return fn
    if not callable(fn):
        raise TypeError(f"a denoiser must be callable eps(x, t), got {type(fn).__name__}")
    return Denoiser(apply_fn=fn)
