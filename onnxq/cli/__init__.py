"""The ``onnxq`` command line."""

from onnxq.cli.commands import app

__all__ = ["app"]
