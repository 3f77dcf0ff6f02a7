"""User-facing errors.

Every error a user can cause (a bad path, a wrong size, an unknown name) is an
``LdmError`` whose message is one line: what was wrong, and what to do. The CLI
prints it and exits with code 2, without a traceback.
"""

import string


class LdmError(Exception):
    """Base of all errors caused by the user's input, not by a bug."""


class CheckpointError(LdmError):
    """A model file or folder cannot be read, or does not match the architecture."""


class ConfigError(LdmError):
    """A configuration value or combination is not supported."""


class InputError(LdmError):
    """A generation or training argument is out of range or unreadable."""


class SettingError(InputError):
    """A setting with a value it cannot take, found by the object that holds the setting.

    The message names settings as ``{field}`` placeholders (and writes a literal brace doubled), so
    each way in words them its own way: the Python API shows the field (``guidance_scale``), the
    command line its flag (``--guidance-scale``), the HTTP API its JSON key (``cfg_scale``).
    """

    def __init__(self, template: str):
        self.template = template
        self.fields = [name for _, name, _, _ in _parts(template) if name]
        super().__init__(self.worded(lambda field: field))

    def worded(self, label) -> str:
        """The message with each ``{field}`` replaced by ``label(field)``."""
        return "".join(text + (label(name) if name else "") for text, name, _, _ in _parts(self.template))


def _parts(template: str):
    return string.Formatter().parse(template)


def placeholder_text(text: str) -> str:
    """``text`` with its braces doubled, so a ``SettingError`` template shows it as written."""
    return text.replace("{", "{{").replace("}", "}}")
