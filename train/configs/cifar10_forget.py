"""`--config=train/configs/cifar10_forget.py[:name]`: the configuration :mod:`dngjax.tools.train.configs.cifar10_forget`."""

from dngjax.tools.train.configs.cifar10_forget import get_config  # noqa: F401
