"""`--config=train/configs/mnist_classifier.py[:name]`: the configuration :mod:`dngjax.tools.train.configs.mnist_classifier`."""

from dngjax.tools.train.configs.mnist_classifier import get_config  # noqa: F401
