"""The one exception type that means "the user's input is wrong", not "the program is broken"."""


class UserError(Exception):
    """Raised for bad files, flags or checkpoints; the CLI prints it as one line and exits non-zero."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, or its type's name when the message is empty."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else err.__class__.__name__
