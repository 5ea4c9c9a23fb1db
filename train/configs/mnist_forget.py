"""MNIST forget-class DDPM: the DDPM trained only on the class to remove (default 0).

``--config=train/configs/mnist_forget.py:cpu --config.only_class=3``.
The shipped CPU models are initialised from the unconditional model
(``--config.init_from=checkpoints/mnist/ddpm``) and fine-tuned on the class;
the GPU size trains from scratch.
"""

from train.configs import mnist_ddpm


def get_config(size: str = "gpu"):
    c = mnist_ddpm.get_config(size)
    c.name = "mnist_forget"
    c.only_class = 0
    if size == "gpu":
        c.num_steps = 3000
        c.sample_every = 1000
    elif size == "cpu":
        c.num_steps = 400
        c.optim.lr = 3e-4
        c.optim.warmup_steps = 20
        c.ema_decay = 0.99
        c.checkpoint_every = 50
    return c
