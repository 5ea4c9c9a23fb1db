"""MNIST forget-class DDPM: the DDPM trained only on the class to remove (default 0).

``--config=train/configs/mnist_forget.py:cpu --config.only_class=3``: trained from
scratch on the class's ~6,000 training images (the paper's setup), same architecture
as ``mnist_ddpm.py:cpu``. The GPU size fine-tunes from the unconditional model
(``--config.init_from=WORKDIR/mnist_ddpm/model``, see ``train/train_all_mnist.sh``).
"""

from dngjax.tools.train.configs import mnist_ddpm


def get_config(size: str = "gpu"):
    c = mnist_ddpm.get_config(size)
    c.name = "mnist_forget"
    c.only_class = 0
    if size == "gpu":
        c.num_train_steps = 1000
        c.optim.lr = 2e-4
        c.optim.warmup_steps = 50
        c.sample_every = 0
    elif size == "cpu":
        c.num_train_steps = 8000
        c.optim.decay_steps = 0   # the shipped forget models: constant lr after the warm-up
    return c
