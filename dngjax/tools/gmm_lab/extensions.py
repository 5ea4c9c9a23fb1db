"""DNG beyond the paper's setting, checked on 2-D mixtures: several concepts, the positive-prompt
mode, and calibration to a target safety.

    python -m experiments.gmm --figure=extensions --out=outputs/gmm     # 20,000 samples per point

The lab (``dngjax.gmm.toy_2d_two_concepts``): four equal modes (std 0.5) at (+-2, +-2), numbered
0 (-2, -2), 1 (2, -2), 2 (-2, 2), 3 (2, 2); a 250-step respaced chain (--steps), seeds 0 .. n-1 at
every point.

* **Several concepts**: forbid mode 2 and mode 3 as two separate concepts. Exact multi-concept DNG
  (lambda0 = 1, exact p(c_k | x_t)), CFG toward the remaining modes (the target's own eps), tracked
  multi-concept DNG (lambda0 = 1, prior 0.25 each, temperature 1, sigma^2 = beta_t), no guidance.
* **Positive-prompt mode**: c+ = the left modes {0, 2}, c- = the top modes {2, 3}; the target
  p(x | c+, not c-) is mode 0. Exact positive-mode DNG (negative prediction eps(x | c+, c-), exact
  p(c- | x_t, c+)); tracked positive-mode DNG with eps(x | c+, c-) and with eps(x | c-), the
  stand-in a text-to-image model offers; positive-mode NP with the stand-in; c+ alone.
* **Calibration**: on the 1-D lab of fig. 1 (forbidden mass 0.35 unguided), the smallest NP and
  tracked-DNG scale whose one-sided 95 % upper bound on the forbidden mass is <= 1 %.

Writes extensions_table.md and extensions.png.
"""

from __future__ import annotations

import functools
import os
import textwrap

import numpy as np

import dngjax as dj
from dngjax.gmm import (ConceptSplit, NegativeSplit, GaussianMixture, mixture_denoiser, toy_2d_two_concepts,
                        wasserstein1_1d)

from .common import Timer, chain, lab_1d, prepare_out, print_table, save_png

DNG_GRID = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0)
NP_GRID = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


def _marginal_w1(x, mixture, axis):
    proj = GaussianMixture.create(np.exp(np.asarray(mixture.log_weights)),
                                         np.asarray(mixture.means)[:, axis], np.asarray(mixture.stds))
    return wasserstein1_1d(np.asarray(x)[:, axis], proj)


def _modes(mixture, x):
    return np.bincount(np.asarray(mixture.classify(np.asarray(x))), minlength=4) / len(x)


def _draw(sched, keys, args, denoiser_u, rule=dj.NoGuidance(), denoiser_c=None):
    """(samples (n, 2) as numpy, seconds) of one rule on the chain ``sched``, one sample per key."""
    with Timer() as tm:
        x = dj.sample(denoiser_u, sched, keys, (2,), rule=rule, denoiser_c=denoiser_c, chunk_size=args.chunk,
                      progress=not args.no_progress)
    return np.asarray(x), tm.s


def _several_concepts(mixture, concepts, sched, draw, steps, n):
    """Forbid mode 2 and mode 3 as two concepts: ({method: (label, (samples, seconds))}, table rows, table)."""
    lab = ConceptSplit(mixture, concepts, sched)
    target = lab.union.remember_mixture
    multi = {"none": ("no guidance", draw(lab.denoiser_full)),
             "exact": ("multi-concept DNG, exact posteriors, lambda0=1",
                       draw(lab.denoiser_full, lab.exact_dng(1.0), lab.denoisers_concepts)),
             "cfg": ("CFG toward the remaining modes (target's eps)",
                     draw(lab.denoiser_full, dj.ClassifierFreeGuidance(1.0), lab.union.denoiser_remember)),
             "tracked": ("multi-concept DNG, tracked posteriors, lambda0=1",
                         draw(lab.denoiser_full, lab.approximate_dng(1.0), lab.denoisers_concepts))}
    rows_m = []
    for key, (label, (x, sec)) in multi.items():
        w = _modes(mixture, x)
        rows_m.append({"label": label, "c1": w[2], "c2": w[3], "w0": w[0] / max(w[0] + w[1], 1e-12),
                       "W1x": _marginal_w1(x, target, 0), "W1y": _marginal_w1(x, target, 1), "s": sec})
    ref = np.asarray(target.sample(dj.keys_from_seeds([10 ** 6])[0], n))
    rows_m.append({"label": f"(exact draws from the target, n = {n}: the sampling floor)",
                   "c1": _modes(mixture, ref)[2], "c2": _modes(mixture, ref)[3],
                   "w0": _modes(mixture, ref)[0] / max(_modes(mixture, ref)[:2].sum(), 1e-12),
                   "W1x": _marginal_w1(ref, target, 0), "W1y": _marginal_w1(ref, target, 1), "s": 0.0})
    table = print_table(f"Several concepts - 2-D lab, forbid mode 2 and mode 3 as two concepts; {steps}-step chain, "
                        f"n = {n}", rows_m,
                        [("label", "method", ""), ("c1", "mass in concept 1 (mode 2)", ".4f"),
                         ("c2", "mass in concept 2 (mode 3)", ".4f"),
                         ("w0", "w(mode 0) among kept (target 0.5)", ".3f"),
                         ("W1x", "W1 of x-marginal", ".4f"), ("W1y", "W1 of y-marginal", ".4f"),
                         ("s", "seconds", ".0f")])
    return multi, rows_m, table


def _positive_mode(mixture, sched, draw, steps, n):
    """c+ = modes {0, 2}, c- = modes {2, 3} (target: mode 0): ({method: (label, (samples, seconds))}, table rows,
    table)."""
    pos = NegativeSplit(mixture.subset([0, 2]), [1], sched)
    null = mixture_denoiser(mixture, sched)
    standin = mixture_denoiser(mixture.subset([2, 3]), sched)
    tracked = dj.PositiveMode(dj.DynamicNegativeGuidance(1.0, prior=0.5, temperature=1.0, variance="beta"))
    positive = {
        "c+": ("c+ alone (no negative)", draw(pos.denoiser_full)),
        "exact": ("positive DNG, exact p(c-|x,c+), neg = eps(x|c+,c-), lambda0=1",
                  draw(null, dj.PositiveMode(dj.ExactDynamicNegativeGuidance(1.0, posterior_fn=pos.posterior_fn,
                                                                              log_space=True)),
                       (pos.denoiser_full, pos.denoiser_neg))),
        "tracked": ("positive DNG, tracked, neg = eps(x|c+,c-), lambda0=1",
                    draw(null, tracked, (pos.denoiser_full, pos.denoiser_neg))),
        "standin": ("positive DNG, tracked, neg = eps(x|c-) (text-to-image stand-in), lambda0=1",
                    draw(null, tracked, (pos.denoiser_full, standin))),
        "np": ("positive NP, neg = eps(x|c-), lambda=1",
               draw(null, dj.PositiveMode(dj.NegativePrompting(1.0)), (pos.denoiser_full, standin))),
    }
    rows_p = []
    for key, (label, (x, sec)) in positive.items():
        w = _modes(mixture, x)
        rows_p.append({"label": label, "m0": w[0], "m2": w[2], "other": w[1] + w[3],
                       "W1x": _marginal_w1(x, pos.remember_mixture, 0),
                       "W1y": _marginal_w1(x, pos.remember_mixture, 1), "s": sec})
    table = print_table(f"Positive-prompt mode - c+ = modes {{0, 2}}, c- = modes {{2, 3}}, target = mode 0; "
                        f"{steps}-step chain, n = {n}", rows_p,
                        [("label", "method", ""), ("m0", "mode 0 (target)", ".4f"), ("m2", "mode 2 (c+ and c-)", ".4f"),
                         ("other", "modes 1, 3", ".4f"), ("W1x", "W1 of x-marginal to mode 0", ".4f"),
                         ("W1y", "W1 of y-marginal to mode 0", ".4f"), ("s", "seconds", ".0f")])
    return positive, rows_p, table


def _calibration(sched, keys, chunk, n):
    """The smallest NP and tracked-DNG scale keeping the 1-D lab's forbidden mass <= 1 % at 95 %: (table rows,
    table)."""
    lab1 = lab_1d(sched)
    rows_c = []
    for name, rule, grid in (("NP", dj.NegativePrompting(), NP_GRID), ("DNG (tracked)", lab1.approximate_dng(), DNG_GRID)):
        cal = dj.calibrate(lab1.denoiser_full, sched, keys, (1,), rule=rule, scales=grid, is_unwanted=lab1.in_negative,
                           target=0.01, denoiser_c=lab1.denoiser_neg, chunk_size=chunk)
        print(f"\n{name}:\n{cal.table()}")
        k = None if cal.scale is None else list(cal.scales).index(cal.scale)
        rows_c.append({"label": name, "grid": " ".join(f"{s:g}" for s in grid),
                       "scale": "none" if k is None else f"{cal.scale:g}",
                       "rate": np.nan if k is None else 100 * cal.rate[k],
                       "upper": np.nan if k is None else 100 * cal.upper[k]})
    table = print_table(f"Calibration - 1-D lab, target <= 1 % forbidden mass at 95 % (one-sided Clopper-Pearson), "
                        f"n = {n} per scale", rows_c,
                        [("label", "method", ""), ("grid", "candidate scales", ""), ("scale", "chosen scale", ""),
                         ("rate", "measured %", ".3f"), ("upper", "upper bound %", ".3f")])
    return rows_c, table


def run(args):
    """The three extension studies; writes extensions_table.md and extensions.png, returns their table rows."""
    out = prepare_out(args.out)
    steps = 250 if args.steps == 1000 else args.steps          # --steps' default (1000) means 250 here
    sched = chain(steps)
    keys = dj.keys_from_seeds(np.arange(args.seed, args.seed + args.n))
    mixture, concepts = toy_2d_two_concepts()
    draw = functools.partial(_draw, sched, keys, args)
    multi, rows_m, t1 = _several_concepts(mixture, concepts, sched, draw, steps, args.n)
    positive, rows_p, t2 = _positive_mode(mixture, sched, draw, steps, args.n)
    rows_c, t3 = _calibration(sched, keys, args.chunk, args.n)
    with open(os.path.join(out, "extensions_table.md"), "w") as f:
        f.write("\n".join([t1, t2, t3]) + "\n")
    plot(multi, positive, mixture, os.path.join(out, "extensions.png"), steps, args.n)
    return rows_m, rows_p, rows_c


def plot(multi, positive, mixture, path, steps, n):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("several concepts: " + multi[k][0], multi[k][1][0]) for k in ("none", "exact", "tracked")]
    panels += [("positive mode: " + positive[k][0], positive[k][1][0]) for k in ("c+", "exact", "standin")]
    fig, axes = plt.subplots(2, 3, figsize=(11, 7.4))
    means = np.asarray(mixture.means)
    for ax, (title, x) in zip(axes.ravel(), panels):
        m = min(len(x), 4000)
        ax.scatter(x[:m, 0], x[:m, 1], s=1, alpha=0.3, color="tab:blue")
        ax.scatter(means[:, 0], means[:, 1], marker="x", color="black")
        ax.set_xlim(-4.5, 4.5)
        ax.set_ylim(-4.5, 4.5)
        ax.set_aspect("equal")
        ax.set_title(textwrap.fill(title, 52), fontsize=7)
    fig.suptitle(f"2-D lab, {steps}-step chain, first 4,000 of n = {n} samples per panel (crosses: the modes)",
                 fontsize=9)
    fig.tight_layout()
    save_png(fig, path, dpi=100)
    plt.close(fig)
