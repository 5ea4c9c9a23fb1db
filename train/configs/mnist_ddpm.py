"""`--config=train/configs/mnist_ddpm.py[:name]`: the configuration :mod:`dngjax.tools.train.configs.mnist_ddpm`."""

from dngjax.tools.train.configs.mnist_ddpm import get_config  # noqa: F401
