"""Does DNG's tracked posterior p_t = p(c- | x_t) recognise the removed class? (diagnostic)

  python sample/posterior_check.py                       # classes 0-3, shipped checkpoints, n=256, 25 steps
  python sample/posterior_check.py --classes=2 --n=512 --variance=posterior

Samples the unconditional model *unguided* (DNG with scale 0: eps = eps_u exactly, while the
posterior is still updated from eps_u and the forget model's eps_c after every step), classifies
the final samples, and compares p_t along the chain between the seeds whose sample is the
removed class and the others: mean p_t in each group and the AUROC of p_t for telling them apart
(0.5 = no information, 1 = perfect). DNG can only steer the trajectories its posterior flags.
Prints a table and writes ``posterior_check.json`` and ``posterior_check.png`` into --out.
"""

from __future__ import annotations

import json
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoints", "checkpoints/mnist", "Folder with ddpm, forget_C and classifier.")
flags.DEFINE_list("classes", ["0", "1", "2", "3"], "Removed classes to check.")
flags.DEFINE_integer("n", 256, "Seeds (samples) per class.")
flags.DEFINE_integer("steps", 25, "Respaced chain length (T = 1000).")
flags.DEFINE_integer("seed", 0, "First seed (the main job's seeds are seed..seed+n-1).")
flags.DEFINE_float("prior", 0.25, "DNG prior p_0 (paper, MNIST: 0.25).")
flags.DEFINE_float("temperature", 0.25, "DNG temperature tau (paper, MNIST: 0.25).")
flags.DEFINE_float("offset", 0.0, "DNG offset delta (paper, MNIST: 0).")
flags.DEFINE_enum("variance", "beta", ["beta", "posterior"], "DNG variance convention.")
flags.DEFINE_string("out", "outputs/posterior_check", "Output folder.")


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for ``positive`` (Mann-Whitney U, ties count 1/2)."""
    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def check_class(c: int, eps_u, classify, schedule, keys):
    import dngjax as dj
    from dngjax import checkpoint

    eps_c = checkpoint.load_denoiser(os.path.join(FLAGS.checkpoints, f"forget_{c}"))
    rule = dj.DynamicNegativeGuidance(scale=0.0, prior=FLAGS.prior, temperature=FLAGS.temperature,
                                      offset=FLAGS.offset, variance=FLAGS.variance)
    x, trace = dj.sample(eps_u, schedule, keys, (28, 28, 1), rule=rule, eps_c=eps_c, return_trace=True)
    labels = classify(np.asarray(x))
    is_c = labels == c
    p = np.asarray(trace.p)                                  # (S, N), sampling order
    t = np.asarray(trace.t)
    return dict(removed_class=c, n=int(len(labels)), n_removed_class=int(is_c.sum()), t=t.tolist(),
                mean_p_removed=np.nanmean(p[:, is_c], axis=1).tolist() if is_c.any() else None,
                mean_p_other=np.nanmean(p[:, ~is_c], axis=1).tolist(),
                auroc=[auroc(p[s], is_c) for s in range(len(t))])


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import dngjax as dj
    from dngjax import checkpoint

    eps_u = checkpoint.load_denoiser(os.path.join(FLAGS.checkpoints, "ddpm"))
    cmod, cparams, _ = checkpoint.load_classifier(os.path.join(FLAGS.checkpoints, "classifier"))
    logits = jax.jit(lambda x: cmod.apply(cparams, jnp.clip(x, -1.0, 1.0)))
    classify = lambda x: np.concatenate([np.asarray(jnp.argmax(logits(x[i:i + 512]), -1))
                                         for i in range(0, len(x), 512)])
    schedule = dj.respace(dj.linear_schedule(), FLAGS.steps)
    keys = dj.keys_from_seeds(FLAGS.seed + np.arange(FLAGS.n))
    results = []
    for c in [int(c) for c in FLAGS.classes]:
        r = check_class(c, eps_u, classify, schedule, keys)
        results.append(r)
        S = len(r["t"])
        picks = sorted({0, S // 4, S // 2, (3 * S) // 4, S - 1})
        print(f"\nremoved class {c}: {r['n_removed_class']} of {r['n']} unguided samples are class {c} "
              f"(DNG posterior tracked with scale 0, variance={FLAGS.variance})")
        print("   t   mean p_t (class c)   mean p_t (others)   AUROC")
        for s in picks:
            pr = r["mean_p_removed"][s] if r["mean_p_removed"] else float("nan")
            print(f"{r['t'][s]:4d}   {pr:18.3f}   {r['mean_p_other'][s]:17.3f}   {r['auroc'][s]:5.2f}")
    os.makedirs(FLAGS.out, exist_ok=True)
    cfg = dict(n=FLAGS.n, steps=FLAGS.steps, seed=FLAGS.seed, prior=FLAGS.prior, temperature=FLAGS.temperature,
               offset=FLAGS.offset, variance=FLAGS.variance, checkpoints=FLAGS.checkpoints)
    with open(os.path.join(FLAGS.out, "posterior_check.json"), "w") as f:
        json.dump(dict(config=cfg, results=results), f, indent=1)
    plot(results, os.path.join(FLAGS.out, "posterior_check.png"))
    print(f"\nwrote {FLAGS.out}/posterior_check.json and posterior_check.png")


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


if __name__ == "__main__":
    app.run(main)
