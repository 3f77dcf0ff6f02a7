"""User-facing errors.

Every error a user can cause (a bad path, a wrong size, an unknown name) is an
``LdmError`` whose message is one line: what was wrong, and what to do. The CLI
prints it and exits with code 2, without a traceback.
"""


class LdmError(Exception):
    """Base of all errors caused by the user's input, not by a bug."""


class CheckpointError(LdmError):
    """A model file or folder cannot be read, or does not match the architecture."""


class ConfigError(LdmError):
    """A configuration value or combination is not supported."""


class InputError(LdmError):
    """A generation or training argument is out of range or unreadable."""
