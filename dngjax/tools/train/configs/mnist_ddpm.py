"""MNIST unconditional DDPM (eps-prediction, linear betas, T = 1000).

``--config=train/configs/mnist_ddpm.py`` (GPU size: the project's ``mnist_unet()``,
ch 32, ~1.1 M parameters) or ``...mnist_ddpm.py:cpu`` (ch 16 x (1, 2, 4), 687k parameters,
trained from scratch on a 2-core CPU, one core per run; resumable, so ``--config.num_train_steps``
can be raised between runs) or ``:tiny`` (tests).
A forget-class model is the same config with ``--config.only_class=C``
(see ``mnist_forget.py``).
"""

from dngjax.tools.train.configs.common import base_config, unet_kwargs


def get_config(size: str = "gpu"):
    c = base_config()
    c.name = "mnist_ddpm"
    c.dataset = "mnist"
    c.model.kind = "unet"
    if size == "gpu":
        c.model.kwargs = unet_kwargs(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(7,),
                                     dropout=0.1, groups=8)
        c.batch_size = 128
        c.num_train_steps = 6000
        c.optim.lr = 5e-4
        c.optim.warmup_steps = 200
        c.checkpoint_every = 1000
        c.sample_every = 2000
        c.log_every = 100
        c.ema_decay = 0.999
    elif size == "cpu":
        # Chosen from measured cost on a 2-core CPU (bench/train.py): channels (16, 32, 64) at
        # 28/14/7 pixels hold 2.5x the parameters of (16, 32, 32) (687k vs 280k) for 1.3x the
        # time per train step and per sampling pass, where ch 32 (1.1 M) costs 2.7x.
        c.model.kwargs = unet_kwargs(ch=16, ch_mult=(1, 2, 4), num_res_blocks=1, attn_resolutions=(7,),
                                     dropout=0.0, groups=8)
        c.batch_size = 64
        # 4 micro-batches of 16, unrolled in the step: the same gradient, ~20 % less time per step on
        # one CPU core (docs/benchmarks.md); any batch the config is given must be a multiple of 16
        c.micro_batch = 16
        c.num_train_steps = 30_000
        c.optim.lr = 1e-3
        c.optim.warmup_steps = 200
        c.optim.decay_steps = 5000   # the shipped ddpm and cond: a cosine decay over each run's last 5000 steps
        c.checkpoint_every = 250
        c.sample_every = 0
        c.log_every = 25
        c.ema_decay = 0.999
    elif size == "tiny":
        c.model.kwargs = unet_kwargs(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                                     dropout=0.0, groups=4)
        c.batch_size = 8
        c.num_train_steps = 6
        c.optim.lr = 1e-3
        c.optim.warmup_steps = 1
        c.checkpoint_every = 2
        c.log_every = 1
        c.final_samples = 0
        c.progress = False
        c.limit_examples = 256
        c.ema_decay = 0.9
    else:
        raise ValueError(f"unknown size {size!r}: gpu, cpu or tiny")
    return c
