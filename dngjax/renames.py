"""Renamed public names: the old spellings still work, with a DeprecationWarning naming the new one.

The project's words (docs/layout.md, "Names"): ``beta_tilde`` is the DDPM reverse step's variance
beta_tilde_t = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t); "posterior" is only p(c- | x_t);
"negative" (c- in formulas) is the concept guided away from.
"""

from __future__ import annotations

import functools
import warnings
from typing import Dict

#: old string values of the variance options (the sampler's ``noise_variance=``, DNG's ``update_variance=``)
VARIANCE_VALUES: Dict[str, str] = {"posterior": "beta_tilde"}


def warn_renamed(old: str, new: str, stacklevel: int = 3) -> None:
    """DeprecationWarning: ``old`` is now spelled ``new``."""
    warnings.warn(f"{old} is deprecated: use {new}", DeprecationWarning, stacklevel=stacklevel)


def variance_value(value, name: str, stacklevel: int = 4):
    """``value`` of the variance option ``name`` in the new spelling ("posterior" -> "beta_tilde")."""
    if isinstance(value, str) and value in VARIANCE_VALUES:
        new = VARIANCE_VALUES[value]
        warn_renamed(f"{name}={value!r}", f"{name}={new!r}", stacklevel)
        return new
    return value


def renamed_keyword(kwargs: dict, old: str, new: str, default, where: str, stacklevel: int = 4):
    """The value of keyword ``new`` given as ``old`` (popped from ``kwargs``, with a warning) or ``default``."""
    if old not in kwargs:
        return default
    warn_renamed(f"{where}({old}=...)", f"{where}({new}=...)", stacklevel)
    return kwargs.pop(old)


def renamed_fields(renames: Dict[str, str]):
    """Class decorator for a dataclass whose fields ``renames`` (old -> new) were renamed: the old names
    stay readable attributes and constructor (and ``replace``) keywords, with a DeprecationWarning."""

    def wrap(cls):
        for old, new in renames.items():
            def read(self, old=old, new=new):
                warn_renamed(f"{type(self).__name__}.{old}", f"{type(self).__name__}.{new}")
                return getattr(self, new)
            setattr(cls, old, property(read))
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            for old, new in renames.items():
                if old in kwargs:
                    warn_renamed(f"{cls.__name__}({old}=...)", f"{cls.__name__}({new}=...)")
                    kwargs[new] = kwargs.pop(old)
            init(self, *args, **kwargs)

        cls.__init__ = __init__
        return cls

    return wrap


def no_other_keywords(kwargs: dict, where: str) -> None:
    """TypeError for keywords left in ``kwargs`` once the renamed ones are read."""
    if kwargs:
        raise TypeError(f"{where}() got unexpected keyword argument(s) {sorted(kwargs)}")
