"""The one exception type that means "the user's input is wrong", not "the program is broken"."""


class UserError(Exception):
    """Raised for bad files, flags or checkpoints; the CLI prints it as one line and exits non-zero."""
