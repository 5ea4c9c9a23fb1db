"""`--config=sample/configs/cifar10.py[:name]`: the configuration :mod:`dngjax.tools.sample.configs.cifar10`."""

from dngjax.tools.sample.configs.cifar10 import get_config  # noqa: F401
