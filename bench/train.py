#!/usr/bin/env python
"""Train-step benchmark: dngjax vs an equivalent PyTorch step, where the time goes, what helps.

    python bench/train.py                  # everything, ~15 min on 2 cores
    python bench/train.py --only torch --cores 2 --batches 64,128
    python bench/train.py --only cores      # 1 process x 2 cores vs 2 processes x 1 core

Every ratio compares two things timed side by side in the same run (interleaved, order
alternating, medians of ``--repeats``; compilation excluded by a warm-up call). The process is
pinned to ``--cores`` CPU cores (``os.sched_setaffinity``) and both frameworks get that many
threads, so wall time is the measure: on a pinned core the wall clock is what the step costs.

Sections:

* ``torch``: the library's train step (``dngjax.tools.train.trainer.make_train_step``: eps-prediction loss at
  a random t, Adam, global-norm clipping, EMA; jitted with the state donated, as ``train/main.py``
  runs it, with the cpu config's ``micro_batch`` where it divides the batch) against the same step in
  PyTorch (``bench/torch_reference.py``'s UNet built from the same weights, ``torch.optim.Adam``,
  ``clip_grad_norm_``, EMA with ``torch._foreach_lerp_``; the whole batch, the authors' style), in
  images/s, for each shipped architecture and batch. Target: >= 0.8x PyTorch. Also PyTorch with the
  same micro-batches (gradient accumulation) against its whole batch.
* ``levers``: the library's UNet forward+backward against variants: the previous formulations
  (flax's ``nn.GroupNorm``, a 1x1 ``nn.Conv`` shortcut, ``jax.image.resize`` upsampling; all three
  = the UNet before this benchmark), XLA:CPU's YNNPACK fusions off or extended to
  elementwise ops and reductions, ResBlocks rematerialised (``nn.remat``), bfloat16 compute; and for the
  whole step: 4 steps per jitted call (``lax.scan``) vs 4 calls, state donation off, the whole
  batch in one pass vs the cpu config's micro-batches, and each micro-batch's gradient as a separate
  jitted call dispatched from Python (``SplitStep``, micro-batches of 16 and 8) vs the one compiled step.
* ``profile``: forward vs forward+backward vs the whole step, and the step's XLA ops grouped by
  kind (convolutions split into forward/input-gradient and kernel-gradient, dots, reductions,
  transposes, elementwise fusions), from a ``jax.profiler`` trace.
* ``cores``: aggregate images/s on the whole machine of one process using 2 cores vs two
  processes pinned to one core each (how ``train/train_all_mnist.sh`` runs two models at once),
  for both frameworks. Runs subprocesses of this script.
"""

from __future__ import annotations

import argparse
import os
import sys



def _parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="batch 64, arch cpu only, 3 repeats")
    ap.add_argument("--cores", type=int, default=1, help="CPU cores to pin this process to (default 1)")
    ap.add_argument("--batches", default=None, help="train batches for the torch section (default 64,128)")
    ap.add_argument("--archs", default=None, help="architectures (default cpu,cpu_v1,gpu; known: see bench/archs.py)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (default 5)")
    ap.add_argument("--only", default=None, help="comma-separated subset of: torch,levers,profile,cores")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: "jax:ARCH:B:N" or "torch:..."
    args = ap.parse_args(argv)
    q = args.quick
    args.batches = [int(b) for b in (args.batches or ("64" if q else "64,128")).split(",")]
    args.archs = (args.archs or ("cpu" if q else "cpu,cpu_v1,gpu")).split(",")
    args.repeats = args.repeats or (3 if q else 5)
    sections = ["torch", "levers", "profile", "cores"]
    args.sections = args.only.split(",") if args.only else sections
    if not set(args.sections) <= set(sections):
        ap.error(f"--only: unknown sections {sorted(set(args.sections) - set(sections))}")
    return args


ARGS = _parse_args() if __name__ == "__main__" else None
if ARGS is not None:
    # Before jax (XLA) and torch (OpenMP) start their thread pools.
    _cores = sorted(os.sched_getaffinity(0))
    if ARGS.cores > len(_cores):
        sys.exit(f"--cores {ARGS.cores}: only {len(_cores)} cores available")
    os.sched_setaffinity(0, _cores[:ARGS.cores] if not ARGS.worker else os.sched_getaffinity(0))
    _n = len(os.sched_getaffinity(0))
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_cpu_multi_thread_eigen={'false' if _n == 1 else 'true'}"
                               f" intra_op_parallelism_threads={_n}").strip()
    os.environ["OMP_NUM_THREADS"] = str(_n)

import collections  # noqa: E402
import dataclasses  # noqa: E402
import gzip  # noqa: E402
import importlib  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402

import numpy as np  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import flax.linen as nn  # noqa: E402
import optax  # noqa: E402

from dngjax.models import unet as dj_unet  # noqa: E402
from dngjax.schedules import linear_schedule  # noqa: E402
from dngjax.tools.train import trainer as train_lib  # noqa: E402
from dngjax.tools.train.configs import mnist_ddpm  # noqa: E402


# bench/'s own modules: ``bench.NAME`` when imported as a package (the tests, ``python -m bench.X``), ``NAME``
# when run as ``python bench/X.py`` from any folder (bench/ is then first on the path: the project's modules
# are all under ``dngjax``, so no name of bench/ shadows one)
def _sibling(name: str):
    return importlib.import_module(f"{__package__}.{name}" if __package__ else name)


archs = _sibling("archs")

if ARGS is not None and set(ARGS.archs) - set(archs.ARCHS):  # checked here: parsing ran before jax was imported
    sys.exit(f"bench/train.py: --archs {','.join(a for a in ARGS.archs if a not in archs.ARCHS)} unknown; "
             f"known: {', '.join(archs.ARCHS)}")

SHAPE = (28, 28, 1)


# --------------------------------------------------------------------------- timing

@dataclasses.dataclass
class Timing:
    wall: float
    walls: list


def measure(fns, repeats):
    """Time each zero-argument callable ``repeats`` times after a warm-up, interleaved, order alternating."""
    for f in fns.values():
        f()
    walls = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        for k in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            fns[k]()
            walls[k].append(time.perf_counter() - t0)
    return {k: Timing(float(np.median(v)), v) for k, v in walls.items()}


class Table:
    def __init__(self):
        self.rows = []

    def section(self, title):
        self.rows.append((f"-- {title}", "", "", "", ""))

    def add(self, name, ratio, target=None, cmp=">=", detail=""):
        ok = "" if target is None else ("pass" if (ratio >= target if cmp == ">=" else ratio <= target) else "FAIL")
        tgt = "" if target is None else f"{cmp} {target:g}"
        self.rows.append((name, f"{ratio:.3f}", tgt, ok, detail))
        print(f"  .. {name}: {ratio:.3f} {tgt} {ok}  ({detail})", flush=True)

    def render(self):
        head = ("measurement", "ratio", "target", "pass/fail", "detail")
        w = [max(len(str(r[i])) for r in self.rows + [head]) for i in range(5)]
        line = lambda r: "| " + " | ".join(str(c).ljust(w[i]) for i, c in enumerate(r)) + " |"
        return "\n".join([line(head), "|" + "|".join("-" * (x + 2) for x in w) + "|"] + [line(r) for r in self.rows])


# --------------------------------------------------------------------------- the two train steps

def perturbed_params(module, seed=0):
    """Random params with no zero layer (the zero-initialised output convs get a lecun-normal draw)."""
    p = module.init(jax.random.key(seed), jnp.zeros((1, *SHAPE)), jnp.zeros((1,), jnp.int32))
    rng = np.random.default_rng(seed)
    out = []
    leaves, tdef = jax.tree_util.tree_flatten(p)
    for a in leaves:
        a = np.asarray(a, np.float64)
        if a.ndim >= 2 and not a.any():
            a = rng.normal(size=a.shape) / np.sqrt(np.prod(a.shape[:-1]))
        out.append(jnp.asarray(a + 0.02 * rng.normal(size=a.shape), jnp.float32))
    return jax.tree_util.tree_unflatten(tdef, out)


def _train_config(batch, micro=None):
    """The cpu config at batch ``batch``; ``micro``: its micro_batch (None: the config's, where it divides)."""
    c = mnist_ddpm.get_config("cpu")
    c.batch_size = batch
    if micro is not None:
        c.micro_batch = micro
    if c.micro_batch and batch % c.micro_batch:
        c.micro_batch = 0
    return c


class JaxStep:
    """The library's train step, jitted with the state donated (as train/train.py runs it)."""

    def __init__(self, module, params, batch, donate=True, compiler_options=None, micro=None):
        cfg = _train_config(batch, micro)
        self.micro = int(cfg.micro_batch)
        opt = train_lib.make_optimizer(cfg)
        sched = linear_schedule()
        self.fn = jax.jit(train_lib.make_train_step(module, opt, cfg, sched.alpha_bars),
                          donate_argnums=(0,) if donate else (), compiler_options=compiler_options)
        params = jax.tree.map(jnp.copy, params)  # the state is donated: never the caller's arrays
        self.state = {"step": jnp.asarray(0, jnp.int32), "params": params,
                      "ema_params": jax.tree.map(jnp.copy, params), "opt_state": opt.init(params),
                      "wall_time": jnp.asarray(0.0), "loss_avg": jnp.asarray(0.0)}
        rng = np.random.default_rng(0)
        self.x = jnp.asarray(rng.uniform(-1, 1, (batch, *SHAPE)), jnp.float32)
        self.y = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
        self.key = jax.random.key(0)

    def __call__(self, n=1):
        for _ in range(n):
            self.state, m = self.fn(self.state, self.x, self.y, self.key)
        jax.block_until_ready(m["loss"])


class ScanStep(JaxStep):
    """k train steps per jitted call (``lax.scan`` over k batches)."""

    def __init__(self, module, params, batch, k):
        super().__init__(module, params, batch)
        cfg = _train_config(batch)
        one = train_lib.make_train_step(module, train_lib.make_optimizer(cfg), cfg, linear_schedule().alpha_bars)
        self.k = k

        def many(state, xs, ys, keys):
            return jax.lax.scan(lambda s, b: one(s, *b), state, (xs, ys, keys))

        self.fn = jax.jit(many, donate_argnums=(0,))
        self.x = jnp.broadcast_to(self.x, (k, *self.x.shape))
        self.y = jnp.broadcast_to(self.y, (k, *self.y.shape))
        self.key = jax.random.split(jax.random.key(0), k)

    def __call__(self, n=1):
        for _ in range(n):
            self.state, m = self.fn(self.state, self.x, self.y, self.key)
        jax.block_until_ready(m["loss"])


class SplitStep(JaxStep):
    """The train step's work with each micro-batch's gradient a separate jitted call, dispatched from Python.

    Three compiled functions instead of one: the batch's random draws (t, noise), the loss and
    gradient of one micro-batch of ``micro`` images added to the running sum (the sum donated), and
    the update (the mean gradient, Adam with the cpu config's clipping, EMA). The gradient is the
    library step's (eps loss at a random t, micro-batch means averaged). A timing lever, not a second
    trainer: the library's step lives in closures of ``dngjax.tools.train.trainer.make_train_step``, so the
    draws and update are written out here, without what costs nothing measurable (the EMA decay's
    warm-up, the grad-norm metric, the unconditional UNet only).
    """

    def __init__(self, module, params, batch, micro):
        super().__init__(module, params, batch, micro=0)
        opt = train_lib.make_optimizer(_train_config(batch))
        alpha_bars = linear_schedule().alpha_bars
        self.micro, n = micro, batch // micro

        def draw(x, key):
            k_t, k_n = jax.random.split(key)
            t = jax.random.randint(k_t, (x.shape[0],), 0, alpha_bars.shape[0])
            noise = jax.random.normal(k_n, x.shape, x.dtype)
            ab = alpha_bars[t][:, None, None, None]
            return jnp.sqrt(ab) * x + jnp.sqrt(1.0 - ab) * noise, t, noise

        grad = jax.value_and_grad(lambda p, xt, t, noise: jnp.mean((module.apply(p, xt, t, train=True) - noise) ** 2))

        def update(state, total):
            loss, grads = jax.tree.map(lambda a: a / n, total)
            updates, opt_state = opt.update(grads, state["opt_state"], state["params"])
            p = optax.apply_updates(state["params"], updates)
            ema = jax.tree.map(lambda e, q: 0.999 * e + 0.001 * q, state["ema_params"], p)
            return dict(state, step=state["step"] + 1, params=p, ema_params=ema, opt_state=opt_state), loss

        self.draw, self.first = jax.jit(draw), jax.jit(grad)
        self.add = jax.jit(lambda total, *a: jax.tree.map(jnp.add, total, grad(*a)), donate_argnums=(0,))
        self.update = jax.jit(update, donate_argnums=(0,))

    def __call__(self, n=1):
        for _ in range(n):
            xt, t, noise = self.draw(self.x, self.key)
            total = None
            for i in range(0, xt.shape[0], self.micro):
                part = (self.state["params"], xt[i:i + self.micro], t[i:i + self.micro], noise[i:i + self.micro])
                total = self.first(*part) if total is None else self.add(total, *part)
            self.state, loss = self.update(self.state, total)
        jax.block_until_ready(loss)


class TorchStep:
    """The same step in PyTorch: eps loss at a random t, Adam, global-norm clipping, EMA."""

    def __init__(self, module, params, batch, micro=0):
        import torch
        TorchUNet = _sibling("torch_reference").TorchUNet
        cfg = _train_config(batch)
        self.micro = micro or batch  # > 0: gradient accumulation over micro-batches of this size
        self.torch = torch
        self.net = TorchUNet(module, params).train()
        self.ema = [p.detach().clone() for p in self.net.parameters()]
        self.opt = torch.optim.Adam(self.net.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.b1, cfg.optim.b2))
        self.clip = cfg.optim.grad_clip
        self.decay = cfg.ema_decay
        self.ab = torch.from_numpy(np.array(linear_schedule().alpha_bars, np.float32))
        self.x = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (batch, 1, 28, 28)).astype(np.float32))
        self.gen = torch.Generator().manual_seed(0)

    def __call__(self, n=1):
        torch = self.torch
        for _ in range(n):
            b = self.x.shape[0]
            t = torch.randint(0, len(self.ab), (b,), generator=self.gen)
            noise = torch.randn(self.x.shape, generator=self.gen)
            ab = self.ab[t][:, None, None, None]
            xt = ab.sqrt() * self.x + (1 - ab).sqrt() * noise
            self.opt.zero_grad(set_to_none=True)
            for i in range(0, b, self.micro):
                s = slice(i, i + self.micro)
                loss = ((self.net(xt[s], t[s]) - noise[s]) ** 2).mean() * (self.micro / b)
                loss.backward()
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.clip)
            self.opt.step()
            with torch.no_grad():
                torch._foreach_lerp_(self.ema, list(self.net.parameters()), 1.0 - self.decay)
        loss.item()


def check_twin(module, params):
    """The PyTorch UNet must compute the Flax UNet's function (same weights), or the comparison means nothing."""
    import torch
    TorchUNet = _sibling("torch_reference").TorchUNet
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, *SHAPE)).astype(np.float32)
    t = np.array([0, 10, 500, 999], np.int32)
    yj = np.asarray(jax.jit(module.apply)(params, x, t))
    with torch.no_grad():
        yt = TorchUNet(module, params).eval()(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
                                              torch.from_numpy(t).long()).numpy().transpose(0, 2, 3, 1)
    rel = float(np.abs(yj - yt).max() / np.abs(yj).max())
    assert rel < 1e-4, f"the PyTorch twin disagrees with the Flax UNet: max rel err {rel:.2e}"
    return rel


# --------------------------------------------------------------------------- sections

def section_torch(tab, ctx):
    for arch in ctx["archs"]:
        module = archs.unet(arch)
        params = perturbed_params(module)
        rel = check_twin(module, params)
        n_params = sum(a.size for a in jax.tree.leaves(params))
        for b in ctx["batches"]:
            js, ts = JaxStep(module, params, b), TorchStep(module, params, b)
            fns = {"jax": js, "torch": ts}
            if js.micro:  # the same micro-batches in torch: does PyTorch gain from them too?
                fns["torch_mb"] = TorchStep(module, params, b, micro=js.micro)
            r = measure(fns, ctx["repeats"])
            ips = {k: b / v.wall for k, v in r.items()}
            mb = f"micro-batches of {js.micro}" if js.micro else "whole batch"
            tab.add(f"dngjax / torch train step, {arch}, B={b}", ips["jax"] / ips["torch"], 0.8, ">=",
                    f"{n_params / 1e3:.0f}k params; jax ({mb}) {ips['jax']:.0f} img/s ({r['jax'].wall * 1e3:.0f} "
                    f"ms/step), torch {ips['torch']:.0f} img/s ({r['torch'].wall * 1e3:.0f} ms/step); twin rel err {rel:.1e}")
            if "torch_mb" in r:
                tab.add(f"torch {mb} / torch whole batch, {arch}, B={b}", r["torch_mb"].wall / r["torch"].wall,
                        None, "", f"< 1: PyTorch gains from them too; {ips['torch_mb']:.0f} img/s")


def unet_variant(name, **overrides):
    """A copy of ``dngjax.models.unet`` with some module-level names replaced (a distinct module, so jit
    caches never mix it with the library's UNet)."""
    mod = types.ModuleType(f"dngjax_bench_unet_{name}")
    sys.modules[mod.__name__] = mod
    exec(compile(inspect.getsource(dj_unet), dj_unet.__file__, "exec"), mod.__dict__)
    mod.__dict__.update(overrides)
    return mod


# XLA:CPU's YNNPACK library fusions extended from their default (dots and convolutions) to elementwise
# ops and reductions: a compiler option (values are DebugOptions.LibraryFusionType names).
YNN_ALL = ",".join(f"LIBRARY_FUSION_TYPE_{k}" for k in ("INDIVIDUAL_DOT", "INDIVIDUAL_CONVOLUTION", "ELTWISE", "REDUCE"))


def _flax_gn(num_groups, epsilon=1e-6, dtype=None, name=None):
    return nn.GroupNorm(num_groups, epsilon=epsilon, dtype=dtype, name=name)


def _conv_1x1(features, dtype=None, name=None):
    return nn.Conv(features, (1, 1), dtype=dtype, name=name)


def _resize_up(h):
    b, hh, ww, c = h.shape
    return jax.image.resize(h, (b, 2 * hh, 2 * ww, c), method="nearest")


def _timed_grad(module, params, x, t, **jit_kw):
    """A zero-argument call of the jitted gradient of the MSE of ``module(params, x, t)`` against x, waited for."""
    g = jax.jit(jax.grad(lambda p: jnp.mean((module.apply(p, x, t) - x) ** 2)), **jit_kw)
    return lambda: jax.block_until_ready(g(params))


def _network_levers(tab, arch, b, base, params, x, t, repeats):
    """fwd+bwd of UNet variants and compiler options against the library's UNet, on x (b, 28, 28, 1)."""
    grad_fn = lambda module, **jit_kw: _timed_grad(module, params, x, t, **jit_kw)
    variants = {
        "flax_gn": archs.unet(arch, unet_variant("flax_gn", GroupNorm=_flax_gn)),
        "conv_1x1": archs.unet(arch, unet_variant("conv1x1", Conv1x1=_conv_1x1)),
        "resize": archs.unet(arch, unet_variant("resize", upsample_nearest_2x=_resize_up)),
        "previous": archs.unet(arch, unet_variant("previous", GroupNorm=_flax_gn, Conv1x1=_conv_1x1,
                                             upsample_nearest_2x=_resize_up)),
    }
    fns = {"library": grad_fn(base), **{k: grad_fn(m) for k, m in variants.items()}}
    variants["remat"] = archs.unet(arch, unet_variant("remat", ResBlock=nn.remat(dj_unet.ResBlock, static_argnums=(3,))))
    fns["remat"] = grad_fn(variants["remat"])
    if jax.default_backend() == "cpu":
        fns["no_ynn"] = grad_fn(base, compiler_options={"xla_cpu_experimental_ynn_fusion_type": ""})
        fns["ynn_all"] = grad_fn(base, compiler_options={"xla_cpu_experimental_ynn_fusion_type": YNN_ALL})
    fns["bf16"] = grad_fn(archs.unet(arch).clone(dtype=jnp.bfloat16))
    r = measure(fns, repeats)
    lib = r["library"].wall
    what = {"flax_gn": "flax nn.GroupNorm instead of the library's GroupNorm",
            "conv_1x1": "1x1 nn.Conv shortcut instead of Conv1x1 (a matmul)",
            "resize": "jax.image.resize upsampling instead of broadcast+reshape",
            "previous": "all three: the UNet before this benchmark",
            "no_ynn": "XLA:CPU YNNPACK fusions off (compiler option)",
            "ynn_all": "YNNPACK fusions also for elementwise ops and reductions (default: dots, convolutions)",
            "remat": "ResBlocks rematerialised in the backward pass (nn.remat)",
            "bf16": "bfloat16 compute (params float32)"}
    for k in fns:
        if k != "library":
            tab.add(f"{k} / library, fwd+bwd, {arch}, B={b}", r[k].wall / lib, None, "",
                    f"{what[k]}; library {lib * 1e3:.0f} ms")


def _step_levers(tab, arch, b, base, params, repeats):
    """Whole train steps: 4 per jitted call vs 4 calls; donation off vs on; the whole batch vs the config's
    micro-batches; micro-batch gradients as separate jitted calls."""
    k = 4
    one, scan, nodonate = JaxStep(base, params, b), ScanStep(base, params, b, k), JaxStep(base, params, b, donate=False)
    whole = JaxStep(base, params, b, micro=0)
    fns = {"one": lambda: one(k), "scan": scan, "nodonate": lambda: nodonate(k)}
    if one.micro:
        fns["whole"] = lambda: whole(k)
    splits = {m: SplitStep(base, params, b, m) for m in (16, 8) if b % m == 0}
    fns.update({f"split{m}": (lambda s=s: s(k)) for m, s in splits.items()})
    r = measure(fns, repeats)
    for m in splits:
        tab.add(f"micro-batch gradients of {m} as separate jitted calls / the library's step, {arch}, B={b}",
                r[f"split{m}"].wall / r["one"].wall, None, "",
                "SplitStep: draws, one call per micro-batch, update (3 compiled functions)")
    if one.micro:
        tab.add(f"whole batch / micro-batches of {one.micro} (the cpu config), train step, {arch}, B={b}",
                r["whole"].wall / r["one"].wall, None, "", "config.micro_batch = 0 vs the cpu config's")
    tab.add(f"{k} steps in one scan call / {k} calls, {arch}, B={b}", r["scan"].wall / r["one"].wall, None, "",
            f"{r['one'].wall / k * 1e3:.0f} ms/step in single calls")
    tab.add(f"no state donation / donation, {arch}, B={b}", r["nodonate"].wall / r["one"].wall, None, "", "")


def section_levers(tab, ctx):
    """What speeds up training: UNet variants and compiler options (fwd+bwd), then whole-step levers."""
    arch = ctx["archs"][0]
    b = ctx["batches"][0]
    base = archs.unet(arch)
    params = perturbed_params(base)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(b, *SHAPE)), jnp.float32)
    t = jnp.asarray(rng.integers(0, 1000, b), jnp.int32)
    _network_levers(tab, arch, b, base, params, x, t, ctx["repeats"])
    _step_levers(tab, arch, b, base, params, ctx["repeats"])


def _profile_ops(fn, args, n=3):
    """Per-op wall time (ms per call) from a jax.profiler trace, keyed by HLO instruction name."""
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(n):
                out = fn(*args)
            jax.block_until_ready(out)
        path = next(os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs if f.endswith(".trace.json.gz"))
        with gzip.open(path) as f:
            events = json.load(f)["traceEvents"]
    agg = collections.Counter()
    for e in events:
        if e.get("ph") == "X":
            agg[e["name"]] += e["dur"] / 1e3 / n
    return agg


def _op_kinds(hlo_text):
    """HLO instruction name -> kind, looking inside fusions for their heaviest op."""
    comps, cur = {}, None
    for line in hlo_text.splitlines():
        m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if m and not line.startswith(" "):
            cur = m.group(1)
            comps[cur] = []
        elif cur:
            comps[cur].append(line)
    pat = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ([\w\-]+)\(")

    def ops(comp, depth=0):
        found = []
        for line in comps.get(comp, []):
            m = pat.match(line)
            if not m:
                continue
            found.append((m.group(3), m.group(2), line))
            c2 = re.search(r"(?:calls|to_apply)=%?([\w.\-]+)", line)
            if c2 and depth < 3:
                found += ops(c2.group(1), depth + 1)
        return found

    kinds = {}
    for lines in comps.values():
        for line in lines:
            m = pat.match(line)
            if not m:
                continue
            name, shape, op = m.groups()
            c = re.search(r"calls=%?([\w.\-]+)", line)
            inner = ops(c.group(1)) if c else [(op, shape, line)]
            names = {o for o, _, _ in inner}
            conv = [(s, l) for o, s, l in inner if o == "convolution"]
            if conv:
                s, l = conv[0]
                # the kernel gradient of a conv is a convolution over the batch ("b01f_01io" with
                # the batch folded into the features): its output is the kernel's (in, kh, kw, out)
                kinds[name] = "conv: kernel gradient" if "window={size=" in l and re.search(
                    r"size=(\d+)x\1", l) and int(re.search(r"size=(\d+)", l).group(1)) > 3 else \
                    "conv: forward / input gradient"
            elif "dot" in names:
                kinds[name] = "dot (dense, attention, 1x1)"
            elif "reduce" in names or "reduce-window" in names:
                kinds[name] = "reduction"
            elif names & {"transpose", "copy"}:
                kinds[name] = "transpose / copy"
            elif names & {"scatter", "gather", "dynamic-slice", "dynamic-update-slice"}:
                kinds[name] = "gather / scatter"
            else:
                kinds[name] = "elementwise fusion / other"
    return kinds


def section_profile(tab, ctx):
    arch = ctx["archs"][0]
    b = ctx["batches"][0]
    module = archs.unet(arch)
    params = perturbed_params(module)
    js = JaxStep(module, params, b, donate=False)
    x, t = js.x, jnp.asarray(np.random.default_rng(0).integers(0, 1000, b), jnp.int32)
    fwd = jax.jit(module.apply)
    grad = jax.jit(jax.grad(lambda p, x, t: jnp.mean((module.apply(p, x, t) - x) ** 2)))
    r = measure({"fwd": lambda: jax.block_until_ready(fwd(params, x, t)),
                 "grad": lambda: jax.block_until_ready(grad(params, x, t)), "step": js}, ctx["repeats"])
    tab.add(f"forward / whole step, {arch}, B={b}", r["fwd"].wall / r["step"].wall, None, "",
            f"forward {r['fwd'].wall * 1e3:.0f} ms, step {r['step'].wall * 1e3:.0f} ms")
    tab.add("backward (fwd+bwd - fwd) / whole step", (r["grad"].wall - r["fwd"].wall) / r["step"].wall, None, "",
            f"backward {(r['grad'].wall - r['fwd'].wall) * 1e3:.0f} ms = "
            f"{(r['grad'].wall - r['fwd'].wall) / r['fwd'].wall:.2f}x the forward")
    tab.add("optimizer + EMA + noise (step - fwd+bwd) / whole step", (r["step"].wall - r["grad"].wall) / r["step"].wall,
            None, "", "")
    agg = _profile_ops(js.fn, (js.state, js.x, js.y, js.key))
    kinds = _op_kinds(js.fn.lower(js.state, js.x, js.y, js.key).compile().as_text())
    by_kind = collections.Counter()
    for name, ms in agg.items():
        if name in kinds:
            by_kind[kinds[name]] += ms
    total = sum(by_kind.values())
    for kind, ms in by_kind.most_common():
        tab.add(f"  share of the step's XLA op time: {kind}", ms / total, None, "", f"{ms:.0f} ms of {total:.0f} ms")


def _worker(spec):
    """Subprocess body for ``cores``: run N steps of one framework, print images/s as JSON."""
    fw, arch, b, n = spec.split(":")
    b, n = int(b), int(n)
    module = archs.unet(arch)
    params = perturbed_params(module)
    step = JaxStep(module, params, b) if fw == "jax" else TorchStep(module, params, b)
    if fw == "torch":
        import torch
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    step(2)
    t0 = time.perf_counter()
    step(n)
    print(json.dumps({"ips": b * n / (time.perf_counter() - t0)}), flush=True)


def section_cores(tab, ctx):
    arch, b = ctx["archs"][0], ctx["batches"][0]
    cores = sorted(os.sched_getaffinity(0)) if ctx["all_cores"] is None else ctx["all_cores"]
    if len(cores) < 2:
        print("  (cores: needs 2 cores, skipped)")
        return
    n = 10 if ctx["repeats"] <= 3 else 20
    me = os.path.abspath(__file__)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(me)))
    env.pop("XLA_FLAGS", None)

    def run(fw, core_sets):
        procs = [subprocess.Popen(["taskset", "-c", ",".join(map(str, cs)), sys.executable, me,
                                   f"--cores={len(cs)}", f"--worker={fw}:{arch}:{b}:{n}"],
                                  stdout=subprocess.PIPE, text=True, env=env) for cs in core_sets]
        return sum(json.loads(p.communicate()[0].strip().splitlines()[-1])["ips"] for p in procs)

    res = {}
    for fw in ("jax", "torch"):
        res[fw, "one"] = run(fw, [cores[:2]])
        res[fw, "two"] = run(fw, [[cores[0]], [cores[1]]])
        tab.add(f"{fw}: 2 processes x 1 core / 1 process x 2 cores, {arch}, B={b}",
                res[fw, "two"] / res[fw, "one"], None, "",
                f"aggregate {res[fw, 'two']:.0f} vs {res[fw, 'one']:.0f} img/s")
    best = lambda fw: max(res[fw, "one"], res[fw, "two"])
    tab.add(f"dngjax / torch, each in its best use of 2 cores, {arch}, B={b}", best("jax") / best("torch"), 0.8, ">=",
            f"jax {best('jax'):.0f} img/s, torch {best('torch'):.0f} img/s")


def main(args):
    import torch
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    all_cores = sorted(_cores) if "_cores" in globals() else None
    ctx = dict(archs=args.archs, batches=args.batches, repeats=args.repeats, all_cores=all_cores)
    context = (f"host CPU: {train_lib.cpu_model_name()}; pinned to {len(os.sched_getaffinity(0))} core(s) of {len(all_cores or [])}; "
               f"load avg {os.getloadavg()[0]:.1f}\n"
               f"jax {jax.__version__} ({jax.default_backend()}), flax {importlib.import_module('flax').__version__}, "
               f"torch {torch.__version__} ({torch.get_num_threads()} threads), python {platform.python_version()}\n"
               f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; repeats {args.repeats} (medians of wall time)")
    print(context, flush=True)
    tab = Table()
    t0 = time.perf_counter()
    titles = {"torch": "dngjax vs PyTorch train step (ratio = dngjax images/s / torch images/s)",
              "levers": "levers (ratio = variant time / library time; < 1: the variant is faster)",
              "profile": "where the time goes (library step)",
              "cores": "using both cores"}
    for key in ("torch", "levers", "profile", "cores"):
        if key in args.sections:
            tab.section(titles[key])
            print(f"[{key}]", flush=True)
            globals()[f"section_{key}"](tab, ctx)
    print()
    print(context)
    print(f"total benchmark time {time.perf_counter() - t0:.0f} s")
    print(tab.render())


if __name__ == "__main__":
    if ARGS.worker:
        _worker(ARGS.worker)
    else:
        main(ARGS)
