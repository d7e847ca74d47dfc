"""Errors the CLI turns into a one-line message, and the exit codes of every command.

One convention for every command, so schedulers can tell outcomes apart: a `CtrscaleError`
exits with its class's code; any other exception is a bug or an environment failure and exits
1 with its traceback.
"""

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    UNEXPECTED = 1  # a crash: rerunning may help (training resumes from its checkpoint)
    BAD_INPUT = 2  # bad data, configuration or arguments: fix the input first
    REJECTED = 3  # refresh: the candidate model failed the AUC gate
    LOCKED = 4  # another process holds the lock of the same registry, dataset or run
    DIVERGED = 5  # training stopped on a non-finite loss or gradient


class CtrscaleError(Exception):
    """Bad input or an impossible request; the message names the file/row/field/key at fault."""

    exit_code = ExitCode.BAD_INPUT


class DataError(CtrscaleError):
    """Input data that violates the schema; the message names file, row (group) and column."""


class TrainingDiverged(CtrscaleError):
    """A non-finite loss or parameter; the message names the steps and the last good
    checkpoint."""

    exit_code = ExitCode.DIVERGED
