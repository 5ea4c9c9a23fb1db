"""`--config=sample/configs/sd.py[:name]`: the configuration :mod:`dngjax.tools.sample.configs.sd`."""

from dngjax.tools.sample.configs.sd import get_config  # noqa: F401
