"""Text-to-image negative guidance on Stable Diffusion, with the paper's Q metric (``--job=text_to_image``).

  python sample/main.py --job=text_to_image --config=sample/configs/sd.py:paper \\
      --config.folder=PATH/stable-diffusion-2-base --config.clip=PATH/clip-vit-large-patch14

For every prompt of the config's table, on the same seeds: the unguided images (classifier-free
guidance toward the prompt), then each method (NP, DNG, optionally SLD) in the positive-prompt mode
away from the related and from the unrelated negative prompt, at the table's scale. Writes into the
output folder it prints:

* ``samples_<row>.png``: the first seeds, one row per setting (unguided, each method x negative);
* ``lambda_<row>.png``: DNG's mean lambda_t and p_t over the chain, related vs unrelated negative
  (the paper's figs. 5 and 12);
* with ``config.clip``: ``q_table.md`` and Q per prompt and method in ``results.json``
  (:mod:`dngjax.q_metric`);
* ``images.npz`` (all images, uint8), ``config.json``.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import time
from typing import Any, Dict, List

import numpy as np

RULES = {"NP": "PositiveNegativePrompting", "DNG": "PositiveDynamicNegativeGuidance",
         "SLD": "PositiveSafeLatentDiffusion"}


@dataclasses.dataclass
class Job:
    config: Any
    pipe: Any
    clip: Any                 # (encoder, params) or None
    rows: List[tuple]
    outdir: str


def validate_config(config) -> None:
    if not config.folder:
        raise ValueError("config.folder is required: a diffusers Stable Diffusion folder "
                         "(--config.folder=PATH; the README says how to download one)")
    if config.n < 1 or config.steps < 2:
        raise ValueError(f"config.n must be >= 1 and config.steps >= 2, got {config.n}, {config.steps}")
    unknown = [m for m in config.methods if m not in RULES]
    if unknown or not config.methods:
        raise ValueError(f"config.methods={tuple(config.methods)}: choose among {sorted(RULES)}")
    if config.dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"config.dtype must be float32, float16 or bfloat16, got {config.dtype!r}")
    prompts = list(config.prompts)
    bad = [r for r in config.rows if not 0 <= int(r) < len(prompts)]
    if bad or not config.rows:
        raise ValueError(f"config.rows={tuple(config.rows)}: indices into the {len(prompts)} prompts of the table")
    for row in prompts:
        if len(row) != 7:
            raise ValueError(f"a prompt row is (prompt, related, unrelated, temperature, offset, NP scale, DNG scale), "
                             f"got {row}")


def prepare(config) -> Job:
    """Validate the config and load the pipeline (and CLIP), before any sampling."""
    import jax.numpy as jnp
    from dngjax import stable_diffusion as sd
    from dngjax.models.clip import load_clip_image

    validate_config(config)
    pipe = sd.load(config.folder, dtype=None if config.dtype == "float32" else getattr(jnp, config.dtype))
    clip = load_clip_image(config.clip) if config.clip else None
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    outdir = config.outdir or os.path.join("outputs", "text_to_image", f"{config.name}-{stamp}")
    return Job(config, pipe, clip, [tuple(config.prompts[int(r)]) for r in config.rows], outdir)


def build_rule(method: str, row: tuple, config):
    import dngjax as dj
    _, _, _, temperature, offset, np_scale, dng_scale = row
    if method == "NP":
        return dj.PositiveNegativePrompting(scale=float(np_scale), cfg_scale=config.cfg_scale)
    if method == "DNG":
        return dj.PositiveDynamicNegativeGuidance(scale=float(dng_scale), cfg_scale=config.cfg_scale,
                                                  temperature=float(temperature), offset=float(offset),
                                                  **dict(config.dng))
    return dj.PositiveSafeLatentDiffusion(cfg_scale=config.cfg_scale, **dict(config.sld))


def estimate_seconds(job: Job) -> Dict[str, float]:
    """Network passes of the job x the measured time of one UNet pass per latent (batch chunk_size)."""
    import jax
    import jax.numpy as jnp
    from dngjax import stable_diffusion as sd
    c, pipe = job.config, job.pipe
    b = min(c.chunk_size, c.n)
    d = sd.text_denoiser(pipe, jnp.zeros((pipe.text_encoder.max_positions, pipe.text_encoder.width)))
    fn = jax.jit(lambda d, x, t: d(x, t))
    x = jnp.zeros((b,) + pipe.latent_shape)
    t = jnp.full((b,), 500, jnp.int32)
    fn(d, x, t).block_until_ready()
    t0 = time.time()
    fn(d, x, t).block_until_ready()
    per_pass = (time.time() - t0) / b
    passes = len(job.rows) * c.n * c.steps * (2 + 2 * 3 * len(c.methods))
    return {"passes": passes, "seconds_per_pass": per_pass, "seconds": passes * per_pass}


def execute(job: Job) -> str:
    import dngjax as dj
    from dngjax import q_metric, stable_diffusion as sd

    c, pipe = job.config, job.pipe
    os.makedirs(job.outdir, exist_ok=True)
    with open(os.path.join(job.outdir, "config.json"), "w") as f:
        f.write(c.to_json_best_effort(indent=2))
    est = estimate_seconds(job)
    print(f"estimated cost: {est['passes']:,} UNet passes x {est['seconds_per_pass'] * 1e3:.1f} ms (measured) = "
          f"{est['seconds'] / 60:.1f} min, plus compilation and decoding", flush=True)
    seeds = c.seed + np.arange(c.n)
    common = dict(steps=c.steps, noise=c.noise, chunk_size=c.chunk_size, progress=c.progress)
    results, images_out = [], {}
    t_start = time.time()
    for r, row in zip(c.rows, job.rows):
        prompt, related, unrelated = row[:3]
        print(f"[{r}] {prompt!r}: related {related!r}, unrelated {unrelated!r}", flush=True)
        unguided = sd.generate(pipe, prompt, None, seeds, rule=dj.ClassifierFreeGuidance(scale=c.cfg_scale), **common)[0]
        shown = {"unguided": unguided}
        traces, entry = {}, {"row": int(r), "prompt": prompt, "related": related, "unrelated": unrelated,
                             "methods": {}}
        emb_u = q_metric.image_embeddings(*job.clip, unguided) if job.clip else None
        for m in c.methods:
            rule = build_rule(m, row, c)
            embs, info = {}, {"scale": float(rule.scale)}
            for kind, negative in (("related", related), ("unrelated", unrelated)):
                imgs, trace = sd.generate(pipe, prompt, negative, seeds, rule=rule, return_trace=True, **common)
                imgs = imgs[0]
                shown[f"{m}, {kind}: {negative!r}"] = imgs
                images_out[f"row{r}_{m}_{kind}"] = imgs
                info[f"mean_lambda_{kind}"] = float(np.mean(trace.lam))
                if m == "DNG":
                    traces[kind] = (np.asarray(trace.t), np.asarray(trace.lam[0]).mean(-1), np.asarray(trace.p[0]).mean(-1))
                if job.clip:
                    embs[kind] = q_metric.image_embeddings(*job.clip, imgs)
            if job.clip:
                info.update(q_metric.q_score(emb_u, embs["related"], embs["unrelated"]))
            entry["methods"][m] = info
        images_out[f"row{r}_unguided"] = unguided
        results.append(entry)
        _plot_samples(shown, os.path.join(job.outdir, f"samples_{r}.png"), f"{prompt!r}", c.grid_images)
        if traces:
            _plot_traces(traces, os.path.join(job.outdir, f"lambda_{r}.png"), prompt, row)
    np.savez_compressed(os.path.join(job.outdir, "images.npz"), seeds=seeds, **images_out)
    with open(os.path.join(job.outdir, "results.json"), "w") as f:
        json.dump({"results": results, "seconds": time.time() - t_start}, f, indent=2)
    if job.clip:
        table = q_table(results, c.methods)
        with open(os.path.join(job.outdir, "q_table.md"), "w") as f:
            f.write(table + "\n")
        print(table)
    print(f"results in {os.path.abspath(job.outdir)} ({time.time() - t_start:.0f} s)", flush=True)
    return job.outdir


def q_table(results: List[Dict], methods) -> str:
    """Markdown: Q (and the two mean CLIP distances) per prompt and method, and the mean over prompts."""
    head = "| prompt | " + " | ".join(f"{m} Q (d related / d unrelated)" for m in methods) + " |"
    lines = [head, "|" + " --- |" * (1 + len(methods))]
    for e in results:
        cells = [f"{e['methods'][m]['q']:.3f} +- {e['methods'][m]['q_se']:.3f} "
                 f"({e['methods'][m]['distance_related']:.3f} / {e['methods'][m]['distance_unrelated']:.3f})"
                 for m in methods]
        lines.append(f"| {e['prompt']} | " + " | ".join(cells) + " |")
    if len(results) > 1:
        lines.append("| mean | " + " | ".join(f"{np.mean([e['methods'][m]['q'] for e in results]):.3f}"
                                              for m in methods) + " |")
    return "\n".join(lines)


def _plot_samples(shown: Dict[str, np.ndarray], path: str, title: str, k: int) -> None:
    from sample.plots import plt
    names = list(shown)
    k = min(k, len(next(iter(shown.values()))))
    fig, axes = plt.subplots(len(names), k, figsize=(1.6 * k + 1.5, 1.7 * len(names)), squeeze=False)
    for i, name in enumerate(names):
        for j in range(k):
            ax = axes[i, j]
            ax.imshow(shown[name][j])
            ax.set_xticks([]), ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle(f"{title}: the same seeds in every row", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_traces(traces, path: str, prompt: str, row: tuple) -> None:
    from sample.plots import plt
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for kind, (t, lam, p) in traces.items():
        neg = row[1] if kind == "related" else row[2]
        axes[0].plot(t, lam, label=f"{kind}: {neg!r}")
        axes[1].plot(t, p, label=f"{kind}: {neg!r}")
    for ax, name in zip(axes, ("mean lambda_t", "mean p_t = p(c- | x_t, c+)")):
        ax.set_xlim(max(t), min(t))
        ax.set_xlabel("diffusion timestep t (sampling goes left to right)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"DNG on {prompt!r}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
