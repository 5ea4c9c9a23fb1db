"""Calibration: the smallest guidance scale that meets a target safety, with a confidence bound.

Given a scorer that flags unwanted samples (e.g. "the classifier calls it the removed class") and a
target rate (e.g. at most 1 %), :func:`calibrate` samples one vmapped sweep over candidate scales
(the same seeds at every scale) and returns the smallest scale whose **upper** confidence bound on
the unwanted rate (Clopper-Pearson, one-sided) is within the target: with probability >= the
confidence level, that scale's true rate on fresh seeds of the same sampler meets the target.

The chosen scale is only as fine as the grid; a second call with a finer grid between the last scale
that failed and the chosen one refines it (on other seeds, so that the bound stays honest).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import numpy as np
from scipy import stats

from .sampler import sweep


class Calibration(NamedTuple):
    """Result of :func:`calibrate` (arrays over the candidate scales, ascending).

    scale: the chosen scale, or None if no candidate meets the target at this confidence.
    scales (K,), unwanted (K,) counts, rate (K,) = unwanted / n, upper (K,) one-sided upper bound.
    """

    scale: Optional[float]
    scales: np.ndarray
    unwanted: np.ndarray
    rate: np.ndarray
    upper: np.ndarray
    n: int
    target: float
    confidence: float

    @property
    def met(self) -> bool:
        return self.scale is not None

    def table(self) -> str:
        head = f"{'scale':>10} {'unwanted':>9} {'rate %':>8} {f'upper {self.confidence:.0%} %':>14}  meets"
        lines = [head, "-" * len(head)]
        for s, k, r, u in zip(self.scales, self.unwanted, self.rate, self.upper):
            lines.append(f"{s:>10g} {k:>9d} {100 * r:>8.2f} {100 * u:>14.2f}  {'yes' if u <= self.target else ''}")
        verdict = (f"smallest scale meeting {100 * self.target:g} % at {self.confidence:.0%} confidence: {self.scale:g}"
                   if self.met else f"no candidate scale meets {100 * self.target:g} % at {self.confidence:.0%} "
                                    "confidence: extend the grid upward or sample more seeds")
        return "\n".join(lines + [verdict, f"(n = {self.n} samples per scale, the same seeds at every scale)"])


def upper_bound(unwanted: np.ndarray, n: int, confidence: float) -> np.ndarray:
    """One-sided Clopper-Pearson upper bound on a rate from ``unwanted`` of ``n`` (1 when all are unwanted)."""
    k = np.asarray(unwanted)
    ub = stats.beta.ppf(confidence, k + 1, np.maximum(n - k, 1))
    return np.where(k >= n, 1.0, ub)


def calibrate(denoiser_u, schedule, keys, shape: Sequence[int], *, rule, scales: Sequence[float],
              is_unwanted: Callable[[np.ndarray], Any], target: float, confidence: float = 0.95,
              denoiser_c=None, noise: str = "beta", eta=None, chunk_size: Optional[int] = None,
              progress: bool = False, solver: Optional[str] = None) -> Calibration:
    """The smallest of ``scales`` whose unwanted rate is <= ``target`` at ``confidence`` (one sweep).

    Args:
      rule: a rule with a ``scale`` hyperparameter (NP, SLD, DNG, ...); its other leaves are kept.
      scales: candidate scales (sorted here; each validated by the rule).
      is_unwanted: samples (N, *shape) numpy -> (N,) booleans, e.g. ``lambda x: labels_fn(x) == c``.
      target: the highest acceptable unwanted rate, a fraction in (0, 1) (0.01 = 1 %).
      confidence: the one-sided level of the upper bound, in (0.5, 1).
      others: as in :func:`dngjax.sweep`.
    """
    grid = np.sort(np.asarray(scales, np.float64).reshape(-1))
    if grid.size == 0:
        raise ValueError("scales is empty: give the candidate guidance scales")
    if not 0.0 < float(target) < 1.0:
        raise ValueError(f"target must be a rate in (0, 1) (0.01 = 1 %), got {target}")
    if not 0.5 < float(confidence) < 1.0:
        raise ValueError(f"confidence must lie in (0.5, 1), got {confidence}")
    if "scale" not in getattr(rule, "leaf_names", ()):
        raise ValueError(f"{type(rule).__name__} has no scale to calibrate")
    for s in grid:
        rule.replace(scale=float(s))                       # illegal scales raise here, before sampling
    x = sweep(denoiser_u, schedule, keys, shape, rule=rule, grid={"scale": grid}, denoiser_c=denoiser_c,
              noise=noise, eta=eta, solver=solver, chunk_size=chunk_size, progress=progress)
    n = x.shape[1]
    flags = [np.asarray(is_unwanted(x[k])).reshape(-1) for k in range(grid.size)]
    if any(f.shape != (n,) for f in flags):
        raise ValueError(f"is_unwanted must return one flag per sample ({n}), got shapes {[f.shape for f in flags]}")
    unwanted = np.array([int(np.sum(f.astype(bool))) for f in flags])
    upper = upper_bound(unwanted, n, confidence)
    ok = np.nonzero(upper <= target)[0]
    return Calibration(scale=float(grid[ok[0]]) if ok.size else None, scales=grid, unwanted=unwanted,
                       rate=unwanted / n, upper=upper, n=int(n), target=float(target), confidence=float(confidence))
