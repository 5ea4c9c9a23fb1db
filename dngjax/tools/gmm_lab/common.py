"""Shared pieces of the Gaussian-mixture lab: labs, rules, chunked sampling, tables."""

from __future__ import annotations

import os
import time
from typing import Dict, Sequence, Tuple

import numpy as np

from dngjax import (NoGuidance, NegativePrompting, ClassifierFreeGuidance, linear_schedule, respace,
                    sample_chunks, keys_from_seeds)
from dngjax.gmm import NegativeSplit, toy_1d, toy_2d, wasserstein1_1d

METHOD_LABELS = {
    "none": "no guidance",
    "cfg": "CFG toward remaining modes, lambda=1",
    "np": "negative prompting, lambda=1",
    "dng_exact": "DNG, exact posterior, lambda0=1",
    "dng_approx": "DNG, Markov-chain posterior, lambda0=1",
}


def chain(steps: int):
    """The linear T = 1000 schedule, respaced to ``steps`` steps when steps < 1000."""
    base = linear_schedule()
    return base if steps >= base.num_steps else respace(base, steps)


def lab_1d(schedule) -> NegativeSplit:
    mixture, negative = toy_1d()
    return NegativeSplit(mixture, negative, schedule)


def lab_2d(schedule) -> NegativeSplit:
    mixture, negative = toy_2d()
    return NegativeSplit(mixture, negative, schedule)


def rule_for(lab: NegativeSplit, method: str, scale: float = 1.0, **kw):
    """(rule, eps_c) for a method name (see METHOD_LABELS)."""
    if method == "none":
        return NoGuidance(), None
    if method == "cfg":
        return ClassifierFreeGuidance(scale), lab.denoiser_remember
    if method == "np":
        return NegativePrompting(scale), lab.denoiser_neg
    if method == "dng_exact":
        return lab.exact_dng(scale), lab.denoiser_neg
    if method == "dng_approx":
        return lab.approximate_dng(scale, **kw), lab.denoiser_neg
    raise ValueError(f"unknown method {method!r}; choose among {list(METHOD_LABELS)}")


def sample_chunked(lab: NegativeSplit, rule, eps_c, schedule, n: int, *, seed0: int = 0,
                   chunk: int = 25_000, progress: bool = True, desc: str = "",
                   trace_reducer=None, eta=None):
    """Samples for seeds seed0 .. seed0+n-1 via :func:`dngjax.sample_chunks` (one compilation).

    ``trace_reducer(x0, t, p, lam)`` is called per chunk when given (the trace is then
    requested), so that per-step statistics can be accumulated without holding an (S, n)
    array. ``eta``: DDIM steps (see :func:`dngjax.sample`). Returns x0 (n, d) as numpy.
    """
    keys = keys_from_seeds(np.arange(seed0, seed0 + n))
    chunks = sample_chunks(lab.denoiser_full, schedule, keys, (lab.full.dim,), rule=rule, denoiser_c=eps_c,
                           chunk_size=chunk, eta=eta, return_trace=trace_reducer is not None,
                           progress=progress, desc=desc or None)
    xs = []
    for c in chunks:
        if trace_reducer is not None:
            trace_reducer(c.x, c.trace.t, c.trace.p, c.trace.lam)
        xs.append(c.x)
    return np.concatenate(xs, axis=0)


def summarize_1d(lab: NegativeSplit, x: np.ndarray) -> Dict[str, float]:
    """W1 to the remaining-modes law, forbidden mass, the remembered modes' relative weights."""
    fr = lab.remember_fractions(x)
    return {"W1": wasserstein1_1d(x[:, 0], lab.remember_mixture),
            "forbidden": float(lab.in_negative(x).mean()),
            "w_left": float(fr[0]), "w_right": float(fr[1]),
            "mean": float(x.mean()), "std": float(x.std())}


def print_table(title: str, rows: Sequence[Dict], columns: Sequence[Tuple[str, str, str]]) -> str:
    """Print (and return) a markdown table; columns = (key, header, format)."""
    lines = [f"\n{title}", "| " + " | ".join(h for _, h, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        cells = []
        for k, _, f in columns:
            v = r.get(k, "")
            cells.append(format(v, f) if isinstance(v, (int, float, np.floating)) and f
                         else str(v).replace("|", "\\|"))              # a "|" in a label would split the cell
        lines.append("| " + " | ".join(cells) + " |")
    out = "\n".join(lines)
    print(out, flush=True)
    return out


def save_png(fig, path: str, dpi: int = 100) -> None:
    """Save a matplotlib figure as a palette PNG (256 colours: ~3x smaller, same look)."""
    import io
    from PIL import Image
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    buf.seek(0)
    img = Image.open(buf).convert("RGB")
    img.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)
    print(f"wrote {path} ({os.path.getsize(path) / 1024:.0f} KB)")


def prepare_out(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path


class Timer:
    def __enter__(self):
        self.t0 = time.time()
        return self

    def __exit__(self, *a):
        self.s = time.time() - self.t0
