"""The MNIST UNet architectures the benchmarks compare, by name.

* ``cpu``: ``train/configs/mnist_ddpm.py:cpu``, the shipped models (ch 16 x (1, 2, 4));
* ``cpu_v1``: the earlier CPU architecture (ch 16 x (1, 2, 2)), the baseline the shipped one was chosen against;
* ``gpu``: ``mnist_ddpm.py:gpu`` (= ``mnist_unet()``, ch 32), without dropout;
* ``cpu_136`` / ``cpu_r2``: the capacity candidates of the pilot (checkpoints/train_state/README.md):
  more channels at 14 and 7 pixels, or two ResBlocks per level.
"""

from __future__ import annotations

from dngjax.models import unet as dj_unet
from dngjax.tools.train.configs import mnist_ddpm

ARCHS = {
    "cpu": dict(mnist_ddpm.get_config("cpu").model.kwargs),
    "cpu_v1": dict(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(7,), dropout=0.0, groups=8),
    "gpu": dict(mnist_ddpm.get_config("gpu").model.kwargs, dropout=0.0),
    "cpu_136": dict(mnist_ddpm.get_config("cpu").model.kwargs, ch_mult=(1, 3, 6)),
    "cpu_r2": dict(mnist_ddpm.get_config("cpu").model.kwargs, num_res_blocks=2),
}


def describe(arch: str) -> str:
    """The architecture in words, e.g. ``UNet ch 16 x (1, 2, 4)`` (as the model cards write it)."""
    from dngjax.tools.train.export import arch_summary
    return arch_summary({"arch": {"kind": "unet", "kwargs": ARCHS[arch]}})


def unet(arch: str, module=dj_unet) -> dj_unet.UNet:
    """The UNet named ``arch`` (a key of ``ARCHS``), built from ``module`` (a variant of the library's)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}")
    kw = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in ARCHS[arch].items()}
    return module.UNet(**kw)
