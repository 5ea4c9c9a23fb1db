"""DNG on DDIM steps: the tracked posterior against the sampler's noise (eta) and the chain length.

    python -m experiments.gmm --figure=ddim --out=outputs/gmm     # 100,000 samples per point

DNG's update is the log-likelihood ratio of two Gaussian transitions, so any Gaussian step can carry
it: DDIM (Song et al. 2021) with x_{t-1} ~ N(mean(eps), eta^2 beta_tilde_t). On the 1-D lab of
fig. 1/3 (forbidden mode of weight 0.35), for eta in ETAS and chains of STEPS respaced steps, from
the same seeds:

* tracked DNG (lambda0 = 1, prior = 0.35, temperature 1, offset 0, p clamped to [1e-6, --p_max])
  with the update's sigma^2 = the step's own variance eta^2 beta_tilde (``update_variance="step"``, the
  exact likelihood ratio of the step) and with beta_tilde whatever eta is (``"beta_tilde"``, a floor);
* exact DNG (lambda0 = 1): the control;
* no guidance.
At eta = 0 the step is deterministic: x_{t-1} - mu_u is the guidance's own shift, the update sees no
evidence, and the sampler refuses tracked DNG; only the control and the unguided chain run there.
eta = 1 is the ancestral chain with sigma^2 = beta_tilde (both variances coincide).

Writes ddim_eta.png and ddim_table.md.
"""

from __future__ import annotations

import os

from dngjax import NoGuidance

from .common import Timer, chain, lab_1d, prepare_out, print_table, sample_chunked, save_png, summarize_1d

STEPS = (1000, 250, 100, 50)
ETAS = (1.0, 0.5, 0.2, 0.0)
METHODS = {"none": "no guidance", "dng_exact": "DNG, exact posterior",
           "dng_step": "DNG, tracked, sigma^2 = step's (eta^2 beta_tilde)",
           "dng_floor": "DNG, tracked, sigma^2 = beta_tilde"}
COLORS = {"none": "tab:gray", "dng_exact": "tab:green", "dng_step": "tab:purple", "dng_floor": "tab:orange"}


def run(args):
    out = prepare_out(args.out)
    rows = []
    for steps in STEPS:
        sched = chain(steps)
        lab = lab_1d(sched)
        for eta in ETAS:
            rules = {"none": NoGuidance(), "dng_exact": lab.exact_dng(1.0)}
            if eta > 0:
                rules["dng_step"] = lab.approximate_dng(1.0, p_max=args.p_max, update_variance="step")
                rules["dng_floor"] = lab.approximate_dng(1.0, p_max=args.p_max, update_variance="beta_tilde")
            for m, rule in rules.items():
                with Timer() as tm:
                    x = sample_chunked(lab, rule, lab.denoiser_neg, sched, args.n, seed0=args.seed,
                                       chunk=args.chunk, progress=not args.no_progress, eta=eta,
                                       desc=f"{m}, {steps} steps, eta {eta}")
                rows.append({"steps": steps, "eta": eta, "method": m, "label": METHODS[m],
                             **summarize_1d(lab, x), "seconds": tm.s})
    cols = [("steps", "chain steps", "d"), ("eta", "eta", ".2f"), ("label", "method", ""),
            ("forbidden", "forbidden mass", ".4f"), ("W1", "W1 to target", ".4f"), ("seconds", "seconds", ".0f")]
    table = print_table(f"DDIM - 1-D lab, n = {args.n} per point, same seeds everywhere; p_max = {args.p_max} "
                        "(target weights among kept modes 0.3846 / 0.6154, unguided forbidden mass 0.35)", rows, cols)
    with open(os.path.join(out, "ddim_table.md"), "w") as f:
        f.write(table + "\n")
    plot(rows, os.path.join(out, "ddim_eta.png"), args)
    return rows


def plot(rows, path, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    styles = {1000: "-", 250: "--", 100: "-.", 50: ":"}
    for m in ("dng_step", "dng_floor", "dng_exact"):
        for steps in STEPS:
            r = [row for row in rows if row["method"] == m and row["steps"] == steps]
            e = [row["eta"] for row in r]
            kw = dict(color=COLORS[m], ls=styles[steps], marker="o", ms=3,
                      label=f"{METHODS[m]}" if steps == STEPS[0] else None)
            axes[0].plot(e, [100 * row["forbidden"] for row in r], **kw)
            axes[1].plot(e, [row["W1"] for row in r], **kw)
    axes[0].set_ylabel("forbidden mass (%)")
    axes[0].set_yscale("symlog", linthresh=1.0)
    axes[1].set_ylabel("W1 to the target (remaining modes)")
    for ax in axes:
        ax.set_xlabel("DDIM eta (1 = ancestral, 0 = deterministic)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"DNG on DDIM steps, 1-D lab, n = {args.n} per point; line style = chain length "
                 "(solid 1000, dashed 250, dash-dot 100, dotted 50)", fontsize=9)
    fig.tight_layout()
    save_png(fig, path, dpi=110)
    plt.close(fig)
