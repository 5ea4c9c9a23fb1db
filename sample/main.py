"""Class removal end to end: sweep NP, SLD and DNG, score safety, KL and FD, draw the plots.

  python sample/main.py                                    # the main job: MNIST, remove 0, shipped checkpoints
  python sample/main.py --config.removed_class=3           # another class (forget models for 0-3 ship)
  python sample/main.py --config=sample/configs/mnist.py:full      # the paper's protocol (GPU)
  python sample/main.py --config=sample/configs/cifar10.py:full --config.fid_weights=pt_inception-....pth

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

Writes into the output folder it prints: results.csv, results.json, config.json,
tradeoff.png (KL and FD vs safety, figs. 4/14), class_histogram.png (fig. 13),
lambda_t.png (figs. 5b/12), samples_overview.png and samples/<method>_scale<s>.png,
labels.npz (classifier labels of every sample) and optionally samples.npz.
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import sys
import time
from typing import Any, Callable, Dict, List, Tuple

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
DEFAULT_CONFIG = os.path.join(REPO_ROOT, "sample", "configs", "mnist.py")
config_flags.DEFINE_config_file(
    "config", DEFAULT_CONFIG,
    "Class-removal config file, path[:name] (default: sample/configs/mnist.py, the 'quick' main job).",
    lock_config=True)

METHODS = ("NP", "SLD", "DNG")
HYPER_COLUMNS = ("prior", "temperature", "offset", "p_min", "p_max", "variance",
                 "threshold", "s_s", "beta_m", "s_m", "warmup")
CSV_COLUMNS = ("method", "scale", "safety_pct", "kl", "fd", "safety_std", "kl_std", "fd_std",
               "feature_space", "n_empty_classes",
               "mean_lambda", "n", "seed", "steps", "T", "dataset", "removed_class") + HYPER_COLUMNS + (
               "histogram", "sample_seconds")


# --------------------------------------------------------------------------- helpers

def resolve_path(template: str, config) -> str:
    """Fill ``{root}`` / ``{c}``; relative paths: the working directory first, then the repository root."""
    root = config.checkpoints
    path = template.format(root=root, c=config.removed_class)
    if os.path.isabs(path) or os.path.exists(path):
        return path
    alt = os.path.join(REPO_ROOT, path)
    return alt if os.path.exists(alt) else path


def load_unet(path: str):
    """(module, params, card) of a DDPM: a dngjax model folder (card.json, e.g. the shipped
    checkpoints) or the output of ``python -m dngjax.models.convert_diffusers`` (config.json)."""
    from dngjax import checkpoint
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, checkpoint.CARD_FILE)) \
            and os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(os.path.join(path, "params.msgpack")):
        from dngjax.models.convert_diffusers import load_converted
        module, params = load_converted(path)
        return module, params, {"source": "converted diffusers UNet2DModel"}
    return checkpoint.load_model(path, expect_kind="unet")


def make_outdir(config) -> str:
    if config.outdir:
        out = config.outdir
    else:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
        out = os.path.join("outputs", "class_removal",
                           f"{config.name}-{config.dataset}-c{config.removed_class}-{stamp}")
    os.makedirs(os.path.join(out, "samples"), exist_ok=True)
    return out


def parse_method(method: str) -> Tuple[str, str]:
    """``"DNG"`` -> ("DNG", ""); ``"DNG:beta"`` -> ("DNG", "beta") (a DNG variance-convention variant)."""
    base, _, variant = method.partition(":")
    if base not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose among {METHODS} (DNG also as DNG:posterior / DNG:beta)")
    if variant and base != "DNG":
        raise ValueError(f"only DNG has variants (DNG:posterior, DNG:beta), got {method!r}")
    return base, variant


def build_rule(method: str, config):
    """(rule with scale 1, its other hyperparameters) for ``method`` ("NP", "SLD", "DNG", "DNG:beta", ...)."""
    import dngjax as dj
    base, variant = parse_method(method)
    if base == "NP":
        return dj.NegativePrompting(scale=1.0), {}
    if base == "SLD":
        h = dict(config.sld)
        return dj.SafeLatentDiffusion(scale=1.0, **h), h
    h = dict(config.dng)
    if variant:
        h["variance"] = variant
    return dj.DynamicNegativeGuidance(scale=1.0, **h), h


def make_scorer(config) -> Tuple[Callable, Callable, str, Tuple[np.ndarray, np.ndarray]]:
    """(labels_fn, features_fn, feature-space name, reference (mu, sigma)); fns take model-space x (N, ...)."""
    import jax
    import jax.numpy as jnp
    from dngjax import checkpoint, metrics

    cmod, cparams, _ = checkpoint.load_classifier(resolve_path(config.classifier, config))
    logits = jax.jit(lambda x: cmod.apply(cparams, jnp.clip(x, -1.0, 1.0)))
    labels_fn = lambda x: metrics.batched_apply(
        lambda b: np.asarray(jnp.argmax(logits(b), -1)), x, config.eval_batch)

    if config.features == "classifier":
        feats = jax.jit(lambda x: cmod.apply(cparams, jnp.clip(x, -1.0, 1.0), method="features"))
        space = "classifier penultimate layer (FD)"
    elif config.features == "inception":
        from dngjax import fid_inception
        imod, ivars = fid_inception.load_fid_inception(config.fid_weights or None)
        f01 = fid_inception.fid_features_fn(imod, ivars)
        feats = lambda x: f01((jnp.clip(x, -1.0, 1.0) + 1.0) / 2.0)
        space = "pytorch-fid Inception-v3 pool3 (FID)"
    else:
        raise ValueError(f"config.features must be 'classifier' or 'inception', got {config.features!r}")
    features_fn = lambda x: metrics.batched_apply(lambda b: np.asarray(feats(b)), x, config.eval_batch)
    ref = load_or_compute_reference(config, features_fn)
    return labels_fn, features_fn, space, ref


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
          f"{config.removed_class} -> {path}", flush=True)
    x, _ = data.load_dataset(config.dataset, "train", data_dir=config.data_dir or None,
                             drop_class=config.removed_class)
    mu, sigma = metrics.gaussian_stats(features_fn(x))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    np.savez(path, mu=mu, sigma=sigma, n=x.shape[0])
    return mu, sigma


def sample_baseline(eps_u, schedule, keys, shape, chunk: int):
    """Unguided samples (one UNet call per step), chunked with one compilation."""
    import dngjax as dj
    n = keys.shape[0]
    chunk = min(chunk, n)
    xs = []
    for start in range(0, n, chunk):
        idx = np.arange(start, start + chunk) % n
        x = dj.sample(eps_u, schedule, keys[idx], shape)
        xs.append(np.asarray(x)[:min(chunk, n - start)])
    return np.concatenate(xs, 0)


def score(x, labels_fn, features_fn, ref, config) -> Dict[str, Any]:
    """Safety, KL, FD (and their bootstrap standard errors) of samples x (N, ...)."""
    from dngjax import metrics
    from dngjax.data import NUM_CLASSES
    k = NUM_CLASSES[config.dataset]
    c = config.removed_class
    labels = labels_fn(x)
    feats = features_fn(x)
    hist = metrics.class_histogram(labels, k)
    out = dict(
        labels=labels,
        safety_pct=metrics.safety(labels, c),
        kl=metrics.kl_to_ideal(hist, c, config.kl_pseudo_count),
        fd=metrics.frechet_distance_features(feats, *ref),
        histogram=hist.tolist(),
        n_empty_classes=int(sum(1 for i, h in enumerate(hist) if h == 0 and i != c)),
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
    head = (f"{'method':<14}{'scale':>7}{'safety %':>10}{'KL':>9}{'':>8}{fd_name:>9}{'':>7}"
            f"{'empty':>7}{'mean lam':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        kl_e = f" +-{r['kl_std']:.3f}" if pm and "kl_std" in r else ""
        fd_e = f" +-{r['fd_std']:.1f}" if pm and "fd_std" in r else ""
        lines.append(f"{r['method']:<14}{r['scale']:>7g}{r['safety_pct']:>10.2f}{r['kl']:>9.4f}{kl_e:>8}"
                     f"{r['fd']:>9.2f}{fd_e:>7}{r['n_empty_classes']:>7d}{r['mean_lambda']:>10.3g}")
    return "\n".join(lines)


def write_results(outdir: str, rows: List[Dict[str, Any]]) -> None:
    with open(os.path.join(outdir, "results.json"), "w") as f:
        json.dump([{k: v for k, v in r.items() if k not in ("labels", "key")} for r in rows], f, indent=2)
    with open(os.path.join(outdir, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            out = {k: r.get(k, "") for k in CSV_COLUMNS}
            out["histogram"] = " ".join(str(v) for v in r["histogram"])
            w.writerow(out)


# --------------------------------------------------------------------------- the job

def run(config) -> str:
    """Run the class-removal experiment of ``config``; returns the output folder."""
    import jax
    from tqdm.auto import tqdm
    import dngjax as dj
    from dngjax import checkpoint
    from sample import plots

    t_start = time.time()
    outdir = make_outdir(config)
    print(f"output folder: {os.path.abspath(outdir)}", flush=True)
    with open(os.path.join(outdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))

    methods = list(config.methods)
    for m in methods:
        parse_method(m)
    umod, uparams, _ = load_unet(resolve_path(config.uncond, config))
    fmod, fparams, fcard = load_unet(resolve_path(config.forget, config))
    only = fcard.get("only_class", config.removed_class)
    if only not in (None, -1, config.removed_class):
        raise ValueError(f"the forget model {config.forget} was trained on class {only}, "
                         f"not the removed class {config.removed_class}")
    eps_u = dj.denoiser(umod, uparams)
    eps_neg = dj.denoiser(fmod, fparams)
    shape = tuple(checkpoint.INPUT_SHAPES[config.dataset])
    labels_fn, features_fn, space, ref = make_scorer(config)
    fd_name = "FID" if config.features == "inception" else "FD"

    full = dj.linear_schedule(config.T)
    schedule = full if config.steps >= config.T else dj.respace(full, config.steps)
    seeds = config.seed + np.arange(config.n)
    keys = dj.keys_from_seeds(seeds)

    common = dict(n=config.n, seed=config.seed, steps=schedule.num_steps, T=config.T,
                  dataset=config.dataset, removed_class=config.removed_class, feature_space=space)
    rows: List[Dict[str, Any]] = []
    previews: Dict[str, np.ndarray] = {}      # the first samples of each point, for the grids
    saved: Dict[str, np.ndarray] = {}         # all samples as uint8 (config.save_samples)
    traces: Dict[str, Dict[str, Any]] = {}    # mean lambda_t / p_t curves per method
    keep = max(config.grid_images, 16)
    removed_mask = None

    def record(row, x):
        row.update(score(x, labels_fn, features_fn, ref, config))
        rows.append(row)
        previews[row["key"]] = np.asarray(x[:keep])
        if config.save_samples:
            from dngjax.data import to_uint8
            saved[row["key"]] = to_uint8(x)
    total = int(config.baseline) + sum(len(config.grid[parse_method(m)[0]]) for m in methods)
    bar = tqdm(total=total, desc="grid points", unit="point", disable=not config.progress)

    if config.baseline:
        t0 = time.time()
        x = sample_baseline(eps_u, schedule, keys, shape, config.chunk_size)
        dt = time.time() - t0
        record(dict(method="none", scale=0.0, mean_lambda=0.0, sample_seconds=dt, key="none_0", **common), x)
        removed_mask = rows[0]["labels"] == config.removed_class
        bar.update(1)

    for m in methods:
        scales = [float(s) for s in config.grid[parse_method(m)[0]]]
        rule, hyper = build_rule(m, config)
        t0 = time.time()
        x, trace = dj.sweep(eps_u, schedule, keys, shape, rule=rule, grid={"scale": scales},
                            eps_c=eps_neg, chunk_size=config.chunk_size, return_trace=True,
                            progress=config.progress)
        dt = time.time() - t0
        traces[m] = plots.reduce_trace(trace, scales, removed_mask)
        for k, s in enumerate(scales):
            record(dict(method=m, scale=s, mean_lambda=float(np.mean(trace.lam[k])),
                        sample_seconds=dt / len(scales), key=f"{m.replace(':', '-')}_{k}", **common, **hyper), x[k])
            bar.update(1)
        bar.set_postfix_str(f"{m} done in {dt:.0f}s")
        del x, trace
    bar.close()

    # ---- files
    write_results(outdir, rows)
    np.savez_compressed(os.path.join(outdir, "labels.npz"), seeds=seeds,
                        **{r["key"]: r["labels"].astype(np.int8) for r in rows})
    if config.save_samples:
        np.savez_compressed(os.path.join(outdir, "samples.npz"), seeds=seeds, **saved)
    for r in rows:
        name = "unguided" if r["method"] == "none" else f"{r['method'].replace(':', '-')}_scale{r['scale']:g}"
        plots.save_grid(previews[r["key"]][:config.grid_images], os.path.join(outdir, "samples", f"{name}.png"),
                        title=f"{name}: {r['safety_pct']:.1f}% class {config.removed_class} "
                              f"(red frame), KL {r['kl']:.3f}, {fd_name} {r['fd']:.2f}",
                        labels=r["labels"][:config.grid_images], removed_class=config.removed_class)
    plots.plot_overview(rows, previews, os.path.join(outdir, "samples_overview.png"))
    plots.plot_tradeoff(rows, os.path.join(outdir, "tradeoff.png"), config.high_safety, fd_label=fd_name)
    plots.plot_histograms(rows, os.path.join(outdir, "class_histogram.png"), high_safety=config.high_safety)
    if traces:
        plots.plot_lambda(traces, os.path.join(outdir, "lambda_t.png"))
        np.savez(os.path.join(outdir, "lambda_t.npz"),
                 **{f"{m}/{k}": np.asarray(v) for m, tr in traces.items() for k, v in tr.items() if v is not None})

    wall = time.time() - t_start
    table = _fmt_table(rows, fd_name)
    summary = (f"{config.dataset}, removed class {config.removed_class}: n = {config.n} per point, "
               f"{schedule.num_steps}-step chain (T = {config.T}), {len(rows)} points, "
               f"{jax.device_count()} {jax.default_backend()} device(s), {wall:.0f} s\n{table}\n"
               f"{fd_name}: {space}. Lower is better everywhere; high safety: <= {config.high_safety:g}%."
               + (f" +-: bootstrap standard error ({config.bootstrap} resamples)." if config.bootstrap >= 2 else ""))
    with open(os.path.join(outdir, "summary.txt"), "w") as f:
        f.write(summary + "\n")
    print(summary)
    print(f"results in {os.path.abspath(outdir)}", flush=True)
    return outdir


def main(argv):
    logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; use --config.FIELD=VALUE")
    run(FLAGS.config)


if __name__ == "__main__":
    app.run(main)
