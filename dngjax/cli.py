"""The one way the command-line tools start: flags defined on call, clear errors, exit codes.

Every CLI of the project (``train/main.py``, ``sample/main.py``, ``python -m train.export``,
``python -m experiments.gmm``, ``python -m dngjax.convert`` and the installed
``dngjax-*`` commands) is a module with

* ``define_flags()``: its absl flags, defined only when the tool runs, so that any number of
  CLI modules can be imported into one process (no ``DuplicateFlagError``);
* ``main(argv)``: the job, which validates everything it can inside :func:`user_errors` before
  any long work starts;
* ``cli_main()``: ``dngjax.cli.run(main, define_flags, doc=__doc__)``.

Exit codes: 0 success (``--help`` included), 2 a user error (a bad flag, a config typo, a missing
file, an illegal hyperparameter, an output folder that cannot be written, a job too large for the
memory), with one ``error: ...`` line and no traceback and nothing left on disk; 130 an interrupt
(Ctrl-C), with one ``interrupted: ...`` line that says whether and how the job resumes (a job says
it with :func:`on_interrupt` once it knows); anything else (1, a traceback) is a bug.

Output folders are checked with :func:`check_writable_folder` before any model is loaded.
"""

from __future__ import annotations

import ast
import contextlib
import os
import signal
import sys
import tempfile
from typing import Callable, Iterator, Optional, Sequence

from absl import app, flags

#: exceptions that mean "the input is wrong", when raised while a job validates its input.
USER_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
               FileExistsError, PermissionError)

#: what ``interrupted: ...`` says when nothing more precise was set (see :func:`on_interrupt`).
NO_RESUME = "nothing of this run is kept to resume from: rerunning the same command starts it again"
_interrupt_message = NO_RESUME


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


def one_line(message: str) -> str:
    """``message`` on one line: its lines joined ("; " between items, a space after punctuation); a Python
    traceback quoted in it (ml_collections quotes one when a config file raises) is reduced to its last
    line, the exception."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if any(line.startswith("Traceback (most recent call last)") for line in lines):
        head = lines[:next(i for i, line in enumerate(lines) if line.startswith("Traceback"))]
        lines = head + lines[-1:]
    out = ""
    for line in lines:
        out += line if not out else (" " if out[-1] in ":;,." else "; ") + line
    return out


def fail(message: str) -> None:
    """Print ``error: message`` (one line) to stderr and exit with code 2."""
    print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
    sys.exit(2)


def on_interrupt(message: str) -> None:
    """What the line ``interrupted: ...`` says if the job is interrupted (Ctrl-C) from now on: whether it
    resumes and how (e.g. "rerun the same command to resume from the last checkpoint in W")."""
    global _interrupt_message
    _interrupt_message = one_line(message)


def check_writable_folder(path: str, flag: str) -> str:
    """``path`` as an absolute path if it is a folder this process can write into, or can create;
    else :class:`UserError` naming ``flag`` (e.g. ``"--workdir"``). Creates nothing: a probe folder
    is made in the nearest existing ancestor and removed at once."""
    if not path:
        raise UserError(f"{flag} must name a folder")
    full = os.path.abspath(os.path.expanduser(path))
    if os.path.lexists(full) and not os.path.isdir(full):
        raise UserError(f"{flag}={path} is a file, not a folder: choose another {flag}")
    parent = full
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"{flag}={path} cannot be created: {parent} is a file: choose another {flag}")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".dngjax-write-test-", dir=parent))
    except OSError as e:
        raise UserError(f"{flag}={path} cannot be created or written ({parent}: {e.strerror or e}): "
                        f"choose a folder you can write to") from None
    return full


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
    with _flag_errors():
        args = FLAGS(list(argv))
    for name in list(FLAGS):
        _check_config_loaded(FLAGS[name])
    return args


@contextlib.contextmanager
def _flag_errors() -> Iterator[None]:
    """Flag definition and parsing problems as ``error: ...`` (exit 2). A config flag with a default
    (sample/main.py) loads its file and applies the command line's ``--config.FIELD=...`` when defined."""
    try:
        yield
    except flags.Error as e:
        fail(f"{_message(e)} (see --help)")
    except (SystemExit, KeyboardInterrupt):
        raise
    except Exception as e:  # config files and their --config.FIELD overrides are parsed here
        fail(f"{_message(e)} (see --help)")


def _check_config_loaded(flag) -> None:
    """ml_collections keeps a config file that failed to load (missing, unreadable) as a value that raises
    on first use, deep in the job: report it now."""
    value = flag.value
    if type(value).__name__ != "_ErrorConfig":
        return
    spec = getattr(flag, "config_filename", "") or ""
    path = spec.split(":", 1)[0]
    if not os.path.exists(path):
        fail(f"--{flag.name}={spec}: no such file {path!r} (see --help)")
    error = getattr(value, "_error", None)
    reason = str(getattr(error, "__cause__", None) or error or "it could not be loaded")
    fail(f"--{flag.name}={spec}: {reason} (see --help)")


def run(main: Callable[[Sequence[str]], None], define_flags: Callable[[], None],
        argv: Optional[Sequence[str]] = None, positional: Sequence[str] = (), doc: str = "",
        interrupted: str = NO_RESUME, distributed: bool = False) -> None:
    """Define the tool's flags, parse ``argv`` (default ``sys.argv``) and run ``main`` under absl.

    ``positional``: names of the positional arguments the tool takes (exactly these; none by default).
    ``doc``: what ``--help`` prints above the flags (the tool module's docstring).
    ``interrupted``: what ``interrupted: ...`` says on Ctrl-C until the job sets more with
    :func:`on_interrupt`. An interrupt exits with code 130 and that one line, no traceback.
    ``distributed``: the tool runs as several processes too: the flags of
    :func:`dngjax.distributed.define_flags` are added, and the processes join
    (:func:`dngjax.distributed.initialize`, a no-op for one) before ``main`` runs; inconsistent
    settings are a user error.
    """
    on_interrupt(interrupted)
    if argv is None:                  # the command line: Ctrl-C leaves at once (see _exit_interrupted)
        signal.signal(signal.SIGINT, _exit_interrupted)
    try:
        _run(main, define_flags, argv, positional, doc, distributed)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)      # a second Ctrl-C while exiting: no traceback
        print(f"\ninterrupted: {_interrupt_message}", file=sys.stderr, flush=True)
        if argv is not None:                               # called from Python (tests): an ordinary exit
            sys.exit(130)
        # The command line: leave at once. An interrupt inside a checkpoint save leaves orbax's writer
        # threads mid-write; the interpreter's shutdown would wait for them, or print their tracebacks.
        # Nothing is lost: files are written to temporary names and renamed when complete.
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        os._exit(130)


def _exit_interrupted(signum, frame) -> None:
    """SIGINT on the command line: the ``interrupted:`` line and exit 130 from the handler itself. A
    KeyboardInterrupt raised instead can land in code that swallows it (a ``__del__``, a weakref or jax
    callback: "Exception ignored in ..."), and the job would go on; exiting here never depends on where
    the main thread is. Nothing is lost: files are written to temporary names and renamed when complete."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)          # a second Ctrl-C while exiting: no traceback
    try:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        sys.stderr.write(f"\ninterrupted: {_interrupt_message}\n")
        sys.stderr.flush()
    finally:
        os._exit(130)


def packaged_config(spec: str) -> str:
    """``--config``'s value with a checkout path the current folder lacks (``train/configs/NAME.py`` or
    ``sample/configs/NAME.py``, optionally ``:name``) pointed at the installed package's copy
    (``dngjax/tools/{train,sample}/configs/NAME.py``), so that the README's command lines work from any
    folder once installed; any other value unchanged."""
    path, colon, rest = spec.partition(":")
    parts = os.path.normpath(path).split(os.sep)
    if os.path.exists(path) or len(parts) < 3 or parts[-3] not in ("train", "sample") or parts[-2] != "configs":
        return spec
    packaged = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tools", parts[-3], "configs", parts[-1])
    return packaged + colon + rest if os.path.exists(packaged) else spec


def _with_packaged_configs(argv: Sequence[str]) -> list:
    out, it = [], iter(argv)
    for a in it:
        if a.startswith("--config="):
            a = "--config=" + packaged_config(a[len("--config="):])
        elif a == "--config":
            out.append(a)
            a = packaged_config(next(it, ""))
        out.append(a)
    return out


def _run(main, define_flags, argv, positional, doc, distributed=False) -> None:
    with _flag_errors():
        define_flags()
        if distributed and "num_processes" not in flags.FLAGS:
            from . import distributed as dist
            dist.define_flags()
    argv = _with_packaged_configs(sys.argv if argv is None else argv)

    def _main(args):
        if len(args) - 1 != len(positional):
            if positional:
                fail(f"expected {' '.join(positional)}, got {args[1:]} (see --help)")
            fail(f"unexpected arguments {args[1:]}; flags are written --name=value (see --help)")
        if distributed:
            from . import distributed as dist
            with user_errors("several processes"):
                dist.initialize_from_flags()
        main(args)

    app.run(_main, argv=argv, flags_parser=lambda a: _parse(a, doc))
