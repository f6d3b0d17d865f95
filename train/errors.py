"""The one family of errors the entry points turn into `error: <message>` and exit 1, with no
traceback: input a user can fix (a config value, a data file, a checkpoint). Each message names
the key, file or column and what was expected. A leaf module."""

from __future__ import annotations


class UpweightError(ValueError):
    """Bad input, named; raised before anything is written wherever it can be."""


class ConfigError(UpweightError):
    """A config value outside its domain; the message names the key, the value and what was
    expected."""
