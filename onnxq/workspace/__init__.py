"""The workspace: manifest, checksummed append-only steps (``store``), their typed payloads
(``steps``) and the fingerprints that tie a workspace to one model, config and data set
(``manifest``)."""
