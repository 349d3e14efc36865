"""``python -m onnxq`` runs the CLI."""

from onnxq.cli import main

if __name__ == "__main__":  # worker processes (--workers) import this module again: they must not run the CLI
    main()
