"""The project's user-facing errors: each message is one line naming the problem and the fix.
The CLI prints them without a traceback."""


class MolmoEdgeError(ValueError):
    """Base of every error a user can fix (bad input, wrong files, missing toolchain)."""
