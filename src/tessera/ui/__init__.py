"""The web UI: server-rendered pages over a store (see ``views.py``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI


def mount_ui(app: FastAPI, *args: Any, **kwargs: Any) -> None:
    """Add the web UI to a FastAPI app (imported lazily: Jinja2 and htmx only when served)."""
    from tessera.ui.views import mount_ui as mount

    mount(app, *args, **kwargs)


def create_local_app(dir: Any) -> FastAPI:
    from tessera.ui.views import create_local_app as create

    return create(dir)


__all__ = ["create_local_app", "mount_ui"]
