#!/usr/bin/env python
"""Text-to-image pipeline benchmark: dngjax vs diffusers' StableDiffusionPipeline, side by side in one run.

    PYTHONPATH=. python bench/sd_pipeline.py [--batch 4] [--steps 10] [--repeats 3] [--threads 1]
    PYTHONPATH=. python bench/sd_pipeline.py --real_size --batch 4 --steps 50     # a GPU: JAX only

Default (CPU): the tiny random SD folder of the tests (``tests/sd_tiny.py``: 2-level UNet with cross-
attention, 16 x 16 images), built in a temporary folder; the same weights in both. Timed, interleaved,
median of ``--repeats`` after a warm-up call (compilation excluded):

* diffusers with a negative prompt (its classifier-free guidance with the negative prompt in place of
  the empty one: 2 UNet passes per step, batched as one call of 2B), ``DDPMScheduler``;
* dngjax ``stable_diffusion.generate`` with ``PositiveNegativePrompting`` and with
  ``PositiveDynamicNegativeGuidance`` (3 UNet passes per step: "", prompt, negative prompt).

Printed: images/s of each, the ratio dngjax / diffusers (images/s, higher is better), and UNet passes
per second (the fairer comparison of the two engines, since the methods differ in passes per step).
With one thread (the default on a CPU) ratios use process CPU time, as bench/sampler.py does.

``--real_size``: no PyTorch side; a random-weight UNet of SD 2 base's size (865 M parameters, 64 x 64
latents, 1024-wide text features) with the tiny folder's VAE and text encoder replaced by random text
features: images/s of the DNG sampler and the device's peak memory -- meant for a GPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time


def _parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=4, help="images per call")
    ap.add_argument("--steps", type=int, default=10, help="sampling steps")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for XLA and torch (1: CPU-time ratios)")
    ap.add_argument("--real_size", action="store_true", help="SD 2 base-size random UNet, JAX only (GPU)")
    return ap.parse_args(argv)


def _timer(threads):
    """(wall, cpu) seconds of a call; the ratio uses CPU time with one thread, wall time otherwise."""
    def run(fn):
        w, c = time.perf_counter(), time.process_time()
        fn()
        return time.perf_counter() - w, time.process_time() - c
    return run


def main(argv=None):
    args = _parse_args(argv)
    if args.threads == 1:
        os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    import jax
    import dngjax as dj
    from dngjax import stable_diffusion as sd

    if args.real_size:
        return _real_size(args)
    import torch
    torch.set_num_threads(args.threads)
    from tests.sd_tiny import make_folder                        # run from the repository root (PYTHONPATH=.)

    folder = os.path.join(tempfile.mkdtemp(prefix="dngjax-sd-bench-"), "tiny-sd")
    torch_pipe = make_folder(folder)
    torch_pipe.set_progress_bar_config(disable=True)
    pipe = sd.load(folder)
    prompt, negative, b, s = "a cat", "a dog", args.batch, args.steps
    runs = {
        "diffusers, negative prompt (2 passes/step)": (2, lambda: torch_pipe(
            prompt, negative_prompt=negative, num_images_per_prompt=b, num_inference_steps=s, guidance_scale=7.5,
            output_type="np", generator=torch.Generator().manual_seed(0)).images),
        "dngjax, positive NP (3 passes/step)": (3, lambda: sd.generate(
            pipe, prompt, negative, range(b), rule=dj.PositiveNegativePrompting(scale=1.0, cfg_scale=7.5), steps=s)),
        "dngjax, positive DNG (3 passes/step)": (3, lambda: sd.generate(
            pipe, prompt, negative, range(b), rule=dj.PositiveDynamicNegativeGuidance(scale=5.0, cfg_scale=7.5),
            steps=s)),
    }
    timer = _timer(args.threads)
    for _, (_, fn) in runs.items():
        fn()                                                    # warm-up: compilation, caches
    times = {k: [] for k in runs}
    for r in range(args.repeats):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        for k in order:
            times[k].append(timer(runs[k][1]))
    use = 1 if args.threads == 1 else 0
    print(f"tiny SD, batch {b}, {s} steps, {args.threads} thread(s), median of {args.repeats}; "
          f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}")
    print(f"{'run':48s} {'images/s':>10s} {'UNet passes/s':>14s} {'wall s':>8s} {'cpu s':>8s}")
    med = {k: (statistics.median(t[0] for t in v), statistics.median(t[1] for t in v)) for k, v in times.items()}
    for k, (passes, _) in runs.items():
        sec = med[k][use]
        print(f"{k:48s} {b / sec:10.2f} {passes * b * s / sec:14.1f} {med[k][0]:8.3f} {med[k][1]:8.3f}")
    ref = list(runs)[0]
    for k in list(runs)[1:]:
        img = med[ref][use] / med[k][use]
        print(f"ratio {k} / diffusers: images/s {img:.2f}x, UNet passes/s {img * runs[k][0] / runs[ref][0]:.2f}x")


def _real_size(args):
    import numpy as np
    import jax
    import jax.numpy as jnp
    import dngjax as dj
    from dngjax import stable_diffusion as sd
    from dngjax.models.sd_unet import SDUNet

    unet = SDUNet(heads=(5, 10, 20, 20), use_linear_projection=True, dtype=jnp.float16 if jax.default_backend() == "gpu" else None)
    x = jnp.zeros((1, 64, 64, 4))
    params = jax.jit(unet.init)(jax.random.key(0), x, jnp.zeros((1,)), jnp.zeros((1, 77, 1024)))
    params = jax.tree_util.tree_map(lambda a: a.astype(unet.dtype or jnp.float32), params)
    n_params = sum(a.size for a in jax.tree_util.tree_leaves(params))
    ctx = jax.random.normal(jax.random.key(1), (3, 77, 1024))
    apply = sd._UNetWithText(unet)
    dens = [dj.Denoiser(apply_fn=apply, params=(params, c)) for c in ctx]
    schedule = dj.respace(dj.scaled_linear_schedule(), args.steps)
    rule = dj.PositiveDynamicNegativeGuidance(scale=5.0, cfg_scale=7.5, prior=0.01)
    keys = dj.keys_from_seeds(range(args.batch))
    run = lambda: np.asarray(dj.sample(dens[0], schedule, keys, (64, 64, 4), rule=rule, denoiser_c=dens[1:],
                                       noise="posterior"))
    t0 = time.perf_counter()
    run()
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    mem = f"peak device memory {peak / 2**30:.2f} GiB" if peak else "peak device memory: not reported by this backend"
    print(f"SD 2 base-size random UNet ({n_params / 1e6:.0f} M parameters, {unet.dtype or 'float32'}), DNG, "
          f"batch {args.batch}, {args.steps} steps on {jax.devices()[0].device_kind}: {args.batch / sec:.3f} images/s "
          f"(latents only, no VAE), {3 * args.batch * args.steps / sec:.1f} UNet passes/s; first call "
          f"{compile_s:.1f} s; {mem}")

if __name__ == "__main__":
    main()
