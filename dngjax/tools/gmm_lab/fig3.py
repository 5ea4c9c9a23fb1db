"""Fig. 3: the Markov-chain posterior estimate vs the exact posterior; DNG with the estimate.

    python -m experiments.gmm --figure=fig3 --out=outputs/gmm     # 50,000 tracked + 100,000 guided samples, T = 1000

(a) With lambda = 0 (plain sampling of the full mixture) each trajectory is run twice
from the same seed: once under DynamicNegativeGuidance(scale=0), whose state is the
Markov-chain estimate of p(c- | x_t), and once under ExactDynamicNegativeGuidance(scale=0),
whose trace is the exact p(c- | x_t). Both runs follow the same trajectories (up to float
rounding, reported), so the two posteriors are compared on the same x_t. Means (and 10-90% bands of the
estimate) are taken separately over samples that end in the forbidden mode and the others.

(b) DNG with the estimate at lambda0 = 1 (prior = c_f = 0.35, temperature 1, offset 0,
p_max 0.99, transition variance beta_t): histogram against the unconditional and the
desired density. Writes fig3_posterior_tracking.png and fig3_table.md.
"""

from __future__ import annotations

import os

import numpy as np

from .common import (save_png, Timer, chain, lab_1d, prepare_out, print_table, sample_chunked,
                     summarize_1d)


class _GroupStats:
    """Per-step sums over the forbidden / allowed groups of a posterior trace (S, B)."""

    def __init__(self, lab):
        self.lab = lab
        self.sums = None
        self.x0 = []
        self.p = []

    def __call__(self, x0, t, p, lam):
        forb = self.lab.in_negative(x0)
        self.t = t
        self.x0.append(x0)
        # kept for the quantile bands and the per-sample error (S x n x 4 bytes)
        self.p.append(p.astype(np.float32))
        p = p.astype(np.float64)
        s = np.stack([p[:, forb].sum(1), p[:, ~forb].sum(1)], 0)
        c = np.array([forb.sum(), (~forb).sum()], np.float64)
        if self.sums is None:
            self.sums, self.counts = s.astype(np.float64), c
        else:
            self.sums += s
            self.counts += c

    def means(self):
        return self.sums / self.counts[:, None]                # (2, S): [forbidden, allowed]

    def all_p(self):
        return np.concatenate(self.p, axis=1)


def _track_at_lambda_zero(lab, sched, args):
    """(a) Each of ``args.n_track`` trajectories at lambda = 0 under the Markov-chain estimate and under the exact
    posterior: (their _GroupStats, x0 of each run (n_track, 1), seconds)."""
    chunk_tr = min(args.chunk, 10_000)
    prog = not args.no_progress
    approx0 = lab.approximate_dng(0.0, p_min=1e-6, p_max=1 - 1e-6, update_variance=args.update_variance)
    exact0 = lab.exact_dng(0.0)
    ga, ge = _GroupStats(lab), _GroupStats(lab)
    with Timer() as tm_a:
        xa = sample_chunked(lab, approx0, lab.denoiser_neg, sched, args.n_track, seed0=args.seed,
                            chunk=chunk_tr, progress=prog, desc="track: Markov-chain posterior",
                            trace_reducer=ga)
        xe = sample_chunked(lab, exact0, lab.denoiser_neg, sched, args.n_track, seed0=args.seed,
                            chunk=chunk_tr, progress=prog, desc="track: exact posterior",
                            trace_reducer=ge)
    return ga, ge, xa, xe, tm_a.s


def _dng_at_lambda_one(lab, sched, args):
    """(b) DNG with the estimate at lambda0 = 1 against exact draws of the target: (its samples (n, 1), table rows,
    table)."""
    rule = lab.approximate_dng(1.0, p_max=args.p_max, update_variance=args.update_variance)
    with Timer() as tm_b:
        xb = sample_chunked(lab, rule, lab.denoiser_neg, sched, args.n, seed0=args.seed, chunk=args.chunk,
                            progress=not args.no_progress, desc="DNG (Markov-chain posterior), lambda0 = 1")
    import jax
    xt = np.asarray(lab.remember_mixture.sample(jax.random.key(args.seed + 12345), args.n))
    rows_b = [{"method": f"DNG, Markov-chain posterior, lambda0=1, p_max={args.p_max}", **summarize_1d(lab, xb),
               "seconds": tm_b.s},
              {"method": "exact samples of the target (reference)", **summarize_1d(lab, xt), "seconds": 0.0}]
    cols_b = [("method", "method", ""), ("W1", "W1 to target", ".4f"), ("forbidden", "forbidden mass", ".5f"),
              ("w_left", "w(-3) among kept", ".4f"), ("w_right", "w(+3) among kept", ".4f"),
              ("seconds", "seconds", ".0f")]
    t2 = print_table(f"Fig. 3b - n = {args.n}, chain = {sched.num_steps} steps (unguided forbidden mass 0.35; "
                     "target weights among kept modes 0.3846 / 0.6154)", rows_b, cols_b)
    return xb, rows_b, t2


def run(args):
    """Fig. 3 (a) and (b); writes fig3_table.md and fig3_posterior_tracking.png, returns their table rows."""
    sched = chain(args.steps)
    lab = lab_1d(sched)
    out = prepare_out(args.out)
    ga, ge, xa, xe, seconds_a = _track_at_lambda_zero(lab, sched, args)
    same_traj = float(np.abs(xa - xe).max())
    ma, me = ga.means(), ge.means()
    gap = np.abs(ma - me)                                       # (2, S)
    pa_all, pe_all = ga.all_p().astype(np.float32), ge.all_p().astype(np.float32)
    per_sample_mae = float(np.mean(np.abs(pa_all - pe_all)))
    forb = lab.in_negative(xe)
    t = ga.t
    track_rows = []
    for gi, name in enumerate(("ends in forbidden mode", "ends in a kept mode")):
        k = int(np.argmax(gap[gi]))
        track_rows.append({
            "group": name, "n": int(ga.counts[gi]),
            "max_gap": float(gap[gi, k]), "t_at": int(t[k]),
            "end_approx": float(ma[gi, -1]), "end_exact": float(me[gi, -1]),
            "mid_approx": float(ma[gi, np.searchsorted(-t, -500)]),
            "mid_exact": float(me[gi, np.searchsorted(-t, -500)]),
        })
    track_cols = [("group", "group", ""), ("n", "samples", "d"),
                  ("max_gap", "max gap of means (abs)", ".4f"), ("t_at", "at t", "d"),
                  ("mid_approx", "approx mean @t=500", ".3f"), ("mid_exact", "exact mean @t=500", ".3f"),
                  ("end_approx", "approx mean @t=0", ".4f"), ("end_exact", "exact mean @t=0", ".4f")]
    t1 = print_table(
        f"Fig. 3a - posterior tracking at lambda = 0, n = {args.n_track}, chain = {sched.num_steps} steps, "
        f"estimate: prior {lab.negative_weight:.2f}, temperature 1, offset 0, variance {args.update_variance!r} "
        f"(same trajectories: max abs dx0 between the two runs = {same_traj:.1e}; per-sample mean abs(p_approx - p_exact) "
        f"over all steps = {per_sample_mae:.4f}; {seconds_a:.0f} s)", track_rows, track_cols)
    xb, rows_b, t2 = _dng_at_lambda_one(lab, sched, args)
    with open(os.path.join(out, "fig3_table.md"), "w") as f:
        f.write(t1 + "\n" + t2 + "\n")
    plot(lab, t, ma, me, pa_all, forb, xb, rows_b[0], os.path.join(out, "fig3_posterior_tracking.png"),
         args, sched.num_steps)
    return track_rows, rows_b


def plot(lab, t, ma, me, pa_all, forb, xb, row_b, path, args, steps):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1.1, 1]})
    colors = ("tab:red", "tab:blue")
    names = ("ends in forbidden mode", "ends in a kept mode")
    for gi in range(2):
        sel = forb if gi == 0 else ~forb
        q10, q90 = np.quantile(pa_all[:, sel], [0.1, 0.9], axis=1)
        ax.fill_between(t, q10, q90, color=colors[gi], alpha=0.12, lw=0)
        ax.plot(t, me[gi], color=colors[gi], lw=2.0, label=f"exact $p(c^-|x_t)$, {names[gi]}")
        ax.plot(t, ma[gi], color=colors[gi], lw=1.6, ls="--", label=f"Markov-chain estimate, {names[gi]}")
    ax.axhline(lab.negative_weight, color="k", lw=0.6, ls=":")
    ax.set_xlim(t.max(), t.min())
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("diffusion time t (sampling runs right-ward, from t = 999 to 0)")
    ax.set_ylabel("posterior of the forbidden mode, group mean")
    ax.set_title(f"(a) $p(c^-|x_t)$ along the reverse process at $\\lambda=0$\n"
                 f"({len(forb):,} trajectories; bands: 10-90% of the estimate per group)", fontsize=10)
    ax.legend(fontsize=8, loc="center left")

    lo, hi = -6.0, 6.0
    grid = np.linspace(lo, hi, 1201)
    bins = np.linspace(lo, hi, 121)
    bx.hist(np.clip(xb[:, 0], lo, hi), bins=bins, density=True, color="tab:purple", alpha=0.5,
            label=f"DNG samples ({len(xb):,})")
    bx.plot(grid, lab.full.density_1d(grid), "k--", lw=1.0, label="unconditional $p_0$")
    bx.plot(grid, lab.remember_mixture.density_1d(grid), "k", lw=1.6, label="desired: remaining modes")
    bx.set_xlabel("$x_0$")
    bx.set_ylabel("density")
    bx.set_title(f"(b) DNG with the Markov-chain posterior, $\\lambda_0 = 1$\nW1 to target = {row_b['W1']:.3f}, "
                 f"forbidden mass = {100 * row_b['forbidden']:.2f}%", fontsize=10)
    bx.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"1-D mixture (forbidden middle mode), DDPM {steps} steps; estimate: prior $c_f$ = "
                 f"{lab.negative_weight:.2f}, temperature 1, offset 0, $\\sigma_t^2$ = {args.update_variance}",
                 fontsize=11)
    fig.tight_layout()
    save_png(fig, path, dpi=110)
    plt.close(fig)
