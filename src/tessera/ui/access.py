"""Who is looking at a page: a signed session cookie (or a bearer token) on ``tessera server``,
everyone-may-read on ``tessera ui`` (a local store, bound to 127.0.0.1).

The login page takes an API token; the cookie holds the token's SHA-256 — the same hash the
catalog keeps — signed with itsdangerous and timestamped, so every request looks the token up
again with ``AuthCatalog.user_for_token``: revoking the token ends its sessions at once. The
cookie is HttpOnly and SameSite=Lax (and Secure over HTTPS). The signing key is
``$TESSERA_UI_SECRET`` or a random key kept in ``<store>/cache/ui-secret`` (mode 0600), shared
by every process serving that store; deleting it signs everyone out.
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request
from itsdangerous import BadSignature, URLSafeTimedSerializer

from tessera.errors import NotSignedInError
from tessera.server.auth import Principal, hash_token
from tessera.store.catalog import AuthCatalog, UserRecord

COOKIE = "tessera_session"
MAX_AGE = 30 * 24 * 3600
SALT = "tessera-ui-session-v1"


@dataclass
class Viewer:
    """The person behind a request, as far as the UI cares: what they may read."""

    principal: Principal | None  # None: a local store, no auth
    via: str = "local"  # "local", "cookie", "token" or "anonymous"

    @property
    def local(self) -> bool:
        return self.principal is None

    @property
    def signed_in(self) -> bool:
        return self.principal is not None and not self.principal.anonymous

    @property
    def name(self) -> str | None:
        if self.principal is None or self.principal.user is None:
            return None
        return self.principal.user.name

    def readable(self, project: str) -> bool:
        return self.principal is None or self.principal.readable(project)

    def role(self, project: str) -> str | None:
        if self.principal is None:
            return "local"
        if self.principal.is_admin:
            return "admin"
        role = self.principal.roles().get(project)
        if role is None and self.principal.public_read:
            return "public"
        return role


def load_secret(root: Path) -> bytes:
    env = os.environ.get("TESSERA_UI_SECRET")
    if env:
        return env.encode()
    path = root / "cache" / "ui-secret"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    for _ in range(50):  # another process may be writing it right now
        text = path.read_text().strip()
        if len(text) == 64:
            return text.encode()
        time.sleep(0.02)
    raise RuntimeError(f"{path} does not hold a UI session key; delete it and restart")


class Sessions:
    """Signs and reads session cookies; turns requests into Viewers."""

    def __init__(self, auth: AuthCatalog | None, public_read: bool, secret: bytes | None):
        self.auth = auth
        self.public_read = public_read
        self.signer = URLSafeTimedSerializer(secret or b"local", salt=SALT)
        self._recent: dict[str, tuple[float, UserRecord | None]] = {}
        self._roles: dict[int, tuple[float, dict[str, str]]] = {}

    def _principal(self, user: UserRecord, cache_seconds: float) -> Principal:
        assert self.auth is not None
        principal = Principal(user, self.auth, self.public_read)
        if cache_seconds > 0 and not user.is_admin:
            now = time.monotonic()
            found = self._roles.get(user.id)
            if found is None or now - found[0] >= cache_seconds:
                if len(self._roles) > 10_000:
                    self._roles.clear()
                found = (now, self.auth.roles(user))
                self._roles[user.id] = found
            principal._roles = dict(found[1])
        return principal

    def _user(self, token_hash: str, cache_seconds: float) -> UserRecord | None:
        """The user of a live token. Pages always ask the catalog (a revoked token stops at
        once); image requests, dozens per page, may reuse an answer for ``cache_seconds``."""
        assert self.auth is not None
        now = time.monotonic()
        if cache_seconds > 0:
            found = self._recent.get(token_hash)
            if found is not None and now - found[0] < cache_seconds:
                return found[1]
        user = self.auth.user_for_token(token_hash)
        if len(self._recent) > 10_000:
            self._recent.clear()
        self._recent[token_hash] = (now, user)
        return user

    @property
    def enabled(self) -> bool:
        return self.auth is not None

    def cookie_for(self, token: str) -> str | None:
        """The cookie value for a valid token, or None if the token is unknown or revoked."""
        assert self.auth is not None
        token_hash = hash_token(token.strip())
        if self.auth.user_for_token(token_hash) is None:
            return None
        return self.signer.dumps({"h": token_hash})

    def viewer(self, request: Request, cache_seconds: float = 0.0) -> Viewer:
        if self.auth is None:
            return Viewer(None, "local")
        header = request.headers.get("authorization", "")
        if header:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise NotSignedInError("the Authorization header must be 'Bearer <token>'")
            user = self._user(hash_token(token.strip()), cache_seconds)
            if user is None:
                raise NotSignedInError("this token is unknown or revoked")
            return Viewer(self._principal(user, cache_seconds), "token")
        cookie = request.cookies.get(COOKIE)
        if cookie:
            try:
                data = self.signer.loads(cookie, max_age=MAX_AGE)
                token_hash = data["h"] if isinstance(data, dict) else None
            except (BadSignature, KeyError, TypeError):
                token_hash = None
            user = self._user(token_hash, cache_seconds) if isinstance(token_hash, str) else None
            if user is not None:
                return Viewer(self._principal(user, cache_seconds), "cookie")
        return Viewer(Principal(None, self.auth, self.public_read), "anonymous")
