"""Top up the grid points that decide the verdict to more samples, on new seeds.

  python sample/main.py --job=extend --runs=OUT/class_0 --n=1024      # then --job=report --runs=OUT

The points that decide the paper's comparison are, per method, the one with the lowest KL and the
one with the lowest FD among the points with at most ``high_safety`` % (1 %) of the removed class,
and the two points that bracket ``high_safety`` % (the report reads each curve there).
For a class-removal run with n seeds per point, this samples those points (and the unguided one) on
the next ``--n`` - n seeds, with everything else as the run had it, into ``<run>_seeds<a>-<b>``;
``--job=report`` merges the two runs point by point (the union of the seeds, statistics recomputed).
A run without scoring features (``features.npz``, older runs) cannot be merged for FD: its deciding
points are then sampled afresh on seeds ``seed .. seed + --n - 1`` (the report keeps the larger point).

Run it again after the report: when the larger samples move another point to the top (or a point
above 1 %), that point is added; finished points are never recomputed (same output folder).
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional

from dngjax.tools.sample import report


def is_top_up(run: str) -> bool:
    """Whether ``run`` is a top-up folder (``<run>_seeds<a>-<b>``) rather than a run of its own."""
    return "_seeds" in os.path.basename(os.path.normpath(run))


def deciding_points(rows: List[Dict], high_safety: float = 1.0) -> Dict[str, List[float]]:
    """Per method: the scales of its lowest-KL and lowest-FD points at <= ``high_safety`` %, and of the
    two neighbouring points between which its curve first falls to ``high_safety`` % (the reading at
    exactly that safety interpolates between them, :func:`report.at_safety`)."""
    out: Dict[str, List[float]] = {}
    for m, best in report.best_at_high_safety(rows, high_safety).items():
        pair = report.crossing(rows, m, high_safety) or ()
        scales = sorted({float(b["scale"]) for b in best.values() if b is not None}
                        | {float(p["scale"]) for p in pair})
        if scales:
            out[m] = scales
    return out


def extension_config(run: str, n_total: int, high_safety: Optional[float] = None, progress: bool = True):
    """The class-removal config that brings ``run``'s deciding points to ``n_total`` samples, or None
    when they all have that many already. Its points are those of the run's group (the run and its
    earlier top-ups, merged), so a second call adds only points that became deciding. ``high_safety``:
    the run's own (its config.json) unless given."""
    from ml_collections import ConfigDict
    from dngjax.tools.sample.run_store import RECORD_KEYS
    config = report.run_config(run)
    if config is None or not os.path.isfile(os.path.join(run, "labels.npz")):
        raise ValueError(f"{run}: not a class-removal run with config.json and labels.npz")
    recorded = config.get("inputs")
    config = {k: v for k, v in config.items() if k not in RECORD_KEYS}   # the config's fields only
    if recorded is not None:                        # its model and reference files must be the same still
        from dngjax.tools.sample.run_store import differences, input_files, run_record
        now = ConfigDict(config)
        changed = differences({"inputs": recorded}, {"inputs": run_record(now, input_files(now))["inputs"]})
        if changed:
            raise ValueError(f"{run} was sampled with other model or reference files than those its config "
                             f"reads now ({'; '.join(changed)}): a top-up would mix two models; rerun the "
                             "whole run instead")
    n0, seed0 = int(config["n"]), int(config["seed"])
    high_safety = float(config.get("high_safety", 1.0)) if high_safety is None else high_safety
    if n_total <= n0:
        raise ValueError(f"--n={n_total}: the run {run} has n = {n0} per point already; ask for more")
    mergeable = os.path.isfile(os.path.join(run, "features.npz"))
    seed, n = (seed0 + n0, n_total - n0) if mergeable else (seed0, n_total)
    outdir = f"{os.path.normpath(run)}_seeds{seed}-{seed + n - 1}"
    group = [run] + ([outdir] if os.path.isfile(os.path.join(outdir, "results.json")) else [])
    rows = report.PerSample(group).rows
    todo = {(m, s) for m, scales in deciding_points(rows, high_safety).items() for s in scales
            if any(r["method"] == m and float(r["scale"]) == s and r["n"] < n_total for r in rows)}
    if not todo:
        return None
    # the top-up keeps the points it has (reused, not resampled) and adds the newly deciding ones
    have = {(r["method"], float(r["scale"])) for r in rows if r["method"] != "none" and r["n"] >= n_total}
    points = todo | have
    methods = [m for m in config["methods"] if any(pm == m for pm, _ in points)]
    grids = tuple((m, tuple(sorted(s for pm, s in points if pm == m))) for m in methods)   # each method its own
    return ConfigDict(dict(config, seed=seed, n=n, methods=methods, method_grids=grids, baseline=True,
                           outdir=outdir, overwrite=False, progress=progress))
