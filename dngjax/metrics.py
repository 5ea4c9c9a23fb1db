"""Metrics of the class-removal experiment: safety, class histogram and KL, Frechet distance.

All functions take and return numpy values (float64 internally) so that scores do
not depend on the accelerator's precision.

* :func:`safety`: the percentage of samples a classifier assigns to the removed
  class (lower is safer; the paper's "% of forbidden class").
* :func:`class_histogram` and :func:`kl_to_ideal`: KL(ideal || generated), where
  the ideal distribution is 0 on the removed class and uniform on the others
  (paper fig. 13). The generated histogram is smoothed with an additive
  pseudo-count (default 0.5 per class, the Jeffreys / Krichevsky-Trofimov
  estimate) so that a class with no samples gives a large but finite KL instead
  of ``inf`` (the authors' code divides by zero there). The removed class has
  ideal probability 0 and contributes nothing whatever its count.
* :func:`frechet_distance`: ``|mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^{1/2})``
  between Gaussian fits of features. ``Tr((S1 S2)^{1/2})`` is computed as the sum
  of square roots of the eigenvalues of the symmetric PSD matrix
  ``S1^{1/2} S2 S1^{1/2}`` (same eigenvalues as ``S1 S2``) with symmetric
  eigendecompositions only, so it never returns complex values or NaN for
  singular or near-singular covariances (e.g. fewer samples than feature
  dimensions), unlike ``scipy.linalg.sqrtm(S1 @ S2)``.
"""

from __future__ import annotations

from typing import Callable, Iterable, Tuple

import numpy as np

#: default additive pseudo-count per class in :func:`kl_to_ideal` (Jeffreys prior).
KL_PSEUDO_COUNT = 0.5


# --------------------------------------------------------------------------- class statistics

def class_histogram(labels, num_classes: int) -> np.ndarray:
    """Counts of each class among integer ``labels``: (N,) -> (num_classes,) int64."""
    labels = np.asarray(labels).reshape(-1)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range "
                         f"[{labels.min()}, {labels.max()}]")
    return np.bincount(labels.astype(np.int64), minlength=num_classes).astype(np.int64)


def _removed(removed_class) -> np.ndarray:
    """An int or a sequence of ints (several classes removed together) -> 1-D int array."""
    return np.asarray(removed_class, np.int64).reshape(-1)


def safety(labels, removed_class) -> float:
    """Percentage (0-100) of samples classified as ``removed_class`` (an int, or a sequence of classes
    removed together: their total share); lower is safer."""
    labels = np.asarray(labels).reshape(-1)
    if labels.size == 0:
        raise ValueError("safety of an empty set of samples is undefined")
    return float(100.0 * np.mean(np.isin(labels, _removed(removed_class))))


def ideal_distribution(num_classes: int, removed_class) -> np.ndarray:
    """0 on the removed class(es), uniform on the others."""
    if num_classes < 2:
        raise ValueError(f"need at least 2 classes, got {num_classes}")
    removed = _removed(removed_class)
    if removed.size == 0 or removed.min() < 0 or removed.max() >= num_classes:
        raise ValueError(f"removed_class must be in [0, {num_classes}), got {removed_class}")
    if np.unique(removed).size >= num_classes:
        raise ValueError(f"removing {removed.tolist()} leaves no class of {num_classes}")
    p = np.ones(num_classes, np.float64)
    p[removed] = 0.0
    return p / p.sum()


def smoothed_distribution(counts, pseudo_count: float = KL_PSEUDO_COUNT) -> np.ndarray:
    """(counts + a) / (N + K a): a class histogram as a distribution with no zero entries (a > 0)."""
    counts = np.asarray(counts, np.float64)
    if np.any(counts < 0):
        raise ValueError("counts must be >= 0")
    if pseudo_count < 0:
        raise ValueError(f"pseudo_count must be >= 0, got {pseudo_count}")
    total = counts.sum() + pseudo_count * counts.size
    if total <= 0:
        raise ValueError("empty histogram with pseudo_count 0 has no distribution")
    return (counts + pseudo_count) / total


def kl_divergence(p, q) -> float:
    """KL(p || q) = sum_i p_i log(p_i / q_i) in nats; terms with p_i = 0 are 0.

    ``inf`` if some q_i = 0 where p_i > 0 (smooth q first, see :func:`smoothed_distribution`).
    """
    p = np.asarray(p, np.float64)
    q = np.asarray(q, np.float64)
    if p.shape != q.shape:
        raise ValueError(f"p and q must have the same shape, got {p.shape} and {q.shape}")
    support = p > 0
    if np.any(q[support] <= 0):
        return float("inf")
    return float(np.sum(p[support] * (np.log(p[support]) - np.log(q[support]))))


def kl_to_ideal(counts, removed_class, pseudo_count: float = KL_PSEUDO_COUNT) -> float:
    """KL(ideal || generated) in nats, for a class histogram ``counts`` (K,).

    ideal = 0 on ``removed_class`` (an int or a sequence), uniform elsewhere; generated = ``counts``
    smoothed with ``pseudo_count`` per class (finite for empty classes when > 0).
    0 only for a histogram that is exactly uniform on the kept classes (with
    pseudo_count 0, or in the limit of many samples).
    """
    counts = np.asarray(counts)
    ideal = ideal_distribution(counts.size, removed_class)
    return kl_divergence(ideal, smoothed_distribution(counts, pseudo_count))


# --------------------------------------------------------------------------- Frechet distance

def gaussian_stats(features) -> Tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), in float64."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {f.shape}")
    if f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {f.shape[0]}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _sym(a: np.ndarray) -> np.ndarray:
    return 0.5 * (a + a.T)


def sqrtm_psd(a) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix.

    Via ``eigh``; eigenvalues below zero (round-off) are clipped to 0, so the
    result is real and symmetric for any symmetric input.
    """
    a = _sym(np.asarray(a, np.float64))
    w, v = np.linalg.eigh(a)
    w = np.sqrt(np.clip(w, 0.0, None))
    return _sym((v * w) @ v.T)


def trace_sqrt_product(sigma1, sigma2) -> float:
    """Tr((S1 S2)^{1/2}) for symmetric PSD S1, S2, as sum sqrt(eig(S1^{1/2} S2 S1^{1/2}))."""
    r1 = sqrtm_psd(sigma1)
    m = _sym(r1 @ _sym(np.asarray(sigma2, np.float64)) @ r1)
    w = np.linalg.eigvalsh(m)
    return float(np.sum(np.sqrt(np.clip(w, 0.0, None))))


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Squared Frechet (2-Wasserstein) distance between N(mu1, S1) and N(mu2, S2).

    d^2 = |mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^{1/2}); clipped at 0
    (round-off can make it slightly negative for identical Gaussians).
    """
    mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"means have different shapes {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"covariances must be ({d}, {d}), got {sigma1.shape} and {sigma2.shape}")
    diff = mu1 - mu2
    fd = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2)
    return float(max(fd, 0.0))


def frechet_distance_features(features, ref_mu, ref_sigma) -> float:
    """Frechet distance between the Gaussian fit of ``features`` (N, D) and reference stats."""
    mu, sigma = gaussian_stats(features)
    return frechet_distance(mu, sigma, ref_mu, ref_sigma)


# --------------------------------------------------------------------------- uncertainty

def bootstrap_std(stat_fn: Callable[[np.ndarray], float], n: int, num: int = 20, seed: int = 0) -> float:
    """Bootstrap standard error of a statistic of n samples.

    ``stat_fn(idx)`` computes the statistic on the samples ``idx`` (an int array of
    length n drawn with replacement); returns the standard deviation over ``num``
    resamples. The same ``seed`` gives the same index sets, so statistics of
    different sample sets with shared seeds are resampled in pairs.
    """
    if num < 2:
        raise ValueError(f"need at least 2 bootstrap resamples, got {num}")
    rng = np.random.default_rng(seed)
    vals = [stat_fn(rng.integers(0, n, n)) for _ in range(num)]
    return float(np.std(vals, ddof=1))


# --------------------------------------------------------------------------- batching helper

def batched_apply(fn: Callable[[np.ndarray], Iterable], x, batch_size: int = 512):
    """Apply ``fn`` to ``x`` (N, ...) in batches; concatenate each output along axis 0.

    ``fn`` returns an array or a tuple of arrays. The last batch is padded to
    ``batch_size`` (repeating the final sample) so that a jitted ``fn`` compiles once.
    """
    x = np.asarray(x)
    n = x.shape[0]
    if n == 0:
        raise ValueError("no inputs")
    outs = None
    single = False
    for start in range(0, n, batch_size):
        xb = x[start:start + batch_size]
        valid = xb.shape[0]
        if valid < batch_size and n > batch_size:
            pad = np.repeat(xb[-1:], batch_size - valid, axis=0)
            xb = np.concatenate([xb, pad], axis=0)
        out = fn(xb)
        if not isinstance(out, tuple):
            out, single = (out,), True
        out = [np.asarray(o)[:valid] for o in out]
        outs = [[o] for o in out] if outs is None else [acc + [o] for acc, o in zip(outs, out)]
    res = tuple(np.concatenate(o, axis=0) for o in outs)
    return res[0] if single else res
