"""The one exception type for mistakes a user can fix."""


class QbcoError(Exception):
    """An error the user can fix; the CLI prints its message in one line and exits with code 2."""


class TrainingStopped(Exception):
    """Training stopped before its last step (a signal, or a non-finite loss); what was finished is kept and
    the message says how to go on. `exit_code` is what the CLI exits with."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
