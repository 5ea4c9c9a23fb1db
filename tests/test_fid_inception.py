"""Parity of the Flax FID Inception-v3 with pytorch-fid's network, and the safe weight loader.

torchvision cannot be imported next to the installed torch wheel, so pytorch-fid's
network is re-implemented here with torch.nn only: torchvision's ``Inception3``
trunk (attribute names and thus ``state_dict`` keys of the real weight file,
``pt_inception-2015-12-05-6726825d.pth``), ``BasicConv2d``, ``InceptionB/D`` and
pytorch-fid's patched ``FIDInceptionA/C/E_1/E_2`` forwards, and pytorch-fid's
``InceptionV3.forward`` input handling (bilinear resize to 299, [0,1] -> [-1,1]).
Random weights, BatchNorm statistics calibrated on random inputs (so that
activations neither vanish nor explode through the 90-odd layers), then random
affine BN parameters.
"""

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
tnn = torch.nn
F = torch.nn.functional

import jax
import jax.numpy as jnp

from dngjax import fid_inception as fi

torch.set_num_threads(2)


# =========================================================================== torch reference (pytorch-fid)

class BasicConv2d(tnn.Module):
    def __init__(self, in_channels, out_channels, **kwargs):
        super().__init__()
        self.conv = tnn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = tnn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class FIDInceptionA(tnn.Module):
    def __init__(self, in_channels, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x):
        branch1x1 = self.branch1x1(x)
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        # Patch: TensorFlow's average pool does not use the padded zeros in its average
        branch_pool = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
        branch_pool = self.branch_pool(branch_pool)
        return torch.cat([branch1x1, branch5x5, branch3x3dbl, branch_pool], 1)


class InceptionB(tnn.Module):
    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        branch3x3 = self.branch3x3(x)
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([branch3x3, branch3x3dbl, branch_pool], 1)


class FIDInceptionC(tnn.Module):
    def __init__(self, in_channels, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        branch1x1 = self.branch1x1(x)
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b = self.branch7x7dbl_1(x)
        b = self.branch7x7dbl_2(b)
        b = self.branch7x7dbl_3(b)
        b = self.branch7x7dbl_4(b)
        branch7x7dbl = self.branch7x7dbl_5(b)
        # Patch: TensorFlow's average pool does not use the padded zeros in its average
        branch_pool = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
        branch_pool = self.branch_pool(branch_pool)
        return torch.cat([branch1x1, branch7x7, branch7x7dbl, branch_pool], 1)


class InceptionD(tnn.Module):
    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        b = self.branch7x7x3_1(x)
        b = self.branch7x7x3_2(b)
        b = self.branch7x7x3_3(b)
        branch7x7x3 = self.branch7x7x3_4(b)
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([branch3x3, branch7x7x3, branch_pool], 1)


class InceptionE(tnn.Module):
    """torchvision's InceptionE modules with pytorch-fid's FIDInceptionE_1 (avg) / E_2 (max) forward."""

    def __init__(self, in_channels, pool="avg"):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        branch1x1 = self.branch1x1(x)
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
        if self.pool == "avg":   # FIDInceptionE_1: average pool without the padded zeros
            branch_pool = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
        else:                    # FIDInceptionE_2: max pool instead of average pool
            branch_pool = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        branch_pool = self.branch_pool(branch_pool)
        return torch.cat([branch1x1, branch3x3, branch3x3dbl, branch_pool], 1)


class TorchFIDInception(tnn.Module):
    """fid_inception_v3() (torchvision Inception3 trunk with the FID blocks) + pytorch-fid's InceptionV3.forward."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, "avg")
        self.Mixed_7c = InceptionE(2048, "max")
        self.fc = tnn.Linear(2048, 1008)

    def forward(self, x, resize_input=True, normalize_input=True):
        if resize_input:
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        if normalize_input:
            x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c",
                     "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(self, name)(x)
        return F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)


def randomize(module, calib_input, seed=0, **forward_kwargs):
    """Kaiming conv weights, BN running stats from a train-mode pass, random BN affine; eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, tnn.Conv2d):
            fan_in = m.weight[0].numel()
            m.weight.data = torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5
        if isinstance(m, tnn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None                     # cumulative average: one batch -> its statistics
    module.train()
    with torch.no_grad():
        module(calib_input, **forward_kwargs)
    for m in module.modules():
        if isinstance(m, tnn.BatchNorm2d):
            m.weight.data = torch.rand(m.weight.shape, generator=g) + 0.5
            m.bias.data = 0.2 * torch.randn(m.bias.shape, generator=g)
            m.momentum = 0.1
    return module.eval()


def to_nhwc(t):
    return np.asarray(t.detach().numpy()).transpose(0, 2, 3, 1)


def rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(b)))


def _block_variables(torch_module, flax_module, x_nhwc):
    """Convert a torch block's state_dict by prefixing it into the full-network key layout."""
    sd = {k: v.numpy() for k, v in torch_module.state_dict().items()}
    flat = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[-1] == "num_batches_tracked":
            continue
        mod, leaf = tuple(parts[:-1]), parts[-1]
        if leaf == "weight" and parts[-2] == "conv":
            flat[("params",) + mod + ("kernel",)] = v.transpose(2, 3, 1, 0)
        elif leaf in ("weight", "bias"):
            flat[("params",) + mod + ({"weight": "scale", "bias": "bias"}[leaf],)] = v
        else:
            flat[("batch_stats",) + mod + ({"running_mean": "mean", "running_var": "var"}[leaf],)] = v
    from flax import traverse_util
    variables = traverse_util.unflatten_dict(flat)
    ref_shapes = jax.eval_shape(lambda: flax_module.init(jax.random.PRNGKey(0), x_nhwc))
    assert jax.tree.map(lambda a: tuple(a.shape), ref_shapes) == jax.tree.map(lambda a: tuple(a.shape), variables)
    return variables


# =========================================================================== block-level parity

@pytest.mark.parametrize("kind", ["A", "B", "C", "D", "E_1", "E_2"])
def test_block_parity(kind):
    torch.manual_seed(0)
    cin, hw = {"A": (192, 9), "B": (288, 9), "C": (768, 7), "D": (768, 9),
               "E_1": (1280, 5), "E_2": (2048, 5)}[kind]
    tmod, fmod = {
        "A": (lambda: FIDInceptionA(cin, 32), lambda: fi.FIDInceptionA(32)),
        "B": (lambda: InceptionB(cin), lambda: fi.InceptionB()),
        "C": (lambda: FIDInceptionC(cin, 128), lambda: fi.FIDInceptionC(128)),
        "D": (lambda: InceptionD(cin), lambda: fi.InceptionD()),
        "E_1": (lambda: InceptionE(cin, "avg"), lambda: fi.FIDInceptionE("avg")),
        "E_2": (lambda: InceptionE(cin, "max"), lambda: fi.FIDInceptionE("max")),
    }[kind]
    tmod, fmod = tmod(), fmod()
    x = torch.randn(2, cin, hw, hw)
    randomize(tmod, torch.randn(4, cin, hw, hw), seed=1)
    with torch.no_grad():
        ref = to_nhwc(tmod(x))
    xn = jnp.asarray(to_nhwc(x))
    out = jax.jit(fmod.apply)(_block_variables(tmod, fmod, xn), xn)
    assert out.shape == ref.shape
    assert rel_err(out, ref) < 1e-5


def test_avg_pool_excludes_padding():
    x = jnp.ones((1, 3, 3, 1))
    np.testing.assert_allclose(fi._avg_pool_3x3_exclude_pad(x), 1.0, rtol=1e-6)
    x = jnp.arange(9.0).reshape(1, 3, 3, 1)
    ref = F.avg_pool2d(torch.arange(9.0).reshape(1, 1, 3, 3), 3, 1, 1, count_include_pad=False)
    np.testing.assert_allclose(fi._avg_pool_3x3_exclude_pad(x), to_nhwc(ref), rtol=1e-6)
    refm = F.max_pool2d(-torch.arange(9.0).reshape(1, 1, 3, 3), 3, 1, 1)
    np.testing.assert_allclose(fi._max_pool_3x3_s1(-x), to_nhwc(refm), rtol=1e-6)


@pytest.mark.parametrize("size", [28, 32, 150, 512])
def test_resize_matches_torch_interpolate(size):
    rng = np.random.default_rng(size)
    x = rng.uniform(size=(2, 3, size, size)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(x), size=(299, 299), mode="bilinear", align_corners=False)
    out = fi.resize_bilinear(jnp.asarray(x.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(np.asarray(out), to_nhwc(ref), atol=2e-6)


# =========================================================================== whole network, via the weight file

@pytest.fixture(scope="module")
def torch_net():
    torch.manual_seed(0)
    net = TorchFIDInception()
    return randomize(net, torch.rand(2, 3, 107, 107), seed=2, resize_input=False)


@pytest.fixture(scope="module")
def weight_file(torch_net, tmp_path_factory):
    path = tmp_path_factory.mktemp("fid") / "pt_inception-random.pth"
    torch.save(torch_net.state_dict(), path)
    return str(path)


def test_state_dict_keys_are_pytorch_fid_keys(torch_net):
    keys = set(torch_net.state_dict())
    for k in ("Conv2d_1a_3x3.conv.weight", "Conv2d_1a_3x3.bn.running_var", "Mixed_5b.branch_pool.conv.weight",
              "Mixed_6e.branch7x7dbl_5.bn.bias", "Mixed_7c.branch3x3dbl_3b.conv.weight", "fc.weight"):
        assert k in keys


@pytest.fixture(scope="module")
def converted(weight_file):
    return fi.load_fid_inception(weight_file, resize_input=False)


def test_network_parity_small_input(torch_net, converted):
    """The whole trunk at 107 x 107 (no resize; 2 x 2 at Mixed_7): same 2048-d pool features to 1e-4."""
    module, variables = converted
    x = torch.rand(2, 3, 107, 107, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = torch_net(x, resize_input=False).numpy()
    out = np.asarray(jax.jit(module.apply)(variables, jnp.asarray(to_nhwc(x))))
    assert out.shape == (2, 2048)
    assert np.std(ref) > 1e-3 * np.abs(ref).max()     # features are not degenerate
    assert rel_err(out, ref) < 1e-4


@pytest.mark.slow
def test_network_parity_full_pipeline(torch_net, weight_file):
    """pytorch-fid's whole input pipeline: 32 x 32 images in [0, 1] resized to 299, features to 1e-4."""
    module, variables = fi.load_fid_inception(weight_file)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = torch_net(x).numpy()
    out = np.asarray(fi.fid_features_fn(module, variables)(to_nhwc(x)))
    assert rel_err(out, ref) < 1e-4


# =========================================================================== safe loader

class NotATensor:
    def __init__(self):
        self.payload = "would run code on unpickling in an unsafe loader"


@pytest.mark.parametrize("zip_format", [True, False])
def test_loader_reads_both_torch_formats(tmp_path, zip_format):
    sd = {"a.conv.weight": torch.randn(4, 3, 3, 3), "a.bn.running_var": torch.rand(4),
          "a.bn.num_batches_tracked": torch.tensor(7), "b": torch.arange(12, dtype=torch.float64).reshape(3, 4).t(),
          "half": torch.randn(5).half(), "flag": torch.tensor([True, False])}
    base = torch.arange(10.0)
    sd["view"] = base[2:8]                        # a tensor with an offset into a shared storage
    sd["base"] = base
    path = tmp_path / "sd.pth"
    torch.save(sd, path, _use_new_zipfile_serialization=zip_format)
    loaded = fi.load_torch_state_dict(str(path))
    assert set(loaded) == set(sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(loaded[k], v.numpy())
        assert loaded[k].dtype == v.numpy().dtype
        assert loaded[k].shape == tuple(v.shape)


def test_loader_refuses_arbitrary_objects(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(2), "x": NotATensor()}, path)
    import pickle
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        fi.load_torch_state_dict(str(path))
    path2 = tmp_path / "evil_legacy.pth"
    torch.save({"x": NotATensor()}, path2, _use_new_zipfile_serialization=False)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        fi.load_torch_state_dict(str(path2))


def test_convert_rejects_wrong_state_dict(weight_file):
    sd = fi.load_torch_state_dict(weight_file)
    del sd["Mixed_6b.branch7x7_2.conv.weight"]
    with pytest.raises(ValueError, match="missing"):
        fi.convert_state_dict(sd)


def test_npz_roundtrip_and_missing_weights_message(converted, tmp_path, monkeypatch):
    _, variables = converted
    npz = str(tmp_path / "fid.npz")
    fi.save_variables(variables, npz)
    _, v2 = fi.load_fid_inception(npz, resize_input=False)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), variables, v2))
    monkeypatch.delenv(fi.FID_WEIGHTS_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05"):
        fi.load_fid_inception(str(tmp_path / "nope.pth"))
