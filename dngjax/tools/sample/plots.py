"""Figures of the class-removal experiment (matplotlib, Agg backend, PNG files).

* :func:`plot_tradeoff`: KL vs safety and FD vs safety, one curve per method (paper figs. 4/14);
* :func:`plot_histograms`: class histograms of the samples against the ideal (fig. 13);
* :func:`plot_lambda`: lambda_t (and DNG's posterior p_t) over diffusion time, averaged over
  samples (figs. 5b/12);
* :func:`save_grid` / :func:`plot_overview`: sample grids;
* :func:`plot_selection`: DNG settings read at equal safety (``--job=select``).
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
from dngjax.data import tile
import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"none": "black", "NP": "tab:blue", "SLD": "tab:orange", "DNG": "tab:green",
          "DNG:beta": "tab:green", "DNG:beta_tilde": "tab:olive",
          "DNG:posterior": "tab:olive"}
MARKERS = {"none": "*", "NP": "o", "SLD": "s", "DNG": "^", "DNG:beta": "<", "DNG:beta_tilde": "v",
           "DNG:posterior": "v"}   # DNG:posterior: the older label of DNG:beta_tilde
# for the other method strings (e.g. DNG[prior=0.1]), in order of appearance; no red (the ideal's colour)
SPARE_STYLES = tuple(zip(("tab:purple", "tab:brown", "tab:pink", "tab:cyan", "tab:gray", "navy", "goldenrod",
                          "teal"), "DPXhp>d<"))


def styles(methods: Sequence[str]) -> Dict[str, tuple]:
    """(colour, marker) per method of one figure: the named methods keep theirs (:data:`COLORS`,
    :data:`MARKERS`), the others (e.g. DNG[prior=0.25,temperature=0.5]) take :data:`SPARE_STYLES` in
    order of first appearance, so that no two methods of a figure look alike."""
    out, spare = {}, 0
    for m in dict.fromkeys(methods):
        if m in COLORS:
            out[m] = (COLORS[m], MARKERS[m])
        else:
            out[m] = SPARE_STYLES[spare % len(SPARE_STYLES)]
            spare += 1
    return out


def to_image(x: np.ndarray) -> np.ndarray:
    """Model space [-1, 1] -> float [0, 1] (clipped); (..., H, W, C)."""
    return np.clip((np.asarray(x, np.float32) + 1.0) / 2.0, 0.0, 1.0)


def _imshow(ax, img):
    if img.shape[-1] == 1:
        ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(img, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def save_grid(x: np.ndarray, path: str, title: str = "", labels: Optional[np.ndarray] = None,
              removed_class=None, ncols: int = 8) -> str:
    """A grid of samples (model space); samples the classifier assigns to the removed class (an int, or a
    sequence of classes removed together) get a red frame."""
    imgs = to_image(x)
    if imgs.shape[-1] == 1 and labels is not None and removed_class is not None:
        imgs = np.repeat(imgs, 3, axis=-1)
    if labels is not None and removed_class is not None:
        hit = np.isin(np.asarray(labels), np.asarray(removed_class).reshape(-1))
        imgs = imgs.copy()
        imgs[hit, 0, :, :] = imgs[hit, -1, :, :] = imgs[hit, :, 0, :] = imgs[hit, :, -1, :] = (1.0, 0.0, 0.0)
    grid = tile(imgs, ncols)
    fig, ax = plt.subplots(figsize=(grid.shape[1] / 40 + 0.5, grid.shape[0] / 40 + 0.8), dpi=100)
    _imshow(ax, grid)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_overview(rows: Sequence[Mapping], samples: Mapping[str, np.ndarray], path: str, per_row: int = 16) -> str:
    """One row of the first ``per_row`` samples per grid point; the same seeds in every row."""
    n = len(rows)
    first = next(iter(samples.values()))
    h = first.shape[1]
    fig, axes = plt.subplots(n, 1, figsize=(per_row * h / 28 * 0.45 + 1.6, n * 0.5 + 0.4), squeeze=False)
    for ax, row in zip(axes[:, 0], rows):
        x = samples[row["key"]][:per_row]
        _imshow(ax, tile(to_image(x), per_row))
        ax.set_ylabel(f"{row['method']} {row['scale']:g}\n{row['safety_pct']:.1f}%", rotation=0,
                      ha="right", va="center", fontsize=7)
    axes[0, 0].set_title("same seeds in every row; label: method, scale, % removed class", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_tradeoff(rows: Sequence[Mapping], path: str, high_safety: float = 1.0,
                  fd_label: str = "FD") -> str:
    """KL (left) and FD (right) against safety (% of samples in the removed class), one curve per method.

    Points of a method are joined in the order of its guidance scale (annotated).
    Lower-left is better; the dashed line marks the high-safety threshold.
    """
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    methods = []
    for r in rows:
        if r["method"] not in methods:
            methods.append(r["method"])
    style = styles(methods)
    for ax, key, ylabel in ((axes[0], "kl", "KL(ideal || generated) [nats]"),
                            (axes[1], "fd", f"{fd_label} to the data without the removed class")):
        for m in methods:
            pts = sorted((r for r in rows if r["method"] == m), key=lambda r: r["scale"])
            xs = [r["safety_pct"] for r in pts]
            ys = [r[key] for r in pts]
            if m == "none":
                ax.scatter(xs, ys, marker="*", s=160, color="black", zorder=5, label="unguided")
                continue
            ax.plot(xs, ys, marker=style[m][1], color=style[m][0], label=m,
                    ls="--" if m in ("DNG:beta_tilde", "DNG:posterior") else "-")
            for r in pts:
                ax.annotate(f"{r['scale']:g}", (r["safety_pct"], r[key]), textcoords="offset points",
                            xytext=(4, 3), fontsize=7, color=style[m][0])
        ax.axvline(high_safety, color="gray", ls="--", lw=0.8)
        ax.set_xlabel("safety: % of samples classified as the removed class (lower is safer)")
        ax.set_ylabel(ylabel)
        ax.set_xscale("symlog", linthresh=1.0, linscale=0.6)
        top = max([r["safety_pct"] for r in rows] + [high_safety])
        ticks = [t for t in (0, 0.25, 0.5, 1, 2, 5, 10, 20, 50, 100) if t <= top * 1.05]
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlim(-0.05, top * 1.3 + 0.1)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    r0 = rows[0]
    fig.suptitle(f"{r0['dataset']}: remove class {r0.get('removed_classes', r0['removed_class'])} "
                 f"(n = {r0['n']} per point, {r0['steps']} steps); lower left is better", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def pick_rows_for_histogram(rows: Sequence[Mapping], high_safety: float = 1.0) -> List[Mapping]:
    """The unguided point, and per method the lowest scale with safety <= ``high_safety``
    (else the method's safest point)."""
    out = [r for r in rows if r["method"] == "none"][:1]
    methods = []
    for r in rows:
        if r["method"] != "none" and r["method"] not in methods:
            methods.append(r["method"])
    for m in methods:
        pts = sorted((r for r in rows if r["method"] == m), key=lambda r: r["scale"])
        ok = [r for r in pts if r["safety_pct"] <= high_safety]
        out.append(ok[0] if ok else min(pts, key=lambda r: (r["safety_pct"], r["scale"])))
    return out


def plot_histograms(rows: Sequence[Mapping], path: str, class_names: Optional[Sequence[str]] = None,
                    high_safety: float = 1.0) -> str:
    """Class frequencies (%) of the samples, grouped bars per class, against the ideal (fig. 13)."""
    k = len(rows[0]["histogram"])
    fig, ax = plt.subplots(figsize=(max(8, k * 0.9) + 3.5, 4))
    draw_histograms(ax, rows, class_names, high_safety)
    ax.set_title(f"class histograms; per method the lowest scale with <= {high_safety:g}% removed class "
                 "(else its safest point)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def draw_histograms(ax, rows: Sequence[Mapping], class_names: Optional[Sequence[str]] = None,
                    high_safety: float = 1.0) -> None:
    """:func:`plot_histograms`' bars and ideal on the axes ``ax`` (the unguided point and, per method,
    its lowest scale with <= ``high_safety`` % removed class, else its safest point)."""
    chosen = pick_rows_for_histogram(rows, high_safety)
    k = len(chosen[0]["histogram"])
    from dngjax.metrics import ideal_distribution
    tag = str(chosen[0].get("removed_classes", chosen[0]["removed_class"]))
    ideal = 100.0 * ideal_distribution(k, [int(c) for c in tag.split("+")])
    width = 0.8 / max(len(chosen), 1)
    xs = np.arange(k)
    style = styles([r["method"] for r in chosen])
    for i, r in enumerate(chosen):
        h = np.asarray(r["histogram"], np.float64)
        freq = 100.0 * h / max(h.sum(), 1)
        label = ("unguided" if r["method"] == "none" else f"{r['method']} scale {r['scale']:g}") + \
            f" (safety {r['safety_pct']:.1f}%, KL {r['kl']:.3f}, n {r.get('n', h.sum()):.0f})"
        ax.bar(xs - 0.4 + width * (i + 0.5), freq, width, color=style[r["method"]][0],
               alpha=0.85 if r["method"] != "none" else 0.4, label=label)
    ax.step(np.r_[xs - 0.5, k - 0.5], np.r_[ideal, ideal[-1]], where="post", color="red", lw=1.2,
            label="ideal (0 on removed class, uniform elsewhere)")
    ax.set_xticks(xs)
    ax.set_xticklabels(list(class_names) if class_names else [str(i) for i in range(k)])
    ax.set_ylabel("% of samples")
    ax.set_xlabel("class assigned by the classifier")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))      # outside: never over the bars


def reduce_trace(trace, scales, removed_mask: Optional[np.ndarray] = None) -> Dict[str, Any]:
    """Mean lambda_t and p_t curves (K, S) of a sweep's Trace, over all samples and, given
    ``removed_mask`` (N,), separately over the seeds whose unguided sample is (not) the removed class."""
    lam, p = np.asarray(trace.lam, np.float64), np.asarray(trace.p, np.float64)
    out: Dict[str, Any] = {"t": np.asarray(trace.t), "scales": np.asarray(scales, np.float64)}
    split = removed_mask is not None and np.any(removed_mask) and not np.all(removed_mask)
    for name, arr in (("lam", lam), ("p", p)):
        out[f"{name}_all"] = arr.mean(-1)
        out[f"{name}_removed"] = arr[..., removed_mask].mean(-1) if split else None
        out[f"{name}_other"] = arr[..., ~removed_mask].mean(-1) if split else None
    return out


def plot_lambda(traces: Mapping[str, Dict], path: str) -> str:
    """Mean lambda_t over samples against the network timestep t (sampling runs from high to low t).

    ``traces[method]`` from :func:`reduce_trace`. One panel per method, one line per scale.
    For methods that track a posterior (DNG) a second row shows the mean p_t. Where
    the unguided run is known, solid lines average over the seeds whose *unguided*
    sample is another class and dashed lines over those whose unguided sample is the
    removed class; otherwise one line averages over all seeds.
    """
    methods = list(traces)
    has_p = [m for m in methods if np.isfinite(traces[m]["p_all"]).any()]
    nrows = 2 if has_p else 1
    fig, axes = plt.subplots(nrows, len(methods), figsize=(4.2 * len(methods), 3.3 * nrows), squeeze=False)
    split_any = False
    for j, m in enumerate(methods):
        tr = traces[m]
        t = np.asarray(tr["t"])
        cmap = plt.get_cmap("viridis")
        K = len(tr["scales"])
        for row, (name, title) in enumerate((("lam", "lambda_t"), ("p", "p_t = p(c- | x_t)"))):
            if row == 1 and m not in has_p:
                if nrows == 2:
                    axes[1, j].axis("off")
                continue
            ax = axes[row, j]
            split = tr.get(f"{name}_removed") is not None
            split_any |= split
            for k in range(K):
                color = cmap(k / max(K - 1, 1))
                lab = f"scale {tr['scales'][k]:g}"
                if split:
                    ax.plot(t, tr[f"{name}_other"][k], color=color, label=lab)
                    ax.plot(t, tr[f"{name}_removed"][k], color=color, ls="--")
                else:
                    ax.plot(t, tr[f"{name}_all"][k], color=color, label=lab)
            ax.set_xlim(t.max(), t.min())
            ax.set_xlabel("diffusion timestep t (sampling goes left to right)")
            ax.set_ylabel(f"mean {title}")
            ax.set_title(f"{m}: {title}", fontsize=9)
            ax.grid(alpha=0.3)
            if row == 0:
                ax.legend(fontsize=7)
    note = ("solid: seeds whose unguided sample is another class; dashed: seeds whose unguided sample "
            "is the removed class" if split_any else "mean over all samples")
    fig.suptitle(note, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_selection(result: Mapping[str, Any], path: str) -> str:
    """KL and FD of every DNG setting read at exactly ``high_safety`` % of the removed class
    (:func:`dngjax.tools.sample.selection.choose`'s ``result``): one column per setting, a small marker per class,
    a bar for the mean over classes (the rule's criterion); the chosen setting's bar outlined.
    Settings whose grid does not bracket the line in some class show only the classes that it does."""
    settings = result["settings"]
    classes = [str(c) for c in result["classes"]]
    fig, axes = plt.subplots(1, 2, figsize=(max(6.0, 1.1 * len(settings) + 2.5), 3.6), dpi=110)
    x = np.arange(len(settings))
    for ax, key, name in ((axes[0], "kl", "KL(train || samples)"), (axes[1], "fd", "FD")):
        for i, st in enumerate(settings):
            if st["qualified"]:                       # every class read: the rule's mean
                chosen = st["method"] == result["chosen"]
                ax.bar(i, st["mean_" + key], width=0.6, color="tab:green", alpha=0.35,
                       edgecolor="black" if chosen else "none", linewidth=1.5)
            for j, c in enumerate(classes):
                if c in st["per_class"]:
                    ax.plot(i + 0.08 * (j - (len(classes) - 1) / 2), st["per_class"][c][key], marker="o",
                            ms=4, ls="none", color=f"C{j}", label=f"removed {c}" if i == 0 else None)
        ax.set_xticks(x)
        short = {"temperature": "temp."}
        ax.set_xticklabels([("\n".join(f"{short.get(k, k)} {v:g}" for k, v in st["overrides"].items()) or st["method"])
                            + ("" if st["qualified"] else "\n(never reaches)" if not st["add_scale"] else "\n(not bracketed)")
                            for st in settings], fontsize=7)
        ax.set_ylabel(f"{name} at {result['high_safety']:g}% removed")
        ax.grid(alpha=0.3, axis="y")
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=7)
    fig.suptitle("DNG settings at equal safety (bars: mean over classes; outlined: chosen)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
