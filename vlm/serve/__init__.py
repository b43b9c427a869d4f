"""`vlm serve`: local search page and slide viewer (FastAPI + Jinja2 + OpenSeadragon); see `vlm.serve.app`."""
