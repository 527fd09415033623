"""Who is calling, and what they may do.

Tokens are ``tsr_`` + 43 random URL-safe characters; the catalog keeps only their SHA-256
(a token has 256 bits of entropy, so a slow password hash would add nothing). Projects are
private to their members: reader < writer < admin. A global admin may do anything. Anonymous
callers may read everything only when the server runs with ``--public-read``.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field

from tessera.errors import AuthError, NotFoundError, NotSignedInError
from tessera.store.catalog import ROLES, AuthCatalog, UserRecord

TOKEN_PREFIX = "tsr_"


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def rank(role: str | None) -> int:
    return -1 if role is None else ROLES.index(role)


@dataclass
class Principal:
    """The caller of one request."""

    user: UserRecord | None
    auth: AuthCatalog
    public_read: bool
    _roles: dict[str, str] | None = field(default=None, repr=False)

    @property
    def anonymous(self) -> bool:
        return self.user is None

    @property
    def is_admin(self) -> bool:
        return self.user is not None and self.user.is_admin

    def require_user(self) -> UserRecord:
        if self.user is None:
            raise NotSignedInError(
                "this needs a token: run `tessera login URL` or set TESSERA_TOKEN"
            )
        return self.user

    def roles(self) -> dict[str, str]:
        if self._roles is None:
            self._roles = {} if self.user is None else self.auth.roles(self.user)
        return self._roles

    def can(self, project: str, need: str) -> bool:
        if self.is_admin or (need == "reader" and self.public_read):
            return True
        return rank(self.roles().get(project)) >= rank(need)

    def readable(self, project: str) -> bool:
        return self.can(project, "reader")

    def require(self, project: str, need: str, hidden: bool = False) -> None:
        """Raise unless the caller has ``need`` in ``project``; invisible projects look absent.
        ``hidden``: the caller named a run or version, not the project; do not name it."""
        if self.can(project, need):
            return
        if self.user is None:
            self.require_user()
        role = self.roles().get(project)
        if role is None and not self.public_read:
            raise NotFoundError(
                "not found (or in a project you are not a member of)"
                if hidden
                else f"no project {project!r} (or you are not a member of it)"
            )
        raise AuthError(
            f"you are {'a ' + role if role else 'not a member'} of project {project!r}; "
            f"this needs the {need} role"
        )

    def require_writer_or_create(self, project: str) -> None:
        """Writers may write; anyone signed in may create a project that does not exist yet,
        and becomes its admin."""
        if self.can(project, "writer"):
            return
        user = self.require_user()
        if not self.auth.project_exists(project):
            self.auth.set_member(project, user, "admin")
            self._roles = None
            return
        self.require(project, "writer")
