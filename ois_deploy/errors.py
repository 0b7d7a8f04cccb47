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
