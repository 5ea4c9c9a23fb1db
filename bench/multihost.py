#!/usr/bin/env python
"""Two processes x one core against one process x two cores: what JAX's distributed runtime costs here.

    python bench/multihost.py                        # both layouts, training and sampling, ~10 min on 2 busy cores
    python bench/multihost.py --batch 64 --seeds 128 --steps 20

Both layouts run the same global work on the same two cores (``os.sched_setaffinity``):

* ``1 process x 2 cores``: one process, two forced host devices (``--xla_force_host_platform_device_count=2``),
  pinned to cores {0, 1}: the batch (or the seeds) split over its two devices, no collectives across
  processes;
* ``2 processes x 1 core``: two processes (:mod:`dngjax.distributed`, a loopback coordinator, gloo
  collectives), one device each, each pinned to its own core: the same split, the gradient mean and
  the sampler's gathers crossing processes.

Measured in each: the library's train step (``dngjax.tools.train.trainer.make_train_step`` on the
``mnist_ddpm.py:tiny`` UNet, global batch ``--batch`` sharded on the data axis, as ``train/main.py``
runs it) in steps/s after a warm-up step, and a DNG sweep (``dngjax.sweep``, 2 grid points, ``--seeds``
seeds over ``--steps`` respaced steps, the same UNet for both predictions) in seconds after a warm-up
call, each timed ``--repeats`` times (medians), in wall time and in the CPU time of all processes
together (less sensitive to other jobs on a shared machine). Compilation is excluded. The ratio
printed is (2 processes x 1 core) / (1 process x 2 cores): above 1 means the processes cost more.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _all_cpu(seconds: float) -> float:
    """The CPU seconds of every process, summed."""
    import jax
    import numpy as np
    if jax.process_count() == 1:
        return seconds
    from jax.experimental import multihost_utils
    return float(np.sum(multihost_utils.process_allgather(np.asarray([seconds], np.float64))))


def _timed(fn, name: str, repeats: int):
    """(wall s, CPU s of all processes) of ``fn()``, medians over ``repeats`` rounds between barriers."""
    import numpy as np
    from dngjax import distributed
    walls, cpus = [], []
    for r in range(repeats):
        distributed.barrier(f"{name}_start_{r}")
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        distributed.barrier(f"{name}_end_{r}")
        walls.append(time.perf_counter() - t0)
        cpus.append(_all_cpu(time.process_time() - c0))
    return float(np.median(walls)), float(np.median(cpus))


def _training_setup(batch: int):
    """(module, schedule, jitted train step, replicated state, x (batch, 28, 28, 1), y (batch,), key): the tiny
    MNIST UNet's library train step, its random batch sharded on the data axis."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    import dngjax as dj
    from dngjax import distributed
    from dngjax.tools.train import trainer
    from dngjax.tools.train.configs import mnist_ddpm

    config = mnist_ddpm.get_config("tiny")
    with config.unlocked():
        config.batch_size = batch
    module = trainer.build_model(config)
    opt = trainer.make_optimizer(config)
    sched = dj.linear_schedule()
    step_fn = jax.jit(trainer.make_train_step(module, opt, config, sched.alpha_bars), donate_argnums=(0,))
    mesh = distributed.global_mesh("data")
    repl, data_sh = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    state = jax.device_put(jax.device_get(trainer._init_state(module, opt, config, (28, 28, 1))), repl)
    rng = np.random.default_rng(0)
    x_all = rng.uniform(-1, 1, (batch, 28, 28, 1)).astype(np.float32)
    y_all = rng.integers(0, 10, batch).astype(np.int32)
    x = distributed.put_global(x_all, data_sh)
    y = distributed.put_global(y_all, data_sh)
    return module, sched, step_fn, state, x, y, jax.random.PRNGKey(0)


def _time_training(step_fn, state, x, y, key, args):
    """(the state after them, wall s per step, CPU s per step) of ``args.train_steps`` steps per round, after a
    warm-up step."""
    import jax
    state, m = step_fn(state, x, y, key)                       # compile + warm-up
    jax.block_until_ready(m)

    def train_round():
        nonlocal state
        for i in range(args.train_steps):
            state, m = step_fn(state, x, y, jax.random.fold_in(key, i))
        jax.block_until_ready(m)

    train_s, train_cpu = (v / args.train_steps for v in _timed(train_round, "bench_train", args.repeats))
    return state, train_s, train_cpu


def _time_sweep(module, params, sched, args):
    """(wall s, CPU s, samples (2, seeds, 28, 28, 1)) of a 2-point DNG sweep, the same UNet for both predictions,
    after a warm-up call."""
    import numpy as np
    import dngjax as dj
    from dngjax.denoiser import denoiser
    den = denoiser(module, params)
    rule = dj.DynamicNegativeGuidance(1.0, prior=0.01, temperature=0.2)
    keys = dj.keys_from_seeds(np.arange(args.seeds))
    chain = dj.respace(sched, args.steps)
    run = lambda: dj.sweep(den, chain, keys, (28, 28, 1), rule=rule, grid={"scale": [1.0, 5.0]}, denoiser_c=den,
                           chunk_size=args.seeds)
    x_s = run()                                                # compile + warm-up
    sample_s, sample_cpu = _timed(run, "bench_sample", args.repeats)
    return sample_s, sample_cpu, x_s


def child(args) -> None:
    """One process of a layout: time the train step and the sweep; process 0 prints the RESULT line."""
    from dngjax import distributed
    distributed.initialize()
    import jax
    import numpy as np

    module, sched, step_fn, state, x, y, key = _training_setup(args.batch)
    state, train_s, train_cpu = _time_training(step_fn, state, x, y, key, args)
    sample_s, sample_cpu, x_s = _time_sweep(module, jax.device_get(state["ema_params"]), sched, args)
    if jax.process_index() == 0:
        print("RESULT " + json.dumps({"train_s_per_step": train_s, "sample_s": sample_s,
                                      "train_cpu_s_per_step": train_cpu, "sample_cpu_s": sample_cpu,
                                      "processes": jax.process_count(), "devices": jax.device_count(),
                                      "checksum": float(np.abs(x_s).sum())}), flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args, n: int, devices: int, cores_per_process) -> dict:
    port = _free_port()
    procs = []
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DNGJAX_COORD", "DNGJAX_NUM", "DNGJAX_PROCESS"))}
    flags = " ".join(f for f in base.get("XLA_FLAGS", "").split() if "device_count" not in f)
    for i in range(n):
        env = dict(base, JAX_PLATFORMS="cpu",
                   XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}".strip())
        if n > 1:
            env.update(DNGJAX_COORDINATOR=f"127.0.0.1:{port}", DNGJAX_NUM_PROCESSES=str(n), DNGJAX_PROCESS_ID=str(i))
        cmd = [sys.executable, os.path.abspath(__file__), "--child", f"--batch={args.batch}",
               f"--seeds={args.seeds}", f"--steps={args.steps}", f"--train_steps={args.train_steps}",
               f"--repeats={args.repeats}"]
        cores = cores_per_process[i]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      preexec_fn=lambda c=cores: os.sched_setaffinity(0, c)))
    outs = [p.communicate(timeout=args.timeout) for p in procs]
    for p, (out, err) in zip(procs, outs):
        if p.returncode != 0:
            raise SystemExit(f"a benchmark process failed:\n{err[-3000:]}")
    line = next(line for out, _ in outs for line in out.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32, help="global training batch (a multiple of 2)")
    ap.add_argument("--train_steps", type=int, default=10, help="timed training steps")
    ap.add_argument("--seeds", type=int, default=64, help="sampling seeds (a multiple of 2)")
    ap.add_argument("--steps", type=int, default=20, help="respaced chain steps of the sweep")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds of each; medians are printed")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds before a layout counts as hung")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("needs two CPU cores")
    a, b = sorted(os.sched_getaffinity(0))[:2]
    one = _launch(args, 1, 2, [{a, b}])
    two = _launch(args, 2, 1, [{a}, {b}])
    same = one["checksum"] == two["checksum"]
    print(f"global batch {args.batch}, sweep of 2 points x {args.seeds} seeds x {args.steps} steps "
          f"(mnist_ddpm.py:tiny UNet, both predictions), jax {__import__('jax').__version__}, cores {a},{b}")
    print(f"{'':<28}{'1 process x 2 cores':>22}{'2 processes x 1 core':>22}{'ratio (2p / 1p)':>17}")
    rows = [("train step, wall s", "train_s_per_step"), ("train step, CPU s", "train_cpu_s_per_step"),
            ("sweep, wall s", "sample_s"), ("sweep, CPU s", "sample_cpu_s")]
    for label, k in rows:
        print(f"{label:<28}{one[k]:>22.4f}{two[k]:>22.4f}{two[k] / one[k]:>17.2f}")
    print(f"(medians of {args.repeats} rounds; CPU s: all processes together; load average during the run: "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())})")
    print(f"sweep samples identical in both layouts: {same}")


if __name__ == "__main__":
    main()
