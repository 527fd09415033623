"""The Tessera server: a thin FastAPI layer over a LocalBackend (see app.py)."""
