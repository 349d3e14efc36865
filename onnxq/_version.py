"""The onnxq version, recorded in workspaces."""

__version__ = "0.1.0"
