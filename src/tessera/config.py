"""Where things are: the store folder, the server URL and its token.

One place resolves them for the Python API and every CLI command:

- store folder: ``dir=`` / ``--dir``, else ``$TESSERA_DIR``, else ``./.tessera``;
- server: ``server=`` / ``--server``, else ``$TESSERA_SERVER`` (none: the embedded store);
- token: ``$TESSERA_TOKEN``, else the one ``tessera login URL`` saved for that server in
  ``$XDG_CONFIG_HOME/tessera/config.json`` (default ``~/.config``), a file only its owner can read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tessera.backend.base import Backend


def config_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "tessera" / "config.json"


def _read_config() -> dict[str, Any]:
    try:
        return json.loads(config_file().read_text())
    except (FileNotFoundError, ValueError):
        return {}


def normalise_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"server must be an http:// or https:// URL, got {url!r}")
    return url


def save_token(server: str, token: str) -> Path:
    """Remember ``token`` for ``server`` in the user's config file (mode 0600)."""
    path = config_file()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    config = _read_config()
    config.setdefault("servers", {})[normalise_url(server)] = {"token": token}
    temp = path.with_suffix(".tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(config, f, indent=2)
    os.chmod(temp, 0o600)
    os.replace(temp, path)
    return path


def token_for(server: str) -> str | None:
    token = os.environ.get("TESSERA_TOKEN")
    if token:
        return token
    entry = _read_config().get("servers", {}).get(normalise_url(server), {})
    return entry.get("token")


def server_url(server: str | None) -> str | None:
    chosen = server or os.environ.get("TESSERA_SERVER") or None
    return normalise_url(chosen) if chosen else None


def open_backend(
    dir: str | os.PathLike[str] | None = None,
    server: str | None = None,
    create: bool = False,
) -> Backend:
    """The backend for these settings: a LocalBackend on the store folder, or an HttpBackend
    talking to the server, which uses the store folder as its local cache."""
    url = server_url(server)
    if url is None:
        from tessera.backend.local import LocalBackend

        return LocalBackend.open(dir, create=create)
    from tessera.backend.http import HttpBackend

    return HttpBackend.open(url, token_for(url), dir)
