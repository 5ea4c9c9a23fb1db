"""`--config=train/configs/cifar10_classifier.py[:name]`: the configuration :mod:`dngjax.tools.train.configs.cifar10_classifier`."""

from dngjax.tools.train.configs.cifar10_classifier import get_config  # noqa: F401
