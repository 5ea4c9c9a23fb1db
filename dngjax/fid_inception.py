"""The FID Inception-v3 of pytorch-fid, in Flax, with a safe loader for its weight file.

FID proper (Heusel et al. 2017) uses the 2048-d pool features of the TensorFlow
Inception-v3 graph of 2015-12-05. pytorch-fid (Seitzer) ported those weights to
PyTorch (``pt_inception-2015-12-05-6726825d.pth``) on torchvision's Inception-v3
with four patched block types, and its FID values match TensorFlow's. This module
re-implements that network layer for layer in Flax (NHWC), so that the same
weight file gives the same features:

* ``FIDInceptionA`` / ``FIDInceptionC`` / ``FIDInceptionE_1``: the pool branch is
  a 3x3 average pool that does not count the zero padding (TensorFlow's
  behaviour; ``count_include_pad=False``);
* ``FIDInceptionE_2`` (``Mixed_7c``): the pool branch is a 3x3 *max* pool;
* ``BasicConv2d``: conv without bias, BatchNorm with eps 1e-3, ReLU;
* input handling of pytorch-fid's ``InceptionV3``: images in [0, 1], bilinearly
  resized to 299 x 299 (``align_corners=False``, no antialiasing), then mapped
  to [-1, 1].

The weights are downloaded by the user (nothing is fetched here) from
https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
and read by :func:`load_torch_state_dict`, a restricted unpickler that accepts
only tensors, storages and ordered dicts (both PyTorch file formats: the zip
archive of torch >= 1.6 and the older sequential format) -- no arbitrary
objects are ever unpickled, and torch itself is not needed.

Usage::

    module, variables = load_fid_inception("pt_inception-2015-12-05-6726825d.pth")
    feats = fid_features_fn(module, variables)(images_nhwc_in_0_1)   # (B, 2048)
"""

from __future__ import annotations

import io
import os
import pickle
import struct as _struct
import zipfile
from collections import OrderedDict
from typing import Any, Callable, Dict, Mapping, Tuple

import numpy as np
import jax
import jax.numpy as jnp
import flax.linen as nn
from flax import traverse_util

from .models.torch_weights import assemble_torch, template

Array = jnp.ndarray

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
FID_WEIGHTS_ENV = "DNGJAX_FID_WEIGHTS"
INPUT_SIZE = 299
BN_EPS = 1e-3


# =========================================================================== network

def _pair(v) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm(eps=1e-3, running statistics) -> ReLU; torch padding semantics."""

    features: int
    kernel_size: Any
    stride: Any = 1
    padding: Any = 0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        ph, pw = _pair(self.padding)
        x = nn.Conv(self.features, _pair(self.kernel_size), strides=_pair(self.stride),
                    padding=((ph, ph), (pw, pw)), use_bias=False, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name="bn")(x)
        return nn.relu(x)


def _max_pool_3x3_s2(x: Array) -> Array:
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


def _avg_pool_3x3_exclude_pad(x: Array) -> Array:
    """TF-style 3x3 stride-1 average pool: padded zeros are not counted."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s1(x: Array) -> Array:
    return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


class FIDInceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(64, 1, name="branch1x1")(x)
        b5 = BasicConv2d(48, 1, name="branch5x5_1")(x)
        b5 = BasicConv2d(64, 5, padding=2, name="branch5x5_2")(b5)
        b3 = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
        b3 = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(b3)
        b3 = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_3")(b3)
        bp = BasicConv2d(self.pool_features, 1, name="branch_pool")(_avg_pool_3x3_exclude_pad(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(384, 3, stride=2, name="branch3x3")(x)
        bd = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = BasicConv2d(96, 3, stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = BasicConv2d(192, 1, name="branch1x1")(x)
        b7 = BasicConv2d(c7, 1, name="branch7x7_1")(x)
        b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv2d(c7, 1, name="branch7x7dbl_1")(x)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv2d(192, 1, name="branch_pool")(_avg_pool_3x3_exclude_pad(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(192, 1, name="branch3x3_1")(x)
        b3 = BasicConv2d(320, 3, stride=2, name="branch3x3_2")(b3)
        b7 = BasicConv2d(192, 1, name="branch7x7x3_1")(x)
        b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv2d(192, 3, stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionE(nn.Module):
    """``FIDInceptionE_1`` (average pool without padding counts) or ``_2`` (max pool)."""

    pool: str = "avg"

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(320, 1, name="branch1x1")(x)
        b3 = BasicConv2d(384, 1, name="branch3x3_1")(x)
        b3 = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                              BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
        bd = BasicConv2d(448, 1, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(384, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                              BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
        pooled = _avg_pool_3x3_exclude_pad(x) if self.pool == "avg" else _max_pool_3x3_s1(x)
        bp = BasicConv2d(192, 1, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def resize_bilinear(x: Array, size: int = INPUT_SIZE) -> Array:
    """NHWC bilinear resize as ``F.interpolate(mode='bilinear', align_corners=False)`` (no antialias)."""
    b, h, w, c = x.shape
    if (h, w) == (size, size):
        return x
    return jax.image.resize(x, (b, size, size, c), method="bilinear", antialias=False)


class FIDInceptionV3(nn.Module):
    """pytorch-fid's ``InceptionV3`` (``use_fid_inception=True``) up to the 2048-d pool features.

    ``apply(variables, x)`` with x (B, H, W, 3) NHWC RGB in [0, 1] -> (B, 2048).
    ``resize_input`` / ``normalize_input`` as in pytorch-fid (both on by default).
    Submodule names are the PyTorch ``state_dict`` prefixes (``Mixed_5b.branch1x1.conv``).
    """

    resize_input: bool = True
    normalize_input: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"FIDInceptionV3 expects NHWC RGB images (B, H, W, 3), got {x.shape}")
        x = x.astype(jnp.float32)
        if self.resize_input:
            x = resize_bilinear(x, INPUT_SIZE)
        if self.normalize_input:
            x = 2.0 * x - 1.0
        # block 0
        x = BasicConv2d(32, 3, stride=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, 3, name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_s2(x)
        # block 1
        x = BasicConv2d(80, 1, name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, 3, name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3_s2(x)
        # block 2
        x = FIDInceptionA(32, name="Mixed_5b")(x)
        x = FIDInceptionA(64, name="Mixed_5c")(x)
        x = FIDInceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        x = FIDInceptionC(128, name="Mixed_6b")(x)
        x = FIDInceptionC(160, name="Mixed_6c")(x)
        x = FIDInceptionC(160, name="Mixed_6d")(x)
        x = FIDInceptionC(192, name="Mixed_6e")(x)
        # block 3
        x = InceptionD(name="Mixed_7a")(x)
        x = FIDInceptionE("avg", name="Mixed_7b")(x)
        x = FIDInceptionE("max", name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))


# =========================================================================== safe torch loader

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


# =========================================================================== conversion

def convert_state_dict(state_dict: Mapping[str, np.ndarray]) -> Dict[str, Any]:
    """PyTorch FID-Inception ``state_dict`` -> Flax variables ``{"batch_stats", "params"}``, mapped by name
    (:func:`dngjax.models.torch_weights.assemble_torch`).

    ``X.conv.weight`` (O, I, kh, kw) -> ``params/X/conv/kernel`` (kh, kw, I, O);
    ``X.bn.weight/bias`` -> ``params/X/bn/scale/bias``; ``X.bn.running_mean/var`` ->
    ``batch_stats/X/bn/mean/var``. ``num_batches_tracked`` and the unused classifier
    ``fc.*`` are dropped. Every variable of the network must be present with the
    right shape, else ``ValueError`` lists what is missing or wrong.
    """
    module, x = FIDInceptionV3(resize_input=False), jnp.zeros((1, 75, 75, 3))
    return assemble_torch(dict(state_dict), template(module, x), "FID Inception-v3",
                          rename=lambda key: None if key.split(".")[0] == "fc" else key,
                          stats=template(module, x, collection="batch_stats"))


def save_variables(variables, path: str) -> None:
    """Save converted variables as a flat ``.npz`` (loads faster than the .pth)."""
    flat = traverse_util.flatten_dict(jax.device_get(variables), sep="/")
    np.savez(path, **{k: np.asarray(v) for k, v in flat.items()})


def load_variables_npz(path: str):
    with np.load(path, allow_pickle=False) as z:
        flat = {k: jnp.asarray(z[k]) for k in z.files}
    return traverse_util.unflatten_dict(flat, sep="/")


def resolve_weights_path(path: str | None = None) -> str:
    """``path``, else ``$DNGJAX_FID_WEIGHTS``; a clear error naming the download URL if absent."""
    path = path or os.environ.get(FID_WEIGHTS_ENV, "")
    if not path or not os.path.exists(path):
        raise FileNotFoundError(
            f"FID Inception weights not found ({path!r}). Download {FID_WEIGHTS_URL} "
            f"and pass its path (config.fid_weights) or set ${FID_WEIGHTS_ENV}.")
    return path


def load_fid_inception(path: str | None = None, resize_input: bool = True,
                       normalize_input: bool = True):
    """(module, variables) from pytorch-fid's ``.pth`` weight file or a converted ``.npz``."""
    path = resolve_weights_path(path)
    if path.endswith(".npz"):
        variables = load_variables_npz(path)
    else:
        variables = convert_state_dict(load_torch_state_dict(path))
    return FIDInceptionV3(resize_input=resize_input, normalize_input=normalize_input), variables


def fid_features_fn(module: FIDInceptionV3, variables) -> Callable[[Array], Array]:
    """A jitted ``f(images) -> (B, 2048)`` for NHWC images in [0, 1] (grayscale is repeated to RGB)."""
    @jax.jit
    def f(x):
        x = jnp.asarray(x, jnp.float32)
        if x.shape[-1] == 1:
            x = jnp.repeat(x, 3, axis=-1)
        return module.apply(variables, x)
    return f
