"""Named UNet configurations."""

from __future__ import annotations

from .unet import UNet


def mnist_unet(**overrides) -> UNet:
    """Small MNIST UNet (28x28x1, ~1 M parameters) sized for CPU training and sampling.

    Levels at 28, 14 and 7 pixels; attention at 7x7.
    """
    kw = dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(7,),
              dropout=0.1, groups=8)
    kw.update(overrides)
    return UNet(**kw)


def cifar10_unet(**overrides) -> UNet:
    """Ho et al.'s CIFAR-10 model: ch 128, mult (1,2,2,2), 2 res blocks, attention at 16x16, dropout 0.1 (35.7 M).

    Downsampling pads like TensorFlow's 'SAME' (``downsample_padding=0``), as the released
    google/ddpm-cifar10-32 weights expect.
    """
    kw = dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
              dropout=0.1, groups=32, downsample_padding=0)
    kw.update(overrides)
    return UNet(**kw)
