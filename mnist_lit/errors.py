"""The one exception type that means "the user's input is wrong", not "the program is broken"."""

import sys
from typing import NoReturn


class UserError(Exception):
    """Raised for bad files, flags or checkpoints; the CLI prints it as one line and exits non-zero."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, or its type's name when the message is empty."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else err.__class__.__name__


def flag_error(message: str) -> NoReturn:
    """End the command as a bad flag does: ``mnist_lit: error: MESSAGE`` on stderr and exit status 2.

    For flag values that parse but cannot be used (two flags that contradict each other, a number out of
    its range), which a tool's function finds after jsonargparse has parsed them.
    """
    sys.stderr.write(f"mnist_lit: error: {message}\n")
    raise SystemExit(2)
