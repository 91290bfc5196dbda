"""The one exception type for mistakes a user can fix."""


class QbcoError(Exception):
    """An error the user can fix; the CLI prints its message in one line and exits with code 2."""
