"""Reading PyTorch-layout weights (diffusers / transformers folders) into Flax parameter trees.

The project's one PyTorch -> Flax weight mapper, shared by every loader of PyTorch weights
(:mod:`~dngjax.models.sd_unet`, :mod:`~dngjax.models.vae`, :mod:`~dngjax.models.clip`,
:mod:`~dngjax.models.convert_diffusers`, :mod:`dngjax.fid_inception`):

* reading: :func:`read_safetensors` (numpy, no torch), :func:`read_bin` (``torch.load(weights_only=True)``),
  :func:`read_folder` (a folder's ``config.json`` and safetensors file), and :func:`load_torch_state_dict`
  (a PyTorch ``.pth`` / ``.bin`` state dict without torch: a restricted unpickler that accepts only tensors,
  storages and ordered dicts, both PyTorch file formats; the FID Inception weights);
* mapping by name: :func:`assemble_torch` puts a state dict into the parameter tree of a Flax module whose
  submodules carry the PyTorch names (:func:`torch_path`; a ``rename`` maps other names onto them first),
  converting each tensor by the kind of parameter the template holds there (convolution / linear kernel,
  normalisation scale, embedding, bias, a bare parameter), with one error that lists every missing,
  unexpected or mis-shaped parameter.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import struct as _struct
import zipfile
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import jax
import jax.numpy as jnp

Path = Tuple[str, ...]

#: at most this many names per kind of problem in a mapping error
_SHOWN = 10


# --------------------------------------------------------------------------- reading


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
    """{name: numpy array} of a ``.safetensors`` file (safetensors' numpy API; no torch)."""
    try:
        from safetensors import safe_open
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"reading {path!r} needs safetensors: pip install safetensors") from e
    out = {}
    with safe_open(path, framework="np") as f:
        for k in f.keys():
            try:
                out[k] = np.asarray(f.get_tensor(k))
            except (TypeError, ValueError) as e:  # e.g. bfloat16, which numpy lacks
                raise ValueError(
                    f"{path!r}: tensor {k!r} has a dtype numpy cannot read ({e}); "
                    "re-save the checkpoint in float32 or float16") from e
    return out


def read_bin(path: str) -> Dict[str, np.ndarray]:
    """{name: float32 numpy array} of a PyTorch ``.bin`` state dict, read with
    ``torch.load(weights_only=True)`` (never an arbitrary pickle); a ``{"state_dict": ...}`` wrapper is opened."""
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"reading {path!r} needs torch (or convert it to .safetensors)") from e
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"could not load {path!r} with torch.load(weights_only=True): {e}") from e
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path!r} does not hold a state dict (got {type(sd).__name__})")
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"{path!r}: entry {k!r} is a {type(v).__name__}, not a tensor")
        out[k] = v.detach().to(torch.float32).cpu().numpy()
    return out


def read_folder(folder: str, weights_name: Union[str, Sequence[str]], what: str
                ) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
    """(config dict, state dict of numpy arrays) of ``folder``/config.json and ``folder``/``weights_name``
    (several names: the first that exists, e.g. the float32 file, then the ``.fp16`` variant)."""
    names = [weights_name] if isinstance(weights_name, str) else list(weights_name)
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{folder!r} is not {what}: config.json is missing")
    found = [os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))]
    if not found:
        raise FileNotFoundError(f"{folder!r} is not {what}: {' or '.join(names)} is missing")
    with open(cfg_path) as f:
        cfg = json.load(f)
    return cfg, read_safetensors(found[0])


# --------------------------------------------------------------------------- reading a PyTorch pickle without torch

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c


class _StorageType:
    def __init__(self, name: str):
        self.name = name
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Storage:
    """A flat typed buffer; ``data`` is filled in when the bytes have been read."""

    def __init__(self, dtype: np.dtype, numel: int):
        self.dtype = dtype
        self.numel = numel
        self.data = None


class _StorageView:
    def __init__(self, base: _Storage, offset: int, numel: int):
        self.base, self.offset, self.numel = base, offset, numel


class _LazyTensor:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, int(offset), tuple(size), tuple(stride)

    def materialize(self) -> np.ndarray:
        st = self.storage
        extra = 0
        if isinstance(st, _StorageView):
            extra, st = st.offset, st.base
        if st.data is None:
            raise pickle.UnpicklingError("tensor storage was never read from the file")
        flat = st.data
        item = flat.dtype.itemsize
        if not self.size:
            return flat[extra + self.offset].copy()
        if 0 in self.size:
            return np.zeros(self.size, flat.dtype)
        last = extra + self.offset + sum((s - 1) * d for s, d in zip(self.size, self.stride))
        if last >= flat.size or extra + self.offset < 0:
            raise pickle.UnpicklingError("tensor extends beyond its storage")
        base = flat[extra + self.offset:]
        return np.lib.stride_tricks.as_strided(
            base, shape=self.size, strides=tuple(d * item for d in self.stride)).copy()


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


class _SafeUnpickler(pickle.Unpickler):
    """Resolves only the globals a state_dict needs; anything else is refused."""

    _ALLOWED = {
        ("collections", "OrderedDict"): OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    }

    def __init__(self, file, persistent_load_fn=None):
        super().__init__(file)
        self._pl = persistent_load_fn

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(
            f"refusing to unpickle {module}.{name}: only tensors and dicts of tensors are loaded")

    def persistent_load(self, pid):
        if self._pl is None:
            raise pickle.UnpicklingError("unexpected persistent id")
        return self._pl(pid)


def _storage_type(obj) -> _StorageType:
    if not isinstance(obj, _StorageType):
        raise pickle.UnpicklingError(f"unsupported storage type {obj!r}")
    return obj


def _flatten_tensors(obj, prefix="") -> Dict[str, np.ndarray]:
    out: Dict[str, np.ndarray] = {}
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            out.update(_flatten_tensors(v, f"{prefix}{k}."))
    elif isinstance(obj, _LazyTensor):
        out[prefix[:-1]] = obj.materialize()
    return out


def _load_zip(data: bytes) -> Any:
    zf = zipfile.ZipFile(io.BytesIO(data))
    names = zf.namelist()
    pkl = [n for n in names if n.endswith("data.pkl")]
    if len(pkl) != 1:
        raise pickle.UnpicklingError(f"not a torch zip checkpoint (data.pkl entries: {pkl})")
    root = pkl[0][: -len("data.pkl")]
    byteorder = "little"
    if root + "byteorder" in names:
        byteorder = zf.read(root + "byteorder").decode().strip()
    storages: Dict[str, _Storage] = {}

    def persistent_load(pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        stype, key, _location, numel = _storage_type(pid[1]), str(pid[2]), pid[3], int(pid[4])
        if key not in storages:
            st = _Storage(stype.dtype, numel)
            raw = zf.read(f"{root}data/{key}")
            dt = stype.dtype.newbyteorder("<" if byteorder == "little" else ">")
            st.data = np.frombuffer(raw, dtype=dt).astype(stype.dtype)
            storages[key] = st
        return storages[key]

    return _SafeUnpickler(io.BytesIO(zf.read(pkl[0])), persistent_load).load()


def _load_legacy(data: bytes) -> Any:
    f = io.BytesIO(data)
    magic = _SafeUnpickler(f).load()
    if magic != _LEGACY_MAGIC:
        raise pickle.UnpicklingError("not a PyTorch checkpoint (bad magic number)")
    _protocol = _SafeUnpickler(f).load()
    sys_info = _SafeUnpickler(f).load()
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
        raise pickle.UnpicklingError("big-endian legacy checkpoints are not supported")
    storages: Dict[str, _Storage] = {}

    def persistent_load(pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        stype, root_key, _location, numel, view = _storage_type(pid[1]), str(pid[2]), pid[3], int(pid[4]), pid[5]
        if root_key not in storages:
            storages[root_key] = _Storage(stype.dtype, numel)
        base = storages[root_key]
        if view is not None:
            _view_key, offset, view_size = view
            return _StorageView(base, int(offset), int(view_size))
        return base

    result = _SafeUnpickler(f, persistent_load).load()
    keys = _SafeUnpickler(f).load()
    for key in keys:
        st = storages[str(key)]
        (numel,) = _struct.unpack("<q", f.read(8))
        nbytes = numel * st.dtype.itemsize
        raw = f.read(nbytes)
        if len(raw) != nbytes:
            raise pickle.UnpicklingError("truncated checkpoint")
        st.data = np.frombuffer(raw, dtype=st.dtype.newbyteorder("<")).astype(st.dtype)
    return result


def load_torch_state_dict(path: str) -> Dict[str, np.ndarray]:
    """Read a PyTorch ``state_dict`` file into ``{name: numpy array}`` without torch.

    Only ``OrderedDict``, tensors (``_rebuild_tensor_v2``/``_rebuild_parameter``)
    and typed storages are accepted; any other global in the pickle raises
    ``pickle.UnpicklingError``. Supports the zip format and the legacy format.
    """
    with open(path, "rb") as fh:
        data = fh.read()
    obj = _load_zip(data) if zipfile.is_zipfile(io.BytesIO(data)) else _load_legacy(data)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    tensors = _flatten_tensors(obj)
    if not tensors:
        raise ValueError(f"{path} holds no tensors")
    return tensors


# --------------------------------------------------------------------------- names


#: old diffusers ``AttentionBlock`` names -> the current ``Attention`` names
LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_RE = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")


def current_attention_names(state: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """``state`` with the attention parameters of older diffusers checkpoints (``query``, ``key``, ``value``,
    ``proj_attn``) renamed as diffusers names them now; ValueError if a checkpoint holds both names."""
    out = {}
    for k, v in state.items():
        m = _LEGACY_RE.match(k)
        if m:
            k = f"{m.group(1)}.{LEGACY_ATTENTION[m.group(2)]}.{m.group(3)}"
        if k in out:
            raise ValueError(f"checkpoint holds both the legacy and the current name of {k!r}")
        out[k] = v
    return out


# --------------------------------------------------------------------------- mapping


def template(module, *example_inputs, collection: str = "params") -> Dict[Path, Any]:
    """{parameter path: ShapeDtypeStruct} of ``module.init``'s ``collection`` (traced, nothing computed)."""
    tmpl = jax.eval_shape(module.init, jax.random.key(0), *example_inputs)[collection]
    return {tuple(str(getattr(k, "key", k)) for k in path): v
            for path, v in jax.tree_util.tree_flatten_with_path(tmpl)[0]}


def _tree(arrays: Dict[Path, np.ndarray], tmpl: Dict[Path, Any]) -> Dict[str, Any]:
    """The nested dict of ``arrays`` (as jax arrays) at the template's paths, in the template's order."""
    params: Dict[str, Any] = {}
    for k in tmpl:
        node = params
        for p in k[:-1]:
            node = node.setdefault(p, {})
        node[k[-1]] = jnp.asarray(arrays[k])
    return params


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


def _flax_leaf(mod: Path, leaf: str, tmpl: Mapping[Path, Any]) -> Optional[str]:
    """The Flax parameter of module ``mod`` that the torch leaf ``leaf`` is, by what the template holds there."""
    if leaf == "bias":
        return "bias"
    if leaf == "weight":
        for name in ("kernel", "scale", "embedding"):      # linear / convolution, normalisation, embedding
            if mod + (name,) in tmpl:
                return name
        return None
    return leaf                                              # a bare parameter (e.g. CLIP's class_embedding)


def _convert(a: np.ndarray, name: str, want: int) -> np.ndarray:
    """A torch tensor as the Flax parameter ``name`` of ``want`` dimensions: kernels of convolutions
    (out, in, kh, kw) -> (kh, kw, in, out), of linear layers (out, in) -> (in, out) (a 1x1 convolution and a
    linear layer convert into each other); anything else as it is."""
    if name == "kernel":
        if a.ndim == 4:
            a = a.transpose(2, 3, 1, 0)                      # (out, in, kh, kw) -> (kh, kw, in, out)
            if want == 2 and a.shape[:2] == (1, 1):
                a = a[0, 0]
        elif a.ndim == 2:
            a = a.T[None, None] if want == 4 else a.T
    return a


#: BatchNorm buffers of PyTorch -> the ``batch_stats`` of Flax's ``nn.BatchNorm``
_BATCH_STATS = {"running_mean": "mean", "running_var": "var"}


def assemble_torch(state: Dict[str, np.ndarray], tmpl: Dict[Path, Any], what: str, dtype: Any = None,
                   prefix: str = "", rename: Optional[Callable[[str], Optional[str]]] = None,
                   source_of: Optional[Callable[[Path], str]] = None,
                   stats: Optional[Dict[Path, Any]] = None) -> Dict[str, Any]:
    """``{"params": tree}`` of a module whose submodules carry the PyTorch names (``torch_path``), from a
    state dict: weights of normalisations -> ``scale``, of embeddings -> ``embedding``, of convolutions
    (out, in, kh, kw) -> ``kernel`` (kh, kw, in, out), of linear layers (out, in) -> ``kernel`` (in, out)
    (a 1x1 convolution and a linear layer convert into each other), biases and bare parameters as they
    are, all cast to ``dtype`` (default float32).

    Only keys under ``prefix`` are read. ``rename``: the name of a (prefix-stripped) key in the Flax
    module's PyTorch naming, or None for an entry to skip (buffers, another model's tower); default: the
    key itself. ``source_of``: the checkpoint's name of a Flax parameter path, to name missing parameters
    (default: the Flax path). ``stats``: the template of the module's ``batch_stats`` (BatchNorm), whose
    ``mean`` / ``var`` are the ``running_mean`` / ``running_var`` buffers (``num_batches_tracked`` is
    skipped); the result is then ``{"batch_stats": tree, "params": tree}``.

    Every key must map to a template entry of the converted shape and every template entry must be
    found: otherwise one ValueError lists the shape mismatches, the missing and the unexpected
    parameters (a config that does not match the weights).
    """
    found: Dict[str, Dict[Path, np.ndarray]] = {"params": {}, "batch_stats": {}}
    templates = {"params": tmpl, "batch_stats": stats or {}}
    shapes: List[str] = []
    bad_shape = set()
    unexpected: List[str] = []
    cast = np.dtype(dtype) if dtype is not None else np.float32
    for key, w in state.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):] if rename is None else rename(key[len(prefix):])
        if name is None:
            continue
        mod, leaf = torch_path(name)
        if stats is not None and leaf == "num_batches_tracked":
            continue
        if stats is not None and leaf in _BATCH_STATS:
            collection, flax_leaf = "batch_stats", _BATCH_STATS[leaf]
        else:
            collection, flax_leaf = "params", _flax_leaf(mod, leaf, tmpl)
        path = mod + (flax_leaf,) if flax_leaf is not None else None
        if path not in templates[collection]:
            unexpected.append(key)
            continue
        want = tuple(templates[collection][path].shape)
        a = _convert(np.asarray(w), flax_leaf, len(want))
        if a.shape != want:
            shapes.append(f"{key} {np.shape(w)}: {'.'.join(path)} has shape {a.shape}, the config needs {want}")
            bad_shape.add((collection, path))
            continue
        found[collection][path] = a.astype(cast)
    missing = [".".join(k) if source_of is None else f"{source_of(k)} ({'.'.join(k)})"
               for collection, t in templates.items() for k in t
               if k not in found[collection] and (collection, k) not in bad_shape]
    if shapes or missing or unexpected:
        raise ValueError(_mismatch(what, shapes, missing, unexpected))
    params = {"params": _tree(found["params"], tmpl)}
    return params if stats is None else {"batch_stats": _tree(found["batch_stats"], stats), **params}


def _mismatch(what: str, shapes: List[str], missing: List[str], unexpected: List[str]) -> str:
    """The message of a checkpoint that does not fit the module its config describes."""
    def listing(title: str, items: List[str]) -> str:
        more = f"\n  ... and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
        return f"{title} ({len(items)}):\n  " + "\n  ".join(items[:_SHOWN]) + more

    parts = []
    if shapes:
        parts.append(listing("shape mismatches", shapes))
    if missing:
        parts.append(listing(f"parameters of the {what} missing from the checkpoint", missing))
    if unexpected:
        parts.append(listing(f"checkpoint parameters the {what} of this config does not have", unexpected))
    return (f"the checkpoint does not fit the {what}: the config (the folder's config.json) does not match its "
            "weights\n" + "\n".join(parts))
