"""Appendix A, figs. 7-9: score fields of a 2-D three-mode mixture under CFG, NP and DNG.

    python -m experiments.gmm --figure=appendix --out=outputs/gmm  # analytic fields + 20,000 samples per rule

Three equal modes (std 0.5) at (-2, -1.2), (2, -1.2) and (0, 2); the top one is
forbidden. At three diffusion times (network timesteps 300, 100, 10 of the linear
T = 1000 schedule), on a grid:

* fig7_scores.png: the unconditional score grad log p_t, the forbidden-concept score
  grad log p_t(x | c-) and the desired (remaining-modes) score;
* fig8_guidance.png: the guidance terms added to the unconditional score, in score units:
  CFG lambda (s_r - s_u), NP -lambda (s_- - s_u), DNG -lambda0 p/(1-p) (s_- - s_u) with the
  exact posterior p = p(c- | x_t), all at lambda = lambda0 = 1;
* fig9_total.png: the total fields s_u + guidance, with their largest deviation from
  the desired score in the panel titles.

Arrows show directions (unit length); colour is log10 of the magnitude on one scale per
figure. The background is log p_t (figs. 7, 9) or the exact posterior p(c- | x_t) (fig. 8).
Prints the magnitudes at the kept and the forbidden modes, and (unless --n 0) the
forbidden mass of 2-D samples of each rule. Writes appendix_table.md.
"""

from __future__ import annotations

import os

import numpy as np
import jax
import jax.numpy as jnp
from scipy.special import logsumexp

from .common import (save_png, METHOD_LABELS, Timer, chain, lab_2d, prepare_out, print_table,
                     rule_for, sample_chunked)

TIMES = (300, 100, 10)
XLIM, YLIM = (-4.5, 4.5), (-3.6, 4.4)


def _np_mixture(mix):
    return (np.asarray(mix.log_weights, np.float64), np.asarray(mix.means, np.float64),
            np.asarray(mix.stds, np.float64))


def _np_terms(mix, x, ab):
    """float64 joint log densities (P, K) and score (P, d) of a mixture at alpha_bar ab."""
    lw, mu, s = _np_mixture(mix)
    var = 1.0 - ab + ab * s ** 2                                             # (K,)
    diff = x[:, None, :] - np.sqrt(ab) * mu[None]                            # (P, K, d)
    d = x.shape[-1]
    joint = lw - 0.5 * (np.sum(diff ** 2, -1) / var + d * np.log(2 * np.pi * var))
    r = np.exp(joint - logsumexp(joint, axis=1, keepdims=True))
    score = -np.sum((r / var)[..., None] * diff, axis=1)
    return joint, score


def alpha_bar_at(lab, t):
    """abar at network timestep t of the full linear T = 1000 schedule (the fields do not
    depend on the chain that --steps picks for the sampling part)."""
    from dngjax import linear_schedule
    return float(np.asarray(linear_schedule().alpha_bars, np.float64)[t])


def fields(lab, x, t):
    """Score-space fields at network timestep t for points x (P, 2), in float64.

    The formulas are evaluated literally (DNG: -p/(1-p) (s_- - s_u), with s_- - s_u a
    difference of two scores). Where 1 - p(c-|x_t) < 1e-12 (deep inside the forbidden
    mode at small t) that product is inf * 0 even in float64: those points are marked
    ``undefined`` (NaN guidance), hatched in the figures and left out of the maxima.
    """
    ab = alpha_bar_at(lab, t)
    x = np.asarray(x, np.float64)
    joint, s_u = _np_terms(lab.full, x, ab)
    jf, s_f = _np_terms(lab.negative_mixture, x, ab)
    jr, s_r = _np_terms(lab.remember_mixture, x, ab)
    log_p = np.minimum(logsumexp(joint[:, list(lab.negative)], axis=1) - logsumexp(joint, axis=1), 0.0)
    with np.errstate(divide="ignore"):
        log_1mp = np.log(-np.expm1(log_p))
    undefined = log_1mp < np.log(1e-12)
    odds = np.where(undefined, np.nan, np.exp(log_p - np.where(undefined, 0.0, log_1mp)))
    g = {"cfg": s_r - s_u, "np": -(s_f - s_u), "dng_exact": -odds[:, None] * (s_f - s_u)}
    return {"t": t, "ab": ab, "s_u": s_u, "s_f": s_f, "s_r": s_r, "g": g, "p": np.exp(log_p),
            "undefined": undefined,
            "logdens": {"s_u": logsumexp(joint, 1), "s_f": logsumexp(jf, 1), "s_r": logsumexp(jr, 1)}}


def _grid(n):
    gx, gy = np.meshgrid(np.linspace(*XLIM, n), np.linspace(*YLIM, n))
    return gx, gy, np.stack([gx.ravel(), gy.ravel()], -1)


def _norm(v):
    return np.linalg.norm(np.asarray(v, np.float64), axis=-1)


def _figure(lab, rows, path, suptitle, bg_kind):
    """rows: list of (label, fn(coarse_fields, fine_fields) -> (vectors, fine background, title suffix,
    fine hatch mask or None))."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    gx, gy, pts = _grid(23)
    fx, fy, fine = _grid(120)
    data = [(fields(lab, pts, t), fields(lab, fine, t)) for t in TIMES]
    vals = np.concatenate([np.log10(np.maximum(_norm(fn(c, f)[0]), 1e-12)) for c, f in data for _, fn in rows])
    vals = vals[np.isfinite(vals)]
    norm = Normalize(vmin=max(np.quantile(vals, 0.02), -3), vmax=np.quantile(vals, 0.995))
    fig, axes = plt.subplots(len(rows), len(TIMES), figsize=(4.1 * len(TIMES), 3.75 * len(rows) + 0.9))
    q = cs = None
    for j, (t, (c, f)) in enumerate(zip(TIMES, data)):
        for i, (label, fn) in enumerate(rows):
            ax = axes[i, j]
            v, bg, extra, hatch = fn(c, f)
            if bg_kind == "density":
                bg = np.maximum(bg, np.max(bg) - 12.0)                 # clip log p_t 12 nats below its max
                cs = ax.contourf(fx, fy, bg.reshape(fx.shape), levels=20, cmap="Greys", alpha=0.55)
            else:
                cs = ax.contourf(fx, fy, bg.reshape(fx.shape), levels=np.linspace(0, 1, 11), cmap="Reds", alpha=0.55)
            if hatch is not None and hatch.any():
                ax.contourf(fx, fy, hatch.reshape(fx.shape).astype(float), levels=[0.5, 1.5], colors="none",
                            hatches=["xxx"])
            v = np.asarray(v, np.float64)
            mag = _norm(v)
            ok = np.isfinite(mag) & (mag > 1e-12)
            u = np.where(ok[:, None], v / np.where(ok, mag, 1.0)[:, None], 0.0)   # no arrow for ~0 / undefined
            q = ax.quiver(gx.ravel()[ok], gy.ravel()[ok], u[ok, 0], u[ok, 1], np.log10(mag[ok]), cmap="viridis",
                          norm=norm, scale=30, width=0.0045, pivot="mid")
            for k, m in enumerate(np.asarray(lab.full.means)):
                forb = k in lab.negative
                ax.plot(*m, marker="X" if forb else "o", color="red" if forb else "white", mec="k", ms=9, mew=1.2)
            ax.set_xlim(*XLIM)
            ax.set_ylim(*YLIM)
            ax.set_aspect("equal")
            ax.set_title(f"{label}\nt = {t} ($\\bar\\alpha_t$ = {c['ab']:.3f}){extra}", fontsize=9)
    fig.subplots_adjust(left=0.04, right=0.86, top=0.885, bottom=0.03, hspace=0.38, wspace=0.12)
    cax = fig.add_axes([0.88, 0.55, 0.015, 0.33])
    fig.colorbar(q, cax=cax, label="log10 |vector|  (arrows show direction only)")
    cax2 = fig.add_axes([0.88, 0.1, 0.015, 0.33])
    fig.colorbar(cs, cax=cax2, label="posterior $p(c^-|x_t)$ (background)" if bg_kind == "posterior"
                 else "log $p_t(x)$ (background)")
    fig.suptitle(suptitle, fontsize=11)
    save_png(fig, path, dpi=90)
    plt.close(fig)


def _at_modes(lab, t, m):
    """|guidance| of rule m at the diffused kept-mode centres (mean) and at the forbidden one."""
    ab = alpha_bar_at(lab, t)
    centres = np.sqrt(ab) * np.asarray(lab.full.means, np.float64)
    g = _norm(fields(lab, centres, t)["g"][m])
    return float(np.mean(g[list(lab.remember)])), float(np.mean(g[list(lab.negative)]))


def field_table(lab, n=4000):
    """Guidance and deviation magnitudes at points distributed as p_t of each group."""
    rows = []
    key = jax.random.key(0)
    for t in TIMES:
        ab = alpha_bar_at(lab, t)
        k1, k2, k3, key = jax.random.split(key, 4)

        def diffused(mix, k):
            x0 = mix.sample(k, n)
            return np.asarray(jnp.sqrt(ab) * x0 + jnp.sqrt(1 - ab) * jax.random.normal(k3, x0.shape))

        at = {"kept": fields(lab, diffused(lab.remember_mixture, k1), t),
              "forb": fields(lab, diffused(lab.negative_mixture, k2), t)}
        for m in ("cfg", "np", "dng_exact"):
            r = {"t": t, "method": METHOD_LABELS[m]}
            for where, f in at.items():
                ok = ~f["undefined"]
                r[f"g_{where}"] = float(np.median(_norm(f["g"][m])[ok]))
                r[f"dev_{where}"] = float(np.median(_norm(f["s_u"] + f["g"][m] - f["s_r"])[ok]))
                r[f"undef_{where}"] = float(np.mean(~ok)) if m == "dng_exact" else 0.0
            rows.append(r)
    return rows


def _fig7_scores(lab, path):
    """Fig. 7: the unconditional, forbidden-concept and desired scores over log p_t."""
    def vec(name):
        return lambda c, f: (c[name], f["logdens"][name], "", None)

    _figure(lab, [("unconditional score $s_u = \\nabla\\log p_t(x)$", vec("s_u")),
                  ("forbidden-concept score $s_- = \\nabla\\log p_t(x|c^-)$", vec("s_f")),
                  ("desired score $s_r$ (remaining modes)", vec("s_r"))],
            path,
            "Fig. 7 - exact scores of the 2-D mixture (forbidden mode: red X; kept modes: white dots)\n"
            "background: log density of the same $p_t$", "density")


def _fig8_guidance(lab, path):
    """Fig. 8: the CFG, NP and DNG guidance terms over the exact posterior p(c- | x_t)."""
    def guid(m, label):
        def fn(c, f):
            kept, forb = _at_modes(lab, c["t"], m)
            hatch = f["undefined"] if m == "dng_exact" else None
            return c["g"][m], f["p"], f"\n|g| at kept modes {kept:.2g}, at forbidden mode {forb:.2g}", hatch
        return (label, fn)

    _figure(lab, [guid("cfg", "CFG guidance $\\lambda(s_r - s_u)$, $\\lambda=1$"),
                         guid("np", "NP guidance $-\\lambda(s_- - s_u)$, $\\lambda=1$"),
                         guid("dng_exact", "DNG guidance $-\\lambda_0\\frac{p}{1-p}(s_- - s_u)$, $\\lambda_0=1$")],
            path,
            "Fig. 8 - guidance terms added to the unconditional score (score units)\nbackground: exact "
            "posterior $p(c^-|x_t)$; hatched: $1-p<10^{-12}$, where $\\frac{p}{1-p}(s_- - s_u)$ is $\\infty\\cdot 0$",
            "posterior")


def _fig9_total(lab, path):
    """Fig. 9: the total guided fields s_u + guidance over the desired log p_t."""
    def total(m, label):
        def fn(c, f):
            v = c["s_u"] + c["g"][m]
            dev = _norm(f["s_u"] + f["g"][m] - f["s_r"])
            ok = ~f["undefined"]
            hatch = f["undefined"] if m == "dng_exact" else None
            return v, f["logdens"]["s_r"], f"\nmax |total - $s_r$| = {np.max(dev[ok]):.2g}", hatch
        return (label, fn)

    _figure(lab, [total("cfg", "CFG total field $s_u + \\lambda(s_r - s_u)$"), total("np", "NP total field"),
                  total("dng_exact", "DNG total field")],
            path,
            "Fig. 9 - total guided score fields\nbackground: log density of the desired (remaining-modes) $p_t$; "
            "hatched as in fig. 8", "density")


def _field_magnitudes_table(lab):
    """The printed table of :func:`field_table` (median guidance and deviation magnitudes)."""
    rows = field_table(lab)
    cols = [("t", "t", "d"), ("method", "rule", ""), ("g_kept", "median abs(guidance), kept modes", ".3g"),
            ("g_forb", "median abs(guidance), forbidden mode", ".3g"),
            ("dev_kept", "median abs(total - desired), kept", ".2g"),
            ("dev_forb", "median abs(total - desired), forbidden", ".2g"),
            ("undef_forb", "share of forbidden points left out (1-p < 1e-12)", ".3f")]
    return print_table("Appendix A - field magnitudes (score units, float64) at 4,000 points distributed as p_t "
                       "of each group", rows, cols)


def _samples_table(lab, sched, args):
    """The printed table of ``args.n`` 2-D samples per rule: forbidden mass, kept weights, distance to own mode."""
    srows = []
    means = np.asarray(lab.full.means)
    for m in ("none", "cfg", "np", "dng_exact", "dng_approx"):
        rule, eps_c = rule_for(lab, m, 1.0)
        with Timer() as tm:
            x = sample_chunked(lab, rule, eps_c, sched, args.n, seed0=args.seed, chunk=args.chunk,
                               progress=not args.no_progress, desc=m)
        fr = lab.remember_fractions(x)
        comp = np.asarray(lab.full.classify(jnp.asarray(x)))
        srows.append({"method": METHOD_LABELS[m], "forbidden": float(lab.in_negative(x).mean()),
                      "w0": float(fr[0]), "w1": float(fr[1]),
                      "r": float(np.median(np.linalg.norm(x - means[comp], axis=-1))), "seconds": tm.s})
    return print_table(f"Appendix A - 2-D samples, n = {args.n} per rule, chain = {sched.num_steps} steps "
                       "(target: forbidden mass ~0, kept weights 0.5 / 0.5, median distance to own mode "
                       "0.5 sqrt(2 ln 2) = 0.589)", srows,
                       [("method", "rule", ""), ("forbidden", "forbidden mass", ".4f"),
                        ("w0", "w(left) among kept", ".4f"), ("w1", "w(right) among kept", ".4f"),
                        ("r", "median distance to own mode", ".3f"), ("seconds", "seconds", ".0f")])


def run(args):
    """Figs. 7-9 and the field table (and, unless ``args.n`` is 0, the samples table); writes appendix_table.md."""
    sched = chain(args.steps)
    lab = lab_2d(sched)
    out = prepare_out(args.out)
    _fig7_scores(lab, os.path.join(out, "fig7_scores.png"))
    _fig8_guidance(lab, os.path.join(out, "fig8_guidance.png"))
    _fig9_total(lab, os.path.join(out, "fig9_total.png"))
    t1 = _field_magnitudes_table(lab)
    t2 = _samples_table(lab, sched, args) if args.n > 0 else ""
    with open(os.path.join(out, "appendix_table.md"), "w") as f:
        f.write(t1 + "\n" + t2 + "\n")
