"""User-facing errors: each carries one sentence that says what is wrong and what to change."""


class RapError(Exception):
    """Bad input or a missing resource. run.py prints the message alone and exits non-zero."""


class DataError(RapError):
    """A data file or data directory is missing or malformed."""


class ModelError(RapError):
    """The model cannot be loaded or is not supported (e.g. its attention does not use RoPE)."""


class ConfigError(RapError):
    """An inconsistent or out-of-range setting."""


class PlanError(RapError):
    """A compression plan file is unreadable or does not fit the model it is applied to."""


class OutputError(RapError):
    """A result cannot be written (full disk, read-only folder)."""
