"""Errors a user can cause. The CLI prints them as one sentence and exits with code 2."""


class UserError(Exception):
    """Bad input, a missing file, a refused option combination: anything the user can fix."""

    exit_code = 2
