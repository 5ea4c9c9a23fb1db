"""Reading PyTorch-layout weights (diffusers / transformers folders) into Flax parameter trees.

Shared by the loaders of :mod:`dngjax.models.clip` and :mod:`dngjax.models.vae`: read a folder's
``config.json`` and safetensors file (numpy, no torch), and assemble converted arrays into the
parameter tree a Flax module expects, with one clear error for a missing or mis-shaped parameter.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Tuple

import numpy as np
import jax
import jax.numpy as jnp

Path = Tuple[str, ...]


def read_folder(folder: str, weights_name: str, what: str) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
    """(config dict, state dict of numpy arrays) of ``folder``/config.json and ``folder``/``weights_name``."""
    from .convert_diffusers import _load_safetensors
    cfg_path, weights = os.path.join(folder, "config.json"), os.path.join(folder, weights_name)
    for p in (cfg_path, weights):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{folder!r} is not {what}: {os.path.basename(p)} is missing")
    with open(cfg_path) as f:
        cfg = json.load(f)
    return cfg, _load_safetensors(weights)


def template(module, *example_inputs) -> Dict[Path, Any]:
    """{parameter path: ShapeDtypeStruct} of ``module.init`` (traced, nothing computed)."""
    tmpl = jax.eval_shape(module.init, jax.random.key(0), *example_inputs)["params"]
    return {tuple(str(getattr(k, "key", k)) for k in path): v
            for path, v in jax.tree_util.tree_flatten_with_path(tmpl)[0]}


def assemble(arrays: Dict[Path, np.ndarray], tmpl: Dict[Path, Any], what: str) -> Dict[str, Any]:
    """``{"params": tree}`` from converted arrays; every template parameter must be there with its shape."""
    missing = sorted(".".join(k) for k in tmpl if k not in arrays)
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} parameters of the {what}, e.g. {missing[:3]}")
    params: Dict[str, Any] = {}
    for k, v in tmpl.items():
        if arrays[k].shape != tuple(v.shape):
            raise ValueError(f"parameter {'.'.join(k)} has shape {arrays[k].shape}, the config needs {tuple(v.shape)}")
        node = params
        for p in k[:-1]:
            node = node.setdefault(p, {})
        node[k[-1]] = jnp.asarray(arrays[k])
    return {"params": params}
