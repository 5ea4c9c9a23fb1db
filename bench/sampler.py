#!/usr/bin/env python
"""Sampler benchmark: prints a table of ratios measured side by side in one run.

    python bench/sampler.py [--quick] [--batches 1,16,128] [--steps N] [--threads T]

Model: an MNIST UNet of ``bench/archs.py`` (``--arch``; default ``cpu``, the shipped models' ch 16 x
(1, 2, 4), 687k parameters; ``gpu`` = ``mnist_unet()``, ch 32, 1.1 M), NHWC, with
random but non-degenerate parameters (the zero-initialised layers are filled in,
every leaf is perturbed), two different parameter sets for eps_u and eps_neg.

Measurements (each compares things timed in the same run, interleaved, median
of ``--repeats``; compile time is excluded from throughput by a warm-up call):

* DNG vs NP time per image (target <= 1.03): both make two network calls per step.
* DNG with the continuous-time posterior (``estimator="stratonovich"``, Hutchinson, 1 and 2 probes: the
  two predictions' jvps) on DDIM eta = 0 vs the paper's DNG on the ancestral chain, time per image and
  step (target <= 2.0).
* K = 8 guidance scales in one ``sweep`` vs 8 separate ``sample`` calls (target < 1)
  and vs one ``sample`` call of the same 8N images (target <= 1.10).
* compile time (trace + lower + XLA compile) of the sampler for a 1000-step vs a
  10-step chain (target <= 1.5).
* dngjax vs an equivalent PyTorch Python-loop sampler (``bench/torch_reference.py``,
  authors' style, same weights) in images/s at each batch (target >= 1.0); dngjax as
  ``dj.denoiser`` makes it by default (on CPU: micro-batches of 16), and also with the whole batch.
* Architectures (no target): the DNG sampler's time per image with each MNIST UNet of
  ``bench/archs.py`` (random parameters) relative to the shipped one (``cpu``, ch 16 x (1, 2, 4)),
  at each batch >= 16: what a larger network would cost every experiment.
* Variants (no target; what helps and what does not): flax's ``nn.GroupNorm`` in
  place of the library's (faster) GroupNorm, micro-batching the network, fusing the two network calls with
  ``vmap`` over stacked params, bfloat16 compute, XLA's YNNPACK off, NCHW
  convolutions, torch channels_last.

Timing: every measurement records wall-clock and process CPU time. On a shared,
contended CPU the wall clock mostly measures the scheduler, so with one thread
(the default on CPU, see ``--threads``) the pass/fail ratios use CPU time, which
for a single-threaded process equals the wall time it would take on an idle
core; both ratios are printed. With more threads (or on a GPU) wall time is used.
"""

from __future__ import annotations

import argparse
import os
import sys



def _parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="short run: batches 1,16, 4 steps, 3 repeats, small sweep, no variants")
    ap.add_argument("--batches", default=None, help="batches for the torch comparison (default 1,16,128)")
    ap.add_argument("--steps", type=int, default=None, help="chain length for throughput (default 10)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (default 5)")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads for JAX (XLA intra-op) and torch alike; 0 = all cores "
                         "(default 1: see docs/benchmarks.md for why on a shared host)")
    ap.add_argument("--sweep-n", type=int, default=None, help="seeds per grid point in the sweep test (default 16)")
    ap.add_argument("--arch", default="cpu",
                    help="a name in bench/archs.py: the UNet of every section but archs (default cpu: the shipped models' network)")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    ap.add_argument("--no-variants", action="store_true", help="skip the variant measurements")
    ap.add_argument("--only", default=None,
                    help="comma-separated subset of: dng_np,continuous,sweep,compile,torch,archs,variants")
    args = ap.parse_args(argv)
    q = args.quick
    args.batches = [int(b) for b in (args.batches or ("1,16" if q else "1,16,128")).split(",")]
    args.steps = args.steps or (4 if q else 10)
    args.repeats = args.repeats or (3 if q else 5)
    args.sweep_n = args.sweep_n or (4 if q else 16)
    if q and args.only is None:
        args.no_variants = True
    sections = {"dng_np", "continuous", "sweep", "compile", "torch", "archs", "variants"}
    args.sections = set(args.only.split(",")) if args.only else sections
    if args.no_torch:
        args.sections.discard("torch")
    if args.no_variants:
        args.sections.discard("variants")
    if not args.sections <= sections:
        ap.error(f"--only: unknown sections {sorted(args.sections - sections)}")
    return args


ARGS = _parse_args() if __name__ == "__main__" else None
N_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
if ARGS is not None and ARGS.threads > 0:
    # Must happen before jax (XLA) and torch (OpenMP) are imported. The process is also pinned to
    # that many cores: XLA:CPU with one intra-op thread still runs work on other threads (measured:
    # ~1.5 cores of CPU time per core of wall time), which a CPU-time ratio would charge to jax.
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:ARGS.threads])
    flags = os.environ.get("XLA_FLAGS", "")
    flags += (f" --xla_cpu_multi_thread_eigen={'false' if ARGS.threads == 1 else 'true'}"
              f" intra_op_parallelism_threads={ARGS.threads}")
    os.environ["XLA_FLAGS"] = flags.strip()
    os.environ.setdefault("OMP_NUM_THREADS", str(ARGS.threads))

import dataclasses  # noqa: E402
import importlib  # noqa: E402
import inspect  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402

import numpy as np  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import flax.linen as nn  # noqa: E402

import dngjax as dj  # noqa: E402
from dngjax import sampler as dj_sampler  # noqa: E402
from dngjax.models import unet as dj_unet  # noqa: E402


# bench/'s own modules: ``bench.NAME`` when imported as a package (the tests, ``python -m bench.X``), ``NAME``
# when run as ``python bench/X.py`` from any folder (bench/ is then first on the path: the project's modules
# are all under ``dngjax``, so no name of bench/ shadows one)
def _sibling(name: str):
    return importlib.import_module(f"{__package__}.{name}" if __package__ else name)


archs = _sibling("archs")

if ARGS is not None and ARGS.arch not in archs.ARCHS:  # checked here: parsing ran before jax was imported
    sys.exit(f"bench/sampler.py: --arch {ARGS.arch!r} is unknown; known: {', '.join(archs.ARCHS)}")

SHAPE = (28, 28, 1)
K_SCALES = (0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0)


# --------------------------------------------------------------------------- timing

@dataclasses.dataclass
class Timing:
    wall: float   # median seconds per call
    cpu: float    # median process CPU seconds per call
    walls: list
    cpus: list


def measure(fns, repeats, warmup=True):
    """Time each zero-argument callable ``repeats`` times, interleaved (order alternating)."""
    if warmup:
        for f in fns.values():
            f()
    walls = {k: [] for k in fns}
    cpus = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        for k in (names if r % 2 == 0 else names[::-1]):
            w0, c0 = time.perf_counter(), time.process_time()
            fns[k]()
            walls[k].append(time.perf_counter() - w0)
            cpus[k].append(time.process_time() - c0)
    return {k: Timing(float(np.median(walls[k])), float(np.median(cpus[k])), walls[k], cpus[k])
            for k in fns}


class Table:
    def __init__(self, metric):
        self.metric = metric          # "cpu" or "wall": which ratio decides pass/fail
        self.rows = []

    def add(self, name, num: Timing, den: Timing, target=None, cmp="<=", detail="", invert=False):
        """ratio = num / den (or den / num with invert=True: a speedup)."""
        rc = (den.cpu / num.cpu) if invert else (num.cpu / den.cpu)
        rw = (den.wall / num.wall) if invert else (num.wall / den.wall)
        r = rc if self.metric == "cpu" else rw
        other = rw if self.metric == "cpu" else rc
        if target is None:
            ok = ""
        elif cmp == "<=":
            ok = "pass" if r <= target else "FAIL"
        elif cmp == "<":
            ok = "pass" if r < target else "FAIL"
        else:
            ok = "pass" if r >= target else "FAIL"
        tgt = "" if target is None else f"{cmp} {target:g}"
        self.rows.append((name, f"{r:.3f}", tgt, ok, f"{other:.3f}", detail))
        print(f"  .. {name}: {r:.3f} {tgt} {ok}  ({detail})", flush=True)

    def section(self, title):
        self.rows.append((f"-- {title}", "", "", "", "", ""))

    def render(self):
        other = "wall ratio" if self.metric == "cpu" else "cpu ratio"
        head = ("measurement", f"ratio ({self.metric})", "target", "pass/fail", other, "detail")
        w = [max(len(str(r[i])) for r in self.rows + [head]) for i in range(6)]
        line = lambda r: "| " + " | ".join(str(c).ljust(w[i]) for i, c in enumerate(r)) + " |"
        out = [line(head), "|" + "|".join("-" * (x + 2) for x in w) + "|"]
        out += [line(r) for r in self.rows]
        return "\n".join(out)


def per_img(t: Timing, n_img, metric):
    v = t.cpu if metric == "cpu" else t.wall
    return v / n_img


# --------------------------------------------------------------------------- models

def perturbed_params(module, seed):
    """Random params with no degenerate layer: zero-initialised kernels get a lecun-normal
    draw, and every leaf (incl. GroupNorm scales/biases) gets a small perturbation."""
    p = module.init(jax.random.key(seed), jnp.zeros((1, *SHAPE)), jnp.zeros((1,), jnp.int32))
    leaves, tdef = jax.tree_util.tree_flatten(p)
    rng = np.random.default_rng(seed)
    out = []
    for a in leaves:
        a = np.asarray(a, np.float64)
        if a.ndim >= 2 and not a.any():
            a = rng.normal(size=a.shape) / np.sqrt(np.prod(a.shape[:-1]))
        else:
            a = a + 0.05 * rng.normal(size=a.shape)
        out.append(jnp.asarray(a, jnp.float32))
    return jax.tree_util.tree_unflatten(tdef, out)


def unet_variant(name, **overrides):
    """A copy of ``dngjax.models.unet`` with some module-level names replaced.

    A distinct module (distinct classes), so jit caches never mix it up with the library's
    UNet; the library's files are untouched."""
    mod = types.ModuleType(f"dngjax_bench_unet_{name}")
    sys.modules[mod.__name__] = mod
    exec(compile(inspect.getsource(dj_unet), dj_unet.__file__, "exec"), mod.__dict__)
    mod.__dict__.update(overrides)
    return mod


def flax_gn_unet(base):
    """The UNet ``base`` with flax's ``nn.GroupNorm`` (the formulation the library's own GroupNorm replaced)."""
    mod = unet_variant("flaxgn", GroupNorm=lambda num_groups, epsilon=1e-6, dtype=None, name=None:
                       nn.GroupNorm(num_groups, epsilon=epsilon, dtype=dtype, name=name))
    kw = {f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.name not in ("parent", "name")}
    return mod.UNet(**kw)


# --------------------------------------------------------------------------- sections

def jax_sampler(eu, ec, rule, sched, b, seed0=0):
    keys = dj.keys_from_seeds(np.arange(seed0, seed0 + b))
    return lambda: np.asarray(dj.sample(eu, sched, keys, SHAPE, rule=rule, denoiser_c=ec))


def section_dng_np(tab, ctx):
    b = 16
    sched = ctx["sched"]
    dng = dj.DynamicNegativeGuidance(scale=2.0)
    npr = dj.NegativePrompting(scale=2.0)
    t = measure({"dng": jax_sampler(ctx["eu"], ctx["ec"], dng, sched, b),
                 "np": jax_sampler(ctx["eu"], ctx["ec"], npr, sched, b)}, ctx["repeats"])
    m = tab.metric
    tab.add("DNG / NP time per image", t["dng"], t["np"], 1.03, "<=",
            f"B={b}, {sched.num_steps} steps; DNG {per_img(t['dng'], b, m) * 1e3:.1f} ms/img, "
            f"NP {per_img(t['np'], b, m) * 1e3:.1f} ms/img ({m})")


def section_continuous(tab, ctx):
    b = 16
    sched = ctx["sched"]
    paper = dj.DynamicNegativeGuidance(scale=2.0)
    keys = dj.keys_from_seeds(np.arange(b))
    run = lambda rule, **kw: (lambda: np.asarray(dj.sample(ctx["eu"], sched, keys, SHAPE, rule=rule,
                                                           denoiser_c=ctx["ec"], **kw)))
    fns = {"paper": run(paper)}
    variants = {"jvp1": ("hutchinson", 1), "jvp2": ("hutchinson", 2), "fd1": ("finite_difference", 1)}
    for name, (div, k) in variants.items():
        fns[name] = run(dj.DynamicNegativeGuidance(scale=2.0, temperature=1.0, estimator="stratonovich",
                                                   divergence=div, probes=k), solver="ddim")
    t = measure(fns, ctx["repeats"])
    m = tab.metric
    for name, (div, k) in variants.items():
        tab.add(f"DNG continuous ({div}, {k} probe{'s' if k > 1 else ''}) / paper DNG", t[name], t["paper"],
                2.0, "<=", f"B={b}, {sched.num_steps} steps; {per_img(t[name], b, m) * 1e3:.1f} vs "
                f"{per_img(t['paper'], b, m) * 1e3:.1f} ms/img ({m})")


def section_sweep(tab, ctx):
    n = ctx["sweep_n"]
    k = len(K_SCALES)
    sched = ctx["sched"]
    eu, ec = ctx["eu"], ctx["ec"]
    rule = dj.DynamicNegativeGuidance(scale=1.0)
    keys = dj.keys_from_seeds(range(n))
    keys_kn = dj.keys_from_seeds(range(k * n))

    def one_sweep():
        return dj.sweep(eu, sched, keys, SHAPE, rule=rule, grid={"scale": list(K_SCALES)}, denoiser_c=ec)

    def separate():
        return [np.asarray(dj.sample(eu, sched, keys, SHAPE, rule=rule.replace(scale=s), denoiser_c=ec))
                for s in K_SCALES]

    def batched():
        return np.asarray(dj.sample(eu, sched, keys_kn, SHAPE, rule=rule, denoiser_c=ec))

    chunk = max(1, 16 // k)

    def chunked():
        return dj.sweep(eu, sched, keys, SHAPE, rule=rule, grid={"scale": list(K_SCALES)}, denoiser_c=ec,
                        chunk_size=chunk)

    fns = {"sweep": one_sweep, "separate": separate, "batched": batched}
    if n > chunk:
        fns["chunked"] = chunked
    t = measure(fns, max(2, ctx["repeats"] - 2))
    m = tab.metric
    tab.add(f"sweep K={k} / {k} separate calls", t["sweep"], t["separate"], 1.0, "<",
            f"N={n} per scale, {sched.num_steps} steps; sweep {per_img(t['sweep'], k * n, m) * 1e3:.1f}, "
            f"separate {per_img(t['separate'], k * n, m) * 1e3:.1f} ms/img")
    tab.add(f"sweep K={k} / one batched call of {k}N", t["sweep"], t["batched"], 1.10, "<=",
            f"batched {per_img(t['batched'], k * n, m) * 1e3:.1f} ms/img")
    if "chunked" in t:
        tab.add(f"sweep K={k} chunk_size={chunk} / {k} separate calls", t["chunked"], t["separate"], None, "<",
                f"{k}x{chunk}={k * chunk} images per compiled call; {per_img(t['chunked'], k * n, m) * 1e3:.1f} ms/img")


def compile_once(ctx, n_steps, b=16):
    """Trace + lower + XLA-compile the library's sampler afresh (AOT, nothing cached)."""
    sched = dj.respace(dj.linear_schedule(), n_steps)
    rule = dj.DynamicNegativeGuidance(scale=2.0)
    eu, ec, shape, eta, _ = dj_sampler._prepare(ctx["eu"], ctx["ec"], rule, SHAPE, "beta", None)
    keys = dj_sampler._as_keys(dj.keys_from_seeds(range(b)))
    jax.clear_caches()                                   # trace afresh
    lowered = dj_sampler._grid_jit.lower(eu, ec, rule, sched, keys, shape, False, "beta", eta, ())
    lowered.compile()


def section_compile(tab, ctx):
    # A new batch size (unused elsewhere) per repeat, so every call traces, lowers and compiles afresh (jax caches
    # traces per argument signature); both chain lengths get the same batch size in a repeat.
    reps = max(2, ctx["repeats"] // 2)
    compile_once(ctx, 10, b=39)                                      # one-time warm-up costs
    walls, cpus = {"1000": [], "10": []}, {"1000": [], "10": []}
    for r in range(reps):
        for k in (("1000", "10") if r % 2 == 0 else ("10", "1000")):
            w0, c0 = time.perf_counter(), time.process_time()
            compile_once(ctx, int(k), b=40 + r)
            walls[k].append(time.perf_counter() - w0)
            cpus[k].append(time.process_time() - c0)
    t = {k: Timing(float(np.median(walls[k])), float(np.median(cpus[k])), walls[k], cpus[k]) for k in walls}
    tab.add("compile 1000 steps / 10 steps", t["1000"], t["10"], 1.5, "<=",
            f"trace+lower+compile, DNG, B=40..: 1000 steps {t['1000'].wall:.1f} s wall / {t['1000'].cpu:.1f} s cpu, "
            f"10 steps {t['10'].wall:.1f} s wall / {t['10'].cpu:.1f} s cpu")


def section_torch(tab, ctx):
    import torch
    ref = _sibling("torch_reference")
    TorchUNet, dng_sample = ref.TorchUNet, ref.dng_sample

    module, pu, pn = ctx["module"], ctx["pu"], ctx["pn"]
    tu, tn = TorchUNet(module, pu).eval(), TorchUNet(module, pn).eval()
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, *SHAPE)).astype(np.float32)
    t = np.array([0, 10, 500, 999], np.int32)
    yj = np.asarray(jax.jit(module.apply)(pu, x, t))
    with torch.no_grad():
        yt = tu(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t).long())
    yt = yt.numpy().transpose(0, 2, 3, 1)
    rel = float(np.abs(yj - yt).max() / np.abs(yj).max())
    print(f"  torch/flax UNet agreement: max rel err {rel:.2e} (output std {yj.std():.3f})", flush=True)
    assert rel < 1e-4, f"the PyTorch twin disagrees with the Flax UNet: max rel err {rel:.2e}"
    ctx["torch_rel_err"] = rel

    sched = ctx["sched"]
    rule = dj.DynamicNegativeGuidance(scale=2.0)
    whole = ctx.get("whole_eu")
    mb = ctx["eu"].micro_batch
    for b in ctx["batches"]:
        gen = torch.Generator().manual_seed(0)
        fns = {"jax": jax_sampler(ctx["eu"], ctx["ec"], rule, sched, b),
               "torch": lambda b=b, gen=gen: dng_sample(tu, tn, sched, b, (1, 28, 28), scale=2.0,
                                                        generator=gen)}
        if whole is not None and b > mb:
            fns["jax_whole"] = jax_sampler(whole[0], whole[1], rule, sched, b)
        reps = ctx["repeats"] if b < 64 else max(2, ctx["repeats"] // 2)
        tt = measure(fns, reps)
        m = tab.metric
        ips = lambda k: b / (tt[k].cpu if m == "cpu" else tt[k].wall)
        how = f"micro-batches of {mb}" if mb and b > mb else "whole batch"
        tab.add(f"dngjax / torch images/s, B={b}", tt["jax"], tt["torch"], 1.0, ">=",
                f"{sched.num_steps} steps DNG; jax ({how}) {ips('jax'):.2f} img/s, torch {ips('torch'):.2f} img/s ({m})",
                invert=True)
        if "jax_whole" in tt:
            tab.add(f"dngjax, whole batch (micro_batch=None) / torch, B={b}", tt["jax_whole"], tt["torch"],
                    None, ">=", f"jax {ips('jax_whole'):.2f} img/s", invert=True)


def section_archs(tab, ctx, names=("cpu", "cpu_r2", "cpu_136")):
    """DNG sampling time per image of each architecture, relative to the shipped one (``cpu``)."""
    sched = ctx["sched"]
    rule = dj.DynamicNegativeGuidance(scale=2.0)
    nets = {}
    for name in names:
        module = archs.unet(name)
        pu, pn = perturbed_params(module, 0), perturbed_params(module, 1)
        nets[name] = (dj.denoiser(module, pu), dj.denoiser(module, pn),
                      sum(a.size for a in jax.tree_util.tree_leaves(pu)))
    m = tab.metric
    for b in sorted({max(16, b) for b in ctx["batches"]}):
        reps = ctx["repeats"] if b < 64 else max(2, ctx["repeats"] // 2)
        t = measure({name: jax_sampler(eu, ec, rule, sched, b) for name, (eu, ec, _) in nets.items()}, reps)
        for name in names[1:]:
            tab.add(f"{name} / {names[0]} (shipped) DNG time per image, B={b}", t[name], t[names[0]],
                    detail=f"{nets[name][2] / 1e3:.0f}k vs {nets[names[0]][2] / 1e3:.0f}k params; "
                           f"{per_img(t[name], b, m) * 1e3:.1f} vs {per_img(t[names[0]], b, m) * 1e3:.1f} ms/img "
                           f"({sched.num_steps} steps, {m})")


def _repeated(f, n_inner, *a):
    """A zero-argument callable running ``f(*a)`` ``n_inner`` times, waiting for each result."""
    def g():
        for _ in range(n_inner):
            jax.block_until_ready(f(*a))
    return g


def _max_rel_err(got, want, ref):
    """max |got - want| relative to max |ref| (want, ref: numpy)."""
    return np.abs(np.asarray(got) - want).max() / np.abs(ref).max()


def _jax_variants(module, pu, pn, x, t, n_inner):
    """({variant: timed callable}, {variant: max rel err to the base forward}) of one UNet forward on x (B, 28, 28, 1):
    base, flax GroupNorm, bf16, YNNPACK off (CPU), micro-batches of 16 (B > 16), two calls vs one vmap pair."""
    b = x.shape[0]
    base = jax.jit(module.apply)
    ref = np.asarray(base(pu, x, t))
    fns = {"base": _repeated(base, n_inner, pu, x, t)}
    errs = {}
    flaxm = flax_gn_unet(module)
    f_flax = jax.jit(flaxm.apply)
    fns["flaxgn"] = _repeated(f_flax, n_inner, pu, x, t)
    errs["flaxgn"] = _max_rel_err(f_flax(pu, x, t), ref, ref)
    bf = module.clone(dtype=jnp.bfloat16)
    f_bf = jax.jit(bf.apply)
    fns["bf16"] = _repeated(f_bf, n_inner, pu, x, t)
    errs["bf16"] = _max_rel_err(f_bf(pu, x, t), ref, ref)
    if jax.default_backend() == "cpu":
        f_eigen = jax.jit(module.apply, compiler_options={"xla_cpu_experimental_ynn_fusion_type": ""})
        fns["no_ynn"] = _repeated(f_eigen, n_inner, pu, x, t)
    if b > 16:
        mb = jax.jit(lambda p, x, t: dj.denoiser(module, p, micro_batch=16)(x, t))
        fns["ubatch16"] = _repeated(mb, n_inner, pu, x, t)
        errs["ubatch16"] = _max_rel_err(mb(pu, x, t), ref, ref)
    # two network calls (eps_u, eps_neg) as two calls vs one vmap over stacked params
    two = jax.jit(lambda pa, pb, x, t: (module.apply(pa, x, t), module.apply(pb, x, t)))
    stacked = jax.tree.map(lambda a, c: jnp.stack([a, c]), pu, pn)
    fused = jax.jit(jax.vmap(module.apply, in_axes=(0, None, None)))
    fns["two_calls"] = _repeated(two, n_inner, pu, pn, x, t)
    fns["vmap_pair"] = _repeated(fused, n_inner, stacked, x, t)
    errs["vmap_pair"] = _max_rel_err(fused(stacked, x, t)[1], np.asarray(two(pu, pn, x, t)[1]), ref)
    return fns, errs


def _torch_variants(module, pu, x, t, n_inner):
    """{variant: timed callable} of the PyTorch twin's forward on x: NCHW ("torch") and channels_last."""
    import torch
    TorchUNet = _sibling("torch_reference").TorchUNet
    tu = TorchUNet(module, pu).eval()
    tcl = TorchUNet(module, pu).eval().to(memory_format=torch.channels_last)
    xt = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
    xcl = xt.contiguous(memory_format=torch.channels_last)
    tt = torch.from_numpy(np.asarray(t)).long()

    def tloop(model, xx):
        def g():
            with torch.no_grad():
                for _ in range(n_inner):
                    model(xx, tt)
        return g

    return {"torch": tloop(tu, xt), "torch_cl": tloop(tcl, xcl)}


def _add_variant_rows(tab, r, errs, b):
    """The table rows of one batch's variants (timings ``r``, errors ``errs``), each against its baseline."""
    e = lambda k: f"; max rel err {errs[k]:.1e}" if k in errs else ""
    tab.add(f"flax nn.GroupNorm / the library's GroupNorm, fwd B={b}", r["flaxgn"], r["base"],
            detail="UNet forward" + e("flaxgn"))
    if b > 16:
        tab.add(f"micro-batches of 16 (lax.map) / whole batch, fwd B={b}", r["ubatch16"], r["base"],
                detail="UNet forward" + e("ubatch16"))
    tab.add(f"bf16 compute / f32, fwd B={b}", r["bf16"], r["base"], detail="UNet forward" + e("bf16"))
    if "no_ynn" in r:
        tab.add(f"XLA YNNPACK off (Eigen) / default, fwd B={b}", r["no_ynn"], r["base"],
                detail="compiler_options xla_cpu_experimental_ynn_fusion_type=''")
    tab.add(f"vmap over stacked params / two calls, B={b}", r["vmap_pair"], r["two_calls"],
            detail="eps_u and eps_neg in one call" + e("vmap_pair"))
    tab.add(f"torch NCHW / jax, fwd B={b}", r["torch"], r["base"], detail=">1: jax faster (one forward pass)")
    tab.add(f"torch channels_last / jax, fwd B={b}", r["torch_cl"], r["base"],
            detail="not the authors' style; oneDNN NHWC convolutions")


def _conv_layout(tab, rng, reps):
    """Convolution layout in XLA: NCHW vs NHWC, one 3x3 conv 32->32 at 28x28, batch 16."""
    x = jnp.asarray(rng.normal(size=(16, 28, 28, 32)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 32, 32)), jnp.float32)
    conv = lambda dn: jax.jit(lambda x, w: jax.lax.conv_general_dilated(
        x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn))
    nhwc, nchw = conv(("NHWC", "HWIO", "NHWC")), conv(("NCHW", "OIHW", "NCHW"))
    xc, wc = jnp.transpose(x, (0, 3, 1, 2)), jnp.transpose(w, (3, 2, 0, 1))
    r = measure({"nhwc": lambda: [nhwc(x, w).block_until_ready() for _ in range(8)],
                 "nchw": lambda: [nchw(xc, wc).block_until_ready() for _ in range(8)]}, reps)
    tab.add("JAX conv NCHW / NHWC (3x3 32->32, 28x28, B=16)", r["nchw"], r["nhwc"], detail="layout")


def section_variants(tab, ctx):
    """Network-level (one forward pass) comparisons of what might speed up CPU sampling."""
    module, pu, pn = ctx["module"], ctx["pu"], ctx["pn"]
    reps = ctx["repeats"]
    rng = np.random.default_rng(2)
    big = max(ctx["batches"])
    for b in sorted({16, big}):
        x = jnp.asarray(rng.normal(size=(b, *SHAPE)), jnp.float32)
        t = jnp.full((b,), 500, jnp.int32)
        n_inner = max(1, 64 // b)
        fns, errs = _jax_variants(module, pu, pn, x, t, n_inner)
        fns.update(_torch_variants(module, pu, x, t, n_inner))
        _add_variant_rows(tab, measure(fns, reps), errs, b)
    _conv_layout(tab, rng, reps)


# --------------------------------------------------------------------------- main

def main(args):
    import torch
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    else:
        torch.set_num_threads(N_CORES)
    backend = jax.default_backend()
    metric = "cpu" if (backend == "cpu" and args.threads == 1) else "wall"
    module = archs.unet(args.arch)
    pu, pn = perturbed_params(module, 0), perturbed_params(module, 1)
    n_params = sum(a.size for a in jax.tree_util.tree_leaves(pu))
    sched = dj.respace(dj.linear_schedule(), args.steps)
    ctx = dict(module=module, pu=pu, pn=pn, eu=dj.denoiser(module, pu), ec=dj.denoiser(module, pn),
               sched=sched, repeats=args.repeats, batches=args.batches, sweep_n=args.sweep_n)
    if "torch" in args.sections and ctx["eu"].micro_batch:  # the library's default on CPU; also without it
        ctx["whole_eu"] = (dj.denoiser(module, pu, micro_batch=None), dj.denoiser(module, pn, micro_batch=None))

    dev = jax.devices()[0]
    from dngjax.tools.train.trainer import cpu_model_name
    cpu_name = cpu_model_name()
    threads = args.threads if args.threads > 0 else N_CORES
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    context = (f"device: {dev.device_kind} ({backend}); host CPU: {cpu_name}, {N_CORES} cores, load avg {load:.1f}\n"
               f"jax {jax.__version__}, flax {importlib.import_module('flax').__version__}, "
               f"torch {torch.__version__}, numpy {np.__version__}, python {platform.python_version()}\n"
               f"threads: {threads} for JAX (XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}) and torch "
               f"(torch.get_num_threads()={torch.get_num_threads()})\n"
               f"model (all sections but archs): {args.arch} ({archs.describe(args.arch)}), {n_params / 1e3:.0f}k params, NHWC f32; chain: {args.steps} respaced steps; "
               f"repeats {args.repeats} (medians); pass/fail metric: {metric} time")
    print(context, flush=True)

    tab = Table(metric)
    t0 = time.perf_counter()
    sections = (("dng_np", "guidance cost", section_dng_np),
                ("continuous", "the continuous-time posterior's cost", section_continuous),
                ("sweep", "sweeps", section_sweep),
                ("compile", "compilation", section_compile),
                ("torch", "dngjax vs PyTorch loop sampler (ratio = speedup of dngjax)", section_torch),
                ("archs", "network size: the capacity candidates' sampling cost (no target)", section_archs),
                ("variants", "variants (no target; < 1 = the variant is faster, except torch / jax rows)",
                 section_variants))
    for key, title, run_section in sections:
        if key in args.sections:
            tab.section(title)
            print(f"[{key}]", flush=True)
            run_section(tab, ctx)
    print()
    print(context)
    print(f"total benchmark time {time.perf_counter() - t0:.0f} s")
    print(tab.render())
    return tab


if __name__ == "__main__":
    main(ARGS)
