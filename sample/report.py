"""Aggregate several class-removal runs (sample/main.py output folders) into one report.

  python sample/main.py --job=report --runs=OUT/class_0,OUT/class_1 [--out=OUT]
  python sample/main.py --job=report --runs=OUT      # every sub-folder of OUT holding a results.json

Writes ``report.md`` (per class: the full table, and the paper's comparison --
among the points with <= 1% removed class, each method's lowest KL and lowest FD)
and ``tradeoff_all.png`` (KL and FD against safety, one row per removed class).
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

import numpy as np


def find_runs(paths: List[str]) -> List[str]:
    runs = []
    for p in paths:
        if os.path.isfile(os.path.join(p, "results.json")):
            runs.append(p)
        elif os.path.isdir(p):
            runs += sorted(os.path.join(p, d) for d in os.listdir(p)
                           if os.path.isfile(os.path.join(p, d, "results.json")))
    if not runs:
        raise FileNotFoundError(f"no results.json in {paths} or their sub-folders")
    return runs


def best_at_high_safety(rows: List[Dict], high_safety: float = 1.0) -> Dict[str, Dict[str, Optional[Dict]]]:
    """Per method: the point of lowest KL and of lowest FD among points with safety <= high_safety."""
    out = {}
    for m in dict.fromkeys(r["method"] for r in rows if r["method"] != "none"):
        ok = [r for r in rows if r["method"] == m and r["safety_pct"] <= high_safety]
        out[m] = {"kl": min(ok, key=lambda r: r["kl"]) if ok else None,
                  "fd": min(ok, key=lambda r: r["fd"]) if ok else None}
    return out


def verdict(best: Dict[str, Dict[str, Optional[Dict]]], dng: str, key: str) -> str:
    """Is DNG variant ``dng``'s lowest ``key`` at high safety below that of NP and SLD?

    "yes" / "no" by the point estimates; "(within noise)" when the gap to the best
    of NP and SLD is smaller than the two bootstrap standard errors combined.
    """
    b = best.get(dng, {}).get(key)
    if b is None:
        return f"{dng} never reaches high safety"
    others = {m: v[key] for m, v in best.items() if not m.startswith("DNG") and v[key] is not None}
    if not others:
        return "only DNG reaches high safety"
    m_best, o = min(others.items(), key=lambda kv: kv[1][key])
    gap = o[key] - b[key]
    se = np.hypot(b.get(key + "_std", 0.0), o.get(key + "_std", 0.0))
    word = "yes" if gap > 0 else "no"
    noise = " (within noise)" if se > 0 and abs(gap) < 2 * se else ""
    return f"{word}{noise}: {b[key]:.3g} vs {m_best} {o[key]:.3g}"


def markdown(runs: List[str], high_safety: float = 1.0) -> str:
    lines = []
    summary = ["| removed class | n | steps | unguided % | method | lowest KL at <= 1% (scale) | "
               "lowest FD at <= 1% (scale) |",
               "| --- | --- | --- | --- | --- | --- | --- |"]
    claims = ["| removed class | DNG variant | lower KL than NP and SLD? | lower FD than NP and SLD? |",
              "| --- | --- | --- | --- |"]
    for run in runs:
        rows = json.load(open(os.path.join(run, "results.json")))
        r0 = rows[0]
        lines.append(f"### {r0['dataset']}, removed class {r0.get('removed_classes', r0['removed_class'])} "
                     f"(n = {r0['n']} per point, {r0['steps']}-step chain, T = {r0['T']}, seed {r0['seed']})\n")
        lines.append("| method | scale | safety % | KL | FD | empty classes | mean lambda |")
        lines.append("| --- | --- | --- | --- | --- | --- | --- |")
        pm = lambda r, k, f: f" ± {r[k + '_std']:{f}}" if k + "_std" in r else ""
        for r in rows:
            lines.append(f"| {r['method']} | {r['scale']:g} | {r['safety_pct']:.2f}{pm(r, 'safety', '.2f')} | "
                         f"{r['kl']:.4f}{pm(r, 'kl', '.4f')} | {r['fd']:.2f}{pm(r, 'fd', '.2f')} | "
                         f"{r['n_empty_classes']} | {r['mean_lambda']:.3g} |")
        lines.append("")
        best = best_at_high_safety(rows, high_safety)
        base = next((r for r in rows if r["method"] == "none"), None)
        base_str = "--" if base is None else f"{base['safety_pct']:.2f}"
        for m, b in best.items():
            kl = "--" if b["kl"] is None else f"{b['kl']['kl']:.4f}{pm(b['kl'], 'kl', '.4f')} ({b['kl']['scale']:g})"
            fd = "--" if b["fd"] is None else f"{b['fd']['fd']:.2f}{pm(b['fd'], 'fd', '.2f')} ({b['fd']['scale']:g})"
            summary.append(f"| {r0.get('removed_classes', r0['removed_class'])} | {r0['n']} | {r0['steps']} | {base_str} | {m} | {kl} | {fd} |")
        for m in best:
            if m.startswith("DNG"):
                claims.append(f"| {r0.get('removed_classes', r0['removed_class'])} | {m} | {verdict(best, m, 'kl')} | {verdict(best, m, 'fd')} |")
    head = [f"Among the grid points with <= {high_safety:g}% of samples in the removed class, each method's "
            "lowest KL and lowest FD (its guidance scale in brackets); -- : the method never reaches that "
            "safety on its grid. ±: bootstrap standard errors (resampling the n samples of a point).\n"]
    return "\n".join(head + summary + ["", "The paper's claim, point by point "
                                        "(\"within noise\": the gap is under two combined standard errors):\n"]
                     + claims + [""] + lines)


def plot_all(runs: List[str], path: str, high_safety: float = 1.0) -> str:
    from sample import plots
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 2, figsize=(11, 3.6 * len(runs)), squeeze=False)
    for i, run in enumerate(runs):
        rows = json.load(open(os.path.join(run, "results.json")))
        for j, key in enumerate(("kl", "fd")):
            ax = axes[i, j]
            for m in dict.fromkeys(r["method"] for r in rows):
                pts = sorted((r for r in rows if r["method"] == m), key=lambda r: r["scale"])
                xs, ys = [r["safety_pct"] for r in pts], [r[key] for r in pts]
                if m == "none":
                    ax.scatter(xs, ys, marker="*", s=140, color="black", zorder=5, label="unguided")
                else:
                    ax.plot(xs, ys, marker=plots.MARKERS.get(m, "o"), color=plots.COLORS.get(m), label=m)
            ax.axvline(high_safety, color="gray", ls="--", lw=0.8)
            ax.set_xscale("symlog", linthresh=1.0, linscale=0.6)
            ax.set_xlabel("% of samples in the removed class")
            ax.set_ylabel(("KL(ideal || generated)" if key == "kl" else "FD") + f", class {rows[0].get('removed_classes', rows[0]['removed_class'])} removed")
            ax.grid(alpha=0.3)
        axes[i, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(runs: List[str], out: Optional[str] = None, high_safety: float = 1.0) -> str:
    """Write report.md and tradeoff_all.png for the run folders ``runs``; returns the output folder."""
    out = out or os.path.commonpath([os.path.abspath(r) for r in runs])
    if os.path.isfile(os.path.join(out, "results.json")):
        out = os.path.dirname(out)
    os.makedirs(out, exist_ok=True)
    md = markdown(runs, high_safety)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(md + "\n")
    plot_all(runs, os.path.join(out, "tradeoff_all.png"), high_safety)
    print(md)
    print(f"\nwrote {os.path.join(out, 'report.md')} and {os.path.join(out, 'tradeoff_all.png')}")
    return out
