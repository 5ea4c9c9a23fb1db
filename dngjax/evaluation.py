"""Scoring samples with a classifier: class histograms, confidence, Fréchet distance of its features.

The MNIST experiments judge a set of generated images x (N, 28, 28, 1) in [-1, 1] by a
separately trained classifier (``checkpoints/mnist/classifier``):

* ``labels`` / ``confidence``: argmax and max of its softmax;
* the class histogram and its KL divergence to a reference histogram (``dngjax.metrics``);
* FD: the Fréchet distance between Gaussians fitted to its penultimate features of the
  samples and of a reference set (``reference_stats``), the MNIST analogue of FID.

Everything takes explicit arguments (a classifier, reference statistics): no config objects.
"""

from __future__ import annotations

from typing import Any, Dict, NamedTuple, Optional

import numpy as np
import jax
import jax.numpy as jnp

from . import metrics

Array = np.ndarray


#: the label of a sample with a NaN or inf element: it is no image, and no class
NONFINITE_LABEL = -1


class Scores(NamedTuple):
    """Per-sample classifier outputs. labels (N,) int; confidence (N,) max softmax; features (N, F);
    finite (N,) bool: every element of the sample is finite. A non-finite sample is never scored: its
    label is :data:`NONFINITE_LABEL`, its confidence and features NaN."""

    labels: Array
    confidence: Array
    features: Array
    finite: Optional[Array] = None


def make_scorer(module: Any, params: Any, batch_size: int = 500):
    """``score(x) -> Scores`` for images x (N, H, W, C) in [-1, 1] (finite values clipped, as samples may
    overshoot; a sample with a NaN or inf element is flagged in ``Scores.finite``, not clipped into range)."""

    @jax.jit
    def _score(x):
        x = jnp.clip(x, -1.0, 1.0)
        logits = module.apply(params, x)
        prob = jax.nn.softmax(logits, axis=-1)
        return jnp.argmax(logits, -1), jnp.max(prob, -1), module.apply(params, x, method="features")

    def score(x: Array) -> Scores:
        x = np.asarray(x, np.float32)
        if x.ndim != 4:
            raise ValueError(f"score: expected images (N, H, W, C), got shape {x.shape}")
        finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
        if not finite.all():                            # the network sees zeros in their place
            x = np.where(finite[:, None, None, None], x, np.float32(0.0))
        parts = []
        for i in range(0, len(x), batch_size):
            chunk = x[i:i + batch_size]
            n = len(chunk)
            if n < batch_size and len(x) > batch_size:  # one compiled shape for every chunk
                chunk = np.concatenate([chunk, np.zeros((batch_size - n, *x.shape[1:]), np.float32)])
            parts.append([np.asarray(a)[:n] for a in _score(jnp.asarray(chunk))])
        labels, confidence, features = (np.concatenate([p[k] for p in parts]) for k in range(3))
        if not finite.all():
            labels[~finite] = NONFINITE_LABEL
            confidence[~finite] = np.nan
            features[~finite] = np.nan
        return Scores(labels, confidence, features, finite)

    return score


def reference_stats(features: Array) -> Dict[str, Any]:
    """Mean and covariance of reference features, as stored in ``reference_stats/*.npz``."""
    mu, sigma = metrics.gaussian_stats(features)
    return {"mu": mu.astype(np.float64), "sigma": sigma.astype(np.float64), "n": int(len(features))}


def sample_quality(scores: Scores, ref_mu: Array, ref_sigma: Array, ref_histogram: Optional[Array] = None,
                   num_classes: int = 10, confident_at: float = 0.9) -> Dict[str, Any]:
    """Quality of an unconditional sample set.

    Returns ``fd`` (to the reference statistics), ``confident_share`` (share with max softmax >
    ``confident_at``: malformed digits are classified with low confidence), ``class_histogram``
    (the histogram and FD of the finite samples only; ``nonfinite`` counts the others, which are never
    confident)
    and, given the reference histogram (e.g. the train set's), ``kl_ref_to_samples`` =
    KL(p_ref || p_samples) with p_samples smoothed (``metrics.smoothed_distribution``).
    """
    finite = np.ones(len(scores.labels), bool) if scores.finite is None else np.asarray(scores.finite, bool)
    hist = metrics.class_histogram(scores.labels[finite], num_classes)
    out = {"num_samples": int(len(scores.labels)),
           "nonfinite": int((~finite).sum()),
           "fd": (float(metrics.frechet_distance_features(scores.features[finite], ref_mu, ref_sigma))
                  if finite.sum() >= 2 else float("nan")),
           "confident_share": float(np.mean(np.nan_to_num(scores.confidence, nan=-1.0) > confident_at)),
           "confident_at": confident_at,
           "class_histogram": hist.tolist()}
    if ref_histogram is not None:
        p_ref = np.asarray(ref_histogram, np.float64) / np.sum(ref_histogram)
        out["kl_ref_to_samples"] = float(metrics.kl_divergence(p_ref, metrics.smoothed_distribution(hist)))
    return out
