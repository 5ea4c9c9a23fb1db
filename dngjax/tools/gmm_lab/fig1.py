"""Fig. 1: 1-D mixture with one forbidden mode; NP distorts, exact DNG and CFG reproduce the target.

    python -m experiments.gmm --figure=fig1 --out=outputs/gmm     # 100,000 samples per method, T = 1000

Samples no guidance, CFG (lambda = 1, toward the remaining modes), negative prompting
(lambda = 1) and DNG with the exact posterior (lambda0 = 1), all from the same seeds,
and plots their histograms against the unconditional density p_0 and the target
(remaining-modes) density. Prints W1 to the target law, the forbidden mass and the
remembered modes' relative weights. Writes fig1_gmm_1d.png and fig1_table.md.
"""

from __future__ import annotations

import os

import numpy as np

from .common import (save_png, METHOD_LABELS, Timer, chain, lab_1d, prepare_out, print_table,
                     rule_for, sample_chunked, summarize_1d)

METHODS = ("none", "cfg", "np", "dng_exact")
COLORS = {"none": "tab:gray", "cfg": "tab:blue", "np": "tab:red", "dng_exact": "tab:green",
          "dng_approx": "tab:purple"}


def run(args):
    sched = chain(args.steps)
    lab = lab_1d(sched)
    out = prepare_out(args.out)
    samples, rows = {}, []
    cache = os.path.join(out, "fig1_samples.npz")
    cached = dict(np.load(cache)) if args.replot else {}
    for m in METHODS:
        rule, eps_c = rule_for(lab, m, 1.0)
        with Timer() as tm:
            if args.replot:
                x = cached[m]
            else:
                x = sample_chunked(lab, rule, eps_c, sched, args.n, seed0=args.seed, chunk=args.chunk,
                                   progress=not args.no_progress, desc=m)
        samples[m] = x
        rows.append({"method": METHOD_LABELS[m], **summarize_1d(lab, x), "seconds": tm.s})
    if not args.replot:
        np.savez_compressed(cache, **samples)
    args.n = len(samples[METHODS[0]])
    # exact samples of the target, as the reference row
    import jax
    xt = np.asarray(lab.remember_mixture.sample(jax.random.key(args.seed + 12345), args.n))
    rows.append({"method": "exact samples of the target (reference)", **summarize_1d(lab, xt), "seconds": 0.0})
    same = np.abs(samples["dng_exact"] - samples["cfg"])
    rows_cmp = [{"quantity": "median abs(x_DNG - x_CFG), same seeds", "value": float(np.median(same))},
                {"quantity": "99.9% quantile of abs(x_DNG - x_CFG)", "value": float(np.quantile(same, 0.999))},
                {"quantity": "share of seeds with abs(x_DNG - x_CFG) > 1e-3", "value": float(np.mean(same > 1e-3))},
                {"quantity": "max abs(x_DNG - x_CFG)", "value": float(same.max())},
                {"quantity": "W1(NP) / W1(DNG exact)", "value": rows[2]["W1"] / rows[3]["W1"]}]
    cols = [("method", "method", ""), ("W1", "W1 to target", ".4f"), ("forbidden", "forbidden mass", ".5f"),
            ("w_left", "w(-3) among kept", ".4f"), ("w_right", "w(+3) among kept", ".4f"),
            ("mean", "mean", ".3f"), ("std", "std", ".3f"), ("seconds", "seconds", ".0f")]
    title = (f"Fig. 1 - 1-D mixture, n = {args.n} per method, chain = {sched.num_steps} steps "
             f"(target weights among kept modes 0.3846 / 0.6154)")
    t1 = print_table(title, rows, cols)
    t2 = print_table("DNG exact vs CFG", rows_cmp, [("quantity", "quantity", ""), ("value", "value", ".3g")])
    with open(os.path.join(out, "fig1_table.md"), "w") as f:
        f.write(t1 + "\n" + t2 + "\n")
    plot(lab, samples, rows, os.path.join(out, "fig1_gmm_1d.png"), args.n, sched.num_steps)
    return rows


def plot(lab, samples, rows, path, n, steps):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo, hi = -7.0, 7.0
    grid = np.linspace(lo, hi, 1401)
    p0 = lab.full.density_1d(grid)
    target = lab.remember_mixture.density_1d(grid)
    bins = np.linspace(lo, hi, 141)
    forb_region = lab.in_negative(grid[:, None])       # where the forbidden mode is the most probable one
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True, sharey=True)
    for ax, m, r in zip(axes.ravel(), METHODS, rows):
        x = samples[m][:, 0]
        outside = np.mean((x < lo) | (x > hi))
        ax.hist(np.clip(x, lo, hi), bins=bins, density=True, color=COLORS[m], alpha=0.55,
                label=f"samples ({n:,})")
        ax.plot(grid, p0, ls="--", color="k", lw=1.0, label="unconditional $p_0$")
        ax.plot(grid, target, color="k", lw=1.6, label="target: remaining modes")
        ax.fill_between(grid, 0, 1, where=forb_region, transform=ax.get_xaxis_transform(),
                        color="tab:red", alpha=0.07, lw=0)
        ttl = f"{METHOD_LABELS[m]}\nW1 = {r['W1']:.3f}, forbidden mass = {100 * r['forbidden']:.2f}%"
        if outside > 0:
            ttl += f", {100 * outside:.1f}% beyond ±7 (piled at edges)"
        ax.set_title(ttl, fontsize=10)
        ax.set_xlim(lo, hi)
    for ax in axes[1]:
        ax.set_xlabel("$x_0$")
    for ax in axes[:, 0]:
        ax.set_ylabel("density")
    axes[0, 0].text(0.0, axes[0, 0].get_ylim()[1] * 0.9,
                    "forbidden\nregion", ha="center", va="top", color="tab:red", fontsize=9)
    axes[0, 0].legend(loc="upper left", fontsize=8)
    fig.suptitle("1-D Gaussian mixture, middle mode forbidden: samples of each guidance rule vs. the target "
                 f"(DDPM, {steps} steps)", fontsize=11)
    fig.tight_layout()
    save_png(fig, path, dpi=110)
    plt.close(fig)
