"""User-facing errors: one line that says what is wrong and what to do."""


class MoecompressError(Exception):
    """An error caused by the user's input; the CLI prints its message on one line, no traceback."""
