"""L2T Studio, the web UI: `python -m app` (see app/__main__.py)."""
