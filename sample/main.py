"""``python sample/main.py [--job=NAME] [--config=sample/configs/NAME.py[:name]]``: the sampling jobs.

The command-line entry point of :mod:`dngjax.tools.sample.main` (installed: ``dngjax-sample``);
without flags it runs the main job (class removal on the shipped MNIST models); ``--help`` lists the
jobs and flags.
"""

from dngjax.tools.sample.main import cli_main

if __name__ == "__main__":
    cli_main()
