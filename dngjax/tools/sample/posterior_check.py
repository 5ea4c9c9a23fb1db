"""Does DNG's tracked posterior p_t = p(c- | x_t) recognise the removed class? (diagnostic)

  python sample/main.py --job=posterior_check --classes=0,1,2,3        # the main job's config
  python sample/main.py --job=posterior_check --config=sample/configs/mnist.py:report --config.n=512

Takes the class-removal config (models, chain, noise, seeds, DNG's hyperparameters), samples the
unguided model (DNG with scale 0: eps = eps_u exactly, while the posterior is still updated from
eps_u and the second prediction eps_c after every step), classifies the final samples, and compares
p_t along the chain between the seeds whose sample is the removed class and the others: mean p_t in
each group and the AUROC of p_t for telling them apart (0.5 = no information, 1 = perfect). DNG can
only steer the trajectories its posterior flags. Prints a table and writes
``posterior_check.json`` and ``posterior_check.png`` into the output folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, List

import numpy as np


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for ``positive`` (Mann-Whitney U, ties count 1/2)."""
    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


@dataclasses.dataclass
class Job:
    config: Any
    classes: List[int]
    out: str
    labels_fn: Any
    denoisers: List[Any]       # per class: (denoiser_u, denoiser_c, description)
    rule: Any
    schedule: Any


def prepare(config, classes, out: str) -> Job:
    """Validate the config and classes and load the models, before any sampling."""
    import dngjax as dj
    from dngjax import checkpoint, evaluation
    from dngjax.tools.sample import class_removal
    from dngjax.tools.sample import inputs

    class_removal.validate_config(config)
    if not classes:
        raise ValueError("no classes to check")
    if config.also_remove:
        raise ValueError("the posterior check tracks one class at a time: --classes=0,2 instead of config.also_remove")
    denoisers = []
    for c in classes:
        cfg = config.copy_and_resolve_references()
        with cfg.unlocked():
            cfg.removed_class = int(c)
        class_removal.validate_config(cfg)
        denoisers.append(inputs.load_denoisers(cfg))
    rule = dj.DynamicNegativeGuidance(scale=0.0, **dict(config.dng))
    cmod, cparams, _ = checkpoint.load_classifier(inputs.resolve_path(config.classifier, config))
    scorer = evaluation.make_scorer(cmod, cparams, batch_size=config.eval_batch)
    full = inputs.training_chain(config)
    schedule = full if config.steps >= config.T else dj.respace(full, config.steps)
    return Job(config, [int(c) for c in classes], out, lambda x: scorer(x).labels, denoisers, rule, schedule)


def check_class(c: int, denoiser_u, denoiser_c, job: Job):
    import dngjax as dj
    from dngjax.data import SHAPES
    config = job.config
    keys = dj.keys_from_seeds(config.seed + np.arange(config.n))
    x, trace = dj.sample(denoiser_u, job.schedule, keys, tuple(SHAPES[config.dataset]),
                         rule=job.rule, denoiser_c=denoiser_c, return_trace=True, noise=config.noise,
                         solver=config.solver,
                         chunk_size=config.chunk_size)
    labels = job.labels_fn(np.asarray(x))
    is_c = labels == c
    p = np.asarray(trace.p)                                  # (S, N), sampling order
    t = np.asarray(trace.t)
    return dict(removed_class=c, n=int(len(labels)), n_removed_class=int(is_c.sum()),
                n_nonfinite=int((np.asarray(labels) < 0).sum()), t=t.tolist(),
                mean_p_removed=np.nanmean(p[:, is_c], axis=1).tolist() if is_c.any() else None,
                mean_p_other=np.nanmean(p[:, ~is_c], axis=1).tolist(),
                auroc=[auroc(p[s], is_c) for s in range(len(t))])


def execute(job: Job) -> str:
    config = job.config
    results = []
    for c, (denoiser_u, denoiser_c, models) in zip(job.classes, job.denoisers):
        r = check_class(c, denoiser_u, denoiser_c, job)
        r["models"] = models
        results.append(r)
        S = len(r["t"])
        picks = sorted({0, S // 4, S // 2, (3 * S) // 4, S - 1})
        est = config.dng.get("estimator", "paper")
        how = (f"update_variance={config.dng.update_variance}" if est == "paper" else f"estimator={est}, "
               f"{config.get('solver') or 'ancestral'} steps, prior {config.dng.prior}")
        print(f"\nremoved class {c}: {r['n_removed_class']} of {r['n']} unguided samples are class {c} "
              f"(DNG posterior tracked with scale 0, {how}; {models})")
        print("   t   mean p_t (class c)   mean p_t (others)   AUROC")
        for s in picks:
            pr = r["mean_p_removed"][s] if r["mean_p_removed"] else float("nan")
            print(f"{r['t'][s]:4d}   {pr:18.3f}   {r['mean_p_other'][s]:17.3f}   {r['auroc'][s]:5.2f}")
    os.makedirs(job.out, exist_ok=True)
    cfg = dict(n=config.n, steps=config.steps, T=config.T, seed=config.seed, noise=config.noise, solver=config.solver,
               dng=dict(config.dng), checkpoints=config.checkpoints, conditional=config.conditional)
    with open(os.path.join(job.out, "posterior_check.json"), "w") as f:
        json.dump(dict(config=cfg, results=results), f, indent=1)
    plot(results, os.path.join(job.out, "posterior_check.png"))
    print(f"\nwrote {job.out}/posterior_check.json and posterior_check.png")
    return job.out


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for i, r in enumerate(results):
        col = f"C{i}"
        t = np.asarray(r["t"])
        if r["mean_p_removed"]:
            axes[0].plot(t, r["mean_p_removed"], "--", color=col, label=f"class {r['removed_class']}: samples of it")
        axes[0].plot(t, r["mean_p_other"], "-", color=col, label=f"class {r['removed_class']}: other samples")
        axes[1].plot(t, r["auroc"], "-o", ms=3, color=col, label=f"removed class {r['removed_class']}")
    axes[0].set_ylabel("mean p_t = p(c- | x_t)")
    axes[1].set_ylabel("AUROC of p_t (removed class vs others)")
    axes[1].axhline(0.5, color="gray", lw=0.8)
    for ax in axes:
        ax.set_xlabel("diffusion timestep t (sampling goes left to right)")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"DNG posterior along unguided trajectories (n = {results[0]['n']} per class)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
