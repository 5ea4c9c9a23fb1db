"""Save and load trained models: a folder with ``params.msgpack`` and ``card.json``.

The shipped format (``checkpoints/mnist/*``, and ``WORKDIR/model`` at the end
of a training run) is deliberately simple and loads fast:

* ``params.msgpack``: ``flax.serialization.to_bytes`` of the parameters used
  for inference (the EMA parameters for DDPMs);
* ``card.json``: the model card. Its ``arch`` entry (``{"kind": "unet" |
  "classifier", "kwargs": {...}}``: the network's architecture) rebuilds the module;
  ``model_type`` says what the model is for (``"ddpm"`` or ``"classifier"``;
  :func:`model_type`: cards written before it was named so say ``kind``);
  ``params_sha256`` and ``num_params`` detect a corrupt or mismatched parameter file.

``load_model(path)`` accepts such a folder, a training workdir (uses
``WORKDIR/model``) or the path of ``card.json`` itself. Every failure raises
:class:`CheckpointError` with a message that says what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict, Mapping, NamedTuple, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from .data import SHAPES
from .denoiser import PREDICTIONS, Denoiser, denoiser
from .schedules import Schedule
from .sd_scheduler import CARD_SCHEDULES, beta_schedule
from .models.classifier import Classifier
from .models.unet import UNet

PARAMS_FILE = "params.msgpack"
CARD_FILE = "card.json"
ARCHS = {"unet": UNet, "classifier": Classifier}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or does not match the architecture in its card."""


def file_sha256(path: str) -> str:
    """sha256 (hex) of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _tuplify(v):
    if isinstance(v, list):
        return tuple(_tuplify(a) for a in v)
    return v


def build_module(arch: Dict[str, Any]):
    """Module from a card's ``arch`` entry."""
    try:
        cls = ARCHS[arch["kind"]]
    except (KeyError, TypeError):
        raise CheckpointError(f"unknown architecture {arch!r}; expected kind in {sorted(ARCHS)}") from None
    kwargs = {k: _tuplify(v) for k, v in dict(arch.get("kwargs", {})).items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise CheckpointError(f"cannot build {arch['kind']} from {kwargs}: {e}") from None


def arch_of(module) -> Dict[str, Any]:
    """Inverse of :func:`build_module`: JSON-able description of a UNet or Classifier."""
    for kind, cls in ARCHS.items():
        if type(module) is cls:
            kwargs = {}
            for f in cls.__dataclass_fields__:
                if f in ("parent", "name") or f == "dtype":
                    continue
                v = getattr(module, f)
                kwargs[f] = list(v) if isinstance(v, tuple) else v
            return {"kind": kind, "kwargs": kwargs}
    raise TypeError(f"cannot describe module of type {type(module).__name__}")


def param_template(module, input_shape):
    """Abstract parameter tree (shapes/dtypes) of ``module`` for inputs of ``input_shape``."""
    x = jnp.zeros((1, *input_shape), jnp.float32)
    if isinstance(module, UNet):
        fn = lambda: module.init(jax.random.PRNGKey(0), x, jnp.zeros((1,), jnp.int32))
    else:
        fn = lambda: module.init(jax.random.PRNGKey(0), x)
    return jax.eval_shape(fn)


def num_params(params) -> int:
    return int(sum(np.size(a) for a in jax.tree_util.tree_leaves(params)))


def save_model(path: str, module, params, card: Dict[str, Any]) -> str:
    """Write ``params.msgpack`` + ``card.json`` into folder ``path`` (atomically per file)."""
    os.makedirs(path, exist_ok=True)
    params = jax.device_get(params)
    data = serialization.to_bytes(params)
    card = dict(card)
    card["arch"] = arch_of(module)
    card["num_params"] = num_params(params)
    card["params_file"] = PARAMS_FILE
    card["params_sha256"] = hashlib.sha256(data).hexdigest()
    card["params_bytes"] = len(data)
    for name, blob in ((PARAMS_FILE, data), (CARD_FILE, json.dumps(card, indent=2, default=_json_default).encode())):
        tmp = os.path.join(path, name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(path, name))
    return path


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    return str(o)


def _model_dir(path: str) -> str:
    path = os.fspath(path)
    if os.path.basename(path) == CARD_FILE:
        path = os.path.dirname(path) or "."
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path} does not exist")
    if os.path.isfile(path):
        raise CheckpointError(f"{path} is a file; pass the model folder holding {CARD_FILE} and {PARAMS_FILE}")
    if not os.path.exists(os.path.join(path, CARD_FILE)) and os.path.exists(os.path.join(path, "model", CARD_FILE)):
        path = os.path.join(path, "model")  # a training workdir
    if not os.path.exists(os.path.join(path, CARD_FILE)):
        hint = ""
        if os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(os.path.join(path, PARAMS_FILE)):
            hint = (" (a folder converted by an older dngjax, without a model card: convert the diffusers "
                    "checkpoint again with python -m dngjax.convert SRC OUT)")
        elif os.path.isfile(os.path.join(path, "config.json")):
            hint = (" (a diffusers folder? convert it first: python -m dngjax.convert "
                    f"{path} OUT, then pass OUT)")
        elif os.path.isdir(os.path.join(path, "checkpoints")):
            hint = (" (this looks like an unfinished training workdir: rerun train/main.py to "
                    "finish it, or export with `python -m train.export`)")
        raise CheckpointError(f"no {CARD_FILE} in {path}: not a dngjax model folder{hint}")
    return path


def load_card(path: str) -> Dict[str, Any]:
    """The model card (dict) of a model folder."""
    d = _model_dir(path)
    try:
        with open(os.path.join(d, CARD_FILE)) as f:
            card = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"corrupt model card {os.path.join(d, CARD_FILE)}: {e}") from None
    if not isinstance(card, dict) or "arch" not in card:
        raise CheckpointError(f"model card {os.path.join(d, CARD_FILE)} has no 'arch' entry")
    return card


def model_type(card: Mapping[str, Any]) -> str | None:
    """What a card's model is for: ``"ddpm"`` or ``"classifier"`` (its ``model_type``; older cards, the
    shipped ones among them, say ``kind``). Not ``arch["kind"]``, the network's architecture."""
    return card.get("model_type", card.get("kind"))


def load_model(path: str, expect_kind: str | None = None) -> Tuple[Any, Any, Dict[str, Any]]:
    """``(module, params, card)`` of a saved model; raises :class:`CheckpointError` on any problem."""
    d = _model_dir(path)
    card = load_card(d)
    module = build_module(card["arch"])
    kind = card["arch"]["kind"]
    if expect_kind is not None and kind != expect_kind:
        raise CheckpointError(f"{d} holds a {kind} model, expected a {expect_kind}")
    ppath = os.path.join(d, card.get("params_file", PARAMS_FILE))
    if not os.path.isfile(ppath):
        raise CheckpointError(f"parameter file missing: {ppath}")
    with open(ppath, "rb") as f:
        data = f.read()
    want = card.get("params_sha256")
    if want and hashlib.sha256(data).hexdigest() != want:
        raise CheckpointError(f"corrupt checkpoint: sha256 of {ppath} does not match its model card "
                              f"(truncated or modified file; {len(data)} bytes, card says "
                              f"{card.get('params_bytes')})")
    shape = tuple(card.get("input_shape") or SHAPES.get(card.get("dataset", ""), ()))
    if not shape:
        raise CheckpointError(f"model card in {d} names neither input_shape nor a known dataset")
    template = param_template(module, shape)
    try:
        raw = serialization.msgpack_restore(data)
    except Exception as e:
        raise CheckpointError(f"corrupt checkpoint: cannot decode {ppath}: {type(e).__name__}: {e}") from None
    _check_tree(raw, template, ppath)
    params = serialization.from_state_dict(template, raw)
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)
    n = num_params(params)
    if card.get("num_params") not in (None, n):
        raise CheckpointError(f"{ppath}: {n} parameters but the card says {card['num_params']}")
    return module, params, card


def _check_tree(raw, template, where: str, prefix: str = "") -> None:
    """Compare a restored state dict with the template; raise on missing/extra keys or shape mismatches."""
    tmpl = serialization.to_state_dict(template)

    def walk(r, t, p):
        if isinstance(t, dict):
            if not isinstance(r, dict):
                raise CheckpointError(f"architecture mismatch in {where}: {p or '/'} is not a dict")
            missing = sorted(set(t) - set(r))
            extra = sorted(set(r) - set(t))
            if missing or extra:
                raise CheckpointError(
                    f"architecture mismatch in {where} at {p or '/'}: missing {missing[:5]}, "
                    f"unexpected {extra[:5]} (the card's arch does not describe these parameters)")
            for k in t:
                walk(r[k], t[k], f"{p}/{k}")
        else:
            rs = tuple(np.shape(r))
            if rs != tuple(t.shape):
                raise CheckpointError(f"architecture mismatch in {where} at {p}: parameter shape {rs}, "
                                      f"the card's architecture needs {tuple(t.shape)}")

    walk(raw, tmpl, prefix)


class DiffusionModel(NamedTuple):
    """A loaded diffusion-model folder. Its card decides everything a tool needs: the architecture
    (``module``), the training chain (:attr:`schedule`), the prediction type and the class labels."""

    module: Any
    params: Any
    card: Dict[str, Any]
    path: str

    @property
    def schedule(self) -> Schedule:
        """The full training chain (T steps) of the card's ``diffusion`` entry (:func:`schedule_of`)."""
        return schedule_of(self.card)

    @property
    def prediction(self) -> str:
        """What the network predicts: ``eps``, ``x0`` or ``v`` (the card's ``diffusion.prediction``)."""
        return (self.card.get("diffusion") or {}).get("prediction", "eps")

    @property
    def num_classes(self) -> int:
        """Class labels of a class-conditional UNet (label ``num_classes`` is the null label); 0 if none."""
        return int(getattr(self.module, "num_classes", 0) or 0)

    def denoiser(self, label: int | None = None) -> Denoiser:
        """``eps(x, t)`` of this model (``label``: a class-conditional model's label, ``num_classes`` for
        the unconditional prediction); the card's prediction type is converted to eps."""
        if label is not None and not 0 <= int(label) <= self.num_classes:
            raise CheckpointError(f"{self.path}: label {label} is not one of this model's labels "
                                  + (f"0..{self.num_classes}" if self.num_classes else "(it takes none)"))
        return denoiser(self.module, self.params, label=label, prediction=self.prediction)


def load_diffusion_model(path: str) -> DiffusionModel:
    """The one way the tools load a DDPM folder: its module, parameters and card (which then decides the
    schedule, prediction type and labels); raises :class:`CheckpointError` on any problem."""
    module, params, card = load_model(path, expect_kind="unet")
    model = DiffusionModel(module, params, card, path)
    if model.prediction not in PREDICTIONS:
        raise CheckpointError(f"{path}: card's diffusion.prediction={model.prediction!r} is not one of {PREDICTIONS}")
    schedule_of(card)                                  # an unknown schedule is refused at load time
    return model


def load_denoiser(path: str, label: int | None = None) -> Denoiser:
    """The denoiser of a saved DDPM (``label`` only for class-conditional UNets); its ``prediction``
    (eps, x0 or v) is the card's ``diffusion.prediction``, so samplers convert it to eps."""
    return load_diffusion_model(path).denoiser(label)


def schedule_of(card: Mapping[str, Any]) -> Schedule:
    """The full training chain (T steps) that a model card's ``diffusion`` entry describes
    (default: Ho et al.'s linear betas 1e-4 .. 0.02 over T = 1000); the schedule names are diffusers'
    ``beta_schedule`` names, read by :func:`dngjax.sd_scheduler.beta_schedule`."""
    d = dict(card.get("diffusion") or {})
    name = d.get("schedule", "linear")
    if name not in CARD_SCHEDULES:
        raise CheckpointError(f"card's diffusion.schedule={name!r}: supported are {sorted(CARD_SCHEDULES)}")
    return beta_schedule(name, int(d.get("num_timesteps", 1000)), d.get("beta_start"), d.get("beta_end"))


def load_classifier(path: str):
    """``(module, params, card)`` of a saved classifier."""
    return load_model(path, expect_kind="classifier")


def load_reference_stats(path: str) -> Tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` from a ``.npz`` with arrays ``mu`` and ``sigma``."""
    if not os.path.isfile(path):
        raise CheckpointError(f"reference statistics not found: {path}")
    try:
        with np.load(path) as f:
            return np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)
    except Exception as e:
        raise CheckpointError(f"corrupt reference statistics {path}: {type(e).__name__}: {e}") from None
