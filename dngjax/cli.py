"""The one way the command-line tools start: flags defined on call, clear errors, exit codes.

Every CLI of the project (``train/main.py``, ``sample/main.py``, ``python -m train.export``,
``python -m experiments.gmm``, ``python -m dngjax.models.convert_diffusers`` and the installed
``dngjax-*`` commands) is a module with

* ``define_flags()``: its absl flags, defined only when the tool runs, so that any number of
  CLI modules can be imported into one process (no ``DuplicateFlagError``);
* ``main(argv)``: the job, which validates everything it can inside :func:`user_errors` before
  any long work starts;
* ``cli_main()``: ``dngjax.cli.run(main, define_flags, doc=__doc__)``.

Exit codes: 0 success (``--help`` included), 2 a user error (a bad flag, a config typo, a missing
file, an illegal hyperparameter), with one ``error: ...`` line and no traceback; anything else
(1, a traceback) is a bug.
"""

from __future__ import annotations

import ast
import contextlib
import os
import sys
from typing import Callable, Iterator, Optional, Sequence

from absl import app, flags

#: exceptions that mean "the input is wrong", when raised while a job validates its input.
USER_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, NotADirectoryError, IsADirectoryError)


class UserError(Exception):
    """A problem with the user's input: reported as one line, exit code 2."""


def _message(e: BaseException) -> str:
    """One readable line (or a few) from an exception, without ml_collections' repr-escaping."""
    msg = str(e)
    if isinstance(e, (AttributeError, KeyError)) and len(msg) > 1 and msg[0] in "'\"" and msg[-1] == msg[0]:
        try:  # ml_collections raises AttributeError(repr-of-message): '\'removed_clas\'\nDid you mean ...'
            msg = ast.literal_eval(msg)
        except (ValueError, SyntaxError):
            pass
        if isinstance(e, AttributeError):
            first, _, rest = msg.partition("\n")
            msg = f"unknown config field {first}" + (f". {rest}" if rest else "")
    return msg.strip() or type(e).__name__


def fail(message: str) -> None:
    """Print ``error: message`` to stderr and exit with code 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


@contextlib.contextmanager
def user_errors(what: str = "") -> Iterator[None]:
    """Turn input errors raised inside the block into ``error: ...`` and exit code 2.

    Use it around a job's validation (building rules, loading models and configs, checking paths),
    not around the long work itself, so that genuine bugs keep their tracebacks.
    """
    from .checkpoint import CheckpointError
    from .data import DataUnavailableError
    try:
        yield
    except (UserError, CheckpointError, DataUnavailableError) + USER_ERRORS as e:
        fail((f"{what}: " if what else "") + _message(e))


def _parse(argv: Sequence[str], doc: str = ""):
    """absl's flag parsing with --help exiting 0 and every parsing problem one line + exit 2."""
    FLAGS = flags.FLAGS
    if any(a in ("-h", "--help", "-help", "--helpshort", "--helpfull") for a in argv[1:]):
        FLAGS.mark_as_parsed()
        try:
            if doc:
                print(doc.strip() + "\n")
            print(FLAGS.get_help() if "--helpfull" in argv else FLAGS.main_module_help(), flush=True)
        except BrokenPipeError:          # `--help | head`: the reader left; no traceback
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    try:
        return FLAGS(list(argv))
    except flags.Error as e:
        fail(f"{_message(e)} (see --help)")
    except (SystemExit, KeyboardInterrupt):
        raise
    except Exception as e:  # config files and their --config.FIELD overrides are parsed here
        fail(f"{_message(e)} (see --help)")


def run(main: Callable[[Sequence[str]], None], define_flags: Callable[[], None],
        argv: Optional[Sequence[str]] = None, positional: Sequence[str] = (), doc: str = "") -> None:
    """Define the tool's flags, parse ``argv`` (default ``sys.argv``) and run ``main`` under absl.

    ``positional``: names of the positional arguments the tool takes (exactly these; none by default).
    ``doc``: what ``--help`` prints above the flags (the tool module's docstring).
    """
    define_flags()
    argv = list(sys.argv if argv is None else argv)

    def _main(args):
        if len(args) - 1 != len(positional):
            if positional:
                fail(f"expected {' '.join(positional)}, got {args[1:]} (see --help)")
            fail(f"unexpected arguments {args[1:]}; flags are written --name=value (see --help)")
        main(args)

    app.run(_main, argv=argv, flags_parser=lambda a: _parse(a, doc))
