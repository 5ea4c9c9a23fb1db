"""`--config=train/configs/mnist_cond.py[:name]`: the configuration :mod:`dngjax.tools.train.configs.mnist_cond`."""

from dngjax.tools.train.configs.mnist_cond import get_config  # noqa: F401
