"""MNIST and CIFAR-10 as NumPy arrays (NHWC), from an offline folder or TensorFlow Datasets.

Sources, tried in this order unless ``source`` says otherwise:

1. an offline folder: ``data_dir`` argument (the ``--data_dir`` flag of
   ``train/main.py``), else the ``DNGJAX_DATA_DIR`` environment variable. It
   holds ``mnist.npz`` and ``cifar10.npz`` with ``x_train, y_train, x_test,
   y_test`` (uint8; MNIST may be (N, 28, 28) without a channel axis). For
   CIFAR-10 the JPEG-packed ``cifar10-jpeg-q75.npz`` of ``../shared/data`` is
   accepted too and decoded in memory (Pillow, ~10 s).
2. TensorFlow Datasets (``pip install 'dngjax[data]'``; needs TensorFlow and a
   network connection the first time).

When neither works, :class:`DataUnavailableError` says how to provide the data.
"""

from __future__ import annotations

import functools
import io
import os
from typing import Optional, Tuple

import numpy as np

ENV_VAR = "DNGJAX_DATA_DIR"
DATASETS = ("mnist", "cifar10")
SPLITS = ("train", "test")
NUM_CLASSES = {"mnist": 10, "cifar10": 10}
SHAPES = {"mnist": (28, 28, 1), "cifar10": (32, 32, 3)}
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
_OFFLINE_FILES = {"mnist": ("mnist.npz",), "cifar10": ("cifar10.npz", "cifar10-jpeg-q75.npz")}


class DataUnavailableError(RuntimeError):
    """No source could provide the dataset; the message names both ways to provide it."""


def _how_to(name: str) -> str:
    files = " or ".join(_OFFLINE_FILES[name])
    return (
        f"Provide {name} in one of two ways:\n"
        f"  (1) offline: put {files} (arrays x_train, y_train, x_test, y_test) in a folder and pass "
        f"--data_dir=FOLDER (data_dir= in Python) or set {ENV_VAR}=FOLDER;\n"
        f"  (2) online: pip install 'dngjax[data]' (tensorflow-datasets + TensorFlow) so that "
        f"TensorFlow Datasets can download it.")


def resolve_data_dir(data_dir: Optional[str] = None) -> Optional[str]:
    """The offline folder to use: the argument, else ``$DNGJAX_DATA_DIR``, else None."""
    d = data_dir or os.environ.get(ENV_VAR) or None
    return os.path.expanduser(d) if d else None


def _decode_jpeg_split(packed, split: str) -> Tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    buf, offs = packed[f"{split}_jpeg"], packed[f"{split}_offsets"]
    images = [np.asarray(Image.open(io.BytesIO(buf[offs[i]:offs[i + 1]].tobytes())).convert("RGB"))
              for i in range(len(offs) - 1)]
    return np.stack(images), np.asarray(packed[f"{split}_labels"])


@functools.lru_cache(maxsize=4)
def _load_offline_file(path: str) -> dict:
    """All four arrays of an offline file (cached: the JPEG file is decoded once per process)."""
    try:
        with np.load(path) as f:
            keys = set(f.files)
            if {"x_train", "y_train", "x_test", "y_test"} <= keys:
                return {k: np.asarray(f[k]) for k in ("x_train", "y_train", "x_test", "y_test")}
            if {"train_jpeg", "train_offsets", "train_labels"} <= keys:
                out = {}
                for split in SPLITS:
                    out[f"x_{split}"], out[f"y_{split}"] = _decode_jpeg_split(f, split)
                return out
    except Exception as e:  # unreadable / truncated file
        raise DataUnavailableError(f"could not read {path}: {type(e).__name__}: {e}") from None
    raise DataUnavailableError(
        f"{path} has arrays {sorted(keys)}; expected x_train, y_train, x_test, y_test "
        f"(or the packed train_jpeg/train_offsets/train_labels layout)")


def _load_offline(name: str, split: str, data_dir: str) -> Tuple[np.ndarray, np.ndarray]:
    for fname in _OFFLINE_FILES[name]:
        path = os.path.join(data_dir, fname)
        if os.path.isfile(path):
            arrays = _load_offline_file(os.path.abspath(path))
            return arrays[f"x_{split}"], arrays[f"y_{split}"]
    raise FileNotFoundError(f"none of {', '.join(_OFFLINE_FILES[name])} in {data_dir}")


def _load_tfds(name: str, split: str) -> Tuple[np.ndarray, np.ndarray]:
    import tensorflow_datasets as tfds  # optional: the 'data' extra

    ds = tfds.as_numpy(tfds.load(name, split=split, batch_size=-1, as_supervised=True))
    return np.asarray(ds[0]), np.asarray(ds[1])


def load_arrays(name: str, split: str = "train", data_dir: Optional[str] = None,
                source: str = "auto") -> Tuple[np.ndarray, np.ndarray]:
    """Raw ``(x uint8 (N,H,W,C), y int32 (N,))`` of ``name`` / ``split``.

    ``source``: "auto" (offline folder if one is set, else TFDS), "offline" or "tfds".
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    if source not in ("auto", "offline", "tfds"):
        raise ValueError(f"source must be 'auto', 'offline' or 'tfds', got {source!r}")
    folder = resolve_data_dir(data_dir)
    problems = []
    x = y = None
    if source in ("auto", "offline"):
        if folder is None:
            problems.append(f"offline: no folder given (--data_dir / ${ENV_VAR} unset)")
        elif not os.path.isdir(folder):
            problems.append(f"offline: {folder} is not a directory")
        else:
            try:
                x, y = _load_offline(name, split, folder)
            except FileNotFoundError as e:
                problems.append(f"offline: {e}")
    if x is None and source in ("auto", "tfds"):
        try:
            x, y = _load_tfds(name, split)
        except ImportError:
            problems.append("TFDS: tensorflow_datasets / tensorflow is not installed")
        except Exception as e:  # network, download, build errors
            problems.append(f"TFDS: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    if x is None:
        raise DataUnavailableError(
            f"could not load {name} ({split}).\n  " + "\n  ".join(problems) + "\n" + _how_to(name))
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[..., None]
    if x.dtype != np.uint8:
        raise DataUnavailableError(f"{name} {split}: expected uint8 images, got {x.dtype}")
    want = SHAPES[name]
    if x.shape[1:] != want:
        raise DataUnavailableError(f"{name} {split}: expected images of shape {want}, got {x.shape[1:]}")
    y = np.asarray(y).astype(np.int32).reshape(-1)
    if len(y) != len(x):
        raise DataUnavailableError(f"{name} {split}: {len(x)} images but {len(y)} labels")
    return x, y


def to_model_space(x_uint8: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return (np.asarray(x_uint8, np.float32) / 127.5 - 1.0).astype(np.float32)


def to_uint8(x: np.ndarray) -> np.ndarray:
    """float [-1, 1] -> uint8 [0, 255] (clipped, rounded)."""
    return np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def tile(x: np.ndarray, ncols: Optional[int] = None, pad: int = 1, fill=None) -> np.ndarray:
    """Images (N, H, W, C) -> one grid image (rows*(H+pad)-pad, ncols*(W+pad)-pad, C) of x's dtype,
    row by row, ``ncols`` per row (default: a square), the gaps filled with ``fill`` (default white:
    255 for integer images, 1.0 for float images in [0, 1])."""
    x = np.asarray(x)
    n, h, w, c = x.shape
    ncols = ncols or int(np.ceil(np.sqrt(n)))
    nrows = int(np.ceil(n / ncols))
    if fill is None:
        fill = 255 if np.issubdtype(x.dtype, np.integer) else 1.0
    out = np.full((nrows * (h + pad) - pad, ncols * (w + pad) - pad, c), fill, x.dtype)
    for i in range(n):
        r, q = divmod(i, ncols)
        out[r * (h + pad):r * (h + pad) + h, q * (w + pad):q * (w + pad) + w] = x[i]
    return out


def filter_classes(x: np.ndarray, y: np.ndarray, only_class: Optional[int] = None,
                   drop_class: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Keep only ``only_class`` (forget-class model) and/or drop ``drop_class`` (reference stats; an int
    or a sequence of classes).

    ``None`` or a negative value means "no filter".
    """
    keep = np.ones(len(y), bool)
    if only_class is not None and only_class >= 0:
        keep &= y == only_class
    drop = [] if drop_class is None else [c for c in np.asarray(drop_class).reshape(-1).tolist() if c >= 0]
    if drop:
        keep &= ~np.isin(y, drop)
    if not keep.any():
        raise ValueError(f"no examples left after only_class={only_class}, drop_class={drop_class}")
    return x[keep], y[keep]


def load_dataset(name: str, split: str = "train", *, data_dir: Optional[str] = None,
                 source: str = "auto", only_class: Optional[int] = None,
                 drop_class: Optional[int] = None, as_float: bool = True,
                 limit: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Images (NHWC) and int32 labels, filtered; float32 in [-1, 1] if ``as_float`` else uint8.

    ``limit`` keeps the first ``limit`` examples after filtering (for tests).
    """
    x, y = load_arrays(name, split, data_dir=data_dir, source=source)
    n = NUM_CLASSES[name]
    for what, c in (("only_class", only_class), ("drop_class", drop_class)):
        if c is not None and np.max(np.asarray(c)) >= n:
            raise ValueError(f"{what}={c} out of range for {name} ({n} classes)")
    x, y = filter_classes(x, y, only_class, drop_class)
    if limit:
        x, y = x[:limit], y[:limit]
    return (to_model_space(x) if as_float else x), y


def batch_indices(num_examples: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Indices of the batch at ``step``: a deterministic function of (seed, step) alone.

    Examples are drawn epoch by epoch, each epoch a fresh permutation seeded by
    (seed, epoch), so a resumed run sees exactly the batches of an uninterrupted one.
    """
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, pos = divmod(start, num_examples)
        perm = _epoch_perm(num_examples, seed, epoch)
        take = perm[pos:pos + batch_size - len(out)]
        out.extend(take.tolist())
        start += len(take)
    return np.asarray(out, np.int64)


@functools.lru_cache(maxsize=2)
def _epoch_perm(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)
