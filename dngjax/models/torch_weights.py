"""Reading PyTorch-layout weights (diffusers / transformers folders) into Flax parameter trees.

Shared by the loaders of :mod:`dngjax.models.clip` and :mod:`dngjax.models.vae`: read a folder's
``config.json`` and safetensors file (numpy, no torch), and assemble converted arrays into the
parameter tree a Flax module expects, with one clear error for a missing or mis-shaped parameter.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Sequence, Tuple, Union

import numpy as np
import jax
import jax.numpy as jnp

Path = Tuple[str, ...]


def read_folder(folder: str, weights_name: Union[str, Sequence[str]], what: str
                ) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
    """(config dict, state dict of numpy arrays) of ``folder``/config.json and ``folder``/``weights_name``
    (several names: the first that exists, e.g. the float32 file, then the ``.fp16`` variant)."""
    from .convert_diffusers import _load_safetensors
    names = [weights_name] if isinstance(weights_name, str) else list(weights_name)
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{folder!r} is not {what}: config.json is missing")
    found = [os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))]
    if not found:
        raise FileNotFoundError(f"{folder!r} is not {what}: {' or '.join(names)} is missing")
    with open(cfg_path) as f:
        cfg = json.load(f)
    return cfg, _load_safetensors(found[0])


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


def torch_path(key: str) -> Tuple[Path, str]:
    """A PyTorch parameter name -> (Flax module path, torch leaf), the numeric indices joined to the name
    before them: ``down_blocks.0.attentions.1.proj_in.weight`` -> (down_blocks_0, attentions_1, proj_in), weight."""
    parts = key.split(".")
    path: list = []
    for p in parts[:-1]:
        if p.isdigit() and path:
            path[-1] = f"{path[-1]}_{p}"
        else:
            path.append(p)
    return tuple(path), parts[-1]


def assemble_torch(state: Dict[str, np.ndarray], tmpl: Dict[Path, Any], what: str, dtype: Any = None,
                   prefix: str = "") -> Dict[str, Any]:
    """``{"params": tree}`` of a module whose submodules carry the PyTorch names (``torch_path``), from a
    state dict: weights of normalisations -> ``scale``, of convolutions (out, in, kh, kw) -> ``kernel``
    (kh, kw, in, out), of linear layers (out, in) -> ``kernel`` (in, out) (a 1x1 convolution and a linear
    layer convert into each other), cast to ``dtype`` (default float32). Only keys under ``prefix`` are read; one not in the template raises
    (a config that does not match the weights), as does a template parameter the state lacks."""
    arrays: Dict[Path, np.ndarray] = {}
    unexpected = []
    for key, w in state.items():
        if not key.startswith(prefix):
            continue
        mod, leaf = torch_path(key[len(prefix):])
        if leaf == "bias":
            name = "bias"
        elif mod + ("kernel",) in tmpl:
            name = "kernel"
        elif mod + ("scale",) in tmpl:
            name = "scale"
        else:
            unexpected.append(key)
            continue
        if mod + (name,) not in tmpl:
            unexpected.append(key)
            continue
        a = np.asarray(w)
        want = len(tmpl[mod + (name,)].shape)
        if name == "kernel":
            if a.ndim == 4:
                a = a.transpose(2, 3, 1, 0)                  # (out, in, kh, kw) -> (kh, kw, in, out)
                if want == 2:
                    a = a[0, 0]
            elif a.ndim == 2:
                a = a.T[None, None] if want == 4 else a.T
        arrays[mod + (name,)] = a.astype(np.dtype(dtype) if dtype is not None else np.float32)
    if unexpected:
        raise ValueError(f"the checkpoint has {len(unexpected)} parameters the {what} of this config does not, "
                         f"e.g. {unexpected[:3]}: the folder's config.json does not match its weights")
    return assemble(arrays, tmpl, what)

