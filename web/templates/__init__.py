"""HTML pages of the download service (read with importlib.resources)."""
