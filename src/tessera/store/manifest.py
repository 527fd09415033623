"""Manifests: the content of one artifact version, as canonical JSON.

A manifest maps each path inside the artifact to the digest and size of its bytes (plus optional
media info, and for references the URI the bytes live at). The version's digest is the BLAKE3 of
the manifest's canonical bytes, so identical content always gives the identical digest. The exact
byte format is specified in docs/FORMAT.md.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from tessera.errors import InvalidPathError, StoreCorruptError, StoreFormatError, TesseraError
from tessera.names import check_artifact_path
from tessera.store.hashing import ALGORITHM, check_digest, file_pieces, hash_bytes, new_hasher

MANIFEST_FORMAT = 1
# The canonical document ends ``"format":N,"hash":"…"`` then, when there is metadata,
# ``,"metadata":{…}}``: keys are sorted, so these are always its last members.
_TAIL = re.compile(rb',"format":(-?[0-9]+),"hash":("(?:[^"\\]|\\.)*")$')
_METADATA_KEY = b',"metadata":'


@dataclass(frozen=True)
class FileEntry:
    """One file of an artifact version."""

    path: str
    digest: str
    size: int
    media: dict[str, Any] | None = None
    ref: str | None = None  # set for references: the bytes live at this URI, not in the store

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"digest": self.digest, "size": self.size}
        if self.media:
            out["media"] = self.media
        if self.ref is not None:
            out["ref"] = self.ref
        return out

    @property
    def stored(self) -> bool:
        """True if the bytes are in the blob store (not an external reference)."""
        return self.ref is None


@dataclass(frozen=True)
class Manifest:
    files: dict[str, FileEntry]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files.values())

    def stored_digests(self) -> set[str]:
        """Digests this manifest keeps alive in the blob store."""
        return {f.digest for f in self.files.values() if f.stored}

    def to_bytes(self) -> bytes:
        doc: dict[str, Any] = {
            "files": {path: entry.to_json() for path, entry in self.files.items()},
            "format": MANIFEST_FORMAT,
            "hash": ALGORITHM,
        }
        if self.metadata:
            doc["metadata"] = self.metadata
        return canonical_json(doc)

    def digest(self) -> str:
        return hash_bytes(self.to_bytes())

    @classmethod
    def from_bytes(cls, data: bytes, digest: str | None = None) -> Manifest:
        _check_bytes(data, digest)
        try:
            doc = json.loads(data)
        except ValueError as e:
            raise StoreCorruptError(f"manifest {digest} is not valid JSON: {e}") from None
        if not isinstance(doc, dict):
            raise StoreCorruptError(f"manifest {digest} is not a JSON object")
        fmt = doc.get("format")
        if not isinstance(fmt, int) or fmt > MANIFEST_FORMAT:
            raise StoreFormatError(
                f"manifest {digest} has format {fmt!r}; this Tessera reads format "
                f"{MANIFEST_FORMAT} — upgrade Tessera"
            )
        if doc.get("hash") != ALGORITHM:
            raise StoreFormatError(
                f"manifest {digest} uses hash {doc.get('hash')!r}; this Tessera knows {ALGORITHM}"
            )
        try:
            entries = [
                FileEntry(
                    path=path,
                    digest=entry["digest"],
                    size=entry["size"],
                    media=entry.get("media"),
                    ref=entry.get("ref"),
                )
                for path, entry in doc.get("files", {}).items()
            ]
            # The same checks as when writing: a foreign manifest must not be able to make
            # download() write outside its folder.
            return cls.build(entries, doc.get("metadata", {}))
        except (KeyError, TypeError, TesseraError) as e:
            raise StoreCorruptError(f"manifest {digest} is malformed: {e}") from None

    @classmethod
    def build(cls, entries: list[FileEntry], metadata: dict[str, Any] | None = None) -> Manifest:
        """Validate entries and sort them by path (the canonical order)."""
        files: dict[str, FileEntry] = {}
        for entry in sorted(entries, key=lambda e: e.path):
            check_artifact_path(entry.path)
            check_digest(entry.digest)
            if not isinstance(entry.size, int) or entry.size < 0:
                raise InvalidPathError(f"{entry.path}: size must be a non-negative integer")
            files[entry.path] = entry
        folders = {p.rsplit("/", 1)[0] for p in files if "/" in p}
        for folder in folders:
            # Parent folders of every folder, too: "a" clashes with "a/b/c".
            parts = folder.split("/")
            for i in range(1, len(parts) + 1):
                if "/".join(parts[:i]) in files:
                    raise InvalidPathError(
                        f"{'/'.join(parts[:i])!r} is both a file and a folder in this artifact"
                    )
        return cls(files=files, metadata=dict(metadata or {}))


# How much of a manifest's end ``read_tail`` keeps: the metadata and the last entries (a
# dataset's sample table is its last file) of even a million-sample dataset.
TAIL_BYTES = 1 << 20


@dataclass(frozen=True)
class ManifestTail:
    """The last bytes of a manifest whose whole was checked against its digest while read."""

    data: bytes
    whole: bool  # the data is the entire manifest


def read_tail(f: BinaryIO, digest: str, keep: int = TAIL_BYTES) -> ManifestTail:
    """Hash a manifest while streaming it; keep only its last ``keep`` bytes.

    A predictions writer needs a dataset's metadata and the entry of its sample table, both at
    the end of the manifest; reading a million-sample manifest (about 260 MB) whole, twice, set
    the writer's peak memory.
    """
    hasher = new_hasher()
    tail = b""
    whole = True
    for chunk in file_pieces(f):
        hasher.update(chunk)
        tail += chunk
        if len(tail) > keep:
            tail = tail[-keep:]
            whole = False
    if hasher.hexdigest() != digest:
        raise _not_its_digest(digest)
    return ManifestTail(tail, whole)


def peek_metadata(data: bytes | ManifestTail, digest: str | None = None) -> dict[str, Any] | None:
    """The metadata of canonical manifest bytes, without building an entry per file.

    A million-sample dataset's manifest has a million entries; turning them into objects takes
    seconds and more than a gigabyte, while a predictions writer needs only the classes and the
    sample table. Canonical JSON sorts keys, so ``metadata`` is the document's last member: the
    one ``,"metadata":`` whose value ends exactly one byte before the document does (a key of
    that name nested inside the metadata would be followed by at least two closing braces).

    Given a ``ManifestTail`` (already checked against its digest) that is not the whole
    manifest, returns None when the metadata does not fit in it.
    """
    if isinstance(data, ManifestTail):
        data, whole = data.data, data.whole
    else:
        _check_bytes(data, digest)
        whole = True
    decoder = json.JSONDecoder()
    end = len(data) - 1
    if data.endswith(b"}"):
        position = data.rfind(_METADATA_KEY)
        while position >= 0:
            start = position + len(_METADATA_KEY)
            text = data[start:end].decode("utf-8", "replace")
            try:
                value, stop = decoder.raw_decode(text)
            except ValueError:
                value, stop = None, -1
            if isinstance(value, dict) and stop == len(text):
                _check_tail(data, position, digest)
                return value
            position = data.rfind(_METADATA_KEY, 0, position)
        if not whole:
            return None
        _check_tail(data, end, digest)  # a manifest without metadata
        return {}
    raise StoreCorruptError(f"manifest {digest} is not a JSON object")


def peek_entry(
    data: bytes | ManifestTail, path: str, digest: str | None = None
) -> FileEntry | None:
    """One file's entry from canonical manifest bytes (None if absent), found by its key.

    Entries are the members of ``files``, the first key of the document, each preceded by
    ``{"files":{`` (the first) or by the closing brace of the entry before it. In a
    ``ManifestTail`` that is not the whole manifest, None means "not in these bytes".
    """
    if isinstance(data, ManifestTail):
        data = data.data
    else:
        _check_bytes(data, digest)
    key = json.dumps(path, ensure_ascii=False).encode("utf-8") + b':{"digest":'
    decoder = json.JSONDecoder()
    position = data.find(key)
    while position >= 0:
        before = data[max(0, position - 10) : position]
        if before == b'{"files":{' or before.endswith(b"},"):
            start = position + len(key) - len(b'{"digest":')
            tail = data[start : start + 65536].decode("utf-8", "ignore")
            try:
                value, _stop = decoder.raw_decode(tail)
                entry = FileEntry(
                    path, value["digest"], value["size"], value.get("media"), value.get("ref")
                )
                check_digest(entry.digest)
            except (ValueError, KeyError, TypeError, TesseraError) as e:
                raise StoreCorruptError(
                    f"manifest {digest} is malformed at {path!r}: {e}"
                ) from None
            return entry
        position = data.find(key, position + 1)
    return None


def _check_bytes(data: bytes, digest: str | None) -> None:
    if digest is not None and hash_bytes(data) != digest:
        raise _not_its_digest(digest)


def _not_its_digest(digest: str) -> StoreCorruptError:
    return StoreCorruptError(
        f"manifest {digest} does not hash to its name; the store is damaged — run `tessera verify`"
    )


def _check_tail(data: bytes, end: int, digest: str | None) -> None:
    """Check the format and hash members that end at ``data[end]``. Searches in place: a
    slice of a million-entry manifest would copy hundreds of megabytes."""
    match = _TAIL.search(data, max(0, end - 300), end)
    if match is None:
        raise StoreCorruptError(f"manifest {digest} is not a canonical manifest")
    fmt, algorithm = int(match.group(1)), json.loads(match.group(2))
    if fmt > MANIFEST_FORMAT or fmt < 1:
        raise StoreFormatError(
            f"manifest {digest} has format {fmt!r}; this Tessera reads format "
            f"{MANIFEST_FORMAT} — upgrade Tessera"
        )
    if algorithm != ALGORITHM:
        raise StoreFormatError(
            f"manifest {digest} uses hash {algorithm!r}; this Tessera knows {ALGORITHM}"
        )


def canonical_json(value: Any) -> bytes:
    """UTF-8 JSON with sorted keys, no insignificant white space, and no NaN or infinity."""
    try:
        text = json.dumps(
            value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
    except ValueError:
        # json refuses NaN and infinity already; walk the document (slow on a big manifest,
        # so only now) to say which value it was.
        _check_finite(value)
        raise
    return text.encode("utf-8")


def _check_finite(value: Any) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{value} cannot be stored in a manifest; use a finite number or null")
    if isinstance(value, dict):
        for v in value.values():
            _check_finite(v)
    elif isinstance(value, list | tuple):
        for v in value:
            _check_finite(v)
