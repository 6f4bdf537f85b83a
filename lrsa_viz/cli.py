"""Command-line entry points: bad input ends with one clear line on stderr and exit status 2, no traceback.

Each CLI module keeps a ``main(argv)`` that raises (for Python callers and tests) and runs as a program through
`run_cli`, which turns the errors a user can fix (bad arguments, bad or missing files) into ``error: <message>``
and exit status 2 (argparse's own status for bad arguments). ``--debug`` shows the full traceback instead.
Anything else (a bug) still ends with its traceback.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

#: Errors caused by the input: wrong values, missing or unreadable files, a missing optional package,
#: a diverging training run (its message says what to change).
USER_ERRORS = (ValueError, OSError, ImportError, FloatingPointError)
EXIT_BAD_INPUT = 2


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """The ``--debug`` flag every CLI documents (read by `run_cli`)."""
    parser.add_argument("--debug", action="store_true", help="on an error, show the full traceback")


def run_cli(main: Callable[[list[str]], object], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)``; return 0, or 2 after printing ``error: ...`` for a `USER_ERRORS` exception.

    With ``--debug`` among the arguments the exception propagates (traceback). Use as
    ``sys.exit(run_cli(main))`` under ``if __name__ == "__main__"``.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        main(args)
    except USER_ERRORS as err:
        if "--debug" in args:
            raise
        message = str(err) or type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0
