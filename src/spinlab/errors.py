"""How a run ends when it does not finish: the errors a user can cause and fix, the only ones
train.py prints as one line, without a traceback; and `Stopped`, a run stopped by a signal.

Each error names what is wrong and what to do. They are raised where the check is made; an error
of any other type (a defect in spinlab or in a library, whatever its class) keeps its traceback and
exit status 1, so that a bug never reads as bad input (docs/faults.md, "Refused starts and exit statuses").
Each also derives from the built-in type such an error had before (ValueError, RuntimeError,
OSError), so that `except ValueError` around a check still catches it.
"""

from __future__ import annotations

# Exit statuses (docs/faults.md). 1 is an unexpected error, with its traceback.
EXIT_REFUSED = 2  # a user error: a value, a changed setting, the data, the checkpoint, the directory
EXIT_BUSY = 3  # another process holds the run directory
EXIT_STOPPED = 75  # stopped by a signal after saving a checkpoint: run the same command to resume


class Stopped(SystemExit):
    """The run stopped on a signal after saving the checkpoint of its last step."""

    def __init__(self, message: str):
        super().__init__(EXIT_STOPPED)
        self.message = message


class UserError(Exception):
    """An expected error, caused by the input and fixed there: exit status `exit_status`."""

    exit_status = EXIT_REFUSED


class ConfigError(UserError, ValueError):
    """A bad setting: an impossible value, a mistyped key, a change a restart cannot honour."""


class DataError(UserError, ValueError):
    """Bad input data: the message names the file, the row and the field."""


class NotFoundError(UserError, RuntimeError):
    """A model, data set, benchmark task, optional package or device (a GPU) that cannot be found."""


class RunDirError(UserError, OSError):
    """A run directory that cannot be used: not writable, too full, or holding someone else's files."""

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno


class RunDirInUse(UserError, RuntimeError):
    """Another process holds the run directory."""

    exit_status = EXIT_BUSY


class CheckpointError(UserError, RuntimeError):
    """A damaged checkpoint: the message says what is intact and how to go on."""
