"""Class removal end to end: sweep NP, SLD and DNG, score safety, KL and FD, draw the plots.

The logic behind ``python sample/main.py`` (see there for the commands): ``prepare(config)``
validates every input (methods, hyperparameters, grids, models, reference statistics) and
loads the models, before any sampling; ``execute(job)`` samples, scores and writes.

An unconditional DDPM is guided away from the removed class with a DDPM trained
only on that class (eps_c), by negative prompting (NP), safe latent diffusion
(SLD) and dynamic negative guidance (DNG), over a grid of guidance scales per
method: one compiled, chunked sweep per method, the same seeds at every grid
point. Every point is scored with

* safety: % of samples the classifier assigns to the removed class (lower is safer);
* KL(ideal || generated) of the class histogram, ideal = 0 on the removed class and
  uniform elsewhere (smoothed, see dngjax.metrics);
* FD: Frechet distance between Gaussian fits of the classifier's penultimate
  features of the samples and of the training set without the removed class
  (shipped reference statistics) -- not FID; FID proper (pytorch-fid's
  Inception-v3) with ``config.features="inception"``.

A sample with a NaN or inf element is no image: ``nonfinite`` counts them per point, safety counts
them as the removed class, KL and FD use the finite samples only, and the point is invalid
(:func:`score_labels`; the reports leave it out of their verdicts).

With ``config.conditional`` set to a class-conditional model folder, one network gives both
predictions instead: eps_u = eps(x | null label), eps_c = eps(x | removed class).

Writes into the output folder it prints (built under ``<folder>.partial`` and renamed when
complete, so a failed run leaves no half-made folder): results.csv, results.json, config.json (the config,
``inputs``: path and sha256 of every model and reference file read, ``environment``: package versions and
git commit; :func:`identity`),
tradeoff.png (KL and FD vs safety, figs. 4/14), class_histogram.png (fig. 13),
lambda_t.png (figs. 5b/12), samples_overview.png and samples/<method>_scale<s>.png,
labels.npz (classifier labels of every sample), features.npz and reference.npz (each sample's scoring
features and the reference statistics, for paired comparisons between points) and optionally samples.npz.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import os
import shutil
import subprocess
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from dngjax.tools import SOURCE_ROOT as REPO_ROOT

METHODS = ("NP", "SLD", "DNG")
HYPER_COLUMNS = ("prior", "temperature", "offset", "p_min", "p_max", "variance",
                 "threshold", "s_s", "beta_m", "s_m", "warmup")
CSV_COLUMNS = ("method", "scale", "safety_pct", "kl", "fd", "safety_std", "kl_std", "fd_std",
               "feature_space", "n_empty_classes", "nonfinite", "valid",
               "mean_lambda", "n", "seed", "steps", "T", "noise", "dataset", "removed_class") + HYPER_COLUMNS + (
               "histogram", "sample_seconds")


# --------------------------------------------------------------------------- helpers

def removed_classes(config) -> Tuple[int, ...]:
    """The removed class, then config.also_remove's (several classes removed together)."""
    return (int(config.removed_class),) + tuple(int(c) for c in config.also_remove)


def class_tag(config) -> str:
    """"0", or "0+2" when several classes are removed together (paths' ``{c}``, titles)."""
    return "+".join(str(c) for c in removed_classes(config))


def resolve_path(template: str, config) -> str:
    """Fill ``{root}`` / ``{c}``; relative paths: the working directory first, then the repository root."""
    root = config.checkpoints
    path = template.format(root=root, c=class_tag(config))
    if os.path.isabs(path) or os.path.exists(path):
        return path
    alt = os.path.join(REPO_ROOT, path)
    return alt if os.path.exists(alt) else path


def parse_method(method: str) -> Tuple[str, str, Dict[str, float]]:
    """A method string -> (base, DNG variance variant, hyperparameter overrides).

    ``"DNG"`` -> ("DNG", "", {}); ``"DNG:beta"`` -> ("DNG", "beta", {}) (a variance-convention variant);
    ``"DNG[prior=0.1,temperature=0.5]"`` -> ("DNG", "", {"prior": 0.1, "temperature": 0.5}): the method
    with those hyperparameters instead of config.dng's / config.sld's (hyperparameter studies run many
    settings in one job; same rule type, so one compilation serves them all).
    """
    head, bracket, rest = method.partition("[")
    overrides: Dict[str, float] = {}
    if bracket:
        if not rest.endswith("]") or not rest[:-1].strip():
            raise ValueError(f"method {method!r}: write overrides as NAME[key=value,...], e.g. DNG[prior=0.1]")
        for item in rest[:-1].split(","):
            key, eq, value = item.partition("=")
            try:
                overrides[key.strip()] = float(value)
            except ValueError:
                raise ValueError(f"method {method!r}: {item.strip()!r} is not key=number") from None
            if not eq or not key.strip():
                raise ValueError(f"method {method!r}: {item.strip()!r} is not key=number")
    base, _, variant = head.partition(":")
    if base not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose among {METHODS} (DNG also as DNG:posterior / DNG:beta, "
                         "any method with overrides as NAME[key=value,...])")
    if variant and base != "DNG":
        raise ValueError(f"only DNG has variants (DNG:posterior, DNG:beta), got {method!r}")
    if overrides and base == "NP":
        raise ValueError(f"NP has no hyperparameter besides its scale (the grid), got {method!r}")
    if "scale" in overrides:
        raise ValueError(f"method {method!r}: the scale is swept by config.grid, not set per method")
    return base, variant, overrides


def method_key(method: str) -> str:
    """A file-name-safe name of a method string: ``DNG:beta`` -> ``DNG-beta``, ``DNG[prior=0.1]`` -> ``DNG-prior0.1``."""
    base, variant, overrides = parse_method(method)
    return "-".join([base] + ([variant] if variant else []) + [f"{k}{v:g}" for k, v in overrides.items()])


def build_rule(method: str, config):
    """(rule with scale 1, its other hyperparameters) for ``method`` ("NP", "SLD", "DNG", "DNG:beta",
    "DNG[prior=0.1]", ...). Unknown or illegal overrides raise ValueError naming them."""
    import dngjax as dj
    base, variant, overrides = parse_method(method)
    if base == "NP":
        return dj.NegativePrompting(scale=1.0), {}
    h = dict(config.sld) if base == "SLD" else dict(config.dng)
    unknown = sorted(set(overrides) - set(h))
    if unknown:
        raise ValueError(f"method {method!r}: {base} has no hyperparameter {unknown}; choose among {sorted(h)}")
    h.update(overrides)
    if variant:
        h["variance"] = variant
    if base == "SLD":
        return dj.SafeLatentDiffusion(scale=1.0, **h), h
    k = len(removed_classes(config))
    if k > 1:                                         # several classes removed together: one concept each
        return dj.MultiConceptDynamicNegativeGuidance(scale=1.0, num_concepts=k, **h), h
    return dj.DynamicNegativeGuidance(scale=1.0, **h), h


def load_or_compute_reference(config, features_fn) -> Tuple[np.ndarray, np.ndarray]:
    from dngjax import checkpoint, metrics
    path = resolve_path(config.reference_stats, config)
    if os.path.isfile(path):
        return checkpoint.load_reference_stats(path)
    if not config.compute_reference:
        raise FileNotFoundError(
            f"reference statistics {path} not found. They ship with the MNIST checkpoints; "
            "otherwise rerun with --config.compute_reference=True (needs the data set, see dngjax.data).")
    from dngjax import data
    print(f"computing reference statistics of {config.dataset} train without class "
          f"{class_tag(config)} -> {path}", flush=True)
    x, _ = data.load_dataset(config.dataset, "train", data_dir=config.data_dir or None,
                             drop_class=list(removed_classes(config)))
    mu, sigma = metrics.gaussian_stats(features_fn(x))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    np.savez(path, mu=mu, sigma=sigma, n=x.shape[0])
    return mu, sigma


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


def _fmt_table(rows: List[Dict[str, Any]], fd_name: str) -> str:
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


# --------------------------------------------------------------------------- models and scoring

def load_denoisers(config) -> Tuple[Any, Any, str]:
    """(denoiser_u, denoiser_c, description) of the two predictions the guidance combines."""
    import dngjax as dj
    from dngjax import checkpoint
    c = config.removed_class
    if config.conditional:
        path = resolve_path(config.conditional, config)
        module, params, card = checkpoint.load_model(path, expect_kind="unet")
        k = int(getattr(module, "num_classes", 0) or 0)
        if not k:
            raise ValueError(f"config.conditional={path} is not a class-conditional model (no num_classes)")
        removed = removed_classes(config)
        bad = [r for r in removed if not 0 <= r < k]
        if bad:
            raise ValueError(f"removed class(es) {bad} not a label of {path} (labels 0..{k - 1})")
        if len(removed) > 1:                          # one concept per removed class
            return (dj.denoiser(module, params, label=k), [dj.denoiser(module, params, label=r) for r in removed],
                    f"class-conditional {path}: eps(x | null label {k}) and eps(x | c) for c in {list(removed)}")
        return (dj.denoiser(module, params, label=k), dj.denoiser(module, params, label=c),
                f"class-conditional {path}: eps(x | null label {k}) and eps(x | {c})")
    upath, fpath = resolve_path(config.uncond, config), resolve_path(config.forget, config)
    umod, uparams, _ = checkpoint.load_model(upath, expect_kind="unet")
    try:
        fmod, fparams, fcard = checkpoint.load_model(fpath, expect_kind="unet")
    except checkpoint.CheckpointError as e:
        raise checkpoint.CheckpointError(
            f"{e}\nno forget-class model for class {c}: train one with python train/main.py "
            f"--config=train/configs/{config.dataset}_forget.py:cpu --config.only_class={c} "
            f"--workdir=workdir/{config.dataset}_forget_{c}, then pass --config.forget=workdir/"
            f"{config.dataset}_forget_{c} (or use a class-conditional model: --config.conditional=...)") from None
    only = fcard.get("only_class", c)
    if only not in (None, -1, c):
        raise ValueError(f"the forget model {fpath} was trained on class {only}, not the removed class {c}")
    return (dj.denoiser(umod, uparams), dj.denoiser(fmod, fparams),
            f"unconditional {upath} and forget-class {fpath}")


def make_scorer(config) -> Tuple[Callable, Callable, str, Tuple[np.ndarray, np.ndarray]]:
    """(labels_fn, scores_fn, feature-space name, reference (mu, sigma)); fns take model-space x (N, ...).

    ``scores_fn(x) -> (labels, features)`` runs the classifier once for both (and Inception for FID).
    """
    import jax.numpy as jnp
    from dngjax import checkpoint, evaluation, metrics

    cmod, cparams, _ = checkpoint.load_classifier(resolve_path(config.classifier, config))
    scorer = evaluation.make_scorer(cmod, cparams, batch_size=config.eval_batch)
    labels_fn = lambda x: scorer(x).labels
    if config.features == "classifier":
        features_fn = lambda x: scorer(x).features

        def scores_fn(x):
            s = scorer(x)
            return s.labels, s.features
        space = "classifier penultimate layer (FD)"
    elif config.features == "inception":
        from dngjax import fid_inception
        imod, ivars = fid_inception.load_fid_inception(config.fid_weights or None)
        f01 = fid_inception.fid_features_fn(imod, ivars)
        features_fn = lambda x: metrics.batched_apply(
            lambda b: np.asarray(f01((jnp.clip(b, -1.0, 1.0) + 1.0) / 2.0)), x, config.eval_batch)
        scores_fn = lambda x: (labels_fn(x), features_fn(x))
        space = "pytorch-fid Inception-v3 pool3 (FID)"
    else:
        raise ValueError(f"config.features must be 'classifier' or 'inception', got {config.features!r}")
    ref = load_or_compute_reference(config, features_fn)
    return labels_fn, scores_fn, space, ref


# --------------------------------------------------------------------------- the job

@dataclasses.dataclass
class Job:
    """A validated class-removal run: models loaded, rules built, output folder chosen."""

    config: Any
    denoiser_u: Any
    denoiser_c: Any
    models: str
    methods: List[Tuple[str, Any, Dict[str, Any], List[float]]]   # (method, rule, hyper, scales)
    labels_fn: Callable
    scores_fn: Callable
    space: str
    ref: Tuple[np.ndarray, np.ndarray]
    schedule: Any
    seeds: np.ndarray
    shape: Tuple[int, ...]
    outdir: str
    record: Dict[str, Any] = dataclasses.field(default_factory=dict)   # config.json: config, inputs, environment
    move_aside: List[str] = dataclasses.field(default_factory=list)    # other runs' folders (config.overwrite)


def validate_config(config) -> None:
    """Raise ValueError for a config that cannot run (before any model is loaded)."""
    from dngjax.data import NUM_CLASSES
    if config.dataset not in NUM_CLASSES:
        raise ValueError(f"config.dataset must be one of {sorted(NUM_CLASSES)}, got {config.dataset!r}")
    k = NUM_CLASSES[config.dataset]
    if not 0 <= config.removed_class < k:
        raise ValueError(f"config.removed_class must be in 0..{k - 1}, got {config.removed_class}")
    also = list(config.also_remove)
    if also:
        if any(not isinstance(a, int) or isinstance(a, bool) or not 0 <= a < k for a in also):
            raise ValueError(f"config.also_remove must hold classes in 0..{k - 1}, got {tuple(also)}")
        if len(set(removed_classes(config))) != 1 + len(also):
            raise ValueError(f"config.also_remove={tuple(also)} repeats a removed class ({config.removed_class})")
        if not config.conditional:
            raise ValueError("removing several classes (config.also_remove) needs the class-conditional model: "
                             "--config.conditional='{root}/cond'")
        other = [m for m in config.methods if parse_method(m)[0] != "DNG"]
        if other:
            raise ValueError(f"removing several classes runs DNG only (one concept per class); drop {other} "
                             "from config.methods")
    for name in ("n", "steps", "T", "chunk_size", "eval_batch"):
        if int(config[name]) < 1:
            raise ValueError(f"config.{name} must be >= 1, got {config[name]}")
    if config.steps > config.T:
        raise ValueError(f"config.steps={config.steps} exceeds the training chain T={config.T}")
    if config.bootstrap == 1 or config.bootstrap < 0:
        raise ValueError(f"config.bootstrap must be 0 (none) or >= 2 resamples, got {config.bootstrap}")
    if not config.methods and not config.baseline:
        raise ValueError("nothing to run: config.methods is empty and config.baseline is False")
    if config.noise not in ("beta", "posterior"):
        raise ValueError(f"config.noise must be 'beta' or 'posterior', got {config.noise!r}")
    from dngjax.sampler import SOLVERS
    if config.solver not in SOLVERS:
        raise ValueError(f"config.solver must be one of {SOLVERS}, got {config.solver!r}")
    if config.solver not in ("ddpm",) and config.noise != "beta":
        raise ValueError(f"config.noise={config.noise!r} sets the ancestral step's variance; "
                         f"config.solver={config.solver!r} takes none: leave config.noise at 'beta'")
    check_model_root(config)


def check_model_root(config) -> None:
    """``config.checkpoints`` exists where a model path names ``{root}`` (the shipped models are in the
    project's checkout, not in the installed package): FileNotFoundError naming the flag to set."""
    fields = ("conditional",) if config.conditional else ("uncond", "forget")
    if not any("{root}" in config[f] for f in (*fields, "classifier")):
        return
    root = resolve_path(config.checkpoints, config)
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"model folder {config.checkpoints} not found (relative paths are looked up in the current folder "
            f"and in {REPO_ROOT}): the shipped models are in the project's checkout (checkpoints/mnist); run "
            f"from the checkout or pass --config.checkpoints=PATH/checkpoints/{config.dataset}")


def build_methods(config) -> List[Tuple[str, Any, Dict[str, Any], List[float]]]:
    """Every method's rule, hyperparameters and grid of scales, validated (illegal values raise).

    A method's grid is its own entry in ``config.method_grids`` ((method string, scales) pairs) if it
    has one, else its base's ``config.grid`` entry (``config.grid.DNG`` for every DNG variant)."""
    own = method_grids(config)
    out = []
    for m in config.methods:
        base, _, _ = parse_method(m)
        scales = [float(s) for s in own.get(m, config.grid[base])]
        if not scales:
            raise ValueError(f"config.method_grids of {m!r} is empty" if m in own else f"config.grid.{base} is empty")
        rule, hyper = build_rule(m, config)
        for s in scales:
            rule.replace(scale=s)                     # validates each grid value
        out.append((m, rule, hyper, scales))
    return out


def method_grids(config) -> Dict[str, Tuple[float, ...]]:
    """``config.method_grids`` as {method string: scales}, checked against ``config.methods`` (configs
    written before the field existed have none)."""
    pairs = config.get("method_grids", None) or ()
    own: Dict[str, Tuple[float, ...]] = {}
    for pair in pairs:
        if len(pair) != 2 or not isinstance(pair[0], str) or not isinstance(pair[1], (tuple, list)):
            raise ValueError(f"config.method_grids: write (method string, scales) pairs, got {pair!r}")
        m, scales = pair
        if m not in config.methods:
            raise ValueError(f"config.method_grids names {m!r}, which is not in config.methods {tuple(config.methods)}")
        if m in own:
            raise ValueError(f"config.method_grids gives {m!r} two grids")
        own[m] = tuple(float(s) for s in scales)
    return own


def choose_outdir(config) -> str:
    if config.outdir:
        return config.outdir.replace("{c}", class_tag(config))
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return os.path.join("outputs", "class_removal", f"{config.name}-{config.dataset}-c{class_tag(config)}-{stamp}")


def _is_previous_run(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "results.json")) and os.path.isfile(os.path.join(path, "config.json"))


def prepare(config) -> Job:
    """Validate everything and load the models; raises (ValueError, CheckpointError, ...) before any sampling.

    A run is its config and the files it reads (:func:`run_record`): an output folder, finished or
    interrupted, that holds another run's points is refused before any model is loaded, naming the
    difference (``config.overwrite=True``: moved aside by :func:`execute`, never deleted)."""
    import dngjax as dj
    from dngjax.data import SHAPES

    validate_config(config)
    methods = build_methods(config)
    outdir = choose_outdir(config)
    if os.path.isfile(outdir):
        raise ValueError(f"config.outdir={outdir} is a file")
    overwrite = bool(config.get("overwrite", False))
    files = input_files(config)
    pending = () if "reference_stats" in files else ("reference_stats",)     # computed below, if at all
    aside = check_folders(outdir, run_record(config, files), overwrite, skip=pending)
    denoiser_u, denoiser_c, models = load_denoisers(config)
    labels_fn, scores_fn, space, ref = make_scorer(config)
    if pending:                                       # the reference statistics exist now: the full check
        files = dict(input_files(config), **{k: v for k, v in files.items() if k == "dataset"})
        aside = check_folders(outdir, run_record(config, files), overwrite)
    full = dj.linear_schedule(config.T)
    schedule = full if config.steps >= config.T else dj.respace(full, config.steps)
    seeds = config.seed + np.arange(config.n)
    dj.keys_from_seeds(seeds)                         # seeds in range
    return Job(config, denoiser_u, denoiser_c, models, methods, labels_fn, scores_fn, space, ref, schedule,
               seeds, tuple(SHAPES[config.dataset]), outdir, run_record(config, files), aside)


def run(config) -> str:
    """Run the class-removal experiment of ``config``; returns the output folder."""
    return execute(prepare(config))


# --------------------------------------------------------------------------- what a run is

def _config_json(config) -> Dict[str, Any]:
    d = json.loads(config.to_json_best_effort())
    d.pop("progress", None)
    return d


# config fields that choose which grid points a run has, not how any one point is sampled or scored
# (select_ceiling: read by --job=select only)
_GRID_FIELDS = ("methods", "grid", "method_grids", "baseline", "grid_images", "outdir", "select_ceiling")
#: config fields that are no part of a run's identity: its grid, where it is written, and how
NOT_IDENTITY = _GRID_FIELDS + ("progress", "overwrite")
#: config.json's entries beside the config's fields: the files the run read (path and sha256) and the
#: software it ran on (package versions, git commit; recorded, no part of the identity)
RECORD_KEYS = ("inputs", "environment")
#: inputs recorded but no part of the identity: the data set is read only to compute the reference
#: statistics, whose file (and hash) the identity has
_RECORD_ONLY_INPUTS = ("dataset",)

_SHA256: Dict[Tuple[str, int, int, int], str] = {}


def file_sha256(path: str) -> str:
    """sha256 (hex) of a file's bytes, computed once per process for each (path, inode, size, mtime)."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _SHA256:
        from dngjax.checkpoint import file_sha256 as sha256
        _SHA256[key] = sha256(path)
    return _SHA256[key]


def _dataset_file(config) -> Optional[str]:
    """The offline data set file that :func:`dngjax.data.load_dataset` reads, if there is one."""
    from dngjax import data
    folder = data.resolve_data_dir(config.data_dir or None)
    for name in data._OFFLINE_FILES.get(config.dataset, ()) if folder else ():
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def input_files(config) -> Dict[str, str]:
    """Every model and reference file the run reads that exists now, by name: ``<field>/card.json`` and
    ``<field>/params.msgpack`` of the models (config.uncond and config.forget, or config.conditional; and
    config.classifier), ``reference_stats``, ``fid_weights`` (features="inception") and ``dataset`` (the
    data set file, read only when the reference statistics are computed)."""
    from dngjax import checkpoint
    fields = ["conditional"] if config.conditional else ["uncond", "forget"]
    files: Dict[str, str] = {}
    for field in fields + ["classifier"]:
        try:
            folder = checkpoint._model_dir(resolve_path(config[field], config))
            names = (checkpoint.CARD_FILE, checkpoint.load_card(folder).get("params_file", checkpoint.PARAMS_FILE))
        except checkpoint.CheckpointError:
            continue                                  # loading the model raises the error that says why
        for name in names:
            if os.path.isfile(os.path.join(folder, name)):
                files[f"{field}/{name}"] = os.path.join(folder, name)
    ref = resolve_path(config.reference_stats, config)
    if os.path.isfile(ref):
        files["reference_stats"] = ref
    elif config.compute_reference and _dataset_file(config):
        files["dataset"] = _dataset_file(config)
    if config.features == "inception":
        from dngjax.fid_inception import FID_WEIGHTS_ENV
        weights = config.fid_weights or os.environ.get(FID_WEIGHTS_ENV, "")
        if weights and os.path.isfile(weights):
            files["fid_weights"] = weights
    return files


_ENVIRONMENT: Dict[str, Any] = {}


def environment() -> Dict[str, Any]:
    """Package versions (jax, jaxlib, flax, numpy, dngjax) and the project's git commit (``git_commit``,
    None outside a git checkout; ``git_dirty``: uncommitted changes to tracked files)."""
    if not _ENVIRONMENT:
        import importlib.metadata
        import dngjax
        for pkg in ("jax", "jaxlib", "flax", "numpy"):
            try:
                _ENVIRONMENT[pkg] = importlib.metadata.version(pkg)
            except importlib.metadata.PackageNotFoundError:
                _ENVIRONMENT[pkg] = None
        _ENVIRONMENT["dngjax"] = dngjax.__version__

        def git(*args):
            try:
                r = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=20)
            except (OSError, subprocess.SubprocessError):
                return None
            return r.stdout.strip() if r.returncode == 0 else None
        _ENVIRONMENT["git_commit"] = git("rev-parse", "HEAD") or None
        status = git("status", "--porcelain", "--untracked-files=no") if _ENVIRONMENT["git_commit"] else None
        _ENVIRONMENT["git_dirty"] = None if status is None else bool(status)
    return dict(_ENVIRONMENT)


def run_record(config, files: Dict[str, str]) -> Dict[str, Any]:
    """What config.json holds: the config's fields, ``inputs`` ({name: {"path", "sha256"}} of
    :func:`input_files`) and ``environment`` (:func:`environment`)."""
    d = _config_json(config)
    d["inputs"] = {name: {"path": os.path.abspath(path), "sha256": file_sha256(path)}
                   for name, path in sorted(files.items())}
    d["environment"] = environment()
    return d


def identity(record: Dict[str, Any], skip: Tuple[str, ...] = ()) -> Dict[str, Any]:
    """What a finished grid point depends on, from a config.json (:func:`run_record`): the config without
    the choice of points, and the sha256 of every model and reference file (``inputs``: None for runs
    that did not record them). Two runs with the same identity share every point they have in common
    (same method and scale); versions and the git commit are recorded, not compared."""
    d = {k: v for k, v in record.items() if k not in NOT_IDENTITY + RECORD_KEYS}
    inputs = record.get("inputs")
    d["inputs"] = None if inputs is None else {
        k: v.get("sha256") for k, v in inputs.items() if k not in _RECORD_ONLY_INPUTS + tuple(skip)}
    return d


def _sampling_identity(config) -> Dict[str, Any]:
    """The config's part of the identity (:func:`identity` without the files)."""
    d = identity(_config_json(config))
    d.pop("inputs")
    return d


def differences(old: Dict[str, Any], new: Dict[str, Any], skip: Tuple[str, ...] = ()) -> List[str]:
    """How two runs' identities differ (config.json records), one short item per field or file:
    ``n: 16 -> 8``, ``dng.prior: 0.25 -> 0.5``, ``/.../ddpm/params.msgpack sha256 ab12.. -> cd34..``."""
    a, b = identity(old, skip), identity(new, skip)
    show = lambda v: "(absent)" if v is _ABSENT else json.dumps(v, sort_keys=True)
    defaults = _config_defaults()
    # a field added to the config (e.g. a new rule hyperparameter) is absent from older records: at its
    # default value it changes nothing, so it is not a difference
    same = lambda x, y, d: x == y or (x is _ABSENT and y == d) or (y is _ABSENT and x == d)
    out = []
    for key in sorted((set(a) | set(b)) - {"inputs"}):
        va, vb = a.get(key, _ABSENT), b.get(key, _ABSENT)
        if same(va, vb, defaults.get(key, _ABSENT)):
            continue
        if isinstance(va, dict) and isinstance(vb, dict):
            dk = defaults.get(key) if isinstance(defaults.get(key), dict) else {}
            out += [f"{key}.{k}: {show(va.get(k, _ABSENT))} -> {show(vb.get(k, _ABSENT))}"
                    for k in sorted(set(va) | set(vb))
                    if not same(va.get(k, _ABSENT), vb.get(k, _ABSENT), dk.get(k, _ABSENT))]
        else:
            out.append(f"{key}: {show(va)} -> {show(vb)}")
    ia, ib = a["inputs"], b["inputs"]
    if ia is None or ib is None:
        if ia != ib:
            out.append("model and reference sha256: " + ("not recorded in its config.json -> recorded"
                                                          if ia is None else "recorded -> not recorded"))
        return out
    for name in sorted(set(ia) | set(ib)):
        if ia.get(name) != ib.get(name):
            entry = (new.get("inputs") or {}).get(name) or (old.get("inputs") or {}).get(name)
            short = lambda h: "(none)" if h is None else h[:12] + ".."
            out.append(f"{entry['path']} sha256 {short(ia.get(name))} -> {short(ib.get(name))}")
    return out


_ABSENT = object()


def _config_defaults() -> Dict[str, Any]:
    """The base config's fields as config.json writes them (what a field absent from an older record meant)."""
    from dngjax.tools.sample.configs import common
    return json.loads(json.dumps(_config_json(common.base_config())))


def _read_record(folder: str) -> Optional[Dict[str, Any]]:
    try:
        with open(os.path.join(folder, "config.json")) as f:
            d = json.load(f)
        return d if isinstance(d, dict) else None
    except (OSError, ValueError):
        return None


def _holds_work(folder: str) -> bool:
    """Whether a work folder holds a finished grid point or chunk of seeds."""
    for sub in ("points", "chunks"):
        for _, _, names in os.walk(os.path.join(folder, sub)):
            if any(n.endswith(".npz") and not n.endswith(".tmp.npz") for n in names):
                return True
    return False


def partial_dir(outdir: str) -> str:
    """Where a run into ``outdir`` is written until it is complete."""
    return outdir.rstrip("/") + ".partial"


def check_folders(outdir: str, record: Dict[str, Any], overwrite: bool = False,
                  skip: Tuple[str, ...] = ()) -> List[str]:
    """The folders of another run (another identity, :func:`differences`) at ``outdir`` (a finished run)
    and ``<outdir>.partial`` (an interrupted one, with finished points or chunks) that ``overwrite``
    moves aside; without it such a folder raises ValueError, one line naming the difference and the
    ways on. An interrupted run that finished nothing is no run: it is replaced."""
    aside = []
    if os.path.isdir(outdir) and os.listdir(outdir):
        if not _is_previous_run(outdir):
            raise ValueError(f"config.outdir={outdir} exists and is not the output of an earlier class-removal run "
                             "(no results.json): choose another --config.outdir (it is never replaced)")
    for folder, what in ((outdir, "a finished run"), (partial_dir(outdir), "an interrupted run")):
        if folder == outdir and not (os.path.isdir(outdir) and os.listdir(outdir)):
            continue
        if folder != outdir and not (os.path.isdir(folder) and _holds_work(folder)):
            continue
        old = _read_record(folder)
        diff = ["its config.json is missing or unreadable"] if old is None else differences(old, record, skip)
        if not diff:
            continue
        if overwrite:
            aside.append(folder)
            continue
        more = f"; and {len(diff) - 6} more" if len(diff) > 6 else ""
        raise ValueError(f"{folder} holds {what} of another config or other model files ({'; '.join(diff[:6])}{more}): "
                         f"choose another --config.outdir, or pass --config.overwrite=True to move it aside to "
                         f"{folder.rstrip('/')}.old-<UTC time> (nothing is deleted)")
    return aside


def move_aside(folder: str) -> str:
    """Rename ``folder`` to ``<folder>.old-<UTC time>`` (never deleted); returns the new name."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    base = folder.rstrip("/") + f".old-{stamp}"
    dst, i = base, 1
    while os.path.exists(dst):
        dst, i = f"{base}-{i}", i + 1
    os.replace(folder, dst)
    return dst


def is_moved_aside(folder: str) -> bool:
    """Whether ``folder`` is a run moved aside by ``config.overwrite`` (``<outdir>.old-<UTC time>``)."""
    return ".old-" in os.path.basename(os.path.normpath(folder))


def _point_file(method: str, scale: float) -> str:
    name = "none" if method == "none" else method_key(method)
    return f"{name}_s{scale:g}.npz"


def _reusable_points(job: "Job", work: str, outdir: str) -> Dict[str, Any]:
    """Finished grid points for this config, by their key in it (``NP_0``, ...), from an interrupted run
    (``work``) or a finished one (``outdir``) with the same sampling identity, whatever their grids were.

    A finished run's point files are copied into ``work`` (kept even where this config's grid no longer
    has them, so that a later, larger grid reuses them too). Folders of another identity were refused
    or moved aside by :func:`prepare` / :func:`execute`; an interrupted run of another identity that
    finished nothing is replaced. Points are matched by method and scale, never by position in the grid."""
    config = job.config
    if os.path.isdir(work):
        old = _read_record(work)
        if old is None or differences(old, job.record):
            if _holds_work(work):                     # prepare refuses these: it changed since
                raise RuntimeError(f"{work} now holds another run's points; not touched")
            print(f"replacing {work}: an interrupted run of another config that finished no point", flush=True)
            shutil.rmtree(work)
    os.makedirs(os.path.join(work, "points"), exist_ok=True)
    old = _read_record(outdir) if _is_previous_run(outdir) else None
    if os.path.isdir(os.path.join(outdir, "points")) and old is not None and not differences(old, job.record):
        for name in os.listdir(os.path.join(outdir, "points")):
            dst = os.path.join(work, "points", name)
            if name.endswith(".npz") and not name.endswith(".tmp.npz") and not os.path.exists(dst):
                shutil.copy2(os.path.join(outdir, "points", name), dst)
    wanted = {("none", 0.0): "none_0"} if config.baseline else {}
    for m, _, _, scales in job.methods:
        for k, s in enumerate(scales):
            wanted[(method_key(m), round(float(s), 12))] = f"{method_key(m)}_{k}"
    done: Dict[str, Any] = {}
    found = 0
    for name in sorted(os.listdir(os.path.join(work, "points"))):
        if not name.endswith(".npz") or name.endswith(".tmp.npz"):
            continue
        row, preview, trace_part, samples = _load_point(os.path.join(work, "points", name))
        found += 1
        method = "none" if row["method"] == "none" else method_key(row["method"])
        key = wanted.get((method, round(float(row["scale"]), 12)))
        if key is not None:
            row["key"] = key
            done[key] = (row, preview, trace_part, samples)
    if found:
        print(f"reusing {len(done)} finished grid point(s) of {len(wanted)} "
              f"({found} on disk for this config and the same model and reference files)", flush=True)
    return done


def _save_point(work: str, row: Dict[str, Any], preview: np.ndarray, trace_part: Dict[str, Any],
                samples: Optional[np.ndarray]) -> None:
    """One finished grid point, so that an interrupted run never recomputes it."""
    path = os.path.join(work, "points", _point_file(row["method"], row["scale"]))
    arrays = {f"trace_{k}": np.asarray(v) for k, v in trace_part.items() if v is not None}
    if samples is not None:
        arrays["samples"] = samples
    meta = {k: v for k, v in row.items() if k not in PER_SAMPLE}
    if row.get("features") is not None:
        arrays["features"] = row["features"]
    tmp = path + ".tmp.npz"
    np.savez(tmp, meta=np.asarray(json.dumps(meta)), labels=row["labels"].astype(np.int16),
             preview=preview.astype(np.float32), **arrays)
    os.replace(tmp, path)


def _load_point(path: str):
    with np.load(path) as f:
        row = json.loads(str(f["meta"]))
        row["labels"] = f["labels"].astype(np.int64)
        if "features" in f.files:
            row["features"] = f["features"]
        trace_part = {k[len("trace_"):]: f[k] for k in f.files if k.startswith("trace_")}
        return row, f["preview"], trace_part, (f["samples"] if "samples" in f.files else None)


def sweep_in_chunks(job: Job, work: str, name: str, rule, scales: List[float]):
    """``dj.sweep`` of ``rule`` over ``scales`` and the job's seeds, chunk by chunk, every finished chunk
    kept in ``<work>/chunks/<name>_<scales>/`` so that an interrupted method resumes at its first
    unfinished chunk (each seed's sample depends on its key only, not on its chunk).

    Returns (x (K, N, ...), :class:`dngjax.Trace` with lam and p (K, S, N), the chunk folder).
    """
    import dngjax as dj
    config = job.config
    folder = os.path.join(work, "chunks", name + "_" + "_".join(f"{s:g}" for s in scales))
    os.makedirs(folder, exist_ok=True)
    n = len(job.seeds)
    parts, done = [], np.zeros(n, bool)
    for f in sorted(os.listdir(folder)):
        if f.endswith(".npz") and not f.endswith(".tmp.npz"):
            with np.load(os.path.join(folder, f)) as z:
                parts.append({k: z[k] for k in ("idx", "x", "lam", "p", "t")})
            done[parts[-1]["idx"]] = True
    todo = np.flatnonzero(~done)
    if len(parts) and len(todo):
        print(f"{name}: resuming at seed index {todo[0]} ({done.sum()} of {n} seeds done)", flush=True)
    if len(todo):
        chunks = dj.sample_chunks(job.denoiser_u, job.schedule, dj.keys_from_seeds(job.seeds[todo]), job.shape,
                                  rule=rule, grid={"scale": list(scales)}, denoiser_c=job.denoiser_c,
                                  chunk_size=config.chunk_size, return_trace=True, noise=config.noise,
                                  solver=config.solver,
                                  progress=config.progress)
        for ch in chunks:
            part = {"idx": todo[ch.start:ch.start + ch.x.shape[1]], "x": ch.x, "lam": ch.trace.lam,
                    "p": ch.trace.p, "t": ch.trace.t}
            path = os.path.join(folder, f"{part['idx'][0]:07d}.npz")
            np.savez(path + ".tmp.npz", **part)
            os.replace(path + ".tmp.npz", path)
            parts.append(part)
    k, steps = len(scales), len(parts[0]["t"])
    x = np.empty((k, n) + tuple(job.shape), np.float32)
    lam, p = np.empty((k, steps, n), np.float32), np.empty((k, steps, n), np.float32)
    for part in parts:
        x[:, part["idx"]] = part["x"]
        lam[:, :, part["idx"]] = part["lam"]
        p[:, :, part["idx"]] = part["p"]
    return x, dj.Trace(t=parts[0]["t"], lam=lam, p=p), folder


def _same_scale(a, b) -> bool:
    return round(float(a), 12) == round(float(b), 12)


def _sweeps(todo: List[int], scales: List[float], recorded: List[Dict[str, Any]]) -> List[List[float]]:
    """The sweeps that sample a method's missing scales ``todo`` (indices into ``scales``).

    A point's samples depend, to float32 rounding, on which scales were vmapped beside it, so a sweep
    interrupted between the recording of its points is redone whole (``swept_with`` of a recorded point:
    its chunks on disk are reused, the points already recorded are kept); the scales no interrupted
    sweep holds (a grown grid) are swept together."""
    left = [scales[k] for k in todo]
    out = []
    for row in recorded:
        group = row.get("swept_with")
        if group and any(_same_scale(s, g) for s in left for g in group):
            out.append([float(g) for g in group])
            left = [s for s in left if not any(_same_scale(s, g) for g in group)]
    return out + ([left] if left else [])


def pass_seconds(job: Job) -> float:
    """Measured seconds of one network pass per image, at the batch size of one sampling call."""
    import jax
    import jax.numpy as jnp
    b = min(job.config.chunk_size, job.config.n)
    x = jnp.zeros((b, *job.shape), jnp.float32)
    t = jnp.full((b,), job.schedule.num_steps // 2, jnp.int32)
    fn = jax.jit(lambda d, x, t: d(x, t))
    fn(job.denoiser_u, x, t).block_until_ready()             # compile
    reps, t0 = 3, time.time()
    for _ in range(reps):
        fn(job.denoiser_u, x, t).block_until_ready()
    return (time.time() - t0) / (reps * b)


def estimate_cost(job: Job, done=frozenset()) -> Dict[str, float]:
    """Network passes left to run (n x chain steps x predictions per step x evaluations per prediction:
    1, or 1 + probes for DNG's continuous-time posterior, whose jvps are counted as one pass each;
    finished points excluded), the measured time per pass and their product."""
    config = job.config
    per_seed_chain = config.n * job.schedule.num_steps
    passes = per_seed_chain * int(config.baseline and "none_0" not in done)
    for m, rule, _, scales in job.methods:
        todo = sum(1 for k in range(len(scales)) if f"{method_key(m)}_{k}" not in done)
        second = (rule.num_conditions or 1) if rule.needs_second_prediction else 0
        spec = rule.tangent_spec()
        per_prediction = 1 if spec is None else 1 + (spec[1] if spec[0] != "exact" else int(np.prod(job.shape)))
        passes += per_seed_chain * todo * (1 + second) * per_prediction
    sec = pass_seconds(job)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return {"passes": passes, "seconds_per_pass": sec, "seconds": passes * sec,
            "cpu_core_hours": passes * sec * cores / 3600}


def execute(job: Job) -> str:
    """Sample every grid point not sampled yet, score it, write the files; returns the output folder.

    Finished points are kept in ``<outdir>.partial/points`` (and ``<outdir>/points`` once complete):
    rerunning into the same folder after an interruption, or with more methods or scales after it
    finished, samples only the points it does not have yet. A point is reused when its method and scale
    are in the new grid and the run's identity is unchanged: the rest of the config (chain, seeds,
    hyperparameters, scoring) and the sha256 of every model and reference file (:func:`identity`).
    A folder of another identity was refused by :func:`prepare`; with ``config.overwrite`` it is moved
    aside here (``<folder>.old-<UTC time>``). Finished work is never deleted.
    """
    import jax
    from tqdm.auto import tqdm
    import dngjax as dj
    from dngjax.tools.sample import plots

    config = job.config
    t_start = time.time()
    outdir = job.outdir
    work = partial_dir(outdir)
    for folder in job.move_aside:
        if os.path.isdir(folder):
            print(f"moved {folder} aside to {move_aside(folder)} (config.overwrite: another run's points, kept)",
                  flush=True)
    done = _reusable_points(job, work, outdir)
    os.makedirs(os.path.join(work, "samples"), exist_ok=True)
    print(f"output folder: {os.path.abspath(outdir)} (written to {os.path.basename(work)} until complete)",
          flush=True)
    with open(os.path.join(work, "config.json.tmp"), "w") as f:     # atomic: a kill leaves the old one
        json.dump(job.record, f, indent=2)
    os.replace(os.path.join(work, "config.json.tmp"), os.path.join(work, "config.json"))
    cost = estimate_cost(job, frozenset(done))
    print(f"estimated cost: {cost['passes']:,} network passes x {1e3 * cost['seconds_per_pass']:.2f} ms (measured) = "
          f"{cost['seconds'] / 60:.1f} min, {cost['cpu_core_hours']:.2f} CPU core-hours "
          f"({jax.default_backend()}), plus compilation", flush=True)

    keys = dj.keys_from_seeds(job.seeds)
    fd_name = "FID" if config.features == "inception" else "FD"
    common = dict(n=config.n, seed=config.seed, steps=job.schedule.num_steps, T=config.T, noise=config.noise,
                  solver=config.solver,
                  dataset=config.dataset, removed_class=config.removed_class, removed_classes=class_tag(config),
                  feature_space=job.space,
                  models=job.models)
    rows: Dict[str, Dict[str, Any]] = {}      # by key
    previews: Dict[str, np.ndarray] = {}      # the first samples of each point, for the grids
    saved: Dict[str, np.ndarray] = {}         # all samples as uint8 (config.save_samples)
    parts: Dict[str, Dict[str, Any]] = {}     # per point: its mean lambda_t / p_t curves
    keep = max(config.grid_images, 16)

    def record(row, x, trace_part):
        from dngjax.data import to_uint8
        row.update(score(x, job.scores_fn, job.ref, config))
        if row["nonfinite"]:
            print(f"warning: {row['method']} at scale {row['scale']:g}: {row['nonfinite']} of {len(row['labels'])} "
                  "samples are non-finite (NaN or inf): counted as the removed class in safety %, left out of KL "
                  f"and {fd_name}; the point is marked invalid", flush=True)
        samples = to_uint8(x) if config.save_samples else None
        _save_point(work, row, np.asarray(x[:keep]), trace_part, samples)
        use(row, np.asarray(x[:keep]), trace_part, samples)

    def use(row, preview, trace_part, samples):
        rows[row["key"]] = row
        previews[row["key"]] = preview
        parts[row["key"]] = trace_part
        if samples is not None:
            saved[row["key"]] = samples

    for row, preview, trace_part, samples in done.values():
        use(row, preview, trace_part, samples)
    total = int(config.baseline) + sum(len(scales) for _, _, _, scales in job.methods)
    bar = tqdm(total=total, initial=len(done), desc="grid points", unit="point", disable=not config.progress)

    if config.baseline and "none_0" not in rows:
        t0 = time.time()
        x = dj.sample(job.denoiser_u, job.schedule, keys, job.shape, chunk_size=config.chunk_size,
                      noise=config.noise, solver=config.solver)
        record(dict(method="none", scale=0.0, mean_lambda=0.0, sample_seconds=time.time() - t0, key="none_0",
                    **common), x, {})
        bar.update(1)
    removed_mask = np.isin(rows["none_0"]["labels"], removed_classes(config)) if "none_0" in rows else None

    for m, rule, hyper, scales in job.methods:
        name = method_key(m)
        todo = [k for k in range(len(scales)) if f"{name}_{k}" not in rows]
        for sweep_scales in _sweeps(todo, scales, [r for r in rows.values() if r["method"] == m]):
            t0 = time.time()
            x, trace, chunks = sweep_in_chunks(job, work, name, rule, sweep_scales)
            dt = time.time() - t0
            reduced = plots.reduce_trace(trace, sweep_scales, removed_mask)
            for j, s in enumerate(sweep_scales):
                k = next((k for k in todo if _same_scale(scales[k], s)), None)
                if k is None:                         # recorded before an interruption: kept as it is
                    continue
                part = {key: (v[j] if key not in ("t", "scales") and v is not None else v)
                        for key, v in reduced.items()}
                part["scales"] = np.asarray(scales[k])
                record(dict(method=m, scale=scales[k], mean_lambda=float(np.mean(trace.lam[j])),
                            sample_seconds=dt / len(sweep_scales), key=f"{name}_{k}",
                            swept_with=[float(v) for v in sweep_scales], **common, **hyper), x[j], part)
                bar.update(1)
            bar.set_postfix_str(f"{m} done in {dt:.0f}s")
            shutil.rmtree(chunks)                     # its points are saved now
            del x, trace
    bar.close()
    shutil.rmtree(os.path.join(work, "chunks"), ignore_errors=True)     # chunks of grids no longer asked for

    # every point in config order, and each method's lambda_t / p_t curves stacked over its scales
    order = (["none_0"] if config.baseline else []) + [f"{method_key(m)}_{k}"
                                                        for m, _, _, scales in job.methods
                                                        for k in range(len(scales))]
    rows = [rows[k] for k in order]
    traces: Dict[str, Dict[str, Any]] = {}
    for m, _, _, scales in job.methods:
        ps = [parts[f"{method_key(m)}_{k}"] for k in range(len(scales))]
        traces[m] = {"t": ps[0]["t"], "scales": np.asarray([float(p["scales"]) for p in ps])}
        for key in ("lam_all", "lam_removed", "lam_other", "p_all", "p_removed", "p_other"):
            have = [p.get(key) for p in ps]
            traces[m][key] = np.stack(have) if all(h is not None for h in have) else None

    # ---- files
    write_results(work, rows)
    np.savez_compressed(os.path.join(work, "labels.npz"), seeds=job.seeds,
                        **{r["key"]: r["labels"].astype(np.int8) for r in rows})
    if all(r.get("features") is not None for r in rows):     # for paired comparisons (dngjax/tools/sample/report.py)
        np.savez_compressed(os.path.join(work, "features.npz"), seeds=job.seeds, **{r["key"]: r["features"] for r in rows})
        np.savez(os.path.join(work, "reference.npz"), mu=job.ref[0], sigma=job.ref[1])
    if config.save_samples:
        np.savez_compressed(os.path.join(work, "samples.npz"), seeds=job.seeds, **saved)
    for r in rows:
        name = "unguided" if r["method"] == "none" else f"{method_key(r['method'])}_scale{r['scale']:g}"
        plots.save_grid(previews[r["key"]][:config.grid_images], os.path.join(work, "samples", f"{name}.png"),
                        title=f"{name}: {r['safety_pct']:.1f}% class {class_tag(config)} "
                              f"(red frame), KL {r['kl']:.3f}, {fd_name} {r['fd']:.2f}",
                        labels=r["labels"][:config.grid_images], removed_class=removed_classes(config))
    plots.plot_overview(rows, previews, os.path.join(work, "samples_overview.png"))
    plots.plot_tradeoff(rows, os.path.join(work, "tradeoff.png"), config.high_safety, fd_label=fd_name)
    plots.plot_histograms(rows, os.path.join(work, "class_histogram.png"), high_safety=config.high_safety)
    if traces:
        plots.plot_lambda(traces, os.path.join(work, "lambda_t.png"))
        np.savez(os.path.join(work, "lambda_t.npz"),
                 **{f"{m}/{k}": np.asarray(v) for m, tr in traces.items() for k, v in tr.items() if v is not None})

    wall = time.time() - t_start
    table = _fmt_table(rows, fd_name)
    summary = (f"{config.dataset}, removed class {class_tag(config)}: n = {config.n} per point, "
               f"{job.schedule.num_steps}-step chain (T = {config.T}), solver {config.solver}, "
               f"noise {config.noise!r}, {len(rows)} points, "
               f"{jax.device_count()} {jax.default_backend()} device(s), {wall:.0f} s this run "
               f"({sum(r.get('sample_seconds', 0.0) for r in rows):.0f} s of sampling in all, resumed runs "
               f"included)\nmodels: {job.models}\n"
               f"{provenance_text(job.record)}\n"
               f"{table}\n"
               f"{fd_name}: {job.space}. Lower is better everywhere; high safety: <= {config.high_safety:g}%."
               + (f" +-: bootstrap standard error ({config.bootstrap} resamples)." if config.bootstrap >= 2 else "")
               + "\n" + NONFINITE_NOTE.format(fd=fd_name))
    with open(os.path.join(work, "summary.txt"), "w") as f:
        f.write(summary + "\n")
    _publish(work, outdir, job.record)
    print(summary)
    print(f"results in {os.path.abspath(outdir)}", flush=True)
    return outdir


def provenance_text(record: Dict[str, Any]) -> str:
    """Two lines for summary.txt and report.md: the inputs' sha256 (first 12 hex digits) and the software."""
    inputs = record.get("inputs")
    files = ("not recorded" if inputs is None else
             ", ".join(f"{k} {v['sha256'][:12]}" for k, v in inputs.items()) or "none")
    env = record.get("environment") or {}
    commit = env.get("git_commit")
    software = (", ".join(f"{k} {env[k]}" for k in ("jax", "flax", "numpy", "dngjax") if env.get(k))
                + ", git " + ("unknown" if not commit else commit[:12] + (" + uncommitted changes"
                                                                         if env.get("git_dirty") else "")))
    return f"inputs (sha256): {files}\nsoftware: {software if env else 'not recorded'}"


def _publish(work: str, outdir: str, record: Dict[str, Any]) -> None:
    """Rename the complete ``work`` folder to ``outdir``. An earlier run there of the same identity is
    replaced once every point file of it is in ``work`` (copied by :func:`_reusable_points`); anything
    else there is moved aside (``<outdir>.old-<UTC time>``), never deleted."""
    if os.path.isdir(outdir):
        old = _read_record(outdir) if _is_previous_run(outdir) else None
        points = os.path.join(outdir, "points")
        kept = os.path.isdir(points) and all(
            os.path.isfile(os.path.join(work, "points", n)) for n in os.listdir(points)
            if n.endswith(".npz") and not n.endswith(".tmp.npz"))
        if not os.listdir(outdir):
            os.rmdir(outdir)
        elif old is not None and kept and not differences(old, record):
            replaced = move_aside(outdir)             # its points live on in the new folder
            os.replace(work, outdir)
            shutil.rmtree(replaced)
            return
        else:
            print(f"moved {outdir} aside to {move_aside(outdir)}: it held another run's results", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(outdir)), exist_ok=True)
    os.replace(work, outdir)
