"""The one base of every multitag error, and what each means for the command's exit code.

Why one base: the CLI maps errors to exit codes in one place (`flows.cli.main`) instead of in
every command, so `tag`, `retrain`, `validate` and `models` agree: 0 done, 1 the run failed,
2 the input could not be used. A class says which it is with `exit_code`; its message
(`str(error)`) is the one line the user reads, without a traceback, so it names the input and
what to do about it.

Standard library only: the CLI imports it before anything heavy.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1  # the run started and failed (a broken contract, a shard that kept failing)
EXIT_UNUSABLE = 2  # the input could not be used (bad arguments, no such folder or version)


class MultitagError(Exception):
    """An error this project raises on purpose; `str(error)` is its user-facing message."""

    exit_code: int = EXIT_FAILED


class RunFailedError(MultitagError):
    """The run started and could not finish: retrying or fixing the cause may help."""

    exit_code: int = EXIT_FAILED


class InputError(MultitagError):
    """The input (a folder, a file, a model version, a parameter) cannot be used as given."""

    exit_code: int = EXIT_UNUSABLE


class CommandError(MultitagError):
    """`cause` with the command's context in its message, and the exit code `cause` has."""

    def __init__(self, message: str, cause: BaseException) -> None:
        super().__init__(message)
        self.exit_code = exit_code_of(cause)


def exit_code_of(error: BaseException) -> int:
    """The exit code for `error`: 1 for anything not a MultitagError (the run failed), and
    1 for one that says trying again can help (`retryable`, e.g. a dataset download cut
    off), whatever its class: the input was fine, the run was not."""
    if not isinstance(error, MultitagError) or getattr(error, "retryable", False):
        return EXIT_FAILED
    return error.exit_code
