"""MNIST forget-class DDPM: the DDPM trained only on the class to remove (default 0).

``--config=train/configs/mnist_forget.py:cpu --config.only_class=3``.
``train/train_all_mnist.sh`` initialises it from the unconditional model
(``--config.init_from=WORKDIR/mnist_ddpm/model``) and fine-tunes it on the class,
on both sizes; without ``init_from`` it trains from scratch (give it more steps).
"""

from train.configs import mnist_ddpm


def get_config(size: str = "gpu"):
    c = mnist_ddpm.get_config(size)
    c.name = "mnist_forget"
    c.only_class = 0
    if size == "gpu":
        c.num_steps = 1000
        c.optim.lr = 2e-4
        c.optim.warmup_steps = 50
        c.sample_every = 0
    elif size == "cpu":
        c.num_steps = 400
        c.optim.lr = 3e-4
        c.optim.warmup_steps = 20
        c.ema_decay = 0.99
        c.checkpoint_every = 50
    return c
