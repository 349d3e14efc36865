"""``python -m onnxq`` runs the CLI."""

from onnxq.cli import app

app(prog_name="onnxq")
