"""Denoisers: the callables ``eps(x_t, t)`` that samplers take.

A sampler needs a function ``eps(x, t) -> eps_hat`` with ``x`` of shape
``(B, *sample_shape)`` and ``t`` int32 of shape ``(B,)`` (the network's
timestep index). Any pure Python function with that signature works. A
:class:`Denoiser` wraps a model's ``apply(params, x, t, ...)`` so that the
parameters travel as a pytree leaf (not baked into the compiled program as
constants): ``jit`` recompiles only when the *function* changes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax.numpy as jnp
from flax import struct

Array = jnp.ndarray


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
    """

    apply_fn: Callable = struct.field(pytree_node=False)
    params: Any = None
    label: Optional[Array] = None

    def __call__(self, x: Array, t: Array) -> Array:
        t = jnp.broadcast_to(jnp.asarray(t, jnp.int32), (x.shape[0],))
        if self.params is None and self.label is None:
            return self.apply_fn(x, t)
        if self.label is None:
            return self.apply_fn(self.params, x, t)
        return self.apply_fn(self.params, x, t, label=self.label)


def denoiser(module_or_fn: Any, params: Any = None, label: Optional[int] = None) -> Denoiser:
    """Turn a Flax module + params (or a pure ``fn(x, t)``) into a :class:`Denoiser`.

    ``denoiser(unet, params)`` -> eps(x, t) = unet.apply(params, x, t);
    ``denoiser(unet, params, label=3)`` -> the class-conditional eps(x, t | 3);
    ``denoiser(fn)`` -> fn itself, wrapped (fn must be hashable: a function, not a lambda made per call).
    """
    if hasattr(module_or_fn, "apply") and hasattr(module_or_fn, "init"):
        if params is None:
            raise ValueError("a Flax module needs its params: denoiser(module, params)")
        apply_fn = ModuleApply(module_or_fn)
    elif callable(module_or_fn):
        apply_fn = module_or_fn
    else:
        raise TypeError(f"expected a Flax module or a callable, got {type(module_or_fn).__name__}")
    lab = None if label is None else jnp.asarray(label, jnp.int32)
    return Denoiser(apply_fn=apply_fn, params=params, label=lab)


def as_denoiser(fn: Any) -> Denoiser:
    """Pass a Denoiser through; wrap a plain ``fn(x, t)``."""
    if isinstance(fn, Denoiser):
        return fn
    if not callable(fn):
        raise TypeError(f"a denoiser must be callable eps(x, t), got {type(fn).__name__}")
    return Denoiser(apply_fn=fn)
