"""`--config=train/configs/mnist_forget.py[:name]`: the configuration :mod:`dngjax.tools.train.configs.mnist_forget`."""

from dngjax.tools.train.configs.mnist_forget import get_config  # noqa: F401
