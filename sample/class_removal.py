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

With ``config.conditional`` set to a class-conditional model folder, one network gives both
predictions instead: eps_u = eps(x | null label), eps_c = eps(x | removed class).

Writes into the output folder it prints (built under ``<folder>.partial`` and renamed when
complete, so a failed run leaves no half-made folder): results.csv, results.json, config.json,
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
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

METHODS = ("NP", "SLD", "DNG")
HYPER_COLUMNS = ("prior", "temperature", "offset", "p_min", "p_max", "variance",
                 "threshold", "s_s", "beta_m", "s_m", "warmup")
CSV_COLUMNS = ("method", "scale", "safety_pct", "kl", "fd", "safety_std", "kl_std", "fd_std",
               "feature_space", "n_empty_classes",
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


def score(x, scores_fn, ref, config) -> Dict[str, Any]:
    """Safety, KL, FD (and their bootstrap standard errors) of samples x (N, ...).

    ``scores_fn(x) -> (labels, features)``: one pass of the scoring network(s) over x.
    """
    labels, feats = scores_fn(x)
    return score_labels(np.asarray(labels), np.asarray(feats, np.float32), ref, config)


def score_labels(labels: np.ndarray, feats: np.ndarray, ref, config) -> Dict[str, Any]:
    """:func:`score` from the classifier's labels (N,) and the scoring features (N, D) of the samples."""
    from dngjax import metrics
    from dngjax.data import NUM_CLASSES
    k = NUM_CLASSES[config.dataset]
    c = removed_classes(config)
    hist = metrics.class_histogram(labels, k)
    out = dict(
        labels=labels,
        features=np.asarray(feats, np.float32),
        safety_pct=metrics.safety(labels, c),
        kl=metrics.kl_to_ideal(hist, c, config.kl_pseudo_count),
        fd=metrics.frechet_distance_features(feats, *ref),
        histogram=hist.tolist(),
        n_empty_classes=int(sum(1 for i, h in enumerate(hist) if h == 0 and i not in c)),
    )
    if config.bootstrap >= 2:
        n = labels.shape[0]
        boot = lambda fn: metrics.bootstrap_std(fn, n, config.bootstrap, config.seed)
        out["safety_std"] = boot(lambda i: metrics.safety(labels[i], c))
        out["kl_std"] = boot(lambda i: metrics.kl_to_ideal(metrics.class_histogram(labels[i], k), c,
                                                           config.kl_pseudo_count))
        out["fd_std"] = boot(lambda i: metrics.frechet_distance_features(feats[i], *ref))
    return out


def _fmt_table(rows: List[Dict[str, Any]], fd_name: str) -> str:
    pm = "std" in "".join(rows[0])
    w = max([14] + [len(r["method"]) + 2 for r in rows])
    head = (f"{'method':<{w}}{'scale':>7}{'safety %':>10}{'KL':>9}{'':>8}{fd_name:>9}{'':>7}"
            f"{'empty':>7}{'mean lam':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        kl_e = f" +-{r['kl_std']:.3f}" if pm and "kl_std" in r else ""
        fd_e = f" +-{r['fd_std']:.1f}" if pm and "fd_std" in r else ""
        lines.append(f"{r['method']:<{w}}{r['scale']:>7g}{r['safety_pct']:>10.2f}{r['kl']:>9.4f}{kl_e:>8}"
                     f"{r['fd']:>9.2f}{fd_e:>7}{r['n_empty_classes']:>7d}{r['mean_lambda']:>10.3g}")
    return "\n".join(lines)


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
    """Validate everything and load the models; raises (ValueError, CheckpointError, ...) before any sampling."""
    import dngjax as dj
    from dngjax.data import SHAPES

    validate_config(config)
    methods = build_methods(config)
    outdir = choose_outdir(config)
    if os.path.isfile(outdir):
        raise ValueError(f"config.outdir={outdir} is a file")
    if os.path.isdir(outdir) and os.listdir(outdir) and not _is_previous_run(outdir):
        raise ValueError(f"config.outdir={outdir} exists and is not the output of an earlier class-removal run "
                         "(no results.json): choose another folder, it would be replaced")
    denoiser_u, denoiser_c, models = load_denoisers(config)
    labels_fn, scores_fn, space, ref = make_scorer(config)
    full = dj.linear_schedule(config.T)
    schedule = full if config.steps >= config.T else dj.respace(full, config.steps)
    seeds = config.seed + np.arange(config.n)
    dj.keys_from_seeds(seeds)                         # seeds in range
    return Job(config, denoiser_u, denoiser_c, models, methods, labels_fn, scores_fn, space, ref, schedule,
               seeds, tuple(SHAPES[config.dataset]), outdir)


def run(config) -> str:
    """Run the class-removal experiment of ``config``; returns the output folder."""
    return execute(prepare(config))


def _config_json(config) -> Dict[str, Any]:
    d = json.loads(config.to_json_best_effort())
    d.pop("progress", None)
    return d


# config fields that choose which grid points a run has, not how any one point is sampled or scored
# (select_ceiling: read by --job=select only)
_GRID_FIELDS = ("methods", "grid", "method_grids", "baseline", "grid_images", "outdir", "select_ceiling")


def _sampling_identity(config) -> Dict[str, Any]:
    """What a finished grid point depends on: the config without the choice of points. Two runs with the
    same identity share every point they have in common (same method and scale)."""
    d = _config_json(config)
    for k in _GRID_FIELDS:
        d.pop(k, None)
    return d


def _same_identity(folder: str, config) -> bool:
    try:
        with open(os.path.join(folder, "config.json")) as f:
            other = json.load(f)
    except (OSError, ValueError):
        return False
    for k in _GRID_FIELDS + ("progress",):
        other.pop(k, None)
    return other == _sampling_identity(config)


def _point_file(method: str, scale: float) -> str:
    name = "none" if method == "none" else method_key(method)
    return f"{name}_s{scale:g}.npz"


def _reusable_points(job: "Job", work: str, outdir: str) -> Dict[str, Any]:
    """Finished grid points for this config, by their key in it (``NP_0``, ...), from an interrupted run
    (``work``) or a finished one (``outdir``) with the same sampling identity, whatever their grids were.

    A finished run's point files are copied into ``work`` (kept even where this config's grid no longer
    has them, so that a later, larger grid reuses them too); an interrupted run of another identity is
    discarded. Points are matched by method and scale, never by position in the grid."""
    config = job.config
    if os.path.isdir(work) and not _same_identity(work, config):
        print(f"discarding {work}: an unfinished run of another config", flush=True)
        shutil.rmtree(work)
    os.makedirs(os.path.join(work, "points"), exist_ok=True)
    if os.path.isdir(os.path.join(outdir, "points")) and _same_identity(outdir, config):
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
              f"({found} on disk for this config's chain, seeds and models)", flush=True)
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
    """Network passes left to run (n x chain steps x predictions per step, finished points excluded),
    the measured time per pass and their product."""
    config = job.config
    per_seed_chain = config.n * job.schedule.num_steps
    passes = per_seed_chain * int(config.baseline and "none_0" not in done)
    for m, rule, _, scales in job.methods:
        todo = sum(1 for k in range(len(scales)) if f"{method_key(m)}_{k}" not in done)
        second = (rule.num_conditions or 1) if rule.needs_second_prediction else 0
        passes += per_seed_chain * todo * (1 + second)
    sec = pass_seconds(job)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return {"passes": passes, "seconds_per_pass": sec, "seconds": passes * sec,
            "cpu_core_hours": passes * sec * cores / 3600}


def execute(job: Job) -> str:
    """Sample every grid point not sampled yet, score it, write the files; returns the output folder.

    Finished points are kept in ``<outdir>.partial/points`` (and ``<outdir>/points`` once complete):
    rerunning into the same folder after an interruption, or with more methods or scales after it
    finished, samples only the points it does not have yet. A point is reused when its method and scale
    are in the new grid and the rest of the config (chain, seeds, models, hyperparameters, scoring) is
    unchanged; another config starts the folder afresh.
    """
    import jax
    from tqdm.auto import tqdm
    import dngjax as dj
    from sample import plots

    config = job.config
    t_start = time.time()
    outdir = job.outdir
    work = outdir.rstrip("/") + ".partial"
    done = _reusable_points(job, work, outdir)
    os.makedirs(os.path.join(work, "samples"), exist_ok=True)
    print(f"output folder: {os.path.abspath(outdir)} (written to {os.path.basename(work)} until complete)",
          flush=True)
    with open(os.path.join(work, "config.json"), "w") as f:
        json.dump(_config_json(config), f, indent=2)
    cost = estimate_cost(job, frozenset(done))
    print(f"estimated cost: {cost['passes']:,} network passes x {1e3 * cost['seconds_per_pass']:.2f} ms (measured) = "
          f"{cost['seconds'] / 60:.1f} min, {cost['cpu_core_hours']:.2f} CPU core-hours "
          f"({jax.default_backend()}), plus compilation", flush=True)

    keys = dj.keys_from_seeds(job.seeds)
    fd_name = "FID" if config.features == "inception" else "FD"
    common = dict(n=config.n, seed=config.seed, steps=job.schedule.num_steps, T=config.T, noise=config.noise,
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
                      noise=config.noise)
        record(dict(method="none", scale=0.0, mean_lambda=0.0, sample_seconds=time.time() - t0, key="none_0",
                    **common), x, {})
        bar.update(1)
    removed_mask = np.isin(rows["none_0"]["labels"], removed_classes(config)) if "none_0" in rows else None

    for m, rule, hyper, scales in job.methods:
        name = method_key(m)
        todo = [k for k in range(len(scales)) if f"{name}_{k}" not in rows]
        if not todo:
            continue
        t0 = time.time()
        x, trace, chunks = sweep_in_chunks(job, work, name, rule, [scales[k] for k in todo])
        dt = time.time() - t0
        reduced = plots.reduce_trace(trace, [scales[k] for k in todo], removed_mask)
        for j, k in enumerate(todo):
            part = {key: (v[j] if key not in ("t", "scales") and v is not None else v)
                    for key, v in reduced.items()}
            part["scales"] = np.asarray(scales[k])
            record(dict(method=m, scale=scales[k], mean_lambda=float(np.mean(trace.lam[j])),
                        sample_seconds=dt / len(todo), key=f"{name}_{k}", **common, **hyper), x[j], part)
            bar.update(1)
        bar.set_postfix_str(f"{m} done in {dt:.0f}s")
        shutil.rmtree(chunks)                         # its points are saved now
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
    if all(r.get("features") is not None for r in rows):     # for paired comparisons (sample/report.py)
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
               f"{job.schedule.num_steps}-step chain (T = {config.T}), noise {config.noise!r}, {len(rows)} points, "
               f"{jax.device_count()} {jax.default_backend()} device(s), {wall:.0f} s this run "
               f"({sum(r.get('sample_seconds', 0.0) for r in rows):.0f} s of sampling in all, resumed runs "
               f"included)\nmodels: {job.models}\n"
               f"{table}\n"
               f"{fd_name}: {job.space}. Lower is better everywhere; high safety: <= {config.high_safety:g}%."
               + (f" +-: bootstrap standard error ({config.bootstrap} resamples)." if config.bootstrap >= 2 else ""))
    with open(os.path.join(work, "summary.txt"), "w") as f:
        f.write(summary + "\n")
    if os.path.isdir(outdir) and (not os.listdir(outdir) or _is_previous_run(outdir)):
        shutil.rmtree(outdir)                         # an earlier run into the same folder: replaced
    os.makedirs(os.path.dirname(os.path.abspath(outdir)), exist_ok=True)
    os.replace(work, outdir)
    print(summary)
    print(f"results in {os.path.abspath(outdir)}", flush=True)
    return outdir
