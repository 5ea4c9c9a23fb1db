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
and read by :func:`load_torch_state_dict` (of :mod:`dngjax.models.torch_weights`), a restricted unpickler that accepts
only tensors, storages and ordered dicts (both PyTorch file formats: the zip
archive of torch >= 1.6 and the older sequential format) -- no arbitrary
objects are ever unpickled, and torch itself is not needed.

Usage::

    module, variables = load_fid_inception("pt_inception-2015-12-05-6726825d.pth")
    feats = fid_features_fn(module, variables)(images_nhwc_in_0_1)   # (B, 2048)
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Mapping, Tuple

import numpy as np
import jax
import jax.numpy as jnp
import flax.linen as nn
from flax import traverse_util

from .models.torch_weights import assemble_torch, load_torch_state_dict, template

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
