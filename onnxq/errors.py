"""The project's error hierarchy.

Every error a user can fix by changing their input is an ``OnnxqError``: its message says what
is wrong and how to fix it, in one line. The CLI prints it and exits with code 2; anything else is
a bug in onnxq and exits with code 1.
"""


class OnnxqError(Exception):
    """A problem with the user's input or options; the message says how to fix it."""


class ModelError(OnnxqError):
    """The input model is missing, unreadable, or cannot be quantized as it is."""


class CalibrationDataError(OnnxqError):
    """The calibration (or evaluation) data does not match the model or is unusable."""


class OutputError(OnnxqError):
    """The output path cannot be written."""


class ConfigError(OnnxqError):
    """An option has a value onnxq does not accept."""


class WorkspaceError(OnnxqError):
    """The workspace belongs to another model or configuration, or cannot be used."""


class DeviceError(OnnxqError):
    """The requested execution device cannot be used."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when empty), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
