"""CIFAR-10 forget-class DDPM: trained only on the class to remove (default 0, airplane).

``--config=train/configs/cifar10_forget.py --config.only_class=0`` (5,000 images;
a single-class model converges much faster than the unconditional one).
"""

from dngjax.tools.train.configs import cifar10_ddpm


def get_config(size: str = "gpu"):
    c = cifar10_ddpm.get_config(size)
    c.name = "cifar10_forget"
    c.only_class = 0  # airplane
    if size == "gpu":
        c.num_train_steps = 50_000
        c.optim.warmup_steps = 1000
    return c
