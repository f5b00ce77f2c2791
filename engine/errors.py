"""User-facing errors: one line that names the file, tensor or field at fault.

The CLI turns any `SupermergeError` into `supermerge: error: <message>` and exit code 2.
"""

from __future__ import annotations

from pathlib import Path


class SupermergeError(Exception):
    """Bad input or an impossible request; the message is shown to the user as is."""


class InputError(SupermergeError):
    """A checkpoint, tensor or file that cannot be used as given.

    Args:
        path: the file or folder at fault.
        message: what is wrong with it.
        tensor: the tensor at fault, if one is.
    """

    def __init__(self, path: str | Path, message: str, tensor: str | None = None) -> None:
        where = f"{path}"
        if tensor is not None:
            where += f": tensor '{tensor}'"
        super().__init__(f"{where}: {message}")
        self.path = Path(path)
        self.tensor = tensor


class ConfigError(SupermergeError):
    """A field of the merge configuration that is missing, unknown or invalid.

    Args:
        field: dotted path of the field, e.g. ``method.density`` or ``experts[2].path``.
        message: what is wrong with it.
        source: the configuration file, if the config came from one.
    """

    def __init__(self, field: str, message: str, source: str | Path | None = None) -> None:
        prefix = f"{source}: " if source is not None else ""
        super().__init__(f"{prefix}field '{field}': {message}")
        self.field = field
        self.message = message
