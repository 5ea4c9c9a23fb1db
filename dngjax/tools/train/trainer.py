"""Training loop for DDPMs (unconditional / forget-class) and the evaluation classifier.

Flax-examples style: ``train_and_evaluate(config, workdir)``. Everything that
varies between runs is in the ``ml_collections`` config (see ``train/configs``).

* optax Adam(W) with linear warm-up (then constant or cosine), global-norm clipping;
* EMA of the parameters (used for sampling and exported);
* a jitted train step, data-parallel over the devices (batch sharded on a 1-D mesh,
  parameters replicated) when there are several: over every process's devices when several
  processes run the job (:mod:`dngjax.distributed`; ``config.batch_size`` is the global batch, each
  process reads only its rows of it; checkpoints are saved and restored by all processes together;
  logs, metrics, sample grids and the model are written by process 0);
* orbax ``CheckpointManager``: periodic saves, automatic resume from the latest
  complete save (orbax writes to a temporary folder and renames it when done,
  so a kill -9 leaves no corrupt checkpoint behind); after each save a sha256
  manifest of the step's files (:mod:`dngjax.tools.train.integrity`), verified on resume: a
  corrupt step is set aside and the run falls back to the newest step that passes
  (``keep_checkpoints`` >= 2 steps are kept), and none passing is an error;
* the batch at step s and every random draw at step s are functions of
  (seed, s) only, so a resumed run reproduces an uninterrupted one;
* ``WORKDIR/runs.jsonl``: one line per run (the step it started from, the schedule and label
  dropout it followed, the hardware), so that a run resumed with another schedule keeps its
  history; the card copies it (``training_runs``), and ``init_from_model`` keeps the card of the
  model a run started from;
* tqdm progress (loss, steps/s), a PNG grid of samples at intervals, and at the
  end ``WORKDIR/model`` (``params.msgpack`` + ``card.json``, see
  :mod:`dngjax.checkpoint`).
"""

from __future__ import annotations

import json
import os
import platform
import time
from typing import Any, Dict

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dngjax import checkpoint as ckpt
from dngjax import data as data_lib
from dngjax import distributed
from dngjax import memory
from dngjax.renames import warn_renamed
from dngjax.schedules import linear_schedule, respace
from dngjax.tools.train import integrity


# --------------------------------------------------------------------------- model / data

def build_model(config):
    """The network ``config.model`` describes, built as a model card's ``arch`` entry is
    (:func:`dngjax.checkpoint.build_module`: one constructor for training and loading)."""
    m = config.model
    if m.kind not in ckpt.ARCHS:
        raise ValueError(f"unknown model kind {m.kind!r}")
    try:
        return ckpt.build_module({"kind": m.kind, "kwargs": dict(m.kwargs)})
    except ckpt.CheckpointError as e:                  # a config typo: a user error, not a corrupt folder
        raise ValueError(f"config.model.kwargs: {e}") from None


def _opt_class(c) -> int | None:
    return None if c is None or c < 0 else int(c)


def load_training_data(config):
    x, y = data_lib.load_dataset(
        config.dataset, "train", data_dir=config.data_dir or None, as_float=False,
        only_class=_opt_class(config.only_class), drop_class=_opt_class(config.get("drop_class", -1)),
        limit=config.get("limit_examples", 0) or None)
    return x, y


def hardware_description() -> Dict[str, Any]:
    devs = jax.local_devices()
    return {"platform": devs[0].platform, "device_kind": devs[0].device_kind,
            "num_devices": len(devs), "num_processes": jax.process_count(),
            "num_devices_total": jax.device_count(), "cpu_count": os.cpu_count(), "cpu_cores_used": _cores_used(),
            "processor": cpu_model_name(), "host": platform.node(), "jax": jax.__version__}


def cpu_model_name() -> str:
    """The CPU's model name from /proc/cpuinfo (e.g. "AMD EPYC"), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as fh:
            return next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _cores_used() -> int:
    """CPU cores this process may run on (``taskset -c 0 python train/main.py ...`` gives 1)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# --------------------------------------------------------------------------- optimiser

def lr_schedule(o, num_train_steps: int):
    """The learning rate as a function of the step, for ``config.optim`` ``o`` (a ConfigDict or the dict of a
    card) and a run of ``num_train_steps`` training steps."""
    warm = max(int(o["warmup_steps"]), 1)
    if o["schedule"] == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, o["lr"], warm, max(num_train_steps, warm + 1),
                                                  end_value=o["lr"] * 0.01)
    # warm-up, constant, then (decay_steps > 0) a cosine decay over the run's last decay_steps steps;
    # the schedule is a function of the step count alone, so a resumed run (num_train_steps raised) follows it
    pieces, bounds = [optax.linear_schedule(0.0, o["lr"], warm), optax.constant_schedule(o["lr"])], [warm]
    decay = int(o.get("decay_steps", 0) or 0)
    if decay > 0:
        pieces.append(optax.cosine_decay_schedule(o["lr"], decay, alpha=0.01))
        bounds.append(num_train_steps - decay)
    return optax.join_schedules(pieces, bounds)


def make_optimizer(config):
    o = config.optim
    lr = lr_schedule(o, config.num_train_steps)
    if o.weight_decay > 0:
        opt = optax.adamw(lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay)
    else:
        opt = optax.adam(lr, b1=o.b1, b2=o.b2)
    if o.grad_clip > 0:
        opt = optax.chain(optax.clip_by_global_norm(o.grad_clip), opt)
    return opt


# --------------------------------------------------------------------------- steps

def _shift_augment(x, key, max_shift):
    """Random integer translation by up to max_shift pixels (zero = background -1 padding)."""
    if max_shift <= 0:
        return x
    b, h, w, c = x.shape
    xp = jnp.pad(x, ((0, 0), (max_shift,) * 2, (max_shift,) * 2, (0, 0)), constant_values=-1.0)
    offs = jax.random.randint(key, (b, 2), 0, 2 * max_shift + 1)
    crop = lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c))
    return jax.vmap(crop)(xp, offs)


def _make_draw(kind, alpha_bars, num_classes: int, label_dropout: float, shift: int):
    """draw(x, y, key) -> (batch, dropout key): the step's random inputs for the whole batch
    (micro-batching does not change them)."""
    num_t = int(alpha_bars.shape[0])

    def draw(x, y, key):
        k_t, k_n, k_d, k_a = jax.random.split(key, 4)
        if kind == "unet":
            t = jax.random.randint(k_t, (x.shape[0],), 0, num_t)
            noise = jax.random.normal(k_n, x.shape, x.dtype)
            ab = alpha_bars[t][:, None, None, None]
            xt = jnp.sqrt(ab) * x + jnp.sqrt(1.0 - ab) * noise
            # Class-conditional: each label is replaced by the null label (num_classes) with
            # probability label_dropout, so one network learns eps(x | c) and eps(x).
            label = (jnp.where(jax.random.bernoulli(k_a, label_dropout, (x.shape[0],)), num_classes,
                               y.astype(jnp.int32)) if num_classes else y)
            return {"x": xt, "t": t, "target": noise, "label": label}, k_d
        return {"x": _shift_augment(x, k_a, shift), "label": y}, k_d

    return draw


def _make_loss(module, kind, num_classes: int):
    """loss_fn(params, batch, k_d) -> (loss, aux): the DDPM's eps MSE or the classifier's cross-entropy."""

    def loss_fn(params, batch, k_d):
        if kind == "unet":
            extra = (batch["label"],) if num_classes else ()
            pred = module.apply(params, batch["x"], batch["t"], *extra, train=True, rngs={"dropout": k_d})
            return jnp.mean((pred - batch["target"]) ** 2), {}
        logits = module.apply(params, batch["x"], train=True, rngs={"dropout": k_d})
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}

    return loss_fn


def make_train_step(module, opt, config, alpha_bars):
    kind = config.model.kind
    ema_decay = float(config.ema_decay)
    num_classes = int(getattr(module, "num_classes", 0) or 0) if kind == "unet" else 0
    label_dropout = float(config.get("label_dropout", 0.0))
    if num_classes and not 0.0 < label_dropout < 1.0:
        raise ValueError(f"a class-conditional DDPM needs 0 < label_dropout < 1 (got {label_dropout}): "
                         "without dropped labels the network never learns the unconditional eps(x)")

    micro = int(config.get("micro_batch", 0) or 0)
    n_micro = int(config.batch_size) // micro if micro else 1
    draw = _make_draw(kind, alpha_bars, num_classes, label_dropout, int(config.get("augment_shift", 0)))
    loss_fn = _make_loss(module, kind, num_classes)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def batch_grads(params, x, y, key):
        """((loss, aux), grads) of the batch mean. With ``config.micro_batch`` = m, the mean over
        batch_size / m micro-batches of m images, each differentiated on its own (the same quantity:
        equal sizes), in a Python loop: unrolled in the compiled step, since XLA:CPU runs a backward
        pass inside ``lax.scan`` ~13x slower (bench/train.py), while the CPU UNet's step with m = 16
        takes ~15 % less time than with the whole batch of 64 (docs/benchmarks.md)."""
        batch, k_d = draw(x, y, key)
        if n_micro == 1:
            return grad_fn(params, batch, k_d)
        size = x.shape[0] // n_micro
        total = None
        for i in range(n_micro):
            part = jax.tree.map(lambda a: a[i * size:(i + 1) * size], batch)
            r = grad_fn(params, part, jax.random.fold_in(k_d, i))
            total = r if total is None else jax.tree.map(jnp.add, total, r)
        return jax.tree.map(lambda a: a / n_micro, total)

    def train_step(state, x, y, key):
        (loss, aux), grads = batch_grads(state["params"], x, y, key)
        updates, opt_state = opt.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        step = state["step"] + 1
        # EMA with warm-up of the decay (so short runs are not dominated by the initialisation).
        d = jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))
        ema = jax.tree_util.tree_map(lambda e, p: d * e + (1.0 - d) * p, state["ema_params"], params)
        new = dict(state, step=step, params=params, ema_params=ema, opt_state=opt_state)
        metrics = {"loss": loss, "grad_norm": jnp.sqrt(sum(jnp.vdot(g, g) for g in jax.tree.leaves(grads))), **aux}
        return new, metrics

    return train_step


# --------------------------------------------------------------------------- sampling / evaluation

def sample_images(module, params, schedule, n: int, seed: int, input_shape, num_steps: int = 100,
                  batch_size: int = 256) -> np.ndarray:
    """n samples (float [-1,1]) of a DDPM trained on ``schedule`` (its full chain), with the project's
    ancestral sampler on that chain respaced to ``num_steps``."""
    from dngjax.denoiser import denoiser
    from dngjax.sampler import keys_from_seeds, sample

    seeds = np.arange(n) + seed * 1_000_003
    return sample(denoiser(module, params), respace(schedule, num_steps), keys_from_seeds(seeds),
                  tuple(input_shape), chunk_size=batch_size)


def write_png_grid(x: np.ndarray, path: str, nrow: int | None = None) -> None:
    """Save images (N,H,W,C) float in [-1,1] as a PNG grid, ``nrow`` images per row (default: a square)."""
    from PIL import Image

    grid = np.pad(data_lib.tile(data_lib.to_uint8(x), nrow, pad=2), ((2, 2), (2, 2), (0, 0)), constant_values=255)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)


def classifier_accuracy(module, params, x_uint8, y, batch_size: int = 1000) -> float:
    """Share of images (uint8) that the classifier labels as ``y`` (scored by dngjax.evaluation)."""
    from dngjax.evaluation import make_scorer
    labels = make_scorer(module, params, batch_size=batch_size)(data_lib.to_model_space(x_uint8)).labels
    return float(np.mean(labels == np.asarray(y)))


# --------------------------------------------------------------------------- main loop

def _init_params(module, config, input_shape):
    """The module's initial parameters. Jitted: eager ``init`` compiles every initializer op by op
    (a tiny UNet: ~19 s against ~11 s); under ``jax.eval_shape`` nothing is compiled."""
    x = jnp.zeros((1, *input_shape), jnp.float32)
    args = (x, jnp.zeros((1,), jnp.int32)) if config.model.kind == "unet" else (x,)
    return jax.jit(module.init)(jax.random.PRNGKey(config.seed), *args)


def _state_of(params, opt):
    return {"step": jnp.asarray(0, jnp.int32), "params": params,
            "ema_params": jax.tree_util.tree_map(jnp.copy, params),
            "opt_state": opt.init(params), "wall_time": jnp.asarray(0.0, jnp.float32),
            "loss_avg": jnp.asarray(0.0, jnp.float32)}


def _abstract_state(module, opt, config, input_shape, sharding=None):
    """Shapes, dtypes and shardings (``sharding``, default the first local device) of the train state: what a
    checkpoint restores into."""
    shapes = jax.eval_shape(lambda: _state_of(_init_params(module, config, input_shape), opt))
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def _load_init_from(config, module):
    """``(params, card)`` of ``config.init_from`` ((None, None) if unset), its architecture checked against the config's."""
    if not config.get("init_from", ""):
        return None, None
    m2, params, card = ckpt.load_model(config.init_from)
    if ckpt.arch_of(m2) != ckpt.arch_of(module):
        raise ValueError(f"init_from={config.init_from}: its architecture {ckpt.arch_of(m2)} differs "
                         f"from the config's {ckpt.arch_of(module)}")
    return params, card


# The card fields of an init_from model that its successor's card keeps (its lineage: e.g. a model
# continued from its own weights with a fresh optimizer counts the steps and CPU hours of both).
INIT_CARD_KEYS = ("name", "only_class", "steps", "batch_size", "wall_time_s", "cpu_core_hours", "hardware",
                  "params_sha256", "training_runs", "config", "init_from", "init_from_model")

RUNS_FILE = "runs.jsonl"


def record_run(workdir: str, config, start: int, stop: int) -> None:
    """Append one run's segment of the training (steps ``start`` -> ``stop`` and the schedule it followed)
    to ``WORKDIR/runs.jsonl``, so that a run resumed with another schedule keeps its history (process 0 only)."""
    if not distributed.is_main_process():
        return
    o = config_to_dict(config.optim)
    line = {"started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "start_step": int(start),
            "stop_step": int(stop), "num_train_steps": int(config.num_train_steps), "batch_size": int(config.batch_size),
            "micro_batch": int(config.get("micro_batch", 0) or 0), "optim": o, "ema_decay": float(config.ema_decay),
            "label_dropout": float(config.get("label_dropout", 0.0)),
            "init_from": (config.get("init_from", "") or None) if start == 0 else None,
            "hardware": hardware_description()}
    with open(os.path.join(workdir, RUNS_FILE), "a") as f:
        f.write(json.dumps(line) + "\n")


def read_runs(workdir: str, final_step: int) -> list:
    """The training's segments from ``WORKDIR/runs.jsonl``, each with its ``end_step``.

    A run that was killed before it saved is repeated by the next one from the same step: a line
    supersedes the earlier lines that start at or after its own start."""
    path = os.path.join(workdir, RUNS_FILE)
    if not os.path.exists(path):
        return []
    runs = []
    with open(path) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                if "num_steps" in r:                    # a line written before the field was renamed
                    r["num_train_steps"] = r.pop("num_steps")
                runs = [q for q in runs if q["start_step"] < r["start_step"]] + [r]
    runs = [r for r in runs if r["start_step"] < final_step]
    for r, nxt in zip(runs, runs[1:] + [None]):
        r["end_step"] = nxt["start_step"] if nxt else int(final_step)
    return runs


def _init_state(module, opt, config, input_shape, init_params=None):
    """The state at step 0: fresh parameters, or ``init_params`` (from ``config.init_from``)."""
    if init_params is not None:
        logging.info("initialised from %s", config.init_from)
        params = init_params
    else:
        params = _init_params(module, config, input_shape)
    return _state_of(jax.tree_util.tree_map(jnp.asarray, params), opt)


def _truncate_metrics(path: str, last_step: int) -> None:
    """Keep the lines of metrics.jsonl up to the restored step (a killed run logged steps after its last save)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
    tmp = path + ".tmp"            # replaced in one step: a run killed here keeps the whole file
    with open(tmp, "w") as f:
        f.writelines(lines)
    os.replace(tmp, path)


def config_to_dict(config) -> Dict[str, Any]:
    return json.loads(config.to_json_best_effort())


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
    """Train (resuming from ``workdir`` if it holds a checkpoint); return the model card."""
    return prepare(config, workdir)()


#: training config fields renamed: {old: new} (``num_steps``: the sampler's chain length elsewhere)
RENAMED_CONFIG_FIELDS = {"num_steps": "num_train_steps"}


def read_old_names(config: ml_collections.ConfigDict) -> None:
    """A config written with the old field names (:data:`RENAMED_CONFIG_FIELDS`) gets the new ones, with a
    DeprecationWarning; a config that sets both keeps the new one's value."""
    for old, new in RENAMED_CONFIG_FIELDS.items():
        if old in config:
            warn_renamed(f"config.{old}", f"config.{new}")
            with config.unlocked():
                if new not in config:
                    config[new] = config[old]
                del config[old]


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raise ValueError for settings that cannot train (before any data is loaded)."""
    if config.dataset not in data_lib.SHAPES:
        raise ValueError(f"config.dataset must be one of {sorted(data_lib.SHAPES)}, got {config.dataset!r}")
    read_old_names(config)
    for name in ("num_train_steps", "batch_size", "log_every", "checkpoint_every"):
        if int(config[name]) < 1:
            raise ValueError(f"config.{name} must be >= 1, got {config[name]}")
    micro = int(config.get("micro_batch", 0) or 0)
    if micro < 0 or (micro and int(config.batch_size) % micro):
        raise ValueError(f"config.micro_batch must be 0 (the whole batch at once) or divide config.batch_size "
                         f"({config.batch_size}), got {micro}")
    if config.model.kind not in ("unet", "classifier"):
        raise ValueError(f"config.model.kind must be 'unet' or 'classifier', got {config.model.kind!r}")
    for name in ("only_class", "drop_class"):
        c = _opt_class(config.get(name, -1))
        if c is not None and c >= data_lib.NUM_CLASSES[config.dataset]:
            raise ValueError(f"config.{name}={c}: {config.dataset} has classes 0..{data_lib.NUM_CLASSES[config.dataset] - 1}")
    o = config.optim
    if o.schedule not in ("constant", "cosine"):
        raise ValueError(f"config.optim.schedule must be 'constant' or 'cosine', got {o.schedule!r}")
    decay = int(o.get("decay_steps", 0))
    if decay < 0 or decay > int(config.num_train_steps) - max(int(o.warmup_steps), 1):
        raise ValueError(f"config.optim.decay_steps={decay}: must be >= 0 and leave the warm-up "
                         f"({o.warmup_steps} steps) inside num_train_steps={config.num_train_steps}")
    if decay and o.schedule != "constant":
        raise ValueError("config.optim.decay_steps applies to schedule='constant' (cosine decays over the whole run)")
    if config.get("max_steps_this_run", 0) < 0:
        raise ValueError(f"config.max_steps_this_run must be >= 0, got {config.max_steps_this_run}")
    if int(config.get("keep_checkpoints", 2)) < 2:
        raise ValueError(f"config.keep_checkpoints must be >= 2 (a corrupt newest checkpoint falls back to the "
                         f"one before), got {config.keep_checkpoints}")


def checkpoint_manager(ckpt_dir: str, keep: int) -> ocp.CheckpointManager:
    """The orbax manager of a run's checkpoints: synchronous saves, the newest ``keep`` steps kept."""
    return ocp.CheckpointManager(
        ckpt_dir,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=1, create=True,
                                             enable_async_checkpointing=False))


def save_verified(mngr: ocp.CheckpointManager, ckpt_dir: str, step: int, state) -> None:
    """Save ``state`` as ``step``, then (orbax has committed the step's folder) its sha256 manifest."""
    if mngr.save(step, args=ocp.args.StandardSave(state)):
        mngr.wait_until_finished()
        if distributed.is_main_process():
            integrity.write_manifest(integrity.step_dir(ckpt_dir, step), step)
        distributed.barrier(f"checkpoint_manifest_{step}")   # several processes: the step is complete for all


def restore_verified(mngr: ocp.CheckpointManager, ckpt_dir: str, workdir: str, abstract_state):
    """``(state, step)`` of the newest checkpoint that passes its sha256 manifest, or ``(None, None)``
    when ``ckpt_dir`` holds none. Newer corrupt steps are moved to ``WORKDIR/corrupt_checkpoints``
    (so that the run saves those steps again) with a warning naming the step and the file; a step
    without a manifest is restored with a warning that it cannot be verified; when every step is
    corrupt, :class:`dngjax.checkpoint.CheckpointError` (nothing is moved). ``abstract_state()``
    gives the structure to restore into."""
    step, status, corrupt = integrity.choose_step(ckpt_dir, mngr.all_steps())
    distributed.barrier("checkpoint_choose")        # several processes: all chose before any is moved
    if step is None:
        return None, None
    for bad, detail in corrupt:
        if distributed.is_main_process():
            moved = integrity.set_aside(ckpt_dir, bad, workdir)
            logging.warning("checkpoint step %d is corrupt: %s; moved to %s, falling back to step %d",
                            bad, detail, moved, step)
    if corrupt:
        distributed.barrier("checkpoint_set_aside")
        mngr.reload()
    if status == integrity.UNVERIFIED:
        logging.warning("checkpoint step %d in %s has no %s (saved before checkpoints had one, or killed "
                        "before it was written): it cannot be verified", step, ckpt_dir, integrity.MANIFEST_FILE)
    state = mngr.restore(step, args=ocp.args.StandardRestore(abstract_state()))
    logging.warning("resumed from step %d in %s (%s)", step, ckpt_dir,
                    "sha256 verified" if status == integrity.OK else "unverified")
    return state, step


class _Setup:
    """What a run needs besides its train state: the config and workdir, the network, optimiser and chain,
    the (not yet compiled) step, the data and its shardings, the checkpoint manager and the file paths."""

    def __init__(self, **fields):
        self.__dict__.update(fields)


def _set_up(config: ml_collections.ConfigDict, workdir: str) -> _Setup:
    """Validate the config; build the network, optimiser, chain and jitted step; check ``init_from``;
    create ``workdir``; load the training data; lay the devices out; open the checkpoint manager."""
    validate_config(config)
    input_shape = data_lib.SHAPES[config.dataset]
    module = build_model(config)
    opt = make_optimizer(config)
    sched = linear_schedule(config.diffusion.num_timesteps, config.diffusion.beta_start, config.diffusion.beta_end)
    step_fn = jax.jit(make_train_step(module, opt, config, sched.alpha_bars), donate_argnums=(0,))
    init_params, init_card = _load_init_from(config, module)    # checked before anything is written
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)

    x_train, y_train = load_training_data(config)
    logging.info("%s train examples: %d (only_class=%s)", config.dataset, len(x_train), config.only_class)
    repl, data_sh = _shardings(config)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    return _Setup(config=config, workdir=workdir, kind=config.model.kind, input_shape=input_shape, module=module,
                  opt=opt, sched=sched, step_fn=step_fn, init_params=init_params, init_card=init_card,
                  x_train=x_train, y_train=y_train, n_ex=len(x_train), repl=repl, data_sh=data_sh,
                  ckpt_dir=ckpt_dir, mngr=checkpoint_manager(ckpt_dir, int(config.get("keep_checkpoints", 2))),
                  metrics_path=os.path.join(workdir, "metrics.jsonl"), base_key=jax.random.PRNGKey(config.seed))


def _shardings(config):
    """``(replicated, data)`` shardings on a 1-D mesh of the devices (every process's, when several run the
    job): the batch is split over the devices when there are several and they divide it, else replicated
    (several processes: they must divide it, each process reads its own rows)."""
    devices = jax.devices()
    n_dev = len(devices)
    if jax.process_count() > 1 and config.batch_size % n_dev:
        raise ValueError(f"config.batch_size={config.batch_size}: with {jax.process_count()} processes it is the "
                         f"global batch, split over all {n_dev} devices; choose a multiple of {n_dev}")
    mesh = Mesh(np.asarray(devices), ("data",))
    repl = NamedSharding(mesh, P())
    data_sh = NamedSharding(mesh, P("data")) if n_dev > 1 and config.batch_size % n_dev == 0 else repl
    return repl, data_sh


def _resume(s: _Setup):
    """The train state to start from, on the devices: the newest verified checkpoint (metrics.jsonl cut back
    to its step), else a fresh state (``init_from``'s parameters if set; a stale metrics.jsonl removed)."""
    # only the state's structure is needed: nothing is initialised on a resume
    state, latest = restore_verified(s.mngr, s.ckpt_dir, s.workdir,
                                     lambda: _abstract_state(s.module, s.opt, s.config, s.input_shape, s.repl))
    main = distributed.is_main_process()
    if latest is not None:
        if main:
            _truncate_metrics(s.metrics_path, latest)
        return state
    logging.warning("no checkpoint in %s: training from step 0", s.ckpt_dir)
    state = _init_state(s.module, s.opt, s.config, s.input_shape, s.init_params)
    if main and os.path.exists(s.metrics_path):
        os.remove(s.metrics_path)  # a run killed before its first save: its lines are not in any state
    if jax.process_count() > 1:    # the same values on every process, replicated over all their devices
        state = jax.device_get(state)
    return jax.device_put(state, s.repl)


def prepare(config: ml_collections.ConfigDict, workdir: str):
    """Validate the config, load the data and model, restore the newest checkpoint of ``workdir`` that passes
    its sha256 manifest (:func:`restore_verified`).

    Everything that can fail because of the input fails here, before any training step. Returns
    ``run()``, which trains to ``config.num_train_steps`` (or ``max_steps_this_run`` steps) and returns
    the model card (``{"step", "halted": True}`` when stopped early).
    """
    s = _set_up(config, workdir)
    state = _resume(s)
    start = int(state["step"])
    return lambda: _run(s, state, start)


def _run(s: _Setup, state, start: int) -> Dict[str, Any]:
    """Train from ``state`` (at step ``start``) to ``config.num_train_steps`` (or ``max_steps_this_run`` steps
    further); the model card, or ``{"step", "halted": True}`` when stopped early."""
    config = s.config
    stop = config.num_train_steps
    if config.get("max_steps_this_run", 0):  # a long job split over several runs (resumed)
        stop = min(stop, start + config.max_steps_this_run)
    step_fn = _compile_step(s, state, start)
    if start < stop:
        record_run(s.workdir, config, start, stop)
    state, step, loss_avg, wall = _train_loop(s, state, step_fn, start, stop)
    s.mngr.wait_until_finished()
    s.mngr.close()
    if step < config.num_train_steps:
        logging.warning("stopped at step %d of %d (max_steps_this_run=%d, saved): rerun the same command to "
                        "continue", step, config.num_train_steps, config.max_steps_this_run)
        return {"step": step, "halted": True}
    return _write_model(s, state, step, loss_avg, wall)


def _compile_step(s: _Setup, state, start: int):
    """The train step compiled once, ahead of time, for this run's shapes and shardings: a later call with
    other shardings (e.g. host scalars put into the state at a save) raises instead of recompiling.
    Lowered on the batch's shapes (no batch is made yet), then checked against the memory free: a batch
    too large is refused here (memory.TooLarge), before the first step and any write."""
    config = s.config
    t_compile = time.time()
    b = int(config.batch_size)
    specs = (jax.ShapeDtypeStruct((b, *s.input_shape), jnp.float32, sharding=s.data_sh),
             jax.ShapeDtypeStruct((b,), s.y_train.dtype, sharding=s.data_sh))
    step_fn = s.step_fn.lower(state, *specs, jax.random.fold_in(s.base_key, start)).compile()
    logging.warning("train step compiled in %.1f s", time.time() - t_compile)
    state_bytes = sum(a.nbytes for a in jax.tree_util.tree_leaves(state))
    micro = int(config.get("micro_batch", 0) or 0)
    memory.check_fits(step_fn, what="one training step", size_flag="--config.batch_size", size=b,
                      extra_bytes=b * (4 * int(np.prod(s.input_shape)) + s.y_train.dtype.itemsize),
                      fixed_bytes=state_bytes, multiple=micro or 1,
                      hint=f" (a multiple of --config.micro_batch={micro}, or --config.micro_batch=0)" if micro else "")
    return step_fn


def _batch(s: _Setup, step: int):
    """The batch and key of ``step``: functions of (seed, step) only, put on the data sharding. Each process
    reads only the rows of the (global) batch that its own devices hold."""
    idx = data_lib.batch_indices(s.n_ex, s.config.batch_size, step, s.config.seed)
    if jax.process_count() == 1:
        return (jax.device_put(data_lib.to_model_space(s.x_train[idx]), s.data_sh),
                jax.device_put(s.y_train[idx], s.data_sh), jax.random.fold_in(s.base_key, step))
    b = len(idx)
    x = jax.make_array_from_callback((b, *s.input_shape), s.data_sh,
                                     lambda i: data_lib.to_model_space(s.x_train[idx[i[0]]]))
    y = jax.make_array_from_callback((b,), s.data_sh, lambda i: s.y_train[idx[i[0]]])
    return x, y, jax.random.fold_in(s.base_key, step)


def _train_loop(s: _Setup, state, step_fn, start: int, stop: int):
    """Steps ``start`` -> ``stop``: metrics logged every ``log_every`` steps, checkpoints every
    ``checkpoint_every`` steps and at ``stop``, preview grids every ``sample_every`` steps.
    Returns ``(state, step, loss_avg, wall_time_s)``."""
    config = s.config
    from tqdm import tqdm
    pbar = tqdm(total=config.num_train_steps, initial=start, desc=config.get("name", s.kind), unit="step",
                disable=not (config.get("progress", True) and distributed.is_main_process()),
                dynamic_ncols=True, mininterval=2.0)
    wall0 = float(state["wall_time"])
    t_start = time.time()
    loss_avg = float(state["loss_avg"])
    step = start
    pending = []
    while step < stop:
        state, metrics = step_fn(state, *_batch(s, step))
        step += 1
        pending.append(metrics)
        if step % config.log_every == 0 or step == stop:
            loss_avg = _log_metrics(s, pbar, pending, loss_avg, step, start, stop, wall0, t_start)
            pending = []
        if step % config.checkpoint_every == 0 or step == stop:
            # Host scalars go in with the state's (replicated) sharding, so the compiled step accepts them.
            # Several processes: process 0's clock, so that every process puts the same values.
            scalars = distributed.broadcast_from_main(np.asarray([wall0 + time.time() - t_start, loss_avg], np.float32))
            state = dict(state, **jax.device_put({"wall_time": np.float32(scalars[0]),
                                                   "loss_avg": np.float32(scalars[1])}, s.repl))
            save_verified(s.mngr, s.ckpt_dir, step, state)
        if s.kind == "unet" and config.sample_every and step % config.sample_every == 0 and step < config.num_train_steps:
            xs = sample_images(s.module, state["ema_params"], s.sched, 64, 0, s.input_shape, config.sample_steps)
            if distributed.is_main_process():
                write_png_grid(xs, os.path.join(s.workdir, "samples", f"step_{step:07d}.png"))
    pbar.close()
    return state, step, loss_avg, wall0 + time.time() - t_start


def _log_metrics(s: _Setup, pbar, pending, loss_avg: float, step: int, start: int, stop: int,
                 wall0: float, t_start: float) -> float:
    """Fold the ``pending`` steps' losses into the moving average, estimate the time left (once, after the
    run's first ``log_every`` steps), update the progress bar, append a line to metrics.jsonl; the new average.
    ``wall0``: the training time of the runs before this one; ``t_start``: when this run's loop started."""
    config = s.config
    for m in jax.device_get(pending):
        loss_avg = float(m["loss"]) if loss_avg == 0.0 else 0.98 * loss_avg + 0.02 * float(m["loss"])
    last_metrics = {k: float(v) for k, v in jax.device_get(pending[-1]).items()}
    if step - start == config.log_every or (step == stop and step - start < config.log_every):
        per_step = (time.time() - t_start) / (step - start)
        left = config.num_train_steps - step
        logging.warning("measured %.3f s/step: the remaining %d steps take ~%.0f min (~%.2f CPU core-hours "
                        "on %d core(s))", per_step, left, left * per_step / 60,
                        left * per_step * _cores_used() / 3600, _cores_used())
    pbar.set_postfix(loss=f"{last_metrics['loss']:.4f}", avg=f"{loss_avg:.4f}")
    pbar.update(config.log_every if step % config.log_every == 0 else step - pbar.n)
    if not distributed.is_main_process():
        return loss_avg
    with open(s.metrics_path, "a") as f:
        f.write(json.dumps({"step": step, "loss_avg": loss_avg, **last_metrics,
                            "elapsed_s": wall0 + time.time() - t_start}) + "\n")
    return loss_avg


def _final_card(s: _Setup, step: int, loss_avg: float, wall: float) -> Dict[str, Any]:
    """The model card of a finished run (before a classifier's test accuracy)."""
    config, kind, init_card = s.config, s.kind, s.init_card
    card = {
        "name": config.get("name", kind),
        "model_type": "ddpm" if kind == "unet" else "classifier",
        "dataset": config.dataset,
        "input_shape": list(s.input_shape),
        "only_class": _opt_class(config.only_class),
        "init_from": config.get("init_from", "") or None,
        "init_from_model": ({k: init_card[k] for k in INIT_CARD_KEYS if k in init_card}
                            if init_card is not None else None),
        "steps": int(step),
        "training_runs": read_runs(s.workdir, step),
        "batch_size": int(config.batch_size),
        "train_examples": int(s.n_ex),
        "wall_time_s": round(wall, 1),
        "cpu_core_hours": (round(wall * _cores_used() * jax.process_count() / 3600, 2)
                           if jax.default_backend() == "cpu" else None),
        "cpu_core_hours_note": "training wall time x the CPU cores the process could use (its affinity) "
                               "x the processes of the job",
        "hardware": hardware_description(),
        "final_loss": round(loss_avg, 5),
        "final_loss_note": "exponential moving average (0.98) of the training loss",
        "params": "EMA of the parameters",
        "config": config_to_dict(config),
    }
    if kind == "unet":
        card["diffusion"] = {"num_timesteps": config.diffusion.num_timesteps,
                             "beta_start": config.diffusion.beta_start, "beta_end": config.diffusion.beta_end,
                             "schedule": "linear", "prediction": "eps"}
    return card


def _score_classifier(s: _Setup, state, card: Dict[str, Any]):
    """A classifier's test accuracy, EMA and raw parameters, into ``card``; the parameters that scored higher
    (the EMA on a tie)."""
    config, module = s.config, s.module
    x_test, y_test = data_lib.load_dataset(config.dataset, "test", data_dir=config.data_dir or None, as_float=False)
    acc_ema = classifier_accuracy(module, state["ema_params"], x_test, y_test)
    acc_raw = classifier_accuracy(module, state["params"], x_test, y_test)
    params_out = state["ema_params"]
    if acc_raw > acc_ema:
        params_out, card["params"] = state["params"], "raw parameters (scored higher than the EMA)"
    card["test_accuracy"] = max(acc_ema, acc_raw)
    card["test_accuracy_ema"], card["test_accuracy_raw"] = acc_ema, acc_raw
    logging.info("test accuracy: ema %.4f raw %.4f", acc_ema, acc_raw)
    return params_out


def _write_model(s: _Setup, state, step: int, loss_avg: float, wall: float) -> Dict[str, Any]:
    """Write ``WORKDIR/model`` (parameters and card) and, for a DDPM, the final sample grid; the card as read back."""
    config = s.config
    main = distributed.is_main_process()
    card = _final_card(s, step, loss_avg, wall)
    if jax.process_count() > 1:        # replicated: every process holds the values; scored and saved on the host
        state = jax.device_get({k: state[k] for k in ("params", "ema_params")})
    params_out = _score_classifier(s, state, card) if s.kind == "classifier" else state["ema_params"]
    out = os.path.join(s.workdir, "model")
    if main:
        ckpt.save_model(out, s.module, params_out, card)
    if s.kind == "unet" and config.get("final_samples", 64):
        xs = sample_images(s.module, params_out, s.sched, int(config.final_samples), 0, s.input_shape,
                           config.sample_steps)
        if main:
            write_png_grid(xs, os.path.join(s.workdir, "samples", "final.png"))
    logging.info("model written to %s", out)
    distributed.barrier("model_written")
    return ckpt.load_card(out)
