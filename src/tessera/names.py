"""Validation of the names users choose: projects, artifacts, aliases, and paths inside artifacts.

Names end up in URLs, file names and SQL parameters, so the rules are strict and checked once,
here, before anything is written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tessera.errors import InvalidNameError, InvalidPathError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_VERSION = re.compile(r"v(0|[1-9][0-9]*)")
_CONTROL = re.compile("[\x00-\x1f\x7f]")
MAX_PATH_LENGTH = 1024


def check_name(name: object, what: str) -> str:
    """Return ``name`` if it is a valid project/artifact/run name, else raise InvalidNameError."""
    if not isinstance(name, str):
        raise InvalidNameError(f"{what} name must be a string, got {type(name).__name__}")
    if not _NAME.fullmatch(name):
        raise InvalidNameError(
            f"invalid {what} name {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_alias(alias: object) -> str:
    """Aliases follow the name rules but may not look like a version number (`v3`)."""
    check_name(alias, "alias")
    assert isinstance(alias, str)
    if re.fullmatch(r"v[0-9]+", alias):
        raise InvalidNameError(
            f"invalid alias {alias!r}: names like 'v3' are version numbers; pick another alias"
        )
    return alias


def check_artifact_path(path: object) -> str:
    """Return ``path`` if it is a safe relative POSIX path inside an artifact.

    Refuses absolute paths, `..` and `.` segments, empty segments, backslashes and control
    characters, so that ``download()`` can never write outside its root folder.
    """
    if not isinstance(path, str):
        raise InvalidPathError(f"artifact path must be a string, got {type(path).__name__}")
    if not path:
        raise InvalidPathError("artifact path is empty; give the file a name")
    if len(path) > MAX_PATH_LENGTH:
        raise InvalidPathError(f"artifact path is longer than {MAX_PATH_LENGTH} characters")
    if path.startswith("/"):
        raise InvalidPathError(f"artifact path {path!r} is absolute; use a relative path")
    if "\\" in path:
        raise InvalidPathError(f"artifact path {path!r} contains a backslash; use '/'")
    if _CONTROL.search(path):
        raise InvalidPathError(f"artifact path {path!r} contains a control character")
    for segment in path.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidPathError(
                f"artifact path {path!r} has an empty, '.' or '..' segment; "
                "paths must stay inside the artifact"
            )
    return path


@dataclass(frozen=True)
class VersionSpec:
    """A parsed ``[project/]name[:version-or-alias]`` reference."""

    project: str | None
    name: str
    selector: str  # "v3", "latest" or a user alias

    @property
    def number(self) -> int | None:
        """The version number if the selector is ``vN``, else None."""
        match = _VERSION.fullmatch(self.selector)
        return int(match.group(1)) if match else None

    def __str__(self) -> str:
        prefix = f"{self.project}/" if self.project else ""
        return f"{prefix}{self.name}:{self.selector}"


def parse_version_spec(spec: object) -> VersionSpec:
    """Parse ``name``, ``name:v1``, ``name:latest``, ``name:alias`` or ``project/name:...``."""
    if not isinstance(spec, str):
        raise InvalidNameError(
            f"artifact reference must be a string like 'name:v1', got {type(spec).__name__}"
        )
    project = None
    rest = spec
    if "/" in rest:
        project, rest = rest.split("/", 1)
        check_name(project, "project")
    name, colon, selector = rest.partition(":")
    check_name(name, "artifact")
    if colon and not selector:
        raise InvalidNameError(
            f"{spec!r} ends with ':'; write {name}:v0, {name}:latest or an alias"
        )
    selector = selector or "latest"
    if not _VERSION.fullmatch(selector):
        if re.fullmatch(r"v[0-9]+", selector):
            raise InvalidNameError(f"{selector!r} is not a version number; write v0, v1, v2, …")
        check_name(selector, "alias")
    return VersionSpec(project=project, name=name, selector=selector)
