"""Text-to-image negative guidance on Stable Diffusion, with the paper's Q metric (``--job=text_to_image``).

  python sample/main.py --job=text_to_image --config=sample/configs/sd.py:paper \\
      --config.folder=PATH/stable-diffusion-2-base --config.clip=PATH/clip-vit-large-patch14

For every prompt of the config's table, on the same seeds: the unguided images (classifier-free
guidance toward the prompt, ``cfg_scale``), then each method away from the related and from the
unrelated negative prompt:

* ``diffusers-NP``: diffusers' negative prompt, the baseline users know: classifier-free guidance at
  ``cfg_scale`` with the negative prompt's prediction in place of the unconditional one (2 UNet passes
  per step: eps_neg + cfg_scale (eps_pos - eps_neg));
* ``NP``, ``DNG``, ``SLD``: the positive-prompt mode of the paper (3 passes per step: "", prompt,
  negative prompt), CFG toward the prompt plus the method's negative guidance at the table's scale.

Compilation: one compiled sampler per method family and image size for the whole job (prompts and
scales are traced arguments; ``diffusers-NP`` reuses the unguided run's), and JAX's persistent
compilation cache on by default (``config.compilation_cache``: "default" = $XDG_CACHE_HOME/dngjax/jax,
else ~/.cache/dngjax/jax; a folder; "" to turn it off), so a rerun loads instead of compiling. The time
spent compiling (and the cache hits) is printed and written to ``results.json``.

Writes into the output folder it prints:

* ``samples_<row>.png``: the first seeds, one row per setting (unguided, each method x negative);
* ``lambda_<row>.png``: DNG's mean lambda_t and p_t over the chain, related vs unrelated negative
  (the paper's figs. 5 and 12);
* with ``config.clip``: ``q_table.md`` and Q per prompt and method in ``results.json``
  (:mod:`dngjax.q_metric`: the paper's eq. 22 at each method's scale, with the mean CLIP scores);
* ``images.npz`` (all images, uint8), ``config.json``.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import time
from typing import Any, Dict, List, Optional

import numpy as np

RULES = {"diffusers-NP": "ClassifierFreeGuidance", "NP": "PositiveMode(NegativePrompting)",
         "DNG": "PositiveMode(DynamicNegativeGuidance)", "SLD": "PositiveMode(SafeLatentDiffusion)"}
#: UNet passes per step of each method (diffusers-NP: negative prompt and prompt; the others: "", both)
PASSES = {"diffusers-NP": 2, "NP": 3, "DNG": 3, "SLD": 3}


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
                         "(--config.folder=PATH; docs/text_to_image.md says how to download one)")
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
    for name in ("height", "width"):
        v = config.get(name, 0)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"config.{name}={v!r}: an image size in pixels (a multiple of 8 for SD), or 0 for "
                             "the model's training size")
    for row in prompts:
        if len(row) != 7:
            raise ValueError(f"a prompt row is (prompt, related, unrelated, temperature, offset, NP scale, DNG scale), "
                             f"got {row}")


def compilation_cache_dir(config) -> Optional[str]:
    """The persistent compilation cache folder ``config.compilation_cache`` names: "default" ->
    $XDG_CACHE_HOME/dngjax/jax (~/.cache/dngjax/jax without XDG_CACHE_HOME), "" -> None (off), else
    the folder given."""
    choice = config.get("compilation_cache", "default")
    if not choice:
        return None
    if choice == "default":
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return os.path.join(base, "dngjax", "jax")
    return os.path.abspath(os.path.expanduser(choice))


def enable_compilation_cache(path: Optional[str]) -> None:
    """JAX's persistent compilation cache in ``path`` (None: off) for this process: programs that take
    over a second to compile are written there and loaded by later runs with the same shapes, jax
    version and device."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc
    if path is not None:
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise ValueError(f"config.compilation_cache: cannot create {path!r} ({e}); pass another folder or "
                             "--config.compilation_cache='' to turn the cache off") from None
    jax.config.update("jax_compilation_cache_dir", path)
    cc.reset_cache()                                   # the cache is set up once per process: from the new dir


class CompileClock:
    """Time spent on compilation while active (``with CompileClock() as clock``), from jax.monitoring:
    ``trace_seconds`` tracing and lowering to XLA, ``compile_seconds`` XLA compiling (or loading from
    the persistent cache), ``programs`` compiled or loaded, ``cache_hits`` loaded from the cache."""

    def __init__(self):
        self.trace_seconds = self.compile_seconds = 0.0
        self.programs = self.cache_hits = 0

    def _duration(self, event, duration, **kw):
        from jax._src import dispatch
        if event == dispatch.BACKEND_COMPILE_EVENT:
            self.compile_seconds += duration
            self.programs += 1
        elif event in (dispatch.JAXPR_TRACE_EVENT, dispatch.JAXPR_TO_MLIR_MODULE_EVENT):
            self.trace_seconds += duration

    def _event(self, event, **kw):
        if event == "/jax/compilation_cache/cache_hits":
            self.cache_hits += 1

    def __enter__(self):
        from jax import monitoring
        monitoring.register_event_duration_secs_listener(self._duration)
        monitoring.register_event_listener(self._event)
        return self

    def __exit__(self, *exc):
        from jax import monitoring
        monitoring.unregister_event_duration_listener(self._duration)
        monitoring.unregister_event_listener(self._event)

    def summary(self) -> Dict[str, Any]:
        return {"trace_seconds": self.trace_seconds, "compile_seconds": self.compile_seconds,
                "programs": self.programs, "cache_hits": self.cache_hits}


def prepare(config) -> Job:
    """Validate the config, load the pipeline (and CLIP), check the image size and set up the persistent
    compilation cache, before any sampling."""
    import jax.numpy as jnp
    from dngjax import stable_diffusion as sd
    from dngjax.models.clip import load_clip_image

    validate_config(config)
    pipe = sd.load(config.folder, dtype=None if config.dtype == "float32" else getattr(jnp, config.dtype))
    height, width = config.get("height", 0) or None, config.get("width", 0) or None
    try:
        sd.check_latent_size(pipe, sd.latent_size(pipe, height, width)[0])
    except ValueError as e:
        raise ValueError(f"config.height={config.get('height', 0)}, config.width={config.get('width', 0)}: {e}") from None
    try:                                                         # the chain the folder's scheduler config gives
        sd.chain(pipe, config.steps, solver=config.get("solver", "") or None)
    except ValueError as e:
        raise ValueError(f"config.solver={config.get('solver', '')!r} on {config.folder}: {e}") from None
    enable_compilation_cache(compilation_cache_dir(config))      # once the folder loaded: sampling compiles next
    clip = load_clip_image(config.clip) if config.clip else None
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    outdir = config.outdir or os.path.join("outputs", "text_to_image", f"{config.name}-{stamp}")
    return Job(config, pipe, clip, [tuple(config.prompts[int(r)]) for r in config.rows], outdir)


def prompt_rule(method: str, row: tuple, config):
    """The rule of ``method`` for one prompt row of the paper's table (its temperature, offset and scales);
    NP, SLD and DNG in the positive-prompt mode, diffusers-NP as classifier-free guidance."""
    import dngjax as dj
    _, _, _, temperature, offset, np_scale, dng_scale = row
    if method == "diffusers-NP":                       # the negative prompt in place of "": 2 passes
        return dj.ClassifierFreeGuidance(scale=config.cfg_scale)
    if method == "NP":
        return dj.PositiveMode(dj.NegativePrompting(scale=float(np_scale)), cfg_scale=config.cfg_scale)
    if method == "DNG":
        return dj.PositiveMode(dj.DynamicNegativeGuidance(scale=float(dng_scale), temperature=float(temperature),
                                                          offset=float(offset), **dict(config.dng)),
                               cfg_scale=config.cfg_scale)
    return dj.PositiveMode(dj.SafeLatentDiffusion(**dict(config.sld)), cfg_scale=config.cfg_scale)


def estimate_seconds(job: Job) -> Dict[str, float]:
    """Network passes of the job x the measured time of one UNet pass per latent (batch chunk_size)."""
    import jax
    import jax.numpy as jnp
    from dngjax import stable_diffusion as sd
    c, pipe = job.config, job.pipe
    b = min(c.chunk_size, c.n)
    d = sd.text_denoiser(pipe, jnp.zeros((pipe.text_encoder.max_positions, pipe.text_encoder.width)))
    fn = jax.jit(lambda d, x, t: d(x, t))
    x = jnp.zeros((b,) + sd.latent_size(pipe, c.get("height", 0) or None, c.get("width", 0) or None)[0])
    t = jnp.full((b,), 500, jnp.int32)
    fn(d, x, t).block_until_ready()
    t0 = time.time()
    fn(d, x, t).block_until_ready()
    per_pass = (time.time() - t0) / b
    passes = len(job.rows) * c.n * c.steps * (2 + 2 * sum(PASSES[m] for m in c.methods))
    return {"passes": passes, "seconds_per_pass": per_pass, "seconds": passes * per_pass}


def execute(job: Job) -> str:
    """Sample every row and method, score them, write the figures, tables and results; the output folder."""
    os.makedirs(job.outdir, exist_ok=True)
    with open(os.path.join(job.outdir, "config.json"), "w") as f:
        f.write(job.config.to_json_best_effort(indent=2))
    with CompileClock() as clock:
        return _execute(job, clock)


def _execute(job: Job, clock: CompileClock) -> str:
    import dngjax as dj
    from dngjax import q_metric, stable_diffusion as sd

    c, pipe = job.config, job.pipe
    est = estimate_seconds(job)
    print(f"estimated cost: {est['passes']:,} UNet passes x {est['seconds_per_pass'] * 1e3:.1f} ms (measured) = "
          f"{est['seconds'] / 60:.1f} min, plus compilation and decoding", flush=True)
    seeds = c.seed + np.arange(c.n)
    # return_trace everywhere: the unguided run and diffusers-NP then share one compiled sampler
    common = dict(steps=c.steps, noise=c.noise, solver=c.get("solver", "") or None, chunk_size=c.chunk_size, progress=c.progress, return_trace=True,
                  height=c.get("height", 0) or None, width=c.get("width", 0) or None)
    results, images_out = [], {}
    t_start = time.time()
    for r, row in zip(c.rows, job.rows):
        prompt, related, unrelated = row[:3]
        print(f"[{r}] {prompt!r}: related {related!r}, unrelated {unrelated!r}", flush=True)
        unguided = sd.generate(pipe, prompt, None, seeds, rule=dj.ClassifierFreeGuidance(scale=c.cfg_scale), **common)[0][0]
        shown = {"unguided": unguided}
        traces, entry = {}, {"row": int(r), "prompt": prompt, "related": related, "unrelated": unrelated,
                             "methods": {}}
        emb_u = q_metric.image_embeddings(*job.clip, unguided) if job.clip else None
        for m in c.methods:
            rule = prompt_rule(m, row, c)
            embs, info = {}, {"scale": float(rule.scale)}
            for kind, negative in (("related", related), ("unrelated", unrelated)):
                imgs, trace = sd.generate(pipe, prompt, negative, seeds, rule=rule, **common)
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
    cache = compilation_cache_dir(c)
    compiled = {**clock.summary(), "cache_dir": cache}
    with open(os.path.join(job.outdir, "results.json"), "w") as f:
        json.dump({"results": results, "seconds": time.time() - t_start, "compilation": compiled}, f, indent=2)
    if job.clip:
        table = q_table(results, c.methods)
        with open(os.path.join(job.outdir, "q_table.md"), "w") as f:
            f.write(table + "\n")
        print(table)
    print(f"compilation: {clock.compile_seconds + clock.trace_seconds:.1f} s ({clock.compile_seconds:.1f} s XLA, "
          f"{clock.trace_seconds:.1f} s tracing) for {clock.programs} programs, {clock.cache_hits} loaded from the "
          + (f"persistent cache {cache}" if cache else "persistent cache (off: --config.compilation_cache='')"),
          flush=True)
    print(f"results in {os.path.abspath(job.outdir)} ({time.time() - t_start:.0f} s)", flush=True)
    return job.outdir


def q_table(results: List[Dict], methods) -> str:
    """Markdown: the paper's eq. 22 per prompt and method at the method's one scale, Q = mean CS with the
    unrelated negative - mean CS with the related one (CS: CLIP cosine similarity to the unguided image of
    the same seed), +- its standard error over seeds, with the two mean CLIP scores; then the mean and
    standard deviation over prompts (as table 4's "Average" column) and a note on what table 4 reports."""
    from dngjax import q_metric
    head = "| prompt | " + " | ".join(f"{m} Q, eq. 22 (CS unrelated / CS related)" for m in methods) + " |"
    lines = [head, "|" + " --- |" * (1 + len(methods))]
    for e in results:
        cells = []
        for m in methods:
            i = e["methods"][m]
            cells.append(f"{i['q']:.3f} +- {i['q_se']:.3f} ({i['clip_score_unrelated']:.3f} / "
                         f"{i['clip_score_related']:.3f})")
        lines.append(f"| {e['prompt']} | " + " | ".join(cells) + " |")
    if len(results) > 1:
        avg = [q_metric.average_over_prompts([e["methods"][m]["q"] for e in results]) for m in methods]
        lines.append("| mean +- sd over prompts | " + " | ".join(f"{a['mean']:.3f} +- {a['std']:.3f}" for a in avg) + " |")
    lines.append("")
    lines.append("Q here: the paper's eq. 22 at each method's one scale, on the same seeds. The paper's table 4 "
                 "reports eq. 23 (a line fitted over a sweep of scales, dngjax.q_metric.q_sweep): not comparable "
                 "number for number.")
    return "\n".join(lines)


def _plot_samples(shown: Dict[str, np.ndarray], path: str, title: str, k: int) -> None:
    from dngjax.tools.sample.plots import plt
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
    from dngjax.tools.sample.plots import plt
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
