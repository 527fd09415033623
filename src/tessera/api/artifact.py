"""Artifacts: ``Artifact`` gathers files to log; ``ArtifactVersion`` is one logged version."""

from __future__ import annotations

import os
import shutil
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from tessera import progress
from tessera.backend.base import Backend, Source
from tessera.errors import (
    DigestMismatchError,
    InvalidPathError,
    NotFoundError,
    TesseraError,
)
from tessera.jsonvalues import to_json
from tessera.names import check_artifact_path, check_name
from tessera.store.catalog import RunRecord, VersionRecord
from tessera.store.hashing import file_pieces, hash_file, new_hasher
from tessera.store.manifest import (
    FileEntry,
    Manifest,
    ManifestTail,
    peek_entry,
    peek_metadata,
    read_tail,
)

if TYPE_CHECKING:
    from tessera.api.run import Run


class Artifact:
    """A named, typed collection of files, gathered before ``run.log_artifact``.

    Nothing is read or stored until the artifact is logged; adding only checks that the files
    exist and that the paths are safe and unique.
    """

    def __init__(
        self,
        name: str,
        type: str,
        description: str | None = None,
        metadata: dict[str, Any] | None = None,
    ):
        self.name = check_name(name, "artifact")
        self.type = check_name(type, "artifact type")
        if description is not None and not isinstance(description, str):
            raise TypeError("description must be a string")
        self.description = description
        self.metadata: dict[str, Any] = to_json(metadata or {}, "metadata")
        self._sources: dict[str, Source] = {}

    def __repr__(self) -> str:
        return f"<Artifact {self.name!r} type={self.type!r} files={len(self._sources)}>"

    def __len__(self) -> int:
        return len(self._sources)

    @property
    def paths(self) -> list[str]:
        return sorted(self._sources)

    def _add(self, source: Source) -> None:
        check_artifact_path(source.path)
        if source.path in self._sources:
            raise InvalidPathError(
                f"{source.path!r} is already in artifact {self.name!r}; give the file another "
                "name with name=..."
            )
        self._sources[source.path] = source

    def add_file(self, path: str | os.PathLike[str], name: str | None = None) -> None:
        """Add a local file, stored under ``name`` (default: its file name)."""
        local = _existing_file(path)
        self._add(Source(path=name if name is not None else local.name, local=local))

    def add_dir(self, path: str | os.PathLike[str], prefix: str = "") -> None:
        """Add every file below a folder, under ``prefix`` + its path relative to the folder."""
        root = Path(path).absolute()
        if not root.is_dir():
            raise NotFoundError(f"{path} is not a folder; use add_file for single files")
        if prefix:
            check_artifact_path(prefix.rstrip("/"))
            prefix = prefix.rstrip("/") + "/"
        for relative, local in sorted(files_below(str(root))):
            self._add(Source(path=prefix + relative, local=Path(local)))

    def add_reference(self, uri: str, name: str | None = None) -> None:
        """Record a file that stays where it is: its digest is kept, its bytes are not copied.

        ``file://`` URIs are supported (a folder adds every file below it).
        """
        parsed = urllib.parse.urlparse(uri)
        if parsed.scheme != "file":
            raise InvalidPathError(
                f"cannot reference {uri!r}: only file:// URIs are supported in this version; "
                "copy the file in with add_file instead"
            )
        local = Path(urllib.parse.unquote(parsed.path))
        if local.is_dir():
            base = name.rstrip("/") + "/" if name else ""
            for folder, dirs, files in os.walk(local):
                dirs.sort()
                for file_name in sorted(files):
                    child = Path(folder) / file_name
                    rel = child.relative_to(local).as_posix()
                    self._add(Source(path=base + rel, local=child, ref=child.as_uri()))
            return
        local = _existing_file(local)
        self._add(Source(path=name or local.name, local=local, ref=local.as_uri()))

    def add_bytes(self, data: bytes, name: str, media: dict[str, Any] | None = None) -> None:
        """Add bytes made in memory (an encoded image, a JSON file) under ``name``."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"add_bytes takes bytes, got {type(data).__name__}")
        self._add(Source(path=name, data=bytes(data), media=media))


def files_below(root: str, relative: str = "") -> Iterator[tuple[str, str]]:
    """(path relative to ``root`` with ``/``, absolute path) of every regular file below it.

    ``os.scandir`` knows each entry's type from the directory listing, so this costs no stat
    per file (a walk with ``Path.is_file`` spent more time than a re-log's hashing saved).
    Links to files are followed, links to folders are not (as ``os.walk``); sockets, fifos
    and dangling links are skipped."""
    with os.scandir(os.path.join(root, relative) if relative else root) as entries:
        for entry in entries:
            rel = f"{relative}/{entry.name}" if relative else entry.name
            if entry.is_dir(follow_symlinks=False):  # as os.walk: no loops through links
                yield from files_below(root, rel)
            elif entry.is_file():
                yield rel, entry.path


def _existing_file(path: str | os.PathLike[str]) -> Path:
    local = Path(path).absolute()
    if not local.exists():
        raise NotFoundError(f"no file at {path}")
    if not local.is_file():
        raise NotFoundError(f"{path} is not a regular file (use add_dir for folders)")
    return local


class ArtifactVersion:
    """One logged version of an artifact: immutable files, named by their digests."""

    def __init__(
        self,
        backend: Backend,
        record: VersionRecord,
        manifest: Manifest | None = None,
        run: Run | None = None,
    ):
        self._backend = backend
        self._record = record
        self._manifest = manifest
        self._metadata: dict[str, Any] | None = None
        self._tail: ManifestTail | None = None
        self._run = run

    def __repr__(self) -> str:
        return f"<ArtifactVersion {self.spec} files={self.file_count} size={self.size}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ArtifactVersion) and other._record.id == self._record.id

    def __hash__(self) -> int:
        return hash(self._record.id)

    @property
    def name(self) -> str:
        return self._record.artifact

    @property
    def project(self) -> str:
        return self._record.project

    @property
    def type(self) -> str:
        return self._record.type

    @property
    def description(self) -> str | None:
        return self._record.description

    @property
    def version(self) -> str:
        """``v0``, ``v1``, …"""
        return self._record.version

    @property
    def number(self) -> int:
        return self._record.number

    @property
    def spec(self) -> str:
        """``project/name:vN``: a reference that always names this version."""
        return self._record.spec

    @property
    def digest(self) -> str:
        """BLAKE3 of the canonical manifest: equal digests mean identical content."""
        return self._record.digest

    @property
    def size(self) -> int:
        return self._record.size

    @property
    def file_count(self) -> int:
        return self._record.file_count

    @property
    def aliases(self) -> tuple[str, ...]:
        return self._record.aliases

    @property
    def created_at(self) -> float:
        return self._record.created_at

    @property
    def run_id(self) -> str | None:
        """The run that logged this version."""
        return self._record.run_id

    @property
    def manifest(self) -> Manifest:
        if self._manifest is None:
            self._manifest = self._backend.read_manifest(self.digest)
        return self._manifest

    @property
    def metadata(self) -> dict[str, Any]:
        if self._manifest is not None:
            return self._manifest.metadata
        if self._metadata is None:
            # Without building the whole manifest: a dataset's has an entry per image.
            found = peek_metadata(self._manifest_tail(), self.digest)
            self._metadata = found if found is not None else self.manifest.metadata
        return self._metadata

    def _manifest_tail(self) -> ManifestTail:
        """The manifest's verified last bytes (its metadata, its last entries), read once."""
        if self._tail is None:
            with self._backend.open_blob(self.digest) as f:
                self._tail = read_tail(f, self.digest)
        return self._tail

    def files(self) -> list[FileEntry]:
        """Every file, sorted by path."""
        return list(self.manifest.files.values())

    def entry(self, path: str) -> FileEntry:
        if self._manifest is None:
            found = peek_entry(self._manifest_tail(), path, self.digest)
            if found is not None:
                return found
        try:
            return self.manifest.files[path]
        except KeyError:
            sample = ", ".join(list(self.manifest.files)[:5])
            raise NotFoundError(
                f"no file {path!r} in {self.spec}; it has {len(self.manifest.files)} files "
                f"(e.g. {sample})"
            ) from None

    def open(self, path: str) -> BinaryIO:
        """Open one file for reading (binary)."""
        entry = self.entry(path)
        if entry.ref is not None:
            return open(_reference_path(entry), "rb")
        return self._backend.open_blob(entry.digest)

    def read_bytes(self, path: str) -> bytes:
        with self.open(path) as f:
            return f.read()

    def lineage(self) -> dict[str, list[RunRecord]]:
        """``{"logged": [runs that logged it], "used": [runs that used it]}``."""
        return self._backend.lineage(self._record.id)

    def download(self, root: str | os.PathLike[str] | None = None, link: bool = False) -> Path:
        """Materialise every file under ``root`` (default ``./artifacts/<name>-<version>``).

        Every file's digest is checked while it is copied; a mismatch raises and leaves no
        partial file. With ``link=True``, stored blobs are hard-linked instead of copied where
        the file system allows (the links share bytes with the store: do not edit them in place).
        """
        target = (
            Path(root) if root is not None else Path("artifacts") / f"{self.name}-{self.version}"
        )
        target = target.absolute()
        entries = self.files()
        total = sum(e.size for e in entries)

        def materialise(entry: FileEntry) -> None:
            dest = target.joinpath(*entry.path.split("/"))
            dest.parent.mkdir(parents=True, exist_ok=True)
            blob_path = self._backend.blob_path(entry.digest) if entry.ref is None else None
            if link and blob_path is not None:
                _verify_file(blob_path, entry)
                _replace_with_link(blob_path, dest)
            else:
                with self.open(entry.path) as src:
                    _copy_verified(src, dest, entry)
            bar.advance(entry.size)

        show = total > 256 * 1024 * 1024 or len(entries) > 2000
        with (
            progress.bar(f"downloading {self.spec}", total, bytes=True, show=show) as bar,
            ThreadPoolExecutor(8) as pool,
        ):
            list(pool.map(materialise, entries))
        return target


def _reference_path(entry: FileEntry) -> Path:
    assert entry.ref is not None
    parsed = urllib.parse.urlparse(entry.ref)
    if parsed.scheme != "file":
        raise TesseraError(f"cannot read reference {entry.ref}: only file:// is supported")
    path = Path(urllib.parse.unquote(parsed.path))
    if not path.exists():
        raise NotFoundError(f"the referenced file {entry.ref} (for {entry.path!r}) is gone")
    return path


def _copy_verified(src: BinaryIO, dest: Path, entry: FileEntry) -> None:
    temp = dest.with_name(f".{dest.name}.tessera-tmp")
    hasher = new_hasher()
    try:
        with open(temp, "wb") as out:
            for chunk in file_pieces(src):
                hasher.update(chunk)
                out.write(chunk)
        if hasher.hexdigest() != entry.digest:
            where = entry.ref or "the blob store"
            raise DigestMismatchError(
                f"{entry.path}: bytes from {where} hash to {hasher.hexdigest()}, expected "
                f"{entry.digest}; the file changed or the store is damaged (run `tessera verify`)"
            )
        os.replace(temp, dest)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _verify_file(path: Path, entry: FileEntry) -> None:
    if hash_file(path)[0] != entry.digest:
        raise DigestMismatchError(
            f"{entry.path}: blob {entry.digest} is damaged; run `tessera verify`"
        )


def _replace_with_link(blob: Path, dest: Path) -> None:
    temp = dest.with_name(f".{dest.name}.tessera-tmp")
    temp.unlink(missing_ok=True)
    try:
        os.link(blob, temp)
    except OSError:  # another file system, or links not allowed: copy instead
        shutil.copyfile(blob, temp)
    os.replace(temp, dest)
