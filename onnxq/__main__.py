"""``python -m onnxq`` runs the CLI."""

from onnxq.cli.commands import app

app(prog_name="onnxq")
