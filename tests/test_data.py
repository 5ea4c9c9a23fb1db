"""dngjax.data: offline loaders (plain and JPEG-packed npz), filters, batch order, the no-source error."""

import io
import os
import sys

import numpy as np
import pytest

from dngjax import data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get(data.ENV_VAR) or os.path.join(REPO, "..", "shared", "data")


def _fake_mnist(folder, n_train=50, n_test=20, seed=0):
    rng = np.random.default_rng(seed)
    np.savez(os.path.join(folder, "mnist.npz"),
             x_train=rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
             y_train=(np.arange(n_train) % 10).astype(np.uint8),
             x_test=rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
             y_test=(np.arange(n_test) % 10).astype(np.uint8))


def _fake_cifar_packed(folder, n=6):
    from PIL import Image

    out = {}
    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        blobs, offs = [], [0]
        for _ in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=75)
            blobs.append(np.frombuffer(buf.getvalue(), np.uint8))
            offs.append(offs[-1] + len(blobs[-1]))
        out[f"{split}_jpeg"] = np.concatenate(blobs)
        out[f"{split}_offsets"] = np.asarray(offs, np.int64)
        out[f"{split}_labels"] = (np.arange(n) % 10).astype(np.uint8)
    np.savez(os.path.join(folder, "cifar10-jpeg-q75.npz"), **out)


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    data._load_offline_file.cache_clear()


def test_offline_mnist_shapes_and_range(tmp_path):
    _fake_mnist(tmp_path)
    x, y = data.load_dataset("mnist", "train", data_dir=str(tmp_path))
    assert x.shape == (50, 28, 28, 1) and x.dtype == np.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert y.dtype == np.int32 and y.shape == (50,)
    xu, _ = data.load_dataset("mnist", "test", data_dir=str(tmp_path), as_float=False)
    assert xu.dtype == np.uint8 and xu.shape == (20, 28, 28, 1)
    np.testing.assert_allclose(data.to_model_space(xu), data.load_dataset("mnist", "test", data_dir=str(tmp_path))[0])
    np.testing.assert_array_equal(data.to_uint8(data.to_model_space(xu)), xu)


def test_env_var_selects_folder(tmp_path, monkeypatch):
    _fake_mnist(tmp_path)
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path))
    x, _ = data.load_dataset("mnist", "train")
    assert x.shape[0] == 50


def test_filters(tmp_path):
    _fake_mnist(tmp_path)
    x, y = data.load_dataset("mnist", "train", data_dir=str(tmp_path), only_class=3)
    assert len(y) == 5 and np.all(y == 3)
    x, y = data.load_dataset("mnist", "train", data_dir=str(tmp_path), drop_class=3)
    assert len(y) == 45 and not np.any(y == 3)
    x, y = data.load_dataset("mnist", "train", data_dir=str(tmp_path), only_class=-1, drop_class=-1)
    assert len(y) == 50
    with pytest.raises(ValueError, match="no examples left"):
        data.filter_classes(x, y, only_class=3, drop_class=3)
    with pytest.raises(ValueError, match="out of range"):
        data.load_dataset("mnist", "train", data_dir=str(tmp_path), only_class=10)


def test_cifar_jpeg_packed_is_decoded(tmp_path):
    _fake_cifar_packed(tmp_path)
    x, y = data.load_dataset("cifar10", "train", data_dir=str(tmp_path), as_float=False)
    assert x.shape == (6, 32, 32, 3) and x.dtype == np.uint8
    assert y.tolist() == list(range(6))


def test_no_source_error_names_both_ways(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails: no TFDS
    with pytest.raises(data.DataUnavailableError) as e:
        data.load_dataset("mnist", "train", data_dir=str(tmp_path / "nowhere"))
    msg = str(e.value)
    assert "--data_dir" in msg and data.ENV_VAR in msg and "dngjax[data]" in msg
    assert "not installed" in msg and "not a directory" in msg
    # empty folder, no env var
    with pytest.raises(data.DataUnavailableError, match="mnist.npz"):
        data.load_dataset("mnist", "train", data_dir=str(tmp_path))
    with pytest.raises(data.DataUnavailableError, match=data.ENV_VAR):
        data.load_dataset("mnist", "train", source="offline")


def test_corrupt_file_error(tmp_path):
    (tmp_path / "mnist.npz").write_bytes(b"not a zip file")
    with pytest.raises(data.DataUnavailableError, match="could not read"):
        data.load_dataset("mnist", "train", data_dir=str(tmp_path))


def test_batch_order_is_a_function_of_step():
    n, b = 23, 8
    a = [data.batch_indices(n, b, s, seed=5) for s in range(9)]
    again = [data.batch_indices(n, b, s, seed=5) for s in reversed(range(9))][::-1]
    for u, v in zip(a, again):
        np.testing.assert_array_equal(u, v)
    flat = np.concatenate(a)
    # the first 23 drawn indices are one permutation (an epoch)
    assert sorted(flat[:23].tolist()) == list(range(23))
    assert not np.array_equal(data.batch_indices(n, b, 0, seed=5), data.batch_indices(n, b, 0, seed=6))


@pytest.mark.skipif(not os.path.isfile(os.path.join(SHARED, "mnist.npz")), reason="no offline MNIST")
def test_real_mnist_counts():
    x, y = data.load_dataset("mnist", "train", data_dir=SHARED, as_float=False)
    assert x.shape == (60000, 28, 28, 1)
    assert int((y == 0).sum()) == 5923
    x0, y0 = data.load_dataset("mnist", "test", data_dir=SHARED, only_class=0, as_float=False)
    assert len(y0) == 980


def test_tile_places_images_row_by_row_with_white_gaps():
    x = np.arange(3 * 2 * 2, dtype=np.uint8).reshape(3, 2, 2, 1) + 1      # three 2x2 images
    g = data.tile(x, ncols=2, pad=1)
    assert g.shape == (5, 5, 1) and g.dtype == np.uint8
    assert np.array_equal(g[0:2, 0:2], x[0]) and np.array_equal(g[0:2, 3:5], x[1])
    assert np.array_equal(g[3:5, 0:2], x[2])
    assert (g[2] == 255).all() and (g[:, 2] == 255).all() and (g[3:5, 3:5] == 255).all()   # gaps, empty cell
    f = data.tile(np.zeros((4, 3, 3, 3), np.float32))                      # default: a 2 x 2 square, white 1.0
    assert f.shape == (7, 7, 3) and f[3].min() == 1.0 and f[:3, :3].max() == 0.0
