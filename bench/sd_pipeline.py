#!/usr/bin/env python
"""Text-to-image pipeline benchmark: dngjax vs diffusers' StableDiffusionPipeline, side by side in one run.

    PYTHONPATH=. python bench/sd_pipeline.py [--batch 4] [--steps 10] [--repeats 3] [--threads 1] [--unet small]
    PYTHONPATH=. python bench/sd_pipeline.py --real_size --batch 4 --steps 50     # a GPU: JAX only

Default (CPU): the tiny random SD folder of the tests (``tests/sd_tiny.py``: 2-level UNet with cross-
attention, 16 x 16 images), built in a temporary folder; the same weights in both. Timed, interleaved,
median of ``--repeats`` after a warm-up call (compilation excluded):

* diffusers with a negative prompt (its classifier-free guidance with the negative prompt in place of
  the empty one: 2 UNet passes per step, batched as one call of 2B), ``DDPMScheduler``;
* dngjax ``stable_diffusion.generate`` with diffusers' negative prompt (``ClassifierFreeGuidance`` with
  a negative prompt: 2 passes per step, two calls of B), with ``PositiveMode(NegativePrompting)`` and with
  ``PositiveMode(DynamicNegativeGuidance)`` (3 UNet passes per step: "", prompt, negative prompt).

``--unet small``: the folder's UNet replaced by one of SD 2 base's structure at a quarter of its widths
(80, 160, 320, 320; 59 M parameters; ``bench/sd_unet_pass.py``'s "small") on 32 x 32 latents (64 x 64
images with the tiny VAE), where the UNet, not Python, is the cost: the time per image of DNG against
diffusers' negative prompt at a size where passes dominate.

Printed: images/s of each, the ratio dngjax / diffusers (images/s, higher is better), and UNet passes
per second (the fairer comparison of the two engines, since the methods differ in passes per step).
With one thread (the default on a CPU) ratios use process CPU time, as bench/sampler.py does.

``--memory [--folder F]``: the process's peak resident memory (``VmHWM``) of the full-size pipeline on a
CPU, each case in a fresh process: ``sd.load`` (float32, and with a bfloat16 UNet): resident memory after
loading and the peak while loading; then, the peak reset after loading (Linux's ``clear_refs``),
``generate`` at 512 x 512 (64 x 64 latents, 2 steps: the peak does not grow with steps) with DNG (3
passes per step) for batch 1 and 2 (diffusers' negative prompt makes the same calls of batch B, two per
step); ``--memory_cases`` picks cases. ``F``: a real SD folder; by default a random one of SD 2 base's
sizes (UNet 865 M, VAE 84 M, OpenCLIP-H text encoder 340 M parameters, the tiny tokenizer) is written
to a temporary folder (5 GB), removed at the end.

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
    ap.add_argument("--memory", action="store_true", help="peak memory of the full-size pipeline (CPU)")
    ap.add_argument("--folder", default=None, help="--memory: a diffusers SD folder (default: random SD 2 base size)")
    ap.add_argument("--memory_cases", default="weights,float32,0;weights,bfloat16,0;dng,float32,1;dng,float32,2",
                    help="--memory: cases 'what,UNet dtype,batch' separated by ';' (what: weights, dng or cfg)")
    ap.add_argument("--memory_case", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--unet", choices=("tiny", "small"), default="tiny",
                    help="the folder's UNet: the tests' tiny one, or SD 2 base's structure at 1/4 width on 32x32 latents")
    return ap.parse_args(argv)


def _timer(threads):
    """(wall, cpu) seconds of a call; the ratio uses CPU time with one thread, wall time otherwise."""
    def run(fn):
        w, c = time.perf_counter(), time.process_time()
        fn()
        return time.perf_counter() - w, time.process_time() - c
    return run


def _bench_folder(unet, threads):
    """(diffusers pipeline, dngjax pipeline, image size in px) of the tests' tiny SD folder, written to a temporary
    folder; ``unet="small"``: its UNet replaced by SD 2 base's structure at 1/4 width on 32 x 32 latents. Torch
    (imported after JAX) runs on ``threads`` threads."""
    from dngjax import stable_diffusion as sd
    import torch
    torch.set_num_threads(threads)
    from tests.sd_tiny import make_folder                        # run from the repository root (PYTHONPATH=.)

    folder = os.path.join(tempfile.mkdtemp(prefix="dngjax-sd-bench-"), "tiny-sd")
    torch_pipe = make_folder(folder)
    px = 16
    if unet == "small":
        import diffusers
        from bench.sd_unet_pass import SD2_BASE
        torch.manual_seed(0)
        torch_pipe.unet = diffusers.UNet2DConditionModel(
            sample_size=32, in_channels=4, out_channels=4, **dict(SD2_BASE, block_out_channels=(80, 160, 320, 320),
                                                                 norm_num_groups=16, cross_attention_dim=32)).eval()
        torch_pipe.save_pretrained(folder, safe_serialization=True)
        px = 32 * torch_pipe.vae_scale_factor
    torch_pipe.set_progress_bar_config(disable=True)
    return torch_pipe, sd.load(folder), px


def _pipeline_runs(torch_pipe, pipe, px, b, s):
    """{label: (UNet passes per step, zero-argument call)}: diffusers' negative prompt first, then dngjax's
    negative prompt, positive NP and positive DNG, b images of s steps each."""
    import torch
    import dngjax as dj
    from dngjax import stable_diffusion as sd
    prompt, negative = "a cat", "a dog"
    return {
        "diffusers, negative prompt (2 passes/step)": (2, lambda: torch_pipe(
            prompt, negative_prompt=negative, num_images_per_prompt=b, num_inference_steps=s, guidance_scale=7.5,
            height=px, width=px, output_type="np", generator=torch.Generator().manual_seed(0)).images),
        "dngjax, negative prompt (2 passes/step)": (2, lambda: sd.generate(
            pipe, prompt, negative, range(b), rule=dj.ClassifierFreeGuidance(7.5), steps=s, height=px, width=px)),
        "dngjax, positive NP (3 passes/step)": (3, lambda: sd.generate(
            pipe, prompt, negative, range(b), rule=dj.PositiveMode(dj.NegativePrompting(scale=1.0), cfg_scale=7.5),
            steps=s, height=px, width=px)),
        "dngjax, positive DNG (3 passes/step)": (3, lambda: sd.generate(
            pipe, prompt, negative, range(b), rule=dj.PositiveMode(dj.DynamicNegativeGuidance(scale=5.0), cfg_scale=7.5),
            steps=s, height=px, width=px)),
    }


def _time_runs(runs, threads, repeats):
    """{label: [(wall s, cpu s)] per repeat} of each run, after a warm-up call each, interleaved (order
    alternating)."""
    timer = _timer(threads)
    for _, (_, fn) in runs.items():
        fn()                                                    # warm-up: compilation, caches
    times = {k: [] for k in runs}
    for r in range(repeats):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        for k in order:
            times[k].append(timer(runs[k][1]))
    return times


def _print_pipeline_results(runs, times, args, px):
    """Images/s and UNet passes/s of each run (medians), and each dngjax run's ratio to diffusers'."""
    import jax
    import torch
    b, s = args.batch, args.steps
    use = 1 if args.threads == 1 else 0
    print(f"{args.unet} SD UNet, {px} x {px} images, batch {b}, {s} steps, {args.threads} thread(s), median of {args.repeats}; "
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


def main(argv=None):
    args = _parse_args(argv)
    if args.memory_case:
        return _memory_case(args)
    if args.memory:
        return _memory(args)
    if args.threads == 1:
        os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    if args.real_size:
        return _real_size(args)
    torch_pipe, pipe, px = _bench_folder(args.unet, args.threads)
    runs = _pipeline_runs(torch_pipe, pipe, px, args.batch, args.steps)
    _print_pipeline_results(runs, _time_runs(runs, args.threads, args.repeats), args, px)


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
    rule = dj.PositiveMode(dj.DynamicNegativeGuidance(scale=5.0, prior=0.01), cfg_scale=7.5)
    keys = dj.keys_from_seeds(range(args.batch))
    run = lambda: np.asarray(dj.sample(dens[0], schedule, keys, (64, 64, 4), rule=rule, denoiser_c=dens[1:],
                                       noise="beta_tilde"))
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

def _full_size_folder(path):
    """A random diffusers folder of SD 2 base's component sizes (the tiny folder's tokenizer and scheduler)."""
    import torch
    import diffusers
    import transformers
    from tests.sd_tiny import make_folder
    from bench.sd_unet_pass import SD2_BASE

    pipe = make_folder(path)
    torch.manual_seed(0)
    pipe.unet = diffusers.UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, **SD2_BASE).eval()
    pipe.vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32,
                                       block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                       down_block_types=("DownEncoderBlock2D",) * 4,
                                       up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512).eval()
    pipe.text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
        max_position_embeddings=77, hidden_act="gelu", projection_dim=512)).eval()
    pipe.save_pretrained(str(path), safe_serialization=True)


def _status():
    with open("/proc/self/status") as f:
        kv = dict(line.split(":", 1) for line in f if ":" in line)
    return {k: int(kv[k].split()[0]) / 2**20 for k in ("VmHWM", "VmRSS")}          # GiB


def _memory_case(args):
    import json
    import jax
    import jax.numpy as jnp
    import dngjax as dj
    from dngjax import stable_diffusion as sd

    what, dtype, b = args.memory_case.split(",")
    pipe = sd.load(args.folder, dtype=jnp.bfloat16 if dtype == "bfloat16" else None)
    nbytes = lambda tree: sum(a.nbytes for a in jax.tree_util.tree_leaves(tree)) / 2**30
    out = dict(case=args.memory_case, params_gib=dict(unet=nbytes(pipe.unet_params), vae=nbytes(pipe.vae_params),
                                                      text=nbytes(pipe.text_params)), after_load=_status())
    if what != "weights":
        rule = (dj.PositiveMode(dj.DynamicNegativeGuidance(scale=5.0), cfg_scale=7.5) if what == "dng"
                else dj.ClassifierFreeGuidance(7.5))
        try:                                    # reset VmHWM to the current RSS: the peak of generate alone
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            out["hwm_reset"] = True
        except OSError:
            out["hwm_reset"] = False
        t0 = time.perf_counter()
        images = sd.generate(pipe, "a cat", "a dog", range(int(b)), rule=rule, steps=2, height=512, width=512)
        out.update(images=list(images.shape), generate_s=time.perf_counter() - t0, after_generate=_status())
    print("MEMORY " + json.dumps(out), flush=True)


def _memory(args):
    folder, made = args.folder, None
    if folder is None:
        made = tempfile.mkdtemp(prefix="dngjax-sd-mem-")
        folder = os.path.join(made, "sd2-base-random")
        t0 = time.perf_counter()
        _full_size_folder(folder)
        print(f"random SD 2 base-size folder written in {time.perf_counter() - t0:.0f} s: {folder}", flush=True)
    try:
        _memory_cases(args, folder)
    finally:
        if made is not None:                                  # the 5 GB random folder (and its tokenizer files)
            import shutil
            shutil.rmtree(made, ignore_errors=True)


def _memory_cases(args, folder):
    import json
    import subprocess
    import sys

    cases = args.memory_cases.split(";")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    print(f"{'case (what, UNet dtype, batch)':34s} {'params GiB (unet/vae/text)':>28s} {'RSS after load':>15s} "
          f"{'peak RSS load':>14s} {'peak RSS generate':>18s} {'generate s':>11s}", flush=True)
    for case in cases:
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory_case", case, "--folder", folder],
                           capture_output=True, text=True, env=env)
        line = [l for l in r.stdout.splitlines() if l.startswith("MEMORY ")]
        if r.returncode or not line:
            print(f"{case}: failed\n{r.stderr[-3000:]}", flush=True)
            continue
        m = json.loads(line[0][len("MEMORY "):])
        p = m["params_gib"]
        if "generate_s" in m:
            gen_peak = (f"{m['after_generate']['VmHWM']:14.2f} GiB" if m["hwm_reset"]
                        else f"{'(no reset) ' + format(m['after_generate']['VmHWM'], '.2f'):>14s} GiB")
            gen = f"{m['generate_s']:11.0f}"
        else:
            gen_peak, gen = f"{'-':>18s}", f"{'-':>11s}"
        print(f"{case:34s} {p['unet']:8.2f} / {p['vae']:.2f} / {p['text']:.2f} {m['after_load']['VmRSS']:11.2f} GiB "
              f"{m['after_load']['VmHWM']:10.2f} GiB {gen_peak} {gen}", flush=True)


if __name__ == "__main__":
    main()
