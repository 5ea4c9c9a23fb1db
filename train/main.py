"""``python train/main.py --config=train/configs/NAME.py[:size] --workdir=DIR``: train a model.

The command-line entry point of :mod:`dngjax.tools.train.main` (installed: ``dngjax-train``);
``--help`` lists the flags.
"""

from dngjax.tools.train.main import cli_main

if __name__ == "__main__":
    cli_main()
