"""The exit status of every command (`omnidiff <command>`, `python -m <module>`), and the one wrapper that maps an
error to it and reports it on stderr as one line, `error: <message>`.

    0  OK         done
    1  FAILED     an unexpected error (its traceback is printed above the error line), or a failure already
                  explained elsewhere (training failed: the worker's traceback is in the log above)
    2  BAD_INPUT  bad arguments, config or input: a config key or value, an input that is missing, unreadable or
                  not in the format the command takes, an output location that cannot be written. Fix the
                  command line or the input and rerun. (argparse exits 2 on bad arguments by itself.)
    3  LOCKED     the output is locked by another live run (tokenize): wait for it to finish, or stop it
    4  STORAGE    storage failed past its retries (common/storage.py): rerun once the store answers; work
                  already committed is kept
    5  NOT_MET    the command ran and its answer is no (`omnidiff plan`: the model does not fit; the tokenize
                  reliability report: a case did not end as expected), so a script can tell it from a crash
 16-31            tokenize_jobs.passes: 16 + the bits of the input kinds whose pass failed (text 1, image-text 2,
                  speech-text 4, messages 8); the others ran

Which errors get which code: an exception that derives from `CliError` carries its own `exit_code`; any other
`ValueError` or `FileNotFoundError` is bad input (2), because that is what this code base raises for a value
or file a user gave (ConfigError, BadInput, VocabMismatch, ... are ValueErrors); everything else is 1. The first
`CliError` along the `raise ... from` chain counts, so an error re-raised with its cause keeps the cause's code.
Set OMNIDIFF_TRACEBACK=1 to print the traceback of every error, not only the unexpected ones.

Why a base class and not a registry of exception types: the code travels with the exception class, so reading
`class LockHeld(RuntimeError, CliError)` tells its exit status, and no mapping depends on which modules happened
to be imported. common/ stays the bottom layer: upper layers subclass it, it imports none of them.
"""
from __future__ import annotations

import functools
import os
import sys
import traceback
from typing import Callable, Sequence

OK = 0
FAILED = 1
BAD_INPUT = 2
LOCKED = 3
STORAGE = 4
NOT_MET = 5

# One line for each command's --help epilog.
EXIT_STATUS_HELP = ("exit status: 0 done, 1 unexpected failure, 2 bad arguments/config/input, 3 output locked by "
                    "another run,\n  4 storage failed past its retries (rerun once it answers), 5 the answer is no "
                    "(plan: does not fit)")


class CliError(Exception):
    """An error a command reports in one line (no traceback) with its `exit_code`: the message says what is
    wrong and what to do. Domain errors mix it in, e.g. `class StorageError(RuntimeError, CliError)`."""
    exit_code: int = BAD_INPUT


class Failed(CliError):
    """A failure already explained (e.g. by a worker's traceback in the log): report it in one line."""
    exit_code = FAILED


def exit_code(error: BaseException) -> int:
    """The exit status for `error` (module docstring)."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, CliError):
            return int(cause.exit_code)
        cause = cause.__cause__
    if isinstance(error, (ValueError, FileNotFoundError)):
        return BAD_INPUT
    return FAILED


def report(error: BaseException) -> int:
    """Print `error` on stderr as the table says and return its exit status."""
    code = exit_code(error)
    unexpected = code == FAILED and not isinstance(error, Failed)
    if unexpected or os.environ.get("OMNIDIFF_TRACEBACK", "") not in ("", "0"):
        traceback.print_exception(error, file=sys.stderr)
    message = f"{type(error).__name__}: {error}" if unexpected else str(error)
    print(f"error: {message}", file=sys.stderr)
    return code


Main = Callable[[Sequence[str] | None], "int | None"]   # a command's main(argv)


def command(main: Main) -> Callable[[Sequence[str] | None], int]:
    """Decorate a command's `main(argv) -> exit status` so that an exception becomes its exit status and one
    error line (`report`); `main` returning None means OK. argparse's own exits (--help, bad arguments) pass
    through, as do KeyboardInterrupt and SystemExit."""
    @functools.wraps(main)
    def run(argv: Sequence[str] | None = None) -> int:
        try:
            return int(main(argv) or OK)
        except Exception as e:  # noqa: BLE001 - the table decides; unexpected errors print their traceback
            return report(e)
    return run
