"""User-facing errors: one line that names the file, key or image and what was expected."""

from __future__ import annotations


class PqfnError(Exception):
    """A problem with the user's input. The CLI prints it as one line and exits non-zero."""


class ConfigError(PqfnError):
    """A config file or override that does not validate."""


class DataError(PqfnError):
    """A dataset that cannot honestly give what was asked."""


class TrialError(PqfnError):
    """A trial that cannot run or has diverged (for example a NaN loss)."""
