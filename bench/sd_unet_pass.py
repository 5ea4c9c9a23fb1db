#!/usr/bin/env python
"""One Stable Diffusion UNet pass: dngjax's Flax UNet vs diffusers' UNet2DConditionModel (PyTorch), same weights.

    PYTHONPATH=. python bench/sd_unet_pass.py [--sizes tiny,small,medium,full] [--repeats 5] [--full_repeats 3]
                                              [--threads 1] [--batch 2] [--bf16]

One forward pass of batch ``--batch`` (2: a classifier-free guidance step's batched call), random
weights (diffusers' initialisation, norms and biases perturbed as in the tests), converted to the
Flax parameter tree by the loader's own code (``assemble_torch``); the outputs are compared (max
|flax - torch| / max |torch|) before timing. Sizes (77 text tokens each):

* ``tiny``: the UNet of the tests' folder (``tests/sd_tiny.py``: 2 levels 32/64, 8 x 8 latents, 32-wide text);
* ``small``: SD 2 base's structure at a quarter of its widths (80, 160, 320, 320), 32 x 32 latents;
* ``medium``: SD 2 base's UNet (865 M parameters) at 32 x 32 latents (256 x 256 images);
* ``narrow``: SD 2 base's structure at half its widths (160, 320, 640, 640), 64 x 64 latents;
* ``full``: SD 2 base's UNet at 64 x 64 latents (512 x 512 images); ``--full_repeats`` repeats.

Timed after a warm-up call (compilation excluded), JAX and torch interleaved (the order alternating),
median of ``--repeats``. ``--threads`` (default 1) sets XLA's intra-op threads (and pins the process to
that many cores) and ``torch.set_num_threads``; with one thread the ratio uses process CPU time (robust to
other load on a shared machine), otherwise wall time. ``--bf16`` also times the Flax UNet with bfloat16
parameters and compute (``dtype=jnp.bfloat16``) and prints its error against float32. Before each size
the estimated cost (calls x a first measured pass) is printed.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time


SD2_BASE = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=1024,
                attention_head_dim=(5, 10, 20, 20), use_linear_projection=True, norm_num_groups=32)
TINY = dict(block_out_channels=(32, 64), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=(4, 8),
            use_linear_projection=True, norm_num_groups=8)
#: name -> (diffusers config, latent size)
SIZES = {
    "tiny": (TINY, 8),
    "small": (dict(SD2_BASE, block_out_channels=(80, 160, 320, 320), norm_num_groups=16), 32),
    "medium": (SD2_BASE, 32),
    "narrow": (dict(SD2_BASE, block_out_channels=(160, 320, 640, 640)), 64),
    "full": (SD2_BASE, 64),
}


def _parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="tiny,small,medium,full", help=f"comma-separated, of {list(SIZES)}")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--full_repeats", type=int, default=3, help="repeats at the full size")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for XLA and torch (1: CPU-time ratios)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="also time the Flax UNet in bfloat16")
    ap.add_argument("--parts", action="store_true",
                    help="time the UNet's parts (ResNet, transformer, attention core, GroupNorm, 3x3 conv per level)")
    args = ap.parse_args(argv)
    bad = [s for s in args.sizes.split(",") if s not in SIZES]
    if bad:
        ap.error(f"--sizes {','.join(bad)} unknown; known: {', '.join(SIZES)}")
    return args


def _set_threads(threads):
    if threads > 0:
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])
        flags = os.environ.get("XLA_FLAGS", "")
        flags += (f" --xla_cpu_multi_thread_eigen={'false' if threads == 1 else 'true'}"
                  f" intra_op_parallelism_threads={threads}")
        os.environ["XLA_FLAGS"] = flags.strip()
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))


def build(name, batch, seed=0):
    """(torch UNet, flax module, float32 params, inputs (x NHWC, t, ctx) as numpy) of a size."""
    import numpy as np
    import torch
    import diffusers
    import jax.numpy as jnp
    from dngjax.models.sd_unet import unet_from_config
    from dngjax.models.torch_weights import assemble_torch, template

    cfg, size = SIZES[name]
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(sample_size=size, in_channels=4, out_channels=4, **cfg).eval()
    with torch.no_grad():                              # non-trivial norms and biases (defaults are 1 and 0)
        for n, p in unet.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model = unet_from_config(dict(unet.config))
    d = cfg["cross_attention_dim"]
    tmpl = template(model, jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)), jnp.zeros((1, 1, d)))
    state = {k: v.detach().numpy() for k, v in unet.state_dict().items()}
    params = assemble_torch(state, tmpl, "UNet")
    del state
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, size, size, 4)).astype(np.float32)
    t = np.array([981, 501][:batch] + [1] * max(0, batch - 2))
    ctx = rng.standard_normal((batch, 77, d)).astype(np.float32)
    return unet, model, params, (x, t, ctx)


def n_params(params):
    import jax
    return sum(a.size for a in jax.tree_util.tree_leaves(params))


def _timed(fn, use_cpu):
    """Seconds of one call of ``fn``: process CPU time (``use_cpu``) or wall time."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return (time.process_time() - c) if use_cpu else (time.perf_counter() - w)


def _forward_runs(unet, model, params, x, t, ctx, bf16):
    """{name: zero-argument call} of one forward pass each: torch, jax float32 (and jax bf16); outputs numpy."""
    import numpy as np
    import jax
    import jax.numpy as jnp
    import torch
    tx, tt, tc = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t), torch.from_numpy(ctx)
    jx, jt, jc = jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx)
    fwd = jax.jit(model.apply)
    runs = {"torch": lambda: unet(tx, tt, encoder_hidden_states=tc).sample.numpy(),
            "jax": lambda: np.asarray(fwd(params, jx, jt, jc))}
    if bf16:
        model16 = model.clone(dtype=jnp.bfloat16)
        params16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), params)
        fwd16 = jax.jit(model16.apply)
        runs["jax bf16"] = lambda: np.asarray(fwd16(params16, jx, jt, jc))
    return runs


def _rel_errors(outs, bf16):
    """{name: max |out - torch| / max |torch|} of each JAX output (NHWC) against torch's (NCHW), and bf16 vs f32."""
    import numpy as np
    ref = outs["torch"].transpose(0, 2, 3, 1)
    err = {k: float(np.abs(v - ref).max() / np.abs(ref).max()) for k, v in outs.items() if k != "torch"}
    if bf16:
        err["bf16 vs f32"] = float(np.abs(outs["jax bf16"] - outs["jax"]).max() / np.abs(outs["jax"]).max())
    return err


def _measure_size(name, args, timed, clock):
    """One size's row: parameters, latent size, repeats, median seconds per pass and the errors of each run."""
    import torch
    unet, model, params, (x, t, ctx) = build(name, args.batch)
    size = SIZES[name][1]
    runs = _forward_runs(unet, model, params, x, t, ctx, args.bf16)
    with torch.inference_mode():
        t0 = time.perf_counter()
        outs = {k: fn() for k, fn in runs.items()}        # warm-up: compilation, allocations
        first = time.perf_counter() - t0
        err = _rel_errors(outs, args.bf16)
        one = {k: timed(fn) for k, fn in runs.items()}
        reps = args.full_repeats if name == "full" else args.repeats
        print(f"[{name}] {n_params(params) / 1e6:.1f} M parameters, {size} x {size} latents; first calls "
              f"{first:.1f} s; one pass " + ", ".join(f"{k} {v:.3f} s" for k, v in one.items())
              + f"; estimated {reps - 1} more repeats: {(reps - 1) * sum(one.values()):.0f} s ({clock})", flush=True)
        times = {k: [v] for k, v in one.items()}            # the estimate's pass is the first repeat
        for r in range(1, reps):
            for k in (list(runs) if r % 2 == 0 else list(reversed(runs))):
                times[k].append(timed(runs[k]))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"[{name}] median " + ", ".join(f"{k} {v:.4f} s" for k, v in med.items())
          + f"; torch / jax {med['torch'] / med['jax']:.2f}x; rel. error " + ", ".join(
              f"{k} {v:.1e}" for k, v in err.items()), flush=True)
    return dict(name=name, params=n_params(params), size=size, reps=reps, med=med, err=err)


def _print_summary(rows, args, clock):
    """The table of every size: medians, torch / jax (and bf16's speed-up and error)."""
    print()
    head = f"{'size':8s} {'params':>8s} {'latents':>8s} {'reps':>5s} {'torch s':>9s} {'jax s':>9s} {'torch/jax':>10s}"
    if args.bf16:
        head += f" {'jax bf16 s':>10s} {'f32/bf16':>9s} {'bf16 err':>9s}"
    print(head + f"   ({clock} time per pass of batch {args.batch}; torch/jax > 1: dngjax faster)")
    for r in rows:
        m = r["med"]
        line = (f"{r['name']:8s} {r['params'] / 1e6:7.1f}M {r['size']:>5d}^2 {r['reps']:>5d} {m['torch']:9.4f} "
                f"{m['jax']:9.4f} {m['torch'] / m['jax']:9.2f}x")
        if args.bf16:
            line += f" {m['jax bf16']:10.4f} {m['jax'] / m['jax bf16']:8.2f}x {r['err']['bf16 vs f32']:9.1e}"
        print(line)


def main(argv=None):
    args = _parse_args(argv)
    _set_threads(args.threads)
    import jax
    import torch
    torch.set_num_threads(max(args.threads, 1) if args.threads > 0 else os.cpu_count())

    use_cpu = args.threads == 1
    clock = "cpu" if use_cpu else "wall"
    timed = functools.partial(_timed, use_cpu=use_cpu)
    print(f"one UNet pass, batch {args.batch}, {args.threads} thread(s) (XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
          f"torch.get_num_threads()={torch.get_num_threads()}), {clock} time, jax {jax.__version__} "
          f"({jax.default_backend()}), torch {torch.__version__}", flush=True)
    if args.parts:
        for name in args.sizes.split(","):
            parts(name, args, timed, clock)
        return
    rows = [_measure_size(name, args, timed, clock) for name in args.sizes.split(",")]
    _print_summary(rows, args, clock)


def _nchw(a):
    """An NHWC numpy array as an NCHW torch tensor."""
    import torch
    return torch.from_numpy(a.transpose(0, 3, 1, 2).copy())


def _resnet_cases(i, s, ch, cfg, blk, pb, h, hc, temb):
    """Level i's (label, torch fn, jitted jax fn, jax args) of its first ResNet, a GroupNorm + SiLU and a 3x3 conv."""
    import jax
    import jax.numpy as jnp
    import torch
    import flax.linen as nn
    from dngjax.models import sd_unet as su
    res = su.ResnetBlock(ch, cfg["norm_num_groups"], 1e-5)
    gn = su.GroupNorm(cfg["norm_num_groups"], 1e-5)
    conv = su.Conv3x3(ch)                          # the UNet's (im2col at <= 8 x 8)
    return [(f"L{i} {s}x{s}x{ch} resnet", lambda: blk.resnets[0](_nchw(h), torch.from_numpy(temb)),
             jax.jit(lambda h, e: res.apply({"params": pb["resnets_0"]}, h, e)),
             (jnp.asarray(h), jnp.asarray(temb))),
            (f"L{i} GroupNorm+SiLU", lambda: torch.nn.functional.silu(blk.resnets[0].norm2(_nchw(hc))),
             jax.jit(lambda h: nn.swish(gn.apply({"params": pb["resnets_0"]["norm2"]}, h))), (jnp.asarray(hc),)),
            (f"L{i} conv3x3", lambda: blk.resnets[0].conv2(_nchw(hc)),
             jax.jit(lambda h: conv.apply({"params": pb["resnets_0"]["conv2"]}, h)), (jnp.asarray(hc),))]


def _attention_cases(i, s, ch, cfg, model, blk, pb, hc, ctx, rng, b):
    """Level i's cases of its transformer and its self- and cross-attention cores (q, k, v drawn from ``rng``)."""
    import numpy as np
    import jax
    import jax.numpy as jnp
    import torch
    from dngjax.models import sd_unet as su
    heads = model.heads[i]
    st = su.SpatialTransformer(heads, model.transformer_layers[i], model.use_linear_projection,
                               cfg["norm_num_groups"])
    tc = torch.from_numpy(ctx)
    cases = [(f"L{i} transformer", lambda: blk.attentions[0](_nchw(hc), tc).sample,
              jax.jit(lambda h, c: st.apply({"params": pb["attentions_0"]}, h, c)),
              (jnp.asarray(hc), jnp.asarray(ctx)))]
    d = ch // heads
    for kind, m in (("self", s * s), ("cross", 77)):
        q = rng.standard_normal((b, s * s, ch)).astype(np.float32)
        kv = rng.standard_normal((b, m, ch)).astype(np.float32)
        th = lambda a: torch.from_numpy(a).view(b, -1, heads, d).transpose(1, 2)
        cases.append((f"L{i} attention core, {kind} ({s * s}x{m}, {heads} heads of {d})",
                      lambda q=q, kv=kv: torch.nn.functional.scaled_dot_product_attention(
                          th(q), th(kv), th(kv)).transpose(1, 2).reshape(b, -1, ch),
                      jax.jit(lambda q, k: su.attend(q, k, k, heads)),
                      (jnp.asarray(q), jnp.asarray(kv))))
    return cases


def _part_cases(name, b):
    """[(label, torch fn, jitted jax fn, jax args)] of each down level's parts of size ``name``, batch b."""
    import numpy as np
    unet, model, params, (x, t, ctx) = build(name, b)
    p = params["params"]
    cfg, size = SIZES[name]
    rng = np.random.default_rng(1)
    temb = rng.standard_normal((b, 4 * cfg["block_out_channels"][0])).astype(np.float32)
    cases = []
    for i, ch in enumerate(cfg["block_out_channels"]):
        s = size // 2 ** i
        cin = cfg["block_out_channels"][max(i - 1, 0)]
        h = rng.standard_normal((b, s, s, cin)).astype(np.float32)
        hc = rng.standard_normal((b, s, s, ch)).astype(np.float32)
        blk, pb = unet.down_blocks[i], p[f"down_blocks_{i}"]
        cases += _resnet_cases(i, s, ch, cfg, blk, pb, h, hc, temb)
        if hasattr(blk, "attentions"):
            cases += _attention_cases(i, s, ch, cfg, model, blk, pb, hc, ctx, rng, b)
    return cases


def parts(name, args, timed, clock):
    """Per level of the down path: its first ResNet, its transformer, and inside them the attention
    core (softmax(q k^T / sqrt(d)) v: torch's ``scaled_dot_product_attention`` as diffusers calls it),
    a GroupNorm and a 3x3 convolution, each jitted alone (the weights as compile-time constants), torch
    vs JAX on the same weights and inputs."""
    import numpy as np
    import torch

    cases = _part_cases(name, args.batch)
    print(f"[{name}] parts, batch {args.batch}, {clock} time, median of {args.repeats}")
    print(f"{'part':52s} {'torch ms':>9s} {'jax ms':>9s} {'torch/jax':>10s}")
    with torch.inference_mode():
        for label, tf, jf, ja in cases:
            run_t, run_j = (lambda: tf().numpy()), (lambda: np.asarray(jf(*ja)))
            run_t(), run_j()
            tt, tj = [], []
            for r in range(args.repeats):
                if r % 2:
                    tj.append(timed(run_j)); tt.append(timed(run_t))
                else:
                    tt.append(timed(run_t)); tj.append(timed(run_j))
            mt, mj = statistics.median(tt), statistics.median(tj)
            print(f"{label:52s} {1e3 * mt:9.2f} {1e3 * mj:9.2f} {mt / mj:9.2f}x", flush=True)


if __name__ == "__main__":
    main()
