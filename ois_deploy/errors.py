"""The one exception type that the CLI turns into a one-line message and exit code 2."""


class UserError(Exception):
    """Bad input from the user: missing or corrupt files, wrong shapes, clicks outside the image."""
