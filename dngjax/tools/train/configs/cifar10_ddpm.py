"""CIFAR-10 DDPM: unconditional (default) or forget-class (see ``cifar10_forget.py``).

``--config=train/configs/cifar10_ddpm.py`` is a *small* unconditional model
(ch 64, ~9 M parameters) for one GPU; the paper's experiments use Ho et al.'s
35.7 M model, which the project converts from ``google/ddpm-cifar10-32``
(see docs/cifar10.md) instead of training it. ``:tiny`` is for tests.
Not trained in this repository (no GPU was available); untested beyond a few steps.
"""

from dngjax.tools.train.configs.common import base_config, unet_kwargs


def get_config(size: str = "gpu"):
    c = base_config()
    c.name = "cifar10_ddpm"
    c.dataset = "cifar10"
    c.model.kind = "unet"
    if size == "gpu":
        c.model.kwargs = unet_kwargs(ch=64, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
                                     dropout=0.1, groups=32)
        c.batch_size = 128
        c.num_train_steps = 200_000
        c.optim.lr = 2e-4
        c.optim.warmup_steps = 5000
        c.checkpoint_every = 5000
        c.sample_every = 10_000
        c.log_every = 100
        c.ema_decay = 0.9999
    elif size == "tiny":
        c.model.kwargs = unet_kwargs(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                                     dropout=0.0, groups=4)
        c.batch_size = 4
        c.num_train_steps = 2
        c.optim.warmup_steps = 1
        c.checkpoint_every = 1
        c.log_every = 1
        c.final_samples = 0
        c.progress = False
        c.limit_examples = 64
        c.ema_decay = 0.9
    else:
        raise ValueError(f"unknown size {size!r}: gpu or tiny")
    return c
