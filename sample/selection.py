"""Choose DNG's hyperparameters from class-removal runs on selection seeds, by a rule fixed in advance.

  python sample/main.py --config=sample/configs/mnist.py:select --config.removed_class=C   # per class C
  python sample/main.py --job=select --runs=outputs/select                                # then choose

The selection runs sample DNG settings (methods ``DNG[prior=..,temperature=..]``, each over a grid of
scales) on seeds that the report never uses (``select`` config: seeds from 1,000,000). The rule,
stated before any report seed is sampled:

1. For a setting s and a removed class c, KL*(s, c) is the lowest KL among s's grid points with at
   most ``high_safety`` % (1 %) of samples in class c, and FD*(s, c) the FD at that point.
2. A setting qualifies if it has such a point for every class of the runs.
3. The chosen setting is the qualifying one with the lowest mean KL* over the classes; ties (mean
   KL* within 0.001) go to the lower mean FD*.
4. If none qualifies, the setting with the lowest mean (over classes) of its smallest removed-class
   share is reported instead, flagged as not reaching the target.

Writes ``selection.md`` and ``selection.json`` next to the runs (or into --out).
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

import numpy as np

from sample.class_removal import parse_method

KL_TIE = 1e-3


def _load(run: str) -> List[Dict]:
    with open(os.path.join(run, "results.json")) as f:
        return json.load(f)


def choose(per_class_rows: Dict[int, List[Dict]], high_safety: float = 1.0) -> Dict:
    """Apply the rule of the module docstring. ``per_class_rows``: {removed class: results rows}.

    Returns {"settings": [per-setting summary], "chosen": method string or None, "qualified": bool}.
    """
    classes = sorted(per_class_rows)
    methods = list(dict.fromkeys(r["method"] for rows in per_class_rows.values() for r in rows
                                 if r["method"] != "none"))
    if not methods:
        raise ValueError("the runs hold no guided points (only 'none'): nothing to choose from")
    settings = []
    for m in methods:
        best, min_share = {}, {}
        for c in classes:
            pts = [r for r in per_class_rows[c] if r["method"] == m]
            if not pts:
                raise ValueError(f"method {m!r} is missing from the run of class {c}: every run needs the same methods")
            min_share[c] = min(r["safety_pct"] for r in pts)
            ok = [r for r in pts if r["safety_pct"] <= high_safety]
            best[c] = min(ok, key=lambda r: r["kl"]) if ok else None
        qualified = all(best[c] is not None for c in classes)
        settings.append({
            "method": m, "overrides": parse_method(m)[2], "qualified": qualified,
            "mean_kl": float(np.mean([best[c]["kl"] for c in classes])) if qualified else None,
            "mean_fd": float(np.mean([best[c]["fd"] for c in classes])) if qualified else None,
            "mean_min_share": float(np.mean([min_share[c] for c in classes])),
            "per_class": {str(c): (None if best[c] is None else
                                   {"scale": best[c]["scale"], "kl": best[c]["kl"], "fd": best[c]["fd"],
                                    "safety_pct": best[c]["safety_pct"]}) for c in classes},
        })
    ok = [s for s in settings if s["qualified"]]
    if ok:
        low = min(s["mean_kl"] for s in ok)
        tied = [s for s in ok if s["mean_kl"] <= low + KL_TIE]
        chosen = min(tied, key=lambda s: s["mean_fd"])["method"]
    else:
        chosen = min(settings, key=lambda s: s["mean_min_share"])["method"]
    return {"classes": classes, "high_safety": high_safety, "settings": settings, "chosen": chosen,
            "qualified": bool(ok)}


def write_selection(runs: List[str], out: Optional[str], high_safety: float) -> str:
    per_class: Dict[int, List[Dict]] = {}
    seeds = set()
    for run in runs:
        rows = _load(run)
        c = int(rows[0]["removed_class"])
        if c in per_class:
            raise ValueError(f"two runs remove class {c}: {runs}")
        per_class[c] = rows
        seeds.add((rows[0]["seed"], rows[0]["n"]))
    result = choose(per_class, high_safety)
    common = os.path.commonpath([os.path.abspath(r) for r in runs])
    out = out or (os.path.dirname(common) if len(runs) == 1 else common)      # next to the run folders
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "selection.json"), "w") as f:
        json.dump(dict(result, runs=[os.path.abspath(r) for r in runs], seeds=sorted(map(str, seeds))), f, indent=1)
    lines = [f"# DNG hyperparameter selection ({len(runs)} run(s), classes {result['classes']})", "",
             f"Rule (sample/selection.py): lowest mean KL over classes at <= {high_safety:g} % removed class; "
             f"ties within {KL_TIE} by FD. Seeds (first, n): {sorted(map(str, seeds))}.", "",
             "| setting | reaches target in every class | mean KL* | mean FD* | mean min. share (%) | chosen |",
             "| --- | --- | --- | --- | --- | --- |"]
    fmt = lambda v: "-" if v is None else f"{v:.4f}"
    for s in sorted(result["settings"], key=lambda s: (not s["qualified"], s["mean_kl"] or 0, s["mean_min_share"])):
        lines.append(f"| {s['method']} | {'yes' if s['qualified'] else 'no'} | {fmt(s['mean_kl'])} | "
                     f"{fmt(s['mean_fd'])} | {s['mean_min_share']:.2f} | {'**yes**' if s['method'] == result['chosen'] else ''} |")
    if not result["qualified"]:
        lines += ["", f"No setting reaches <= {high_safety:g} % in every class; the safest is listed as chosen."]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "selection.md"), "w") as f:
        f.write(text)
    print(text)
    print(f"chosen: {result['chosen']}  ({os.path.join(out, 'selection.md')})", flush=True)
    return result["chosen"]
