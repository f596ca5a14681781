"""The base of every error a user can fix; stage scripts print these as one line, no traceback."""


class PetpipeError(Exception):
    """A problem with the user's params, data or files; the message names it and the fix."""
