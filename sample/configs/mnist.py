"""`--config=sample/configs/mnist.py[:name]`: the configuration :mod:`dngjax.tools.sample.configs.mnist`."""

from dngjax.tools.sample.configs.mnist import get_config  # noqa: F401
