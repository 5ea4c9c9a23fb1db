"""Choose DNG's hyperparameters from class-removal runs on selection seeds, by a rule fixed in advance.

  python sample/main.py --config=sample/configs/mnist.py:select --config.removed_class=C   # per class C
  python sample/main.py --job=select --runs=outputs/select                                # then choose

The selection runs sample DNG settings (methods ``DNG[prior=..,temperature=..]``, each over its own grid
of scales, ``config.method_grids``) on seeds that the report never uses (``select`` config: seeds from
1,000,000). The rule, stated before any selection or report seed of these settings was sampled (the
report's reading (ii): every curve compared at equal safety):

1. For a setting s and a removed class c, KL(s, c) and FD(s, c) are s's curve read at exactly
   ``high_safety`` % (1 %) of class c: interpolated linearly in safety between the two neighbouring
   grid points (in scale) where the curve first falls to 1 % (:func:`dngjax.tools.sample.report.crossing`,
   :func:`dngjax.tools.sample.report.read_at`).
2. A setting qualifies if its grid brackets 1 % in every class of the runs.
3. The chosen setting is the qualifying one with the lowest mean KL over the classes; ties (mean KL
   within 0.001) go to the lower mean FD.
4. The choice is complete only when every setting qualifies: a setting whose grid does not bracket 1 %
   in some class is listed with the scale to add (below its lowest scale when that one is already at
   <= 1 %, above its highest when it never gets there); add it to ``config.method_grids`` and rerun
   (finished points are reused), so that no setting is left out for where its grid happened to lie.
   A curve still above 1 % at a grid point whose guidance at the chain's start, lambda_T = scale *
   prior / (1 - prior), is at least ``ceiling`` (config.select_ceiling; 20, five times NP's largest
   protocol scale) does not reach 1 % in that class: the setting does not qualify and needs no more
   scales (such curves flatten: the samples that end in the removed class are the ones whose tracked
   posterior never rises). If none qualifies, nothing is chosen.

Writes ``selection.md``, ``selection.json`` and ``selection.png`` next to the runs (or into --out).
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

import numpy as np

from dngjax.tools.sample import report
from dngjax.tools.sample.methods import parse_method

KL_TIE = 1e-3


def _load(run: str) -> List[Dict]:
    with open(os.path.join(run, "results.json")) as f:
        return json.load(f)


def _missing_bracket(pts: List[Dict], high_safety: float) -> str:
    """Why a curve's grid does not bracket ``high_safety`` %, as the scale to add."""
    pts = sorted(pts, key=lambda r: r["scale"])
    if pts[0]["safety_pct"] <= high_safety:
        return f"below {pts[0]['scale']:g} (already {pts[0]['safety_pct']:.2f}% there)"
    return f"above {pts[-1]['scale']:g} (still {min(r['safety_pct'] for r in pts):.2f}%)"


def _start_guidance(row: Dict) -> float:
    """lambda_T = scale * prior / (1 - prior): the guidance of a DNG point at the chain's start."""
    return float(row["scale"]) * float(row["prior"]) / (1.0 - float(row["prior"]))


def choose(per_class_rows: Dict[int, List[Dict]], high_safety: float = 1.0,
           ceiling: Optional[float] = None) -> Dict:
    """Apply the rule of the module docstring. ``per_class_rows``: {removed class: results rows};
    ``ceiling``: the lambda_T at which a curve still above ``high_safety`` % counts as never reaching
    it (None: no ceiling, every unbracketed curve asks for a scale).

    Returns {"classes", "high_safety", "ceiling", "settings": [per-setting summary], "chosen": method
    string or None, "complete": whether every setting qualifies or is out by the ceiling}.
    """
    classes = sorted(per_class_rows)
    methods = list(dict.fromkeys(r["method"] for rows in per_class_rows.values() for r in rows
                                 if r["method"] != "none"))
    if not methods:
        raise ValueError("the runs hold no guided points (only 'none'): nothing to choose from")
    settings = []
    for m in methods:
        per_class, missing, unreachable = {}, {}, {}
        for c in classes:
            pts = [r for r in per_class_rows[c] if r["method"] == m]
            if not pts:
                raise ValueError(f"method {m!r} is missing from the run of class {c}: every run needs the same methods")
            pair = report.crossing(pts, m, high_safety)
            if pair is None:
                top = max(pts, key=lambda r: r["scale"])
                if (ceiling is not None and min(r["safety_pct"] for r in pts) > high_safety
                        and _start_guidance(top) >= ceiling):
                    unreachable[str(c)] = (f"still {min(r['safety_pct'] for r in pts):.2f}% at scale {top['scale']:g} "
                                           f"(lambda_T {_start_guidance(top):.3g} >= {ceiling:g})")
                else:
                    missing[str(c)] = _missing_bracket(pts, high_safety)
                continue
            a, b = pair
            per_class[str(c)] = {"kl": report.read_at(a, b, "kl", high_safety),
                                 "fd": report.read_at(a, b, "fd", high_safety),
                                 "between": [a["scale"], b["scale"]],
                                 "safety_pct": [a["safety_pct"], b["safety_pct"]]}
        qualified = not missing and not unreachable
        settings.append({
            "method": m, "overrides": parse_method(m)[2], "qualified": qualified,
            "mean_kl": float(np.mean([v["kl"] for v in per_class.values()])) if qualified else None,
            "mean_fd": float(np.mean([v["fd"] for v in per_class.values()])) if qualified else None,
            "per_class": per_class, "add_scale": missing, "never_reaches": unreachable,
        })
    ok = [s for s in settings if s["qualified"]]
    chosen = None
    if ok:
        low = min(s["mean_kl"] for s in ok)
        tied = [s for s in ok if s["mean_kl"] <= low + KL_TIE]
        chosen = min(tied, key=lambda s: s["mean_fd"])["method"]
    return {"classes": classes, "high_safety": high_safety, "ceiling": ceiling, "settings": settings,
            "chosen": chosen, "complete": all(s["qualified"] or not s["add_scale"] for s in settings)}


def _load_runs(runs: List[str]):
    """({removed class: its rows}, {(first seed, n)}) of the selection runs (one run per class)."""
    per_class: Dict[int, List[Dict]] = {}
    seeds = set()
    for run in runs:
        rows = _load(run)
        c = int(rows[0]["removed_class"])
        if c in per_class:
            raise ValueError(f"two runs remove class {c}: {runs}")
        per_class[c] = rows
        seeds.add((rows[0]["seed"], rows[0]["n"]))
    return per_class, seeds


def _table_lines(result, n_runs: int, seeds, high_safety: float, ceiling: Optional[float]) -> List[str]:
    """selection.md's title, rule and table of the settings."""
    classes = result["classes"]
    lines = [f"# DNG hyperparameter selection ({n_runs} run(s), classes {classes})", "",
             f"Rule (dngjax/tools/sample/selection.py): every curve read at exactly {high_safety:g} % of the removed class "
             f"(interpolated between the two grid points that bracket it); lowest mean KL over the classes, "
             f"ties within {KL_TIE} by mean FD"
             + (f"; a curve still above {high_safety:g} % at lambda_T = scale * prior / (1 - prior) >= {ceiling:g} "
                "never reaches it" if ceiling is not None else "")
             + f". Seeds (first, n): {sorted(map(str, seeds))}.", "",
             "| setting | mean KL | mean FD | " + " | ".join(f"class {c}: KL, FD (scales)" for c in classes)
             + " | chosen |",
             "| --- | --- | --- | " + " | ".join("---" for _ in classes) + " | --- |"]
    fmt = lambda v, d: "--" if v is None else f"{v:.{d}f}"
    for s in sorted(result["settings"], key=lambda s: (not s["qualified"], s["mean_kl"] or 0)):
        cells = []
        for c in map(str, classes):
            v = s["per_class"].get(c)
            cells.append(f"{v['kl']:.4f}, {v['fd']:.1f} ({v['between'][0]:g}-{v['between'][1]:g})" if v else
                         f"never reaches it: {s['never_reaches'][c]}" if c in s["never_reaches"] else
                         f"not bracketed: add a scale {s['add_scale'][c]}")
        lines.append(f"| {s['method']} | {fmt(s['mean_kl'], 4)} | {fmt(s['mean_fd'], 2)} | " + " | ".join(cells)
                     + f" | {'**yes**' if s['method'] == result['chosen'] else ''} |")
    return lines


def _advice_lines(result, runs: List[str], per_class, high_safety: float) -> List[str]:
    """selection.md's paragraphs after the table: what to run next, settings out by the ceiling, incompleteness."""
    lines: List[str] = []
    base = (report.run_config(runs[0]) or {}).get("dng")      # the runs' own DNG hyperparameters
    overrides = parse_method(result["chosen"])[2] if result["chosen"] is not None else {}
    if result["chosen"] is not None and base and all(abs(float(base[k]) - v) < 1e-12 for k, v in overrides.items()):
        lines += ["", f"The chosen setting is the runs' own DNG ({', '.join(f'{k} {base[k]:g}' for k in sorted(overrides))}; "
                  "the report's `DNG` samples it on the report seeds already): nothing more to run."]
    elif result["chosen"] is not None:
        m = result["chosen"]
        scales = sorted({float(r["scale"]) for rows in per_class.values() for r in rows if r["method"] == m})
        grid = "(" + ",".join(f"{x:g}" for x in scales) + ",)"
        lines += ["", f"The chosen setting on the report seeds, beside the methods already there (its grid as here; finished "
                  "points are reused): `bash sample/run_protocol.sh` with CONFIG, OUT, CLASSES and SETUPS as the report's "
                  f"runs and the flags `--config.methods='(\"NP\",\"SLD\",\"DNG\",\"{m}\")' "
                  f"--config.method_grids='((\"{m}\",{grid}),)'`."]
    out_by_ceiling = [s["method"] for s in result["settings"] if s["never_reaches"] and not s["add_scale"]]
    if out_by_ceiling:
        lines += ["", f"Out by the ceiling (no grid reaches {high_safety:g} % of the removed class in some class): "
                  + ", ".join(out_by_ceiling) + "."]
    if not result["complete"]:
        lines += ["", f"{sum(s['qualified'] for s in result['settings'])} of {len(result['settings'])} settings "
                  f"bracket {high_safety:g} % in every class: add the scales listed to config.method_grids and "
                  "rerun the selection runs (finished points are reused) before taking the choice."]
    return lines


def write_selection(runs: List[str], out: Optional[str], high_safety: float,
                    ceiling: Optional[float] = None) -> Optional[str]:
    per_class, seeds = _load_runs(runs)
    result = choose(per_class, high_safety, ceiling)
    common = os.path.commonpath([os.path.abspath(r) for r in runs])
    out = out or (os.path.dirname(common) if len(runs) == 1 else common)      # next to the run folders
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "selection.json"), "w") as f:
        json.dump(dict(result, runs=[os.path.abspath(r) for r in runs], seeds=sorted(map(str, seeds))), f, indent=1)
    lines = _table_lines(result, len(runs), seeds, high_safety, ceiling) + _advice_lines(result, runs, per_class, high_safety)
    from dngjax.tools.sample import plots
    plots.plot_selection(result, os.path.join(out, "selection.png"))
    lines += ["", "![KL and FD of each setting at equal safety](selection.png)"]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "selection.md"), "w") as f:
        f.write(text)
    print(text)
    state = "" if result["complete"] else " (incomplete: some settings need more scales)"
    print(f"chosen: {result['chosen']}{state}  ({os.path.join(out, 'selection.md')})", flush=True)
    return result["chosen"]
