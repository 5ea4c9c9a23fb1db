"""MNIST evaluation classifier (small CNN; test accuracy >= 99.0%).

``--config=train/configs/mnist_classifier.py`` (GPU) or ``:cpu`` / ``:tiny``.
"""

from ml_collections import ConfigDict

from dngjax.tools.train.configs.common import base_config


def get_config(size: str = "gpu"):
    c = base_config()
    c.name = "mnist_classifier"
    c.dataset = "mnist"
    c.model.kind = "classifier"
    c.model.kwargs = ConfigDict(dict(num_classes=10, widths=(32, 64), feature_dim=128, dropout=0.3))
    c.augment_shift = 2
    c.optim.lr = 2e-3
    c.optim.schedule = "cosine"
    c.optim.weight_decay = 1e-4
    c.optim.warmup_steps = 100
    c.ema_decay = 0.99
    c.final_samples = 0
    if size == "gpu":
        c.batch_size = 256
        c.num_train_steps = 3000
        c.checkpoint_every = 1000
        c.log_every = 100
    elif size == "cpu":
        c.model.kwargs.widths = (16, 32)
        c.batch_size = 128
        c.num_train_steps = 1500
        c.checkpoint_every = 100
        c.log_every = 10
    elif size == "tiny":
        c.model.kwargs.widths = (4, 8)
        c.model.kwargs.feature_dim = 16
        c.batch_size = 16
        c.num_train_steps = 20
        c.optim.warmup_steps = 2
        c.checkpoint_every = 10
        c.log_every = 5
        c.progress = False
        c.limit_examples = 512
    else:
        raise ValueError(f"unknown size {size!r}: gpu, cpu or tiny")
    return c
