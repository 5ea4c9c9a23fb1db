"""``python -m train.export --workdir=DIR --out=checkpoints/mnist``: trained models into the shipped folder.

The command-line entry point of :mod:`dngjax.tools.train.export` (installed: ``dngjax-export``);
``--help`` lists the flags.
"""

from dngjax.tools.train.export import cli_main

if __name__ == "__main__":
    cli_main()
