"""Backends: the one interface the public API talks to (see base.py)."""
