"""The one exception type that the CLI turns into a one-line message and exit code 2."""

from __future__ import annotations

import sys
from typing import Callable, NoReturn


class UserError(Exception):
    """Bad input from the user: missing or corrupt files, wrong shapes, clicks outside the image."""


def exit_with(error: UserError) -> NoReturn:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


def run_script(main: Callable[[], None]) -> None:
    """Entry point of the scripts in benchmarks/: bad input ends as in the CLI (one line, code 2)."""
    try:
        main()
    except UserError as e:
        exit_with(e)


def first_line(error: BaseException) -> str:
    """An exception's first non-empty line for a one-line message; its type name when it has none
    (an empty or blank message must not make the message itself fail)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
