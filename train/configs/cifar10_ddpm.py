"""`--config=train/configs/cifar10_ddpm.py[:name]`: the configuration :mod:`dngjax.tools.train.configs.cifar10_ddpm`."""

from dngjax.tools.train.configs.cifar10_ddpm import get_config  # noqa: F401
