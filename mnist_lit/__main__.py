"""``python -m mnist_lit``: the process is ours, so process-wide settings are made here, not in ``main()``."""

from mnist_lit.allocator import keep_freed_memory
from mnist_lit.cli import main


def run() -> None:
    """The command line's entry point (also the ``mnist-lit`` script)."""
    keep_freed_memory()  # before training allocates anything: faster CPU steps (allocator.py)
    main()


if __name__ == "__main__":
    run()
