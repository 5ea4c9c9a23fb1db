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
(:func:`dngjax.tools.sample.scoring.score_labels`; the reports leave it out of their verdicts).

With ``config.conditional`` set to a class-conditional model folder, one network gives both
predictions instead: eps_u = eps(x | null label), eps_c = eps(x | removed class).

Writes into the output folder it prints (built under ``<folder>.partial`` and renamed when
complete, so a failed run leaves no half-made folder): results.csv, results.json, config.json (the config,
``inputs``: path and sha256 of every model and reference file read, ``environment``: package versions and
git commit; :func:`dngjax.tools.sample.run_store.identity`),
tradeoff.png (KL and FD vs safety, figs. 4/14), class_histogram.png (fig. 13),
lambda_t.png (figs. 5b/12), samples_overview.png and samples/<method>_scale<s>.png,
labels.npz (classifier labels of every sample), features.npz and reference.npz (each sample's scoring
features and the reference statistics, for paired comparisons between points) and optionally samples.npz.

Several processes (:mod:`dngjax.distributed`, docs/multihost.md) run the same job together: each sweep's
seeds are sharded over every process's devices and every process gets the whole sweep back; process 0
alone writes the folder (points, chunks, files), the others read its finished points and chunks to resume
the same way (the folder must be on a file system every process sees).
"""


from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
import time
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
from dngjax import distributed
from dngjax.tools.sample.inputs import check_model_root, load_denoisers, make_scorer, training_chain
from dngjax.tools.sample.methods import build_methods, class_tag, method_key, parse_method, removed_classes
from dngjax.tools.sample.run_store import publish, reusable_points, save_point, check_folders, input_files, move_aside, partial_dir, provenance_text, run_record
from dngjax.tools.sample.scoring import NONFINITE_NOTE, format_table, score, write_results


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
    if config.noise not in ("beta", "beta_tilde", "posterior"):     # "posterior": the older "beta_tilde"
        raise ValueError(f"config.noise must be 'beta' or 'beta_tilde', got {config.noise!r}")
    from dngjax.sampler import SOLVERS
    if config.solver not in SOLVERS:
        raise ValueError(f"config.solver must be one of {SOLVERS}, got {config.solver!r}")
    if config.solver not in ("ddpm",) and config.noise != "beta":
        raise ValueError(f"config.noise={config.noise!r} sets the ancestral step's variance; "
                         f"config.solver={config.solver!r} takes none: leave config.noise at 'beta'")
    check_model_root(config)


def choose_outdir(config) -> str:
    if config.outdir:
        return config.outdir.replace("{c}", class_tag(config))
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return os.path.join("outputs", "class_removal", f"{config.name}-{config.dataset}-c{class_tag(config)}-{stamp}")


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
    full = training_chain(config)
    schedule = full if config.steps >= config.T else dj.respace(full, config.steps)
    seeds = config.seed + np.arange(config.n)
    dj.keys_from_seeds(seeds)                         # seeds in range
    return Job(config, denoiser_u, denoiser_c, models, methods, labels_fn, scores_fn, space, ref, schedule,
               seeds, tuple(SHAPES[config.dataset]), outdir, run_record(config, files), aside)


def run(config) -> str:
    """Run the class-removal experiment of ``config``; returns the output folder."""
    return execute(prepare(config))


def sweep_in_chunks(job: Job, work: str, name: str, rule, scales: List[float]):
    """``dj.sweep`` of ``rule`` over ``scales`` and the job's seeds, chunk by chunk, every finished chunk
    kept in ``<work>/chunks/<name>_<scales>/`` so that an interrupted method resumes at its first
    unfinished chunk (each seed's sample depends on its key only, not on its chunk).

    Returns (x (K, N, ...), :class:`dngjax.Trace` with lam and p (K, S, N), the chunk folder).
    """
    import dngjax as dj
    config = job.config
    main = distributed.is_main_process()
    folder = os.path.join(work, "chunks", name + "_" + "_".join(f"{s:g}" for s in scales))
    if main:
        os.makedirs(folder, exist_ok=True)
    n = len(job.seeds)
    parts, done = [], np.zeros(n, bool)
    for f in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if f.endswith(".npz") and not f.endswith(".tmp.npz"):
            with np.load(os.path.join(folder, f)) as z:
                parts.append({k: z[k] for k in ("idx", "x", "lam", "p", "t")})
            done[parts[-1]["idx"]] = True
    distributed.barrier("class_removal:chunks_read")       # every process resumes from the same chunks
    todo = np.flatnonzero(~done)
    if len(parts) and len(todo) and main:
        print(f"{name}: resuming at seed index {todo[0]} ({done.sum()} of {n} seeds done)", flush=True)
    if len(todo):
        chunks = dj.sample_chunks(job.denoiser_u, job.schedule, dj.keys_from_seeds(job.seeds[todo]), job.shape,
                                  rule=rule, grid={"scale": list(scales)}, denoiser_c=job.denoiser_c,
                                  chunk_size=config.chunk_size, return_trace=True, noise=config.noise,
                                  solver=config.solver,
                                  progress=config.progress and main)
        for ch in chunks:
            part = {"idx": todo[ch.start:ch.start + ch.x.shape[1]], "x": ch.x, "lam": ch.trace.lam,
                    "p": ch.trace.p, "t": ch.trace.t}
            if main:
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
    hyperparameters, scoring) and the sha256 of every model and reference file (:func:`.run_store.identity`).
    A folder of another identity was refused by :func:`prepare`; with ``config.overwrite`` it is moved
    aside here (``<folder>.old-<UTC time>``). Finished work is never deleted.
    """
    t_start = time.time()
    work, done = open_run(job)
    points = sample_points(job, work, done)
    if not distributed.is_main_process():          # several processes: process 0 writes the run folder
        distributed.barrier("class_removal:published")
        return job.outdir
    rows, traces = in_config_order(job, points)
    write_run_files(job, work, rows, points, traces)
    summary = summary_text(job, rows, time.time() - t_start)
    with open(os.path.join(work, "summary.txt"), "w") as f:
        f.write(summary + "\n")
    publish(work, job.outdir, job.record)
    print(summary)
    print(f"results in {os.path.abspath(job.outdir)}", flush=True)
    distributed.barrier("class_removal:published")
    return job.outdir


def open_run(job: Job) -> Tuple[str, Dict[str, Any]]:
    """The run's working folder (``<outdir>.partial``) with its config.json, another run's folder moved
    aside (``config.overwrite``), and the points it can reuse; prints the estimated cost of the rest."""
    import jax
    work = partial_dir(job.outdir)
    main = distributed.is_main_process()     # several processes: process 0 prepares and writes the folder,
    if main:                                 # the others read its finished points once it has
        for folder in job.move_aside:
            if os.path.isdir(folder):
                print(f"moved {folder} aside to {move_aside(folder)} (config.overwrite: another run's points, kept)",
                      flush=True)
        done = reusable_points(job, work, job.outdir)
    distributed.barrier("class_removal:open")
    if not main:
        done = reusable_points(job, work, job.outdir, read_only=True)
    distributed.barrier("class_removal:points_read")
    if main:
        os.makedirs(os.path.join(work, "samples"), exist_ok=True)
        print(f"output folder: {os.path.abspath(job.outdir)} (written to {os.path.basename(work)} until complete)",
              flush=True)
        with open(os.path.join(work, "config.json.tmp"), "w") as f:     # atomic: a kill leaves the old one
            json.dump(job.record, f, indent=2)
        os.replace(os.path.join(work, "config.json.tmp"), os.path.join(work, "config.json"))
    cost = estimate_cost(job, frozenset(done))
    if main:
        print(f"estimated cost: {cost['passes']:,} network passes x {1e3 * cost['seconds_per_pass']:.2f} ms (measured) = "
              f"{cost['seconds'] / 60:.1f} min, {cost['cpu_core_hours']:.2f} CPU core-hours "
              f"({jax.default_backend()}), plus compilation", flush=True)
    return work, done


def _fd_name(config) -> str:
    return "FID" if config.features == "inception" else "FD"


@dataclasses.dataclass
class Points:
    """Every grid point of a run, by key (``none_0``, ``DNG_3``, ...): its row of scores, its first samples
    (for the grids), its mean lambda_t / p_t curves and, with ``config.save_samples``, all its samples."""
    rows: Dict[str, Dict[str, Any]] = dataclasses.field(default_factory=dict)
    previews: Dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    curves: Dict[str, Dict[str, Any]] = dataclasses.field(default_factory=dict)
    samples: Dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def add(self, row, preview, curves, samples) -> None:
        self.rows[row["key"]] = row
        self.previews[row["key"]] = preview
        self.curves[row["key"]] = curves
        if samples is not None:
            self.samples[row["key"]] = samples


def _point_fields(job: Job) -> Dict[str, Any]:
    """The fields every point's row of this run shares (chain, seeds, data set, scoring, models)."""
    config = job.config
    return dict(n=config.n, seed=config.seed, steps=job.schedule.num_steps, T=config.T, noise=config.noise,
                solver=config.solver,
                dataset=config.dataset, removed_class=config.removed_class, removed_classes=class_tag(config),
                feature_space=job.space,
                models=job.models)


def _recorder(job: Job, work: str, points: "Points"):
    """record(row, x, curves): score a finished point's samples x, save it (process 0) and add it to ``points``."""
    from dngjax.data import to_uint8

    config = job.config
    main = distributed.is_main_process()
    keep = max(config.grid_images, 16)

    def record(row, x, curves):
        row.update(score(x, job.scores_fn, job.ref, config))
        if row["nonfinite"]:
            print(f"warning: {row['method']} at scale {row['scale']:g}: {row['nonfinite']} of {len(row['labels'])} "
                  "samples are non-finite (NaN or inf): counted as the removed class in safety %, left out of KL "
                  f"and {_fd_name(config)}; the point is marked invalid", flush=True)
        samples = to_uint8(x) if config.save_samples else None
        if main:
            save_point(work, row, np.asarray(x[:keep]), curves, samples)
        points.add(row, np.asarray(x[:keep]), curves, samples)

    return record


def sample_points(job: Job, work: str, done: Dict[str, Any]) -> Points:
    """The reused points, then every other point sampled (one chunked sweep per method and run of
    scales), scored and saved as it finishes (:func:`save_point`)."""
    from tqdm.auto import tqdm
    import dngjax as dj
    from dngjax.tools.sample import plots

    config = job.config
    main = distributed.is_main_process()
    keys = dj.keys_from_seeds(job.seeds)
    common = _point_fields(job)
    points = Points()
    record = _recorder(job, work, points)

    for row, preview, curves, samples in done.values():
        points.add(row, preview, curves, samples)
    total = int(config.baseline) + sum(len(scales) for _, _, _, scales in job.methods)
    bar = tqdm(total=total, initial=len(done), desc="grid points", unit="point", disable=not (config.progress and main))

    if config.baseline and "none_0" not in points.rows:
        t0 = time.time()
        x = dj.sample(job.denoiser_u, job.schedule, keys, job.shape, chunk_size=config.chunk_size,
                      noise=config.noise, solver=config.solver)
        record(dict(method="none", scale=0.0, mean_lambda=0.0, sample_seconds=time.time() - t0, key="none_0",
                    **common), x, {})
        bar.update(1)
    rows = points.rows
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
                curves = {key: (v[j] if key not in ("t", "scales") and v is not None else v)
                          for key, v in reduced.items()}
                curves["scales"] = np.asarray(scales[k])
                record(dict(method=m, scale=scales[k], mean_lambda=float(np.mean(trace.lam[j])),
                            sample_seconds=dt / len(sweep_scales), key=f"{name}_{k}",
                            swept_with=[float(v) for v in sweep_scales], **common, **hyper), x[j], curves)
                bar.update(1)
            bar.set_postfix_str(f"{m} done in {dt:.0f}s")
            if main:
                shutil.rmtree(chunks)                 # its points are saved now
            del x, trace
    bar.close()
    if main:
        shutil.rmtree(os.path.join(work, "chunks"), ignore_errors=True)     # chunks of grids no longer asked for
    return points


def in_config_order(job: Job, points: Points) -> Tuple[List[Dict[str, Any]], Dict[str, Dict[str, Any]]]:
    """Every point's row in config order, and each method's lambda_t / p_t curves stacked over its scales."""
    config = job.config
    order = (["none_0"] if config.baseline else []) + [f"{method_key(m)}_{k}"
                                                        for m, _, _, scales in job.methods
                                                        for k in range(len(scales))]
    rows = [points.rows[k] for k in order]
    traces: Dict[str, Dict[str, Any]] = {}
    for m, _, _, scales in job.methods:
        ps = [points.curves[f"{method_key(m)}_{k}"] for k in range(len(scales))]
        traces[m] = {"t": ps[0]["t"], "scales": np.asarray([float(p["scales"]) for p in ps])}
        for key in ("lam_all", "lam_removed", "lam_other", "p_all", "p_removed", "p_other"):
            have = [p.get(key) for p in ps]
            traces[m][key] = np.stack(have) if all(h is not None for h in have) else None
    return rows, traces


def write_run_files(job: Job, work: str, rows: List[Dict[str, Any]], points: Points,
                    traces: Dict[str, Dict[str, Any]]) -> None:
    """results.csv / .json, labels.npz, features.npz + reference.npz, samples.npz (``config.save_samples``),
    the sample grids and the plots, into the working folder."""
    from dngjax.tools.sample import plots
    config = job.config
    fd_name = _fd_name(config)
    write_results(work, rows)
    np.savez_compressed(os.path.join(work, "labels.npz"), seeds=job.seeds,
                        **{r["key"]: r["labels"].astype(np.int8) for r in rows})
    if all(r.get("features") is not None for r in rows):     # for paired comparisons (report.py)
        np.savez_compressed(os.path.join(work, "features.npz"), seeds=job.seeds, **{r["key"]: r["features"] for r in rows})
        np.savez(os.path.join(work, "reference.npz"), mu=job.ref[0], sigma=job.ref[1])
    if config.save_samples:
        np.savez_compressed(os.path.join(work, "samples.npz"), seeds=job.seeds, **points.samples)
    for r in rows:
        name = "unguided" if r["method"] == "none" else f"{method_key(r['method'])}_scale{r['scale']:g}"
        plots.save_grid(points.previews[r["key"]][:config.grid_images], os.path.join(work, "samples", f"{name}.png"),
                        title=f"{name}: {r['safety_pct']:.1f}% class {class_tag(config)} "
                              f"(red frame), KL {r['kl']:.3f}, {fd_name} {r['fd']:.2f}",
                        labels=r["labels"][:config.grid_images], removed_class=removed_classes(config))
    plots.plot_overview(rows, points.previews, os.path.join(work, "samples_overview.png"))
    plots.plot_tradeoff(rows, os.path.join(work, "tradeoff.png"), config.high_safety, fd_label=fd_name)
    plots.plot_histograms(rows, os.path.join(work, "class_histogram.png"), high_safety=config.high_safety)
    if traces:
        plots.plot_lambda(traces, os.path.join(work, "lambda_t.png"))
        np.savez(os.path.join(work, "lambda_t.npz"),
                 **{f"{m}/{k}": np.asarray(v) for m, tr in traces.items() for k, v in tr.items() if v is not None})


def summary_text(job: Job, rows: List[Dict[str, Any]], wall: float) -> str:
    """summary.txt: the setting, the models, the provenance and the results table."""
    import jax
    config = job.config
    fd_name = _fd_name(config)
    return (f"{config.dataset}, removed class {class_tag(config)}: n = {config.n} per point, "
            f"{job.schedule.num_steps}-step chain (T = {config.T}), solver {config.solver}, "
            f"noise {config.noise!r}, {len(rows)} points, "
            f"{jax.device_count()} {jax.default_backend()} device(s), {wall:.0f} s this run "
            f"({sum(r.get('sample_seconds', 0.0) for r in rows):.0f} s of sampling in all, resumed runs "
            f"included)\nmodels: {job.models}\n"
            f"{provenance_text(job.record)}\n"
            f"{format_table(rows, fd_name)}\n"
            f"{fd_name}: {job.space}. Lower is better everywhere; high safety: <= {config.high_safety:g}%."
            + (f" +-: bootstrap standard error ({config.bootstrap} resamples)." if config.bootstrap >= 2 else "")
            + "\n" + NONFINITE_NOTE.format(fd=fd_name))
