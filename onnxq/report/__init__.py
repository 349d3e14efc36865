"""Reports on models: fidelity against the float model (``evaluate``, ``compare``) and ``inspect``."""
