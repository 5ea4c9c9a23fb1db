"""Chain length: how far the Markov-chain posterior of DNG degrades on short (respaced) chains.

    python -m experiments.gmm --figure=chain --out=outputs/gmm     # 100,000 samples per point

DNG tracks p(c- | x_t) from the chain's own transitions (Alg. 2), so its estimate can only be as
good as the chain is fine. On the 1-D lab of fig. 1/3 (forbidden mode of weight 0.35), for chains
of 1000 (the full linear schedule), 250, 100, 50 and 25 respaced steps, from the same seeds:

* DNG with the Markov-chain posterior (lambda0 = 1, prior = 0.35, temperature 1, offset 0,
  the --update_variance convention, p clamped to [1e-6, --p_max]): forbidden mass and W1 to the target;
* DNG with the exact posterior (lambda0 = 1): the control, exact at every chain length up to the
  discretisation of the sampler itself;
* no guidance: the forbidden mass the guidance starts from (0.35 on a fine chain).

Writes chain_length.png and chain_table.md.
"""

from __future__ import annotations

import os


from .common import Timer, chain, lab_1d, prepare_out, print_table, sample_chunked, save_png, summarize_1d

STEPS = (1000, 250, 100, 50, 25)
METHODS = {"none": "no guidance", "dng_exact": "DNG, exact posterior, lambda0=1",
           "dng_approx": "DNG, Markov-chain posterior, lambda0=1"}
COLORS = {"none": "tab:gray", "dng_exact": "tab:green", "dng_approx": "tab:purple"}


def run(args):
    out = prepare_out(args.out)
    rows = []
    for steps in STEPS:
        sched = chain(steps)
        lab = lab_1d(sched)
        rules = {"none": (lab.approximate_dng(0.0), lab.denoiser_neg),
                 "dng_exact": (lab.exact_dng(1.0), lab.denoiser_neg),
                 "dng_approx": (lab.approximate_dng(1.0, p_max=args.p_max, update_variance=args.update_variance),
                                lab.denoiser_neg)}
        for m, (rule, denoiser_c) in rules.items():
            with Timer() as tm:
                x = sample_chunked(lab, rule, denoiser_c, sched, args.n, seed0=args.seed, chunk=args.chunk,
                                   progress=not args.no_progress, desc=f"{m}, {steps} steps")
            rows.append({"steps": steps, "method": m, "label": METHODS[m], **summarize_1d(lab, x), "seconds": tm.s})
    cols = [("steps", "chain steps", "d"), ("label", "method", ""), ("forbidden", "forbidden mass", ".4f"),
            ("W1", "W1 to target", ".4f"), ("w_left", "w(-3) among kept", ".4f"), ("seconds", "seconds", ".0f")]
    table = print_table(f"Chain length - 1-D lab, n = {args.n} per point, same seeds everywhere; DNG's update "
                        f"sigma^2 = {args.update_variance!r}, p_max = {args.p_max} (target weights among kept modes "
                        "0.3846 / 0.6154, unguided forbidden mass 0.35)", rows, cols)
    with open(os.path.join(out, "chain_table.md"), "w") as f:
        f.write(table + "\n")
    plot(rows, os.path.join(out, "chain_length.png"), args)
    return rows


def plot(rows, path, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for m, label in METHODS.items():
        r = [row for row in rows if row["method"] == m]
        s = [row["steps"] for row in r]
        axes[0].plot(s, [100 * row["forbidden"] for row in r], "-o", color=COLORS[m], label=label)
        axes[1].plot(s, [row["W1"] for row in r], "-o", color=COLORS[m], label=label)
    axes[0].set_ylabel("forbidden mass (%)")
    axes[0].set_yscale("symlog", linthresh=1.0)
    axes[1].set_ylabel("W1 to the target (remaining modes)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xticks(STEPS)
        ax.set_xticklabels([str(s) for s in STEPS])
        ax.set_xlabel("chain length (respaced steps of the T = 1000 schedule)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"DNG on short chains, 1-D lab, n = {args.n} per point (sigma^2 = {args.update_variance}, "
                 f"p_max = {args.p_max})", fontsize=10)
    fig.tight_layout()
    save_png(fig, path, dpi=110)
    plt.close(fig)
