"""The paper's Q metric for text-to-image negative guidance, from CLIP image embeddings.

A negative prompt that names something the image would contain (a *related* one: "Chalices, candles"
for "A Medieval Feast") should change the image; one that names something absent (an *unrelated* one:
"Kids playing football") should leave it as it was. For each seed, the guided image is compared with
the unguided one of the same seed (classifier-free guidance toward the prompt alone) by the cosine
distance of their CLIP image embeddings, d = 1 - cos(e_guided, e_unguided), and

    Q = mean over seeds of d(related negative) - mean over seeds of d(unrelated negative):

large when the guidance acts only where the negative prompt applies. The paper reports Q averaged over
its five prompts and 32 seeds: 0.052 for DNG, 0.007 for NP.

This is how this project reads the paper's eqs. 22-23 (appendix H): the appendix's text was not
available offline when it was written, so compare with the paper's numbers only after checking the
definition there; the function returns both mean distances, so other combinations can be formed.

Images are prepared as transformers' ``CLIPImageProcessor`` does for square inputs: resized (bicubic)
to the tower's input size, scaled to [0, 1], normalised with CLIP's channel means and deviations.
"""

from __future__ import annotations

import functools
from typing import Any, Dict

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


def cosine_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """1 - cos(a_i, b_i) per row of two (N, D) arrays."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    cos = np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return 1.0 - cos


def q_score(unguided: np.ndarray, related: np.ndarray, unrelated: np.ndarray) -> Dict[str, Any]:
    """Q from the embeddings (N, D) of the same N seeds: unguided, guided away from the related and from
    the unrelated negative prompt. Returns Q, its standard error (paired over seeds), and the two mean
    distances with theirs."""
    if not (np.shape(unguided) == np.shape(related) == np.shape(unrelated)) or np.ndim(unguided) != 2:
        raise ValueError(f"three (N, D) embeddings of the same seeds needed, got {np.shape(unguided)}, "
                         f"{np.shape(related)}, {np.shape(unrelated)}")
    d_rel, d_unrel = cosine_distance(related, unguided), cosine_distance(unrelated, unguided)
    n = len(d_rel)
    se = lambda v: float(np.std(v, ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    return {"q": float(np.mean(d_rel - d_unrel)), "q_se": se(d_rel - d_unrel),
            "distance_related": float(np.mean(d_rel)), "distance_related_se": se(d_rel),
            "distance_unrelated": float(np.mean(d_unrel)), "distance_unrelated_se": se(d_unrel), "n": n}
