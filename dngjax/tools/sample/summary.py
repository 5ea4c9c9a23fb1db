"""The verdict over several reports side by side: one table per reading for every removed class and setup.

  python sample/main.py --job=report --runs=outputs/protocol_cpu               # setup (a): report.json
  python sample/main.py --job=report --runs=outputs/protocol_cpu/conditional   # setup (b)
  python sample/main.py --job=summary --runs=outputs/protocol_cpu,outputs/protocol_cpu/conditional

Reads the ``report.json`` that ``--job=report`` writes beside report.md (:func:`dngjax.tools.sample.report.summarise`:
nothing is resampled here) and writes ``summary.md`` -- the paper's claim under both readings with a count
of the verdicts, then the values behind it: (ii) every curve read at exactly 1 % of the removed class,
(i) per method its lowest KL and FD among its grid points at <= 1 % (the paper's reading) -- and
``claims.png``: per class and setup, DNG's gap to the better of NP and SLD with two standard errors
(positive: DNG lower, i.e. better).
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Tuple


def _report_json(folder: str) -> str:
    return folder if folder.endswith(".json") else os.path.join(folder, "report.json")


def load(folders: List[str]) -> Tuple[List[Dict], float]:
    """The groups (removed class, setup) of every folder's report.json, sorted by class and then setup,
    and the safety (%) the reports read the claim at. Each group gains ``label``: "0, (a) forget model"
    when the setups differ ((a), (b), ... in order of first appearance), else the class alone."""
    groups, highs = [], set()
    for folder in folders:
        path = _report_json(folder)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: run --job=report --runs={folder} first "
                                    "(reports written before report.json existed need a rerun)")
        with open(path) as f:
            data = json.load(f)
        groups += data["groups"]
        highs.add(data["high_safety"])
    if not groups:
        raise ValueError(f"the reports in {folders} hold no removed class")
    if len(highs) > 1:
        raise ValueError(f"the reports in {folders} read the claim at different safeties: {sorted(highs)} %")
    setups = list(dict.fromkeys(g["setup"] for g in groups))
    for g in groups:
        letter = "abcdefghij"[setups.index(g["setup"])] if len(setups) > 1 else ""
        g["label"] = f"{g['removed']}, ({letter}) {g['setup']}" if letter else f"{g['removed']}"
    order = {s: i for i, s in enumerate(setups)}
    return sorted(groups, key=lambda g: (str(g["removed"]), order[g["setup"]])), highs.pop()


def _methods(groups: List[Dict]) -> List[str]:
    """Every method of the reports: NP, SLD, other baselines, then the DNG variants (each in order of
    first appearance)."""
    rank = lambda m: 3 if m.startswith("DNG") else {"NP": 0, "SLD": 1}.get(m, 2)
    return sorted(dict.fromkeys(m for g in groups for m in g["grid"]), key=rank)


def claim_cell(c: Dict) -> str:
    """A claim (:func:`dngjax.tools.sample.report.claim_at_grid` / ``claim_at_safety``) as a short cell:
    "**yes, within noise** (gap 0.015 +- 0.013 to SLD)"."""
    if "missing" in c:
        return c["missing"]
    gap = f"gap {c['gap']:.3g}" + (f" +- {c['se']:.2g}" if c["se"] else "")
    return f"**{verdict_word(c)}** ({gap} to {c['baseline']})"


def verdict_word(c: Dict) -> str:
    """The claim's class: "yes", "yes, within noise", "no, within noise", "no", or "missing"."""
    if "missing" in c:
        return "missing"
    return ("yes" if c["yes"] else "no") + (", within noise" if c["within_noise"] else "")


def markdown(groups: List[Dict], high_safety: float = 1.0) -> str:
    """summary.md: the verdict first (the claim under both readings, and its count), then the evidence:
    (ii) every curve read at exactly ``high_safety`` %, (i) the paper's reading on the grid."""
    parts = [_claims_table(groups, high_safety), _at_safety_table(groups, high_safety),
             _grid_table(groups, high_safety)]
    timed = [g for g in groups if g.get("sample_hours") is not None]   # reports from before it lack it
    if timed:
        parts.append(f"Sampling time: {sum(g['sample_hours'] for g in timed):.1f} h over {len(timed)} class-setups "
                     "(wall clock, each report's points' sampling summed, top-ups included; compilation and "
                     "scoring not counted): " + ", ".join(f"{g['label']} {g['sample_hours']:.2f} h" for g in timed)
                     + ".")
    return "\n\n".join(parts) + "\n"


_pm = lambda v, f: "" if v is None else f" +- {v:{f}}"


def _grid_table(groups: List[Dict], high_safety: float) -> str:
    h = f"{high_safety:g} %"
    methods = _methods(groups)
    out = [f"(i) The paper's reading: per method the lowest KL and the lowest FD among its grid points at <= {h} "
           "(+-: bootstrap standard errors of the point):\n",
           "| class, setup | unguided % | " + " | ".join(f"{m}: lowest KL at <= {h} (scale, n)" for m in methods)
           + f" | lowest FD at <= {h}: " + " / ".join(methods) + " (scale) | non-finite samples (invalid points) |",
           "| --- | --- | " + " | ".join("---" for _ in methods) + " | --- | --- |"]
    for g in groups:
        kl = [("--" if (p := g["grid"].get(m, {}).get("kl")) is None
               else f"{p['value']:.3f}{_pm(p['se'], '.3f')} ({p['scale']:g}, {p['n']})") for m in methods]
        fd = [("--" if (p := g["grid"].get(m, {}).get("fd")) is None else f"{p['value']:.1f} ({p['scale']:g})")
              for m in methods]
        unguided = "--" if g["unguided_pct"] is None else f"{g['unguided_pct']:.2f}"
        out.append(f"| {g['label']} | {unguided} | " + " | ".join(kl) + " | " + " / ".join(fd) + f" | {_nonfinite_cell(g)} |")
    if any(g.get("nonfinite") for g in groups):
        out.append("\nNon-finite samples (a NaN or inf element) count as the removed class in safety %; points "
                   "with any are invalid and left out of every reading and claim.")
    return "\n".join(out)


def _nonfinite_cell(g: Dict) -> str:
    """"0", or the count and the invalid points: "8 (NP 1e+30: 8 of 8)"; "--" for reports before the count."""
    if "nonfinite" not in g:
        return "--"
    bad = g["nonfinite"]
    if not bad:
        return "0"
    return (f"{sum(p['nonfinite'] for p in bad)} ("
            + ", ".join(f"{p['method']} {p['scale']:g}: {p['nonfinite']} of {p['n']}" for p in bad) + ")")


def _at_safety_table(groups: List[Dict], high_safety: float) -> str:
    h = f"{high_safety:g} %"
    methods = _methods(groups)
    dng = [m for m in methods if m.startswith("DNG")]
    out = [f"(ii) At equal safety: each curve read at exactly {h} of the removed class, interpolated between "
           f"the two grid points where it falls to {h} (+-: bootstrap, the crossing recomputed on every draw):\n",
           f"| class, setup | KL at {h}: " + " / ".join(methods) + f" | FD at {h}: " + " / ".join(methods)
           + " | " + " | ".join(f"{m}'s bracketing scales" for m in dng) + " |",
           "| --- | --- | --- | " + " | ".join("---" for _ in dng) + " |"]
    for g in groups:
        cell = lambda m, key, f: ("--" if (a := g["at_safety"].get(m)) is None or a[key] is None
                                  else f"{a[key]['value']:{f}}{_pm(a[key]['se'], f)}")
        between = lambda m: ("--" if (a := g["at_safety"].get(m)) is None else
                             " and ".join(f"{p['scale']:g} ({p['safety_pct']:.2f} %)" for p in a["between"]))
        out.append(f"| {g['label']} | " + " / ".join(cell(m, "kl", ".3f") for m in methods) + " | "
                   + " / ".join(cell(m, "fd", ".1f") for m in methods) + " | "
                   + " | ".join(between(m) for m in dng) + " |")
    return "\n".join(out)


def _claims_table(groups: List[Dict], high_safety: float) -> str:
    h = f"{high_safety:g} %"
    variants = list(dict.fromkeys(v for g in groups for v in g["claims"]))
    several = len(variants) > 1
    out = [f"The paper's claim, \"at <= {h} removed class DNG has lower KL and lower FD than NP and SLD\" "
           "(the gap to the better of NP and SLD, positive when DNG is lower; +-: its bootstrap standard error, "
           "paired where the points share seeds; \"within noise\": under two standard errors), under reading "
           f"(i), the paper's (per method its best grid point at <= {h}), and (ii), at equal safety (every curve "
           f"read at exactly {h}); the tables after it give the values:\n",
           "| class, setup" + (" | DNG variant" if several else "") + " | (i) lower KL? | (i) lower FD? | "
           f"(ii) lower KL at {h}? | (ii) lower FD at {h}? |",
           "| --- " + ("| --- " if several else "") + "| --- | --- | --- | --- |"]
    counts: Dict[str, Dict[str, int]] = {}
    for g in groups:
        for v, c in g["claims"].items():
            cells = [c[reading][key] for reading in ("grid", "at_safety") for key in ("kl", "fd")]
            out.append(f"| {g['label']} | " + (f"{v} | " if several else "")
                       + " | ".join(claim_cell(x) for x in cells) + " |")
            for name, x in zip(("(i) KL", "(i) FD", "(ii) KL", "(ii) FD"), cells):
                name = f"{v}: {name}" if several else name      # one count per DNG variant
                counts.setdefault(name, {}).setdefault(verdict_word(x), 0)
                counts[name][verdict_word(x)] += 1
    words = ["yes", "yes, within noise", "no, within noise", "no", "missing"]
    out += ["", "Count over the rows above" + (", per DNG variant" if several else "") + ":\n",
            "| | " + " | ".join(words) + " |", "| --- | " + " | ".join("---" for _ in words) + " |"]
    if several:                                                  # variant by variant, not row by row
        counts = {f"{v}: {n}": counts[f"{v}: {n}"] for v in variants
                  for n in ("(i) KL", "(i) FD", "(ii) KL", "(ii) FD") if f"{v}: {n}" in counts}
    for name, c in counts.items():
        out.append(f"| {name} | " + " | ".join(str(c.get(w, 0)) for w in words) + " |")
    return "\n".join(out)


def plot_claims(groups: List[Dict], path: str, high_safety: float = 1.0) -> str:
    """claims.png: per row (class, setup, DNG variant) and measure, DNG's gap to the better baseline
    under reading (i) (filled) and (ii) (hollow), with +-2 standard errors; right of 0: DNG lower."""
    import matplotlib.pyplot as plt
    from dngjax.tools.sample import plots

    rows = [(g, v, c) for g in groups for v, c in g["claims"].items()]
    several = len({v for _, v, _ in rows}) > 1
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(rows) + 1.6), squeeze=False, sharey=True)
    labels = [g["label"] + (f" {v}" if several else "") for g, v, _ in rows]
    spans: Dict[str, List[int]] = {}                     # rows of each class and setup, shaded every other one
    for i, (g, _, _) in enumerate(rows):
        spans.setdefault(g["label"], []).append(i)
    shaded = [(idx[0] - 0.5, idx[-1] + 0.5) for idx in list(spans.values())[1::2]]
    baselines = list(dict.fromkeys(c[r][k]["baseline"] for _, _, c in rows for r in ("grid", "at_safety")
                                   for k in ("kl", "fd") if "missing" not in c[r][k]))
    colour = {m: st[0] for m, st in plots.styles(baselines).items()}
    for ax, key in zip(axes[0], ("kl", "fd")):
        for lo, hi in shaded:
            ax.axhspan(lo, hi, color="0.93", zorder=0)
        for i, (g, v, c) in enumerate(rows):
            for reading, dy, filled in (("grid", -0.12, True), ("at_safety", 0.12, False)):
                x = c[reading][key]
                if "missing" in x:
                    continue
                color = colour[x["baseline"]]
                ax.errorbar([x["gap"]], [i + dy], xerr=None if not x["se"] else [[2 * x["se"]], [2 * x["se"]]],
                            fmt="o" if filled else "s", color=color, mfc=color if filled else "white", capsize=3)
        ax.axvline(0.0, color="black", lw=0.8)
    axes[0, 0].set_yticks(range(len(rows)))
    axes[0, 0].set_yticklabels(labels, fontsize=8)       # shared by both panels
    axes[0, 0].set_ylim(len(rows) - 0.5, -0.5)           # the first row on top
    for ax, name in zip(axes[0], ("KL", "FD")):
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("better baseline minus DNG (> 0: DNG lower)", fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    h = f"{high_safety:g} %"
    handles = [plt.Line2D([], [], marker="o", ls="", color="gray", label=f"(i) lowest at <= {h} on the grid"),
               plt.Line2D([], [], marker="s", ls="", color="gray", mfc="white", label=f"(ii) read at exactly {h}")]
    handles += [plt.Line2D([], [], marker="o", ls="", color=colour[m], label=f"gap to {m}") for m in baselines]
    axes[0, 1].tick_params(labelleft=False)
    axes[0, 1].legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle("DNG against the better of NP and SLD (error bars: 2 standard errors)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_summary(groups: List[Dict], high_safety: float, folders: List[str], out: Optional[str] = None) -> str:
    """summary.md and claims.png for the groups :func:`load` read from the reports in ``folders``
    (default ``out``: their common parent); returns the output folder."""
    out = out or os.path.commonpath([os.path.abspath(os.path.dirname(_report_json(f))) for f in folders])
    os.makedirs(out, exist_ok=True)
    md = markdown(groups, high_safety)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(md)
    plot_claims(groups, os.path.join(out, "claims.png"), high_safety)
    print(md)
    print(f"wrote {os.path.join(out, 'summary.md')} and claims.png in {out}")
    return out
