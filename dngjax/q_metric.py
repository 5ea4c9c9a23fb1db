"""The paper's Q metric for text-to-image negative guidance (appendix H, eqs. 22-23, table 4).

Setting (sec. 4.2, fig. 6a, appendix D.3): per prompt, the same seeds are sampled unguided (here:
classifier-free guidance toward the prompt) and guided away from a *related* negative prompt (one that
names something the image would contain: "Chalices, candles" for "A Medieval Feast"), which should
change the image, and from an *unrelated* one ("Kids playing football"), which should not. The
*CLIP score* CS of two images is "the cosine similarity of their respective CLIP space
representations" (sec. 4.2), averaged over the seeds (32 in the paper), each guided image compared with
the unguided image of its own seed.

* Eq. 22, one guidance scale (:func:`q_score`)::

      Q = CS(img_no_guid, img_unrel) - CS(img_no_guid, img_rel)

  in [-2, 2]; large when the unrelated negative prompt leaves the images as they were (CS near 1)
  and the related one changes them (lower CS); negative when the unrelated one changes them more.
* Eq. 23, a sweep of guidance scales (:func:`q_regression`, :func:`q_sweep`): the points
  (x, y) = (mean CS related, mean CS unrelated), one per scale (fig. 6b), are fitted by a line
  y = a x + b; with [x_min, x_max] the range of x the sweep reached, Q is the mean over that range of
  y - x along the line::

      Q = a (x_max + x_min) / 2 + b - (x_max + x_min) / 2 = (a - 1) (x_max + x_min) / 2 + b

  ("the average y value from which the average x value is subtracted"). The text extraction of the
  paper lost the fraction bars and the minus signs of eq. 23; this form is the one its prose and
  eq. 22 fix (it is eq. 22 averaged along the fitted line), with table 4's sign (higher is better).
* Table 4: eq. 23 per prompt (5 prompts) for NP and DNG, and an "Average" column: mean and standard
  deviation over the prompts. For DNG the printed entries give exactly the printed average
  (0.052 +- 0.022 with the sample standard deviation, ddof = 1: :func:`average_over_prompts`); for NP
  the printed entries (-0.015, 0.003, 0.017, 0.016, 0.041) give 0.012 +- 0.021, not the printed
  0.007 +- 0.014: that row does not add up as printed.

What the paper leaves open: the guidance scales of the sweep, whether the fit uses all of them (its
sec. 4.2 says "a linear regression in a limited interval"; pass only the points of the interval you
mean), and the CLIP model (this module takes any CLIP image tower; the job's recipe names
openai/clip-vit-large-patch14). The ``--job=text_to_image`` job samples one scale per method and prompt
(the scales of the captions of figs. 16-20), so it reports eq. 22 at that scale, not table 4's eq. 23.

Images are prepared as transformers' ``CLIPImageProcessor`` does for square inputs: resized (bicubic)
to the tower's input size, scaled to [0, 1], normalised with CLIP's channel means and deviations.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, Sequence

import numpy as np
import jax
import jax.numpy as jnp

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def preprocess(images: np.ndarray, size: int) -> jnp.ndarray:
    """uint8 images (N, H, W, 3) -> CLIP pixels (N, size, size, 3): the shorter side resized to ``size``
    (bicubic, antialiased), a centred square crop, [0, 1], normalised per channel."""
    x = jnp.asarray(images, jnp.float32) / 255.0
    n, h, w, c = x.shape
    s = size / min(h, w)
    nh, nw = max(size, round(h * s)), max(size, round(w * s))
    x = jax.image.resize(x, (n, nh, nw, c), method="cubic", antialias=True)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = jnp.clip(x[:, top:top + size, left:left + size], 0.0, 1.0)
    return (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


@functools.partial(jax.jit, static_argnums=0)
def _embed(encoder, params, images):
    e = encoder.apply(params, preprocess(images, encoder.image_size))
    return e / jnp.linalg.norm(e, axis=-1, keepdims=True)


def image_embeddings(encoder, params, images: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """Unit-norm CLIP image embeddings (N, D) of uint8 images (N, H, W, 3), ``batch_size`` at a time
    (``encoder``, ``params``: :func:`dngjax.models.clip.load_clip_image`)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    out = []
    for i in range(0, len(images), batch_size):
        part = images[i:i + batch_size]
        m = len(part)
        if m < batch_size and len(images) > batch_size:     # the last batch padded: one compiled shape
            part = np.concatenate([part, np.repeat(part[-1:], batch_size - m, axis=0)])
        out.append(np.asarray(_embed(encoder, params, part))[:m])
    return np.concatenate(out)


def clip_score(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The paper's CLIP score per pair: the cosine similarity cos(a_i, b_i) of the rows of two (N, D)
    embedding arrays (any norm; sec. 4.2)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"two (N, D) embeddings of the same seeds needed, got {a.shape} and {b.shape}")
    return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def cosine_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """1 - cos(a_i, b_i) per row of two (N, D) arrays: 1 - :func:`clip_score`."""
    return 1.0 - clip_score(a, b)


def q_score(unguided: np.ndarray, related: np.ndarray, unrelated: np.ndarray) -> Dict[str, Any]:
    """Eq. 22 at one guidance scale, from the embeddings (N, D) of the same N seeds: unguided, guided
    away from the related and from the unrelated negative prompt.

    ``q`` = mean CS(unguided, unrelated) - mean CS(unguided, related); ``q_se`` its standard error
    (paired over seeds); ``clip_score_related`` / ``clip_score_unrelated`` the two mean CLIP scores (a
    point of fig. 6b: x, y) with theirs; ``distance_related`` / ``distance_unrelated`` = 1 - those
    (the same Q: mean distance related - mean distance unrelated); ``n`` the number of seeds."""
    if not (np.shape(unguided) == np.shape(related) == np.shape(unrelated)) or np.ndim(unguided) != 2:
        raise ValueError(f"three (N, D) embeddings of the same seeds needed, got {np.shape(unguided)}, "
                         f"{np.shape(related)}, {np.shape(unrelated)}")
    cs_rel, cs_unrel = clip_score(unguided, related), clip_score(unguided, unrelated)
    n = len(cs_rel)
    se = lambda v: float(np.std(v, ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    return {"q": float(np.mean(cs_unrel - cs_rel)), "q_se": se(cs_unrel - cs_rel),
            "clip_score_related": float(np.mean(cs_rel)), "clip_score_related_se": se(cs_rel),
            "clip_score_unrelated": float(np.mean(cs_unrel)), "clip_score_unrelated_se": se(cs_unrel),
            "distance_related": float(np.mean(1.0 - cs_rel)), "distance_related_se": se(cs_rel),
            "distance_unrelated": float(np.mean(1.0 - cs_unrel)), "distance_unrelated_se": se(cs_unrel),
            "n": n}


def q_regression(clip_score_related: Sequence[float], clip_score_unrelated: Sequence[float]) -> Dict[str, Any]:
    """Eq. 23 from the points of one prompt and method over a sweep of guidance scales: x =
    ``clip_score_related``, y = ``clip_score_unrelated`` (mean CLIP scores, one per scale, fig. 6b).

    Fits y = a x + b by least squares over the points, takes [x_min, x_max] = the range of x, and
    returns ``q`` = (a - 1) (x_max + x_min) / 2 + b with ``a``, ``b``, ``x_min``, ``x_max`` and the
    number of points ``n_points``. Needs at least two distinct x values."""
    x = np.asarray(clip_score_related, np.float64)
    y = np.asarray(clip_score_unrelated, np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"two 1-d sequences of mean CLIP scores of the same scales needed, got {x.shape} and {y.shape}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("the CLIP scores must be finite")
    if len(x) < 2 or np.ptp(x) == 0:
        raise ValueError(f"eq. 23 fits a line: at least two distinct related CLIP scores needed, got {x.tolist()}")
    dx = x - x.mean()
    a = float(np.sum(dx * (y - y.mean())) / np.sum(dx * dx))
    b = float(y.mean() - a * x.mean())
    x_min, x_max = float(x.min()), float(x.max())
    mid = (x_max + x_min) / 2
    return {"q": (a - 1.0) * mid + b, "a": a, "b": b, "x_min": x_min, "x_max": x_max, "n_points": len(x)}


def q_sweep(unguided: np.ndarray, related: np.ndarray, unrelated: np.ndarray) -> Dict[str, Any]:
    """Eq. 23 from embeddings: ``unguided`` (N, D), ``related`` and ``unrelated`` (G, N, D): the same N
    seeds guided at G scales (e.g. ``sd.generate(..., grid={"scale": scales})``, one grid point per
    scale; leave out the unguided scale 0 unless you mean it to be a point of the fit). Returns
    :func:`q_regression`'s result with the per-scale points ``clip_score_related`` and
    ``clip_score_unrelated`` (G,) and ``q_per_scale`` (eq. 22 at each scale)."""
    related, unrelated = np.asarray(related), np.asarray(unrelated)
    if related.ndim != 3 or related.shape != unrelated.shape or related.shape[1:] != np.shape(unguided):
        raise ValueError(f"unguided (N, D) and related, unrelated (G, N, D) of the same seeds needed, got "
                         f"{np.shape(unguided)}, {related.shape}, {unrelated.shape}")
    points = [q_score(unguided, r, u) for r, u in zip(related, unrelated)]
    x = [p["clip_score_related"] for p in points]
    y = [p["clip_score_unrelated"] for p in points]
    return {**q_regression(x, y), "clip_score_related": x, "clip_score_unrelated": y,
            "q_per_scale": [p["q"] for p in points]}


def average_over_prompts(q: Sequence[float]) -> Dict[str, float]:
    """Table 4's "Average" column: the mean of the per-prompt Q values and their sample standard
    deviation (ddof = 1; what the printed DNG row gives: 0.052 +- 0.022)."""
    q = np.asarray(q, np.float64)
    if q.ndim != 1 or len(q) < 1:
        raise ValueError(f"a 1-d sequence of per-prompt Q values needed, got shape {q.shape}")
    return {"mean": float(q.mean()), "std": float(q.std(ddof=1)) if len(q) > 1 else float("nan"), "n": len(q)}
