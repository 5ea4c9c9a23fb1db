"""``python -m experiments.gmm --figure=NAME --out=DIR``: the Gaussian-mixture lab.

The command-line entry point of :mod:`dngjax.tools.gmm_lab` (installed: ``dngjax-gmm``); ``--help``
lists the figures and flags.
"""

from dngjax.tools.gmm_lab.__main__ import cli_main

if __name__ == "__main__":
    cli_main()
