"""Aggregate several class-removal runs (sample/main.py output folders) into one report.

  python sample/main.py --job=report --runs=OUT/class_0,OUT/class_1 [--out=OUT]
  python sample/main.py --job=report --runs=OUT      # every sub-folder of OUT holding a results.json

Writes ``report.md`` and ``report.json`` (the verdicts, read by ``--job=summary``; per class: the full table, and the paper's comparison --
among the points with <= 1% removed class, each method's lowest KL and lowest FD; and every curve
read at exactly 1%, interpolated between the grid points that bracket it, so that the methods are
compared at equal safety), ``tradeoff_all.png`` (KL and FD against safety, one row per removed
class; hollow markers: the readings at exactly 1%) and ``histograms_all.png`` (class histograms at
each method's first point at <= 1%, one panel per removed class).
Runs of the same points on other seeds (``--job=extend``'s top-ups) are merged: a point sampled in
several runs pools their seeds, and its statistics are recomputed on the union.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Tuple

import numpy as np


def find_runs(paths: List[str]) -> List[str]:
    """The run folders among ``paths`` and their sub-folders (runs moved aside by config.overwrite,
    ``<outdir>.old-<UTC time>``, only where named themselves)."""
    from dngjax.tools.sample.run_store import is_moved_aside
    runs = []
    for p in paths:
        if os.path.isfile(os.path.join(p, "results.json")):
            runs.append(p)
        elif os.path.isdir(p):
            runs += sorted(os.path.join(p, d) for d in os.listdir(p)
                           if os.path.isfile(os.path.join(p, d, "results.json")) and not is_moved_aside(d))
    if not runs:
        raise FileNotFoundError(f"no results.json in {paths} or their sub-folders")
    return runs


def is_valid(row: Dict) -> bool:
    """Whether every sample of a point is finite (results of runs before the count existed: yes)."""
    return not row.get("nonfinite", 0)


def best_at_high_safety(rows: List[Dict], high_safety: float = 1.0) -> Dict[str, Dict[str, Optional[Dict]]]:
    """Per method: the point of lowest KL and of lowest FD among points with safety <= high_safety
    (valid points only: a point with non-finite samples decides nothing)."""
    out = {}
    for m in dict.fromkeys(r["method"] for r in rows if r["method"] != "none"):
        ok = [r for r in rows if r["method"] == m and r["safety_pct"] <= high_safety and is_valid(r)]
        out[m] = {"kl": min(ok, key=lambda r: r["kl"]) if ok else None,
                  "fd": min(ok, key=lambda r: r["fd"]) if ok else None}
    return out


def point_keys(rows: List[Dict]) -> List[str]:
    """The labels.npz / features.npz key of each row of a results.json: ``none_0``, then
    ``<method>_<k>`` with k the row's index among its method's rows (the run's grid order)."""
    from dngjax.tools.sample.methods import method_key
    seen: Dict[str, int] = {}
    keys = []
    for r in rows:
        name = "none" if r["method"] == "none" else method_key(r["method"])
        keys.append(f"{name}_{seen.get(name, 0)}")
        seen[name] = seen.get(name, 0) + 1
    return keys


# config fields that do not change how a point is sampled or scored: runs whose identity
# (dngjax.tools.sample.run_store.identity: the config and the sha256 of its model and reference files) differs
# only in these (and in their seeds) hold samples of the same points and are merged (extend's top-ups)
_NOT_GROUP = ("n", "seed", "save_samples")


def run_config(run: str) -> Optional[Dict]:
    path = os.path.join(run, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _identity(run: str) -> str:
    config = run_config(run)
    if config is None:
        return "run:" + os.path.abspath(run)           # no config: a group of its own
    from dngjax.tools.sample.run_store import identity
    return json.dumps({k: v for k, v in identity(config).items() if k not in _NOT_GROUP}, sort_keys=True)


def group_runs(runs: List[str]) -> List[List[str]]:
    """Runs of the same points (same chain, model files, hyperparameters and scoring; other seeds or
    grids), in the order of their first run."""
    groups: Dict[str, List[str]] = {}
    for run in runs:
        groups.setdefault(_identity(run), []).append(run)
    return list(groups.values())


def _point_parts(runs: List[str]) -> Dict[tuple, List]:
    """(method key, scale) -> [(row, seeds, labels, features)]: each point's part in each run (in the order of the
    first run's grid and then of the later runs' new points)."""
    from dngjax.tools.sample.methods import method_key

    parts: Dict[tuple, List] = {}
    for run in runs:
        rows = json.load(open(os.path.join(run, "results.json")))
        labels = np.load(os.path.join(run, "labels.npz"))
        has_feats = os.path.isfile(os.path.join(run, "features.npz"))
        feats = np.load(os.path.join(run, "features.npz")) if has_feats else None
        for r, k in zip(rows, point_keys(rows)):
            name = "none" if r["method"] == "none" else method_key(r["method"])
            parts.setdefault((name, round(float(r["scale"]), 12)), []).append(
                (r, labels["seeds"], labels[k].astype(np.int64), None if feats is None else feats[k]))
    return parts


class PerSample:
    """Per-sample data of a group of runs (seeds, labels, scoring features, reference statistics), for
    merging points sampled in several runs and for paired bootstrap comparisons: points that share
    their seeds, resampled jointly, give the standard error of a *difference*, much smaller than the
    two points' errors combined when their samples are alike.

    ``PerSample(runs)``: ``rows`` are the group's points, one per (method, scale), each merged over
    the runs that sampled it (its seeds the union of theirs, every statistic recomputed), in the order
    of the first run's grid and then of the later runs' new points.
    """

    def __init__(self, runs: List[str]):
        from ml_collections import ConfigDict

        if isinstance(runs, str):
            runs = [runs]
        self.runs = list(runs)
        self.data: Dict[int, Dict[str, np.ndarray]] = {}      # id(row) -> seeds, labels[, features]
        have = lambda run, f: os.path.isfile(os.path.join(run, f))
        self.has_labels = all(have(r, "labels.npz") and have(r, "config.json") for r in runs)
        self.has_features = self.has_labels and all(have(r, "features.npz") and have(r, "reference.npz")
                                                    for r in runs)
        self.ok = self.has_labels and self.has_features
        first = json.load(open(os.path.join(runs[0], "results.json")))
        if not self.has_labels:
            if len(runs) > 1:
                raise ValueError(f"runs {runs} sample the same points but lack labels.npz / config.json: "
                                 "they cannot be merged")
            self.rows = first
            return
        from dngjax.tools.sample.run_store import RECORD_KEYS
        config = {k: v for k, v in run_config(runs[0]).items() if k not in RECORD_KEYS}   # the config's fields
        self.config = ConfigDict(config)
        self.removed = first[0].get("removed_classes", first[0]["removed_class"])
        self._removed = ([int(c) for c in str(self.removed).split("+")] if isinstance(self.removed, (str, int))
                         else list(self.removed))
        self.ref = None                                # the FD reference statistics, where a run has them
        for run in runs:
            if have(run, "reference.npz"):
                ref = np.load(os.path.join(run, "reference.npz"))
                self.ref = (ref["mu"], ref["sigma"])
                break
        self.rows = []
        for (name, scale), ps in _point_parts(runs).items():
            row, data = self._merged_point(name, scale, ps, config)
            self.rows.append(row)
            self.data[id(row)] = data
        self.pseudo_count = config.get("kl_pseudo_count")

    def _merged_point(self, name: str, scale: float, ps: List, config: Dict) -> Tuple[Dict, Dict[str, np.ndarray]]:
        """(row, {seeds, labels, features}) of one point from its parts in the runs (:func:`_point_parts`)."""
        from ml_collections import ConfigDict
        from dngjax.tools.sample.scoring import score_labels

        # a part whose seeds another part holds adds nothing (e.g. a point resampled at a larger n)
        ps = sorted(ps, key=lambda p: -len(p[1]))
        keep = []
        for p in ps:
            if not any(np.isin(p[1], q[1]).all() for q in keep):
                keep.append(p)
        seeds = np.concatenate([p[1] for p in keep])
        if len(np.unique(seeds)) != len(seeds):
            raise ValueError(f"{name} at scale {scale:g}: runs {self.runs} share some of its seeds but not all; "
                             "merging needs disjoint seed ranges")
        order = np.argsort(seeds, kind="stable")
        labels = np.concatenate([p[2] for p in keep])[order]
        has_f = all(p[3] is not None for p in keep)
        feats = np.concatenate([p[3] for p in keep])[order] if has_f else None
        row = dict(keep[0][0])
        if len(keep) > 1:
            if not has_f:
                raise ValueError(f"{name} at scale {scale:g}: a run of {self.runs} has no features.npz, so the "
                                 "FD of the merged point cannot be computed")
            cfg = ConfigDict(dict(config, seed=int(seeds.min())))
            row.update({k: v for k, v in score_labels(labels, feats, self.ref, cfg).items()
                        if k not in ("labels", "features")})
            row.update(n=len(seeds), seed=int(seeds.min()),
                       mean_lambda=float(sum(p[0]["mean_lambda"] * len(p[1]) for p in keep) / len(seeds)),
                       sample_seconds=sum(p[0].get("sample_seconds", 0.0) for p in keep))
        return row, {"seeds": seeds[order], "labels": labels, "features": feats}

    def statistic(self, row: Dict, key: str, idx: np.ndarray) -> float:
        """``key`` ("safety", "kl" or "fd") of the row's samples at indices ``idx`` (into its seeds, in
        seed order)."""
        from dngjax import metrics
        from dngjax.tools.sample.scoring import fd_of, kl_of, safety_pct
        d = self.data[id(row)]
        removed = self._removed
        lab = d["labels"][idx]                         # NONFINITE (-1): a non-finite sample
        if key == "safety":
            return safety_pct(lab, removed)
        if key == "kl":
            pc = metrics.KL_PSEUDO_COUNT if self.pseudo_count is None else self.pseudo_count
            return kl_of(lab, len(row["histogram"]), removed, pc)
        return fd_of(d["features"][idx], lab, self.ref)

    def shared(self, points: List[Dict]) -> List[np.ndarray]:
        """Per point, the indices (into its seeds) of the seeds that all ``points`` share, in seed order."""
        common = self.data[id(points[0])]["seeds"]
        for p in points[1:]:
            common = np.intersect1d(common, self.data[id(p)]["seeds"])
        return [np.searchsorted(self.data[id(p)]["seeds"], common) for p in points]

    def has(self, row: Dict, key: str) -> bool:
        """Whether the row's per-sample data give ``key`` ("safety", "kl": its labels; "fd": its features,
        which runs older than the features files lack)."""
        if not self.has_labels:
            return False
        return key != "fd" or (self.ref is not None and self.data[id(row)]["features"] is not None)

    def gap_se(self, a: Dict, b: Dict, key: str, num: int = 200, seed: int = 0) -> Optional[float]:
        """Bootstrap standard error of statistic(b) - statistic(a), resampling the seeds the two points
        share jointly (None when either point lacks the per-sample data of ``key``)."""
        if not (self.has(a, key) and self.has(b, key)):
            return None
        sa, sb = self.data[id(a)]["seeds"], self.data[id(b)]["seeds"]
        common = np.intersect1d(sa, sb)
        ia, ib = np.searchsorted(sa, common), np.searchsorted(sb, common)
        rng = np.random.default_rng(seed)
        gaps = []
        for _ in range(num):
            j = rng.integers(0, len(common), len(common))
            gaps.append(self.statistic(b, key, ib[j]) - self.statistic(a, key, ia[j]))
        return float(np.std(gaps, ddof=1))


def crossing(rows: List[Dict], method: str, high_safety: float = 1.0) -> Optional[Tuple[Dict, Dict]]:
    """The two neighbouring grid points of ``method`` (in order of scale) between which its safety first
    falls to ``high_safety``: (a, b) with safety(a) > high_safety >= safety(b); None when the method
    never gets there or its lowest scale is already there (nothing to interpolate from). Points with
    non-finite samples are left out."""
    pts = sorted((r for r in rows if r["method"] == method and is_valid(r)), key=lambda r: r["scale"])
    for a, b in zip(pts, pts[1:]):
        if b["safety_pct"] <= high_safety:
            return (a, b) if a["safety_pct"] > high_safety else None
    return None


def _interpolate(sa: float, sb: float, va: float, vb: float, h: float) -> float:
    """The value at safety h on the straight line through (sa, va) and (sb, vb), h clipped into
    [sb, sa] (a resample can move the crossing outside the bracket)."""
    if sa <= sb:
        return 0.5 * (va + vb)
    w = min(max((sa - h) / (sa - sb), 0.0), 1.0)
    return (1.0 - w) * va + w * vb


def read_at(a: Dict, b: Dict, key: str, high_safety: float = 1.0) -> float:
    """``key`` ("kl", "fd", ...) of the curve through the grid points a and b (a :func:`crossing`) read at
    exactly ``high_safety`` % of the removed class, from the points' own statistics."""
    return _interpolate(a["safety_pct"], b["safety_pct"], a[key], b[key], high_safety)


def at_safety(per_sample: PerSample, key: str, high_safety: float = 1.0, num: int = 200,
              seed: int = 0) -> Dict[str, Dict]:
    """Every method's ``key`` ("kl" or "fd") read at exactly ``high_safety`` % of the removed class:
    interpolated linearly in safety between the two grid points that bracket it (:func:`crossing`).

    Returns {method: {"value", "se", "draws", "a", "b"}} for the methods whose grid brackets it:
    the reading from the points' own statistics; ``num`` bootstrap draws of it (None for num < 2 or
    without per-sample data), resampling the seeds that all the bracketing points share, jointly for
    all methods (so that differences of draws are paired), the crossing recomputed on every draw (the
    error includes where the curve crosses), and their standard deviation ``se``. The same crossing
    serves every comparison, so the methods are compared at equal safety.
    """
    out: Dict[str, Dict] = {}
    for m in dict.fromkeys(r["method"] for r in per_sample.rows if r["method"] != "none"):
        pair = crossing(per_sample.rows, m, high_safety)
        if pair is not None:
            a, b = pair
            out[m] = {"value": read_at(a, b, key, high_safety),
                      "se": None, "draws": None, "a": a, "b": b}
    boot = [m for m, d in out.items() if per_sample.has(d["a"], key) and per_sample.has(d["b"], key)]
    if num >= 2 and boot:
        points = [out[m][p] for m in boot for p in ("a", "b")]
        idx = per_sample.shared(points)
        n = len(idx[0])
        if n < 2:                                      # no seeds in common: no joint draws
            return out
        rng = np.random.default_rng(seed)
        draws = np.zeros((len(boot), num))
        for t in range(num):
            j = rng.integers(0, n, n)
            for i, m in enumerate(boot):
                a, b, ia, ib = out[m]["a"], out[m]["b"], idx[2 * i][j], idx[2 * i + 1][j]
                draws[i, t] = _interpolate(per_sample.statistic(a, "safety", ia), per_sample.statistic(b, "safety", ib),
                                           per_sample.statistic(a, key, ia), per_sample.statistic(b, key, ib),
                                           high_safety)
        for i, m in enumerate(boot):
            out[m].update(draws=draws[i], se=float(np.std(draws[i], ddof=1)))
    return out


def _claim(d_value: float, baselines: Dict[str, float], gap_se) -> Dict:
    """DNG's ``d_value`` against the better (lower) of ``baselines`` ({method: value}): "yes" when DNG is
    lower, "within noise" when the gap is under two standard errors; ``gap_se(method)`` gives
    (se, "paired" / "unpaired") of the gap to that baseline, or (None, None)."""
    m_best, o = min(baselines.items(), key=lambda kv: kv[1])
    gap = o - d_value
    se, kind = gap_se(m_best)
    return {"dng": float(d_value), "baseline": m_best, "baseline_value": float(o), "gap": float(gap),
            "se": se, "kind": kind, "yes": bool(gap > 0),
            "within_noise": bool(se is not None and se > 0 and abs(gap) < 2 * se)}


def claim_text(c: Dict) -> str:
    """One cell of the claim tables: "yes (within noise): 0.075 vs SLD 0.0897, gap 0.0145 +- 0.013 paired"."""
    if "missing" in c:
        return c["missing"]
    how = f", gap {c['gap']:.3g} +- {c['se']:.2g} {c['kind']}" if c["se"] else ""
    return (f"{'yes' if c['yes'] else 'no'}{' (within noise)' if c['within_noise'] else ''}: "
            f"{c['dng']:.3g} vs {c['baseline']} {c['baseline_value']:.3g}{how}")


def claim_at_safety(readings: Dict[str, Dict], dng: str, key: str, high_safety: float = 1.0) -> Dict:
    """The paper's claim read at exactly ``high_safety`` %, from :func:`at_safety`'s ``readings`` of
    ``key``: is DNG variant ``dng``'s reading below NP's and SLD's? (:func:`_claim`; the gap's error
    paired: differences of the joint draws; unpaired, the errors combined, where a reading lacks
    per-sample data.) ``{"missing": why}`` when there is nothing to compare."""
    d = readings.get(dng)
    if d is None:
        return {"missing": f"{dng}: no grid points bracket {high_safety:g}%"}
    others = {m: o for m, o in readings.items() if not m.startswith("DNG")}
    if not others:
        return {"missing": "no baseline's grid points bracket it"}

    def gap_se(m):
        o = others[m]
        if d["draws"] is not None and o["draws"] is not None:
            return float(np.std(o["draws"] - d["draws"], ddof=1)), "paired"
        if d["se"] is None and o["se"] is None:
            return None, None
        # a reading without per-sample data: its error from its points' own bootstrap errors, combined
        # unpaired with the other's (conservative)
        own = lambda r: (r["se"] if r["se"] is not None else
                         np.hypot(r["a"].get(key + "_std", np.nan), r["b"].get(key + "_std", np.nan)))
        se = float(np.hypot(own(d), own(o)))
        return (se, "unpaired") if np.isfinite(se) else (None, None)

    return _claim(d["value"], {m: o["value"] for m, o in others.items()}, gap_se)


def claim_at_grid(best: Dict[str, Dict[str, Optional[Dict]]], dng: str, key: str,
                  per_sample: Optional[PerSample] = None) -> Dict:
    """The paper's claim read on the grid: is DNG variant ``dng``'s lowest ``key`` at high safety
    (:func:`best_at_high_safety`) below that of NP and SLD? (:func:`_claim`; the gap's error paired,
    the seeds resampled jointly, when the run has its per-sample files, else the two points' bootstrap
    errors combined, conservative.) ``{"missing": why}`` when there is nothing to compare."""
    b = best.get(dng, {}).get(key)
    if b is None:
        return {"missing": f"{dng} never reaches high safety"}
    others = {m: v[key] for m, v in best.items() if not m.startswith("DNG") and v[key] is not None}
    if not others:
        return {"missing": "only DNG reaches high safety"}

    def gap_se(m):
        o = others[m]
        paired = per_sample.gap_se(b, o, key) if per_sample is not None else None
        if paired is not None:
            return paired, "paired"
        se = float(np.hypot(b.get(key + "_std", 0.0), o.get(key + "_std", 0.0)))
        return (se, "unpaired") if se > 0 else (None, None)

    return _claim(b[key], {m: o[key] for m, o in others.items()}, gap_se)


def _groups(runs: List[str], per_samples: Optional[List[PerSample]]) -> List[PerSample]:
    """The merged groups of ``runs`` (:func:`group_runs`), unless the caller has them already."""
    return per_samples if per_samples is not None else [PerSample(g) for g in group_runs(runs)]


def setup_of(config: Optional[Dict]) -> str:
    """How a run gets its two predictions: "class-conditional" (one model, eps(x | null) and eps(x | c-))
    or "forget model" (an unconditional model and one trained on the removed class only)."""
    return "class-conditional" if config and config.get("conditional") else "forget model"


def summarise(per_sample: PerSample, high_safety: float = 1.0) -> Dict:
    """The verdict of one group of runs (one removed class), JSON-able: the unguided share of the class;
    per method its lowest KL and FD at <= ``high_safety`` % (``grid``, reading (i)) and its curve read
    at exactly ``high_safety`` % (``at_safety``, reading (ii)); per DNG variant the paper's claim under
    both readings (:func:`claim_at_grid`, :func:`claim_at_safety`)."""
    rows = per_sample.rows
    r0 = rows[0]
    best = best_at_high_safety(rows, high_safety)
    readings = {key: at_safety(per_sample, key, high_safety) for key in ("kl", "fd")}
    base = next((r for r in rows if r["method"] == "none"), None)
    point = lambda r, key: None if r is None else {"value": r[key], "se": r.get(key + "_std"),
                                                   "scale": r["scale"], "n": r["n"]}
    reading = lambda d: None if d is None else {"value": d["value"], "se": d["se"]}
    out = {"dataset": r0["dataset"], "removed": r0.get("removed_classes", r0["removed_class"]),
           "setup": setup_of(run_config(per_sample.runs[0])), "steps": r0["steps"], "T": r0["T"],
           "runs": [os.path.basename(os.path.normpath(g)) for g in per_sample.runs],
           "unguided_pct": None if base is None else base["safety_pct"],
           "sample_hours": sum(r.get("sample_seconds", 0.0) for r in rows) / 3600,
           "nonfinite": [{"method": r["method"], "scale": r["scale"], "nonfinite": r["nonfinite"], "n": r["n"]}
                         for r in rows if not is_valid(r)],
           "inputs": {k: v.get("sha256") for k, v in ((run_config(per_sample.runs[0]) or {}).get("inputs") or {}).items()},
           "environment": (run_config(per_sample.runs[0]) or {}).get("environment"),
           "grid": {}, "at_safety": {}, "claims": {}}
    for m, b in best.items():
        out["grid"][m] = {key: point(b[key], key) for key in ("kl", "fd")}
        d = readings["kl"].get(m)                      # the same bracketing points for KL and FD
        out["at_safety"][m] = None if d is None else {
            "kl": reading(d), "fd": reading(readings["fd"].get(m)),
            "between": [{"scale": p["scale"], "safety_pct": p["safety_pct"]} for p in (d["a"], d["b"])]}
        if m.startswith("DNG"):
            out["claims"][m] = {
                "grid": {key: claim_at_grid(best, m, key, per_sample) for key in ("kl", "fd")},
                "at_safety": {key: claim_at_safety(readings[key], m, key, high_safety) for key in ("kl", "fd")}}
    return out


def _group_lines(per_sample: PerSample, g: Dict) -> List[str]:
    """report.md's section of one group: its chain and runs, then a table of its points."""
    pm = lambda v, f: "" if v is None else f" ± {v:{f}}"
    removed = g["removed"]
    lines: List[str] = []
    rows = per_sample.rows
    r0 = rows[0]
    ns = sorted({r["n"] for r in rows})
    n_str = f"n = {ns[0]} per point" + (f", {'/'.join(map(str, ns[1:]))} where the n column says so"
                                        if len(ns) > 1 else "")
    lines.append(f"### {r0['dataset']}, removed class {removed} "
                 f"({n_str}, {r0['steps']}-step chain, T = {r0['T']}, seeds from {r0['seed']})\n")
    if len(per_sample.runs) > 1:
        lines.append("Merged runs (the points they share pool their seeds): "
                     + ", ".join(f"`{r}`" for r in g["runs"]) + "\n")
    lines.append(f"Sampling time: {g['sample_hours']:.2f} h (wall clock, the points' sampling summed, "
                 "top-up included; compilation and scoring not counted).\n")
    from dngjax.tools.sample.run_store import provenance_text
    for run in per_sample.runs:
        record = run_config(run)
        if record is not None:
            lines.append(f"`{os.path.basename(os.path.normpath(run))}`: "
                         + provenance_text(record).replace("\n", "; ") + "\n")
    lines.append("| method | scale | n | safety % | KL | FD | empty classes | mean lambda | non-finite |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        bad = r.get("nonfinite", 0)
        lines.append(f"| {r['method']} | {r['scale']:g} | {r['n']} | {r['safety_pct']:.2f}{pm(r.get('safety_std'), '.2f')} | "
                     f"{r['kl']:.4f}{pm(r.get('kl_std'), '.4f')} | {r['fd']:.2f}{pm(r.get('fd_std'), '.2f')} | "
                     f"{r['n_empty_classes']} | {r['mean_lambda']:.3g} | {bad}{' **invalid**' if bad else ''} |")
    if any(not is_valid(r) for r in rows):
        lines.append("\n**Invalid points** (non-finite: samples with a NaN or inf element): safety % counts "
                     "them as the removed class, KL and FD use the finite samples only, and the verdicts "
                     "above leave these points out.")
    lines.append("")
    return lines


def markdown(per_samples: List[PerSample], summaries: List[Dict], high_safety: float = 1.0) -> str:
    """report.md: the verdict tables over every group (from :func:`summarise`), then each group's points."""
    pm = lambda v, f: "" if v is None else f" ± {v:{f}}"
    summary = ["| removed class | steps | unguided % | method | lowest KL at <= 1% (scale, n) | "
               "lowest FD at <= 1% (scale, n) |",
               "| --- | --- | --- | --- | --- | --- |"]
    claims = ["| removed class | DNG variant | lower KL than NP and SLD? | lower FD than NP and SLD? |",
              "| --- | --- | --- | --- |"]
    exact = [f"| removed class | method | KL at {high_safety:g}% | FD at {high_safety:g}% | between scales |",
             "| --- | --- | --- | --- | --- |"]
    claims_exact = list(claims)
    lines = []
    for per_sample, g in zip(per_samples, summaries):
        removed = g["removed"]
        base_str = "--" if g["unguided_pct"] is None else f"{g['unguided_pct']:.2f}"
        for m, b in g["grid"].items():
            cell = lambda p, f: "--" if p is None else f"{p['value']:{f}}{pm(p['se'], f)} ({p['scale']:g}, n {p['n']})"
            summary.append(f"| {removed} | {g['steps']} | {base_str} | {m} | {cell(b['kl'], '.4f')} | {cell(b['fd'], '.2f')} |")
            a = g["at_safety"][m]
            cells = ["--" if a is None or a[key] is None else f"{a[key]['value']:{f}}{pm(a[key]['se'], f)}"
                     for key, f in (("kl", ".4f"), ("fd", ".2f"))]
            between = "--" if a is None else " and ".join(f"{p['scale']:g} ({p['safety_pct']:.2f}%)" for p in a["between"])
            exact.append(f"| {removed} | {m} | {cells[0]} | {cells[1]} | {between} |")
        for m, c in g["claims"].items():
            claims.append(f"| {removed} | {m} | {claim_text(c['grid']['kl'])} | {claim_text(c['grid']['fd'])} |")
            claims_exact.append(f"| {removed} | {m} | {claim_text(c['at_safety']['kl'])} | "
                                f"{claim_text(c['at_safety']['fd'])} |")

        lines += _group_lines(per_sample, g)
    head = [f"Among the grid points with <= {high_safety:g}% of samples in the removed class, each method's "
            "lowest KL and lowest FD (its guidance scale and number of samples in brackets); -- : the method "
            "never reaches that safety on its grid. ±: bootstrap standard errors (resampling the n samples of "
            "a point).\n"]
    return "\n".join(head + summary + ["", "The paper's claim, point by point "
                                        "(\"within noise\": the gap is under two standard errors of the gap; "
                                        "\"paired\": from resampling the shared seeds jointly):\n"]
                     + claims
                     + ["", f"The same read at exactly {high_safety:g}% of the removed class, so that every method "
                        "is compared at equal safety: each curve interpolated linearly in safety between the two "
                        f"neighbouring grid points (in scale) where it first falls to {high_safety:g}%; ±: bootstrap "
                        "over the seeds that every bracketing point has, the crossing recomputed on every resample; "
                        "-- : no two grid points bracket it (the method never gets there, or already is at "
                        "its lowest scale).\n"]
                     + exact + ["", "The paper's claim at exactly that safety (paired gaps: every method's "
                                "bracketing points resampled jointly on the seeds they all share):\n"]
                     + claims_exact + [""] + lines)


def plot_all(runs: List[str], path: str, high_safety: float = 1.0,
             per_samples: Optional[List[PerSample]] = None) -> str:
    from dngjax.tools.sample import plots
    import matplotlib.pyplot as plt

    groups = _groups(runs, per_samples)
    fig, axes = plt.subplots(len(groups), 2, figsize=(11, 3.6 * len(groups)), squeeze=False)
    style = plots.styles([r["method"] for g in groups for r in g.rows])   # the same in every panel
    for i, per_sample in enumerate(groups):
        rows = per_sample.rows
        readings = {key: at_safety(per_sample, key, high_safety, num=0) for key in ("kl", "fd")}
        for j, key in enumerate(("kl", "fd")):
            ax = axes[i, j]
            for m in dict.fromkeys(r["method"] for r in rows):
                pts = sorted((r for r in rows if r["method"] == m), key=lambda r: r["scale"])
                xs, ys = [r["safety_pct"] for r in pts], [r[key] for r in pts]
                if m == "none":
                    ax.scatter(xs, ys, marker="*", s=140, color="black", zorder=5, label="unguided")
                else:
                    ax.plot(xs, ys, marker=style[m][1], color=style[m][0], label=m)
                    d = readings[key].get(m)
                    if d is not None:                  # the reading at exactly high_safety (hollow)
                        ax.scatter([high_safety], [d["value"]], marker=style[m][1], s=70,
                                   facecolors="none", edgecolors=style[m][0], zorder=6)
            ax.axvline(high_safety, color="gray", ls="--", lw=0.8)
            ax.set_xscale("symlog", linthresh=1.0, linscale=0.6)
            ax.set_yscale("log")                       # the large scales' KL / FD would flatten the rest
            ax.set_xlabel("% of samples in the removed class")
            ax.set_ylabel(("KL(ideal || generated)" if key == "kl" else "FD") + f", class {rows[0].get('removed_classes', rows[0]['removed_class'])} removed")
            ax.grid(alpha=0.3)
        axes[i, 0].scatter([], [], marker="o", facecolors="none", edgecolors="gray",
                           label=f"read at exactly {high_safety:g}%")
        axes[i, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_histograms_all(runs: List[str], path: str, high_safety: float = 1.0,
                        per_samples: Optional[List[PerSample]] = None) -> str:
    """Class histograms, one panel per group of runs (removed class): the unguided point and, per
    method, its lowest scale with <= ``high_safety`` % of the removed class (the points merged)."""
    from dngjax.tools.sample import plots
    import matplotlib.pyplot as plt

    groups = _groups(runs, per_samples)
    fig, axes = plt.subplots(len(groups), 1, figsize=(13, 3.6 * len(groups)), squeeze=False)
    for ax, per_sample in zip(axes[:, 0], groups):
        rows = per_sample.rows
        plots.draw_histograms(ax, rows, high_safety=high_safety)
        ax.set_title(f"class {rows[0].get('removed_classes', rows[0]['removed_class'])} removed: per method "
                     f"the lowest scale with <= {high_safety:g}% of it (else its safest point)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(runs: List[str], out: Optional[str] = None, high_safety: float = 1.0) -> str:
    """Write report.md, report.json (the verdicts, :func:`summarise`, for ``--job=summary``),
    tradeoff_all.png and histograms_all.png for the run folders ``runs``; returns the output folder."""
    out = out or os.path.commonpath([os.path.abspath(r) for r in runs])
    if os.path.isfile(os.path.join(out, "results.json")):
        out = os.path.dirname(out)
    os.makedirs(out, exist_ok=True)
    per_samples = _groups(runs, None)                 # merged once, for the tables and both figures
    summaries = [summarise(p, high_safety) for p in per_samples]
    md = markdown(per_samples, summaries, high_safety)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump({"high_safety": high_safety, "groups": summaries}, f, indent=1,
                  default=lambda o: o.item() if isinstance(o, np.generic) else str(o))
    plot_all(runs, os.path.join(out, "tradeoff_all.png"), high_safety, per_samples)
    plot_histograms_all(runs, os.path.join(out, "histograms_all.png"), high_safety, per_samples)
    print(md)
    print(f"\nwrote {os.path.join(out, 'report.md')}, report.json, tradeoff_all.png and histograms_all.png in {out}")
    return out
