"""The Gaussian-mixture lab in one command.

    python -m experiments.gmm all --out outputs/gmm        # figs. 1, 3 and 7-9 with the documented sizes
    python -m experiments.gmm fig1 [options]               # = python -m experiments.gmm.fig1 [options]
    python -m experiments.gmm fig3 [options]
    python -m experiments.gmm appendix [options]           # figs. 7-9
"""

import sys

from . import appendix, fig1, fig3

COMMANDS = {"fig1": fig1.main, "fig3": fig3.main, "appendix": appendix.main}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in (*COMMANDS, "all"):
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "all":
        for name in ("fig1", "fig3", "appendix"):
            print(f"\n===== {name} =====", flush=True)
            COMMANDS[name](rest)
        return 0
    COMMANDS[cmd](rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
