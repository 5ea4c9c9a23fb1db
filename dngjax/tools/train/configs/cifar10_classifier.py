"""CIFAR-10 evaluation classifier (small CNN, three conv stages, shift augmentation).

``--config=train/configs/cifar10_classifier.py`` (GPU) or ``:tiny`` (tests).
Not trained in this repository (no GPU was available).
"""

from ml_collections import ConfigDict

from dngjax.tools.train.configs.common import base_config


def get_config(size: str = "gpu"):
    c = base_config()
    c.name = "cifar10_classifier"
    c.dataset = "cifar10"
    c.model.kind = "classifier"
    c.model.kwargs = ConfigDict(dict(num_classes=10, widths=(64, 128, 256), feature_dim=256, dropout=0.3))
    c.augment_shift = 4
    c.optim.lr = 2e-3
    c.optim.schedule = "cosine"
    c.optim.weight_decay = 5e-4
    c.optim.warmup_steps = 500
    c.ema_decay = 0.999
    c.final_samples = 0
    if size == "gpu":
        c.batch_size = 256
        c.num_train_steps = 20_000
        c.checkpoint_every = 2000
        c.log_every = 100
    elif size == "tiny":
        c.model.kwargs.widths = (4, 8)
        c.model.kwargs.feature_dim = 16
        c.batch_size = 4
        c.num_train_steps = 2
        c.optim.warmup_steps = 1
        c.checkpoint_every = 1
        c.log_every = 1
        c.progress = False
        c.limit_examples = 64
    else:
        raise ValueError(f"unknown size {size!r}: gpu or tiny")
    return c
