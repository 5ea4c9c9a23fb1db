"""DNG's posterior estimators across samplers and chain lengths: the paper's update against the continuous-time one.

    python -m experiments.gmm --figure=samplers --out=outputs/gmm          # 20,000 samples per point (784-d: 2,000)

Three labs with exact posteriors: the 1-D and 2-D mixtures of figs. 1/3 and a 784-dimensional one
(``highdim_lab``: the 1-D lab's three modes along one smooth 28 x 28 pattern, each isotropic in all 784
dimensions with the 1-D lab's stds, so the posterior also reads the spread of all 784 coordinates). For
each sampler (DDIM eta = 0, DPM-Solver++(2M), ancestral DDPM with beta_tilde noise) and chain length
(STEPS), from the same seeds, DNG at lambda0 = 1 (prior = the forbidden weight, temperature 1, p clamped to
[1e-6, 0.99]) with
* the paper's estimator (Alg. 2; ancestral chains only: it needs the step's noise),
* the continuous-time estimator (``estimator="stratonovich"``, ``start="gaussian"``; Hutchinson's divergence
  from one probe per step, through finite differences, the direction of g included),
* the exact posterior (the control),
and three numbers per point: the forbidden share (samples nearest a forbidden mode), W1 to the target (the
remaining modes; 784-d: along the pattern), and the posterior's mean error |p_tracked - p_exact| over the
chain, measured on the unguided chain (scale 0, so every estimator sees the same path; the last steps
excluded where the exact posterior is 0 or 1 anyway).

Writes samplers_table.md and samplers.png; every finished row goes to samplers_rows.jsonl at once, and a
rerun with the same --n, --seed and --p_max skips the rows found there (the 1000-step rows take most of
the time: the run can be split across sittings).
"""

from __future__ import annotations

import json
import os

import numpy as np
import jax.numpy as jnp

import dngjax as dj
from dngjax.gmm import NegativeSplit, GaussianMixture, wasserstein1_1d

from .common import Timer, chain, lab_1d, lab_2d, prepare_out, print_table, save_png

STEPS = (10, 25, 50, 100, 1000)
SAMPLERS = {"ddim": dict(solver="ddim"), "dpmpp_2m": dict(solver="dpmpp_2m"), "ancestral": dict(noise="beta_tilde")}
SAMPLER_LABELS = {"ddim": "DDIM eta=0", "dpmpp_2m": "DPM-Solver++(2M)", "ancestral": "ancestral (beta_tilde)"}
ESTIMATORS = {"paper": "paper (Alg. 2)", "continuous": "continuous time (1 finite-difference probe)", "exact": "exact posterior"}


def highdim_lab(schedule, d: int = 784) -> NegativeSplit:
    """The 1-D lab's modes (-3, 0, 3; weights .25/.35/.40; stds .35/.50/.40) along a smooth unit pattern u in d dims."""
    side = int(round(np.sqrt(d)))
    yy, xx = np.mgrid[0:side, 0:side] / (side - 1)
    u = (np.sin(2 * np.pi * xx) * np.cos(np.pi * yy) + 0.5 * np.exp(-((xx - .5) ** 2 + (yy - .4) ** 2) / .05)).ravel()[:d]
    u = u / np.linalg.norm(u)
    means = np.stack([-3.0 * u, 0.0 * u, 3.0 * u])
    return NegativeSplit(GaussianMixture.create([0.25, 0.35, 0.40], means, [0.35, 0.50, 0.40]), (1,), schedule), u


def _labs(schedule):
    hd, u = highdim_lab(schedule)
    return {"1-D": (lab_1d(schedule), None), "2-D": (lab_2d(schedule), None), "784-D": (hd, u)}


def _rule(estimator: str, lab: NegativeSplit, scale: float, p_max: float):
    if estimator == "exact":
        return lab.exact_dng(scale, p_max=1 - 1e-6 if scale else 1 - 1e-7)
    kw = dict(prior=lab.negative_weight, temperature=1.0, p_min=1e-6, p_max=p_max)
    if estimator == "paper":
        return dj.DynamicNegativeGuidance(scale, variance="step", **kw)
    # exact scores: log r_T from the Gaussian estimate (exact to O(alpha_bar_T); the default start, log r_T = 0,
    # leaves ~2 % of the 2-D lab's forbidden mode on DDIM chains of any length: the deterministic path keeps it)
    return dj.DynamicNegativeGuidance(scale, estimator="stratonovich", divergence="finite_difference",
                                      start="gaussian", **kw)


def _along(m: GaussianMixture, u: np.ndarray) -> GaussianMixture:
    """The 1-D mixture of the projections onto the unit vector u (isotropic components)."""
    return GaussianMixture.create(np.exp(np.asarray(m.log_weights)), np.asarray(m.means) @ u, np.asarray(m.stds))


def _forbidden(lab: NegativeSplit, x: np.ndarray, u) -> float:
    """Share of samples nearest a forbidden mode; 784-D: nearest along the pattern u (the modes' positions),
    not by the spread of all 784 coordinates, which short chains of any estimator leave slightly off."""
    if u is None:
        return float(lab.in_negative(x).mean())
    comp = np.asarray(_along(lab.full, u).classify(jnp.asarray((x @ u)[:, None], jnp.float32)))
    return float(np.isin(comp, lab.negative).mean())


def _w1(lab: NegativeSplit, x: np.ndarray, u) -> float:
    if u is None and x.shape[1] == 1:
        return wasserstein1_1d(x[:, 0], lab.remember_mixture)
    if u is None:
        return float("nan")
    return wasserstein1_1d(x @ u, _along(lab.remember_mixture, u))


def run(args):
    out = prepare_out(args.out)
    # finished points of an earlier run with the same n, seed and clamp are kept (the run resumes)
    store = os.path.join(out, "samplers_rows.jsonl")
    setting = {"n": args.n, "seed": args.seed, "p_max": args.p_max}
    done = {}
    if os.path.exists(store):
        for line in open(store):
            r = json.loads(line)
            if r.get("setting") == setting:
                done[(r["lab"], r["steps"], r["sampler"], r["estimator"])] = r
    rows = list(done.values())
    points = [(s, k, e) for s in STEPS for k in SAMPLERS for e in ESTIMATORS if not (e == "paper" and k != "ancestral")]
    print(f"{len(points)} (steps, sampler, estimator) points x 3 labs, n = {args.n} (784-D: {max(args.n // 10, 500)}) "
          f"each, plus the unguided chains for the posterior error; longest chains: 1000 steps; "
          f"{len(done)} of {3 * len(points)} rows finished earlier ({store})", flush=True)
    for steps, sampler, est in points:
        sched = chain(steps)
        for name, (lab, u) in _labs(sched).items():
            if (name, steps, sampler, est) in done:
                continue
            n = args.n if u is None else max(args.n // 10, 500)
            d = lab.full.dim
            keys = dj.keys_from_seeds(np.arange(args.seed, args.seed + n))
            kw = dict(denoiser_c=lab.denoiser_neg, chunk_size=min(n, args.chunk if u is None else 500),
                      **SAMPLERS[sampler])
            with Timer() as tm:
                x = np.asarray(dj.sample(lab.denoiser_full, sched, keys, (d,), rule=_rule(est, lab, 1.0, args.p_max), **kw))
                err = float("nan")
                if est != "exact":
                    m = min(n, 2000)
                    k2 = keys[:m]
                    kw2 = dict(kw, chunk_size=min(m, kw["chunk_size"]), return_trace=True)
                    _, tr = dj.sample(lab.denoiser_full, sched, k2, (d,), rule=_rule(est, lab, 0.0, 1 - 1e-7), **kw2)
                    _, ex = dj.sample(lab.denoiser_full, sched, k2, (d,), rule=_rule("exact", lab, 0.0, 1 - 1e-7), **kw2)
                    err = float(np.abs(np.asarray(tr.p) - np.asarray(ex.p)).mean())
            rows.append({"lab": name, "sampler": sampler, "steps": steps, "estimator": est,
                         "label": f"{SAMPLER_LABELS[sampler]}, {ESTIMATORS[est]}",
                         "forbidden": _forbidden(lab, x, u), "W1": _w1(lab, x, u), "p_err": err,
                         "n": n, "seconds": tm.s})
            r = rows[-1]
            with open(store, "a") as f:
                f.write(json.dumps(dict(r, setting=setting)) + "\n")
            print(f"{name:6s} {steps:5d} {sampler:10s} {est:10s} forbidden {r['forbidden']:.4f} W1 {r['W1']:.4f} "
                  f"p_err {r['p_err']:.4f} ({tm.s:.0f} s)", flush=True)
    cols = [("lab", "lab", ""), ("steps", "steps", "d"), ("label", "sampler, estimator", ""),
            ("forbidden", "forbidden share", ".4f"), ("W1", "W1 to target", ".4f"),
            ("p_err", "mean abs posterior error (unguided)", ".4f"), ("seconds", "seconds", ".0f")]
    order = {k: i for i, k in enumerate(("1-D", "2-D", "784-D"))}
    rows.sort(key=lambda r: (order[r["lab"]], r["steps"], list(SAMPLERS).index(r["sampler"]),
                             list(ESTIMATORS).index(r["estimator"])))
    table = print_table(f"DNG estimators x samplers x chain length, lambda0 = 1, p_max = {args.p_max}; n = {args.n} "
                        f"per point (784-D: {max(args.n // 10, 500)}), seeds {args.seed}.. (unguided forbidden share 0.35)",
                        rows, cols)
    with open(os.path.join(out, "samplers_table.md"), "w") as f:
        f.write(table + "\n")
    plot(rows, os.path.join(out, "samplers.png"), args)
    return rows


def plot(rows, path, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labs = ("1-D", "2-D", "784-D")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
    colors = {"paper": "tab:orange", "continuous": "tab:purple", "exact": "tab:green"}
    styles = {"ddim": "-", "dpmpp_2m": "--", "ancestral": ":"}
    for ax, lab in zip(axes, labs):
        for est in ESTIMATORS:
            for sampler in SAMPLERS:
                r = [row for row in rows if row["lab"] == lab and row["estimator"] == est and row["sampler"] == sampler]
                if not r:
                    continue
                ax.plot([row["steps"] for row in r], [100 * max(row["forbidden"], 1e-4) for row in r],
                        color=colors[est], ls=styles[sampler], marker="o", ms=3,
                        label=f"{ESTIMATORS[est]}, {SAMPLER_LABELS[sampler]}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{lab} lab")
        ax.set_xlabel("chain steps")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("forbidden share (%)")
    axes[-1].legend(fontsize=6)
    fig.suptitle(f"DNG (lambda0 = 1) with the paper's and the continuous-time posterior; n = {args.n} per point",
                 fontsize=9)
    fig.tight_layout()
    save_png(fig, path, dpi=110)
    plt.close(fig)
