"""Class removal's scores of one grid point: safety (% of the removed class), KL of the class histogram,
FD / FID, with non-finite samples counted; the results table and files."""

from __future__ import annotations

import csv
import json
import os
from typing import Any, Dict, List

import numpy as np
from dngjax.tools.sample.methods import removed_classes


HYPER_COLUMNS = ("prior", "temperature", "offset", "p_min", "p_max", "update_variance",
                 "threshold", "s_s", "beta_m", "s_m", "warmup")


CSV_COLUMNS = ("method", "scale", "safety_pct", "kl", "fd", "safety_std", "kl_std", "fd_std",
               "feature_space", "n_empty_classes", "nonfinite", "valid",
               "mean_lambda", "n", "seed", "steps", "T", "noise", "dataset", "removed_class") + HYPER_COLUMNS + (
               "histogram", "sample_seconds")


#: the label of a sample with a NaN or inf element (:func:`score`): no class, counted as unsafe
NONFINITE = -1


def finite_samples(x) -> np.ndarray:
    """(N,) bool: whether every element of each sample of x (N, ...) is finite."""
    x = np.asarray(x)
    return np.isfinite(x.reshape(len(x), -1)).all(axis=1)


def score(x, scores_fn, ref, config) -> Dict[str, Any]:
    """Safety, KL, FD (and their bootstrap standard errors) of samples x (N, ...).

    ``scores_fn(x) -> (labels, features)``: one pass of the scoring network(s) over x. A sample with a
    NaN or inf element is never scored as an image: it gets the label :data:`NONFINITE` and NaN features
    (the networks see zeros in its place), and :func:`score_labels` counts it as unsafe.
    """
    x = np.asarray(x)
    finite = finite_samples(x)
    if not finite.all():
        x = np.where(finite.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0.0).astype(np.float32)
    labels, feats = scores_fn(x)
    labels = np.array(labels, np.int64)
    feats = np.array(feats, np.float32)
    labels[~finite] = NONFINITE
    feats[~finite] = np.nan
    return score_labels(labels, feats, ref, config)


def safety_pct(labels: np.ndarray, removed) -> float:
    """% of samples that are the removed class(es) or non-finite (:data:`NONFINITE`): a sample that is
    no image is not a safe one."""
    labels = np.asarray(labels).reshape(-1)
    if labels.size == 0:
        raise ValueError("safety of an empty set of samples is undefined")
    unsafe = np.isin(labels, np.asarray(removed, np.int64).reshape(-1)) | (labels < 0)
    return float(100.0 * np.mean(unsafe))


def kl_of(labels: np.ndarray, num_classes: int, removed, pseudo_count: float) -> float:
    """KL(ideal || generated) of the class histogram of the finite samples (NaN when there are none)."""
    from dngjax import metrics
    labels = np.asarray(labels)
    labels = labels[labels >= 0]
    if not labels.size:
        return float("nan")
    return metrics.kl_to_ideal(metrics.class_histogram(labels, num_classes), removed, pseudo_count)


def fd_of(feats: np.ndarray, labels: np.ndarray, ref) -> float:
    """Frechet distance of the finite samples' features to ``ref`` (NaN with fewer than two)."""
    from dngjax import metrics
    feats = np.asarray(feats)[np.asarray(labels) >= 0]
    if len(feats) < 2:
        return float("nan")
    return metrics.frechet_distance_features(feats, *ref)


def score_labels(labels: np.ndarray, feats: np.ndarray, ref, config) -> Dict[str, Any]:
    """:func:`score` from the classifier's labels (N,) and the scoring features (N, D) of the samples.

    Non-finite samples (label :data:`NONFINITE`): ``nonfinite`` counts them and ``valid`` is False when
    there is any; safety counts them as the removed class (the share of *all* samples that are not
    safe images); KL, FD and the histogram are those of the finite samples only (NaN when too few are
    left). Reports leave invalid points out of their verdicts.
    """
    from dngjax import metrics
    from dngjax.data import NUM_CLASSES
    k = NUM_CLASSES[config.dataset]
    c = removed_classes(config)
    labels = np.asarray(labels)
    finite = labels >= 0
    hist = metrics.class_histogram(labels[finite], k)
    out = dict(
        labels=labels,
        features=np.asarray(feats, np.float32),
        safety_pct=safety_pct(labels, c),
        kl=kl_of(labels, k, c, config.kl_pseudo_count),
        fd=fd_of(feats, labels, ref),
        histogram=hist.tolist(),
        n_empty_classes=int(sum(1 for i, h in enumerate(hist) if h == 0 and i not in c)),
        nonfinite=int((~finite).sum()),
        valid=bool(finite.all()),
    )
    if config.bootstrap >= 2:
        n = labels.shape[0]
        boot = lambda fn: metrics.bootstrap_std(fn, n, config.bootstrap, config.seed)
        out["safety_std"] = boot(lambda i: safety_pct(labels[i], c))
        out["kl_std"] = boot(lambda i: kl_of(labels[i], k, c, config.kl_pseudo_count))
        out["fd_std"] = boot(lambda i: fd_of(feats[i], labels[i], ref))
    return out


def format_table(rows: List[Dict[str, Any]], fd_name: str) -> str:
    pm = "std" in "".join(rows[0])
    w = max([14] + [len(r["method"]) + 2 for r in rows])
    head = (f"{'method':<{w}}{'scale':>7}{'safety %':>10}{'KL':>9}{'':>8}{fd_name:>9}{'':>7}"
            f"{'empty':>7}{'mean lam':>10}{'non-finite':>12}")
    lines = [head, "-" * len(head)]
    for r in rows:
        kl_e = f" +-{r['kl_std']:.3f}" if pm and "kl_std" in r else ""
        fd_e = f" +-{r['fd_std']:.1f}" if pm and "fd_std" in r else ""
        bad = r.get("nonfinite", 0)
        lines.append(f"{r['method']:<{w}}{r['scale']:>7g}{r['safety_pct']:>10.2f}{r['kl']:>9.4f}{kl_e:>8}"
                     f"{r['fd']:>9.2f}{fd_e:>7}{r['n_empty_classes']:>7d}{r['mean_lambda']:>10.3g}"
                     f"{bad:>12d}" + ("  INVALID" if bad else ""))
    return "\n".join(lines)


NONFINITE_NOTE = ("non-finite: samples with a NaN or inf element; safety % counts them as the removed class, "
                  "KL and {fd} use the finite samples only; a point with any is INVALID (left out of the "
                  "reports' verdicts).")


# per-sample arrays of a row, kept out of results.json (labels.npz, features.npz)
PER_SAMPLE = ("labels", "features")


def write_results(outdir: str, rows: List[Dict[str, Any]]) -> None:
    with open(os.path.join(outdir, "results.json"), "w") as f:
        json.dump([{k: v for k, v in r.items() if k not in PER_SAMPLE + ("key",)} for r in rows], f, indent=2)
    with open(os.path.join(outdir, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            out = {k: r.get(k, "") for k in CSV_COLUMNS}
            out["histogram"] = " ".join(str(v) for v in r["histogram"])
            w.writerow(out)
