"""The one exception type the CLI turns into a clean message and a non-zero exit code."""


class CtrscaleError(Exception):
    """Bad input or an impossible request; the message names the file/row/field/key at fault."""

    exit_code = 1


class DataError(CtrscaleError):
    """Input data that violates the schema; the message names file, row (group) and column."""
