"""Keeping a store honest: ``verify`` finds every inconsistency, ``gc`` reclaims garbage.

Both walk the same graph: catalog version rows → manifest blobs → the blobs they list. A blob
that no manifest lists is garbage once it is older than the grace period (a version being
committed right now has written or touched its blobs within the grace period, so gc never
deletes a blob that is about to become referenced).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from tessera import progress
from tessera.errors import DigestMismatchError, StoreCorruptError, TesseraError
from tessera.store import Store
from tessera.store.hashing import is_digest
from tessera.store.manifest import Manifest


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)
    versions: int = 0
    blobs: int = 0
    bytes: int = 0
    references: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(store: Store, check_blob_contents: bool = True) -> VerifyReport:
    """Check that every version has its manifest, every manifest's blobs exist with the right
    size, and (unless told otherwise) that every blob hashes to its name."""
    report = VerifyReport()
    with store.catalog.read() as conn:
        if conn.dialect.name == "sqlite":
            result = conn.exec_driver_sql("PRAGMA quick_check").scalar()
            if result != "ok":
                report.problems.append(f"catalog: SQLite quick_check says {result}")

    present: dict[str, int] = {}
    for info in store.blobs.list():
        if is_digest(info.digest):
            present[info.digest] = info.size
        else:
            report.problems.append(f"blobs: stray file {info.digest!r} is not named by a digest")

    for version in store.catalog.all_versions():
        report.versions += 1
        where = version.spec
        if version.digest not in present:
            report.problems.append(f"{where}: manifest blob {version.digest} is missing")
            continue
        try:
            manifest = Manifest.from_bytes(store.blobs.read(version.digest), version.digest)
        except TesseraError as e:
            report.problems.append(f"{where}: {e}")
            continue
        if len(manifest.files) != version.file_count or manifest.size != version.size:
            report.problems.append(
                f"{where}: catalog says {version.file_count} files / {version.size} bytes, "
                f"manifest has {len(manifest.files)} / {manifest.size}"
            )
        for entry in manifest.files.values():
            if not entry.stored:
                report.references += 1
                continue
            size = present.get(entry.digest)
            if size is None:
                report.problems.append(f"{where}: {entry.path}: blob {entry.digest} is missing")
            elif size != entry.size:
                report.problems.append(
                    f"{where}: {entry.path}: blob {entry.digest} has {size} bytes, "
                    f"manifest says {entry.size}"
                )

    report.blobs = len(present)
    report.bytes = sum(present.values())
    if check_blob_contents:

        def check(digest: str) -> str | None:
            try:
                actual = store.blobs.hash_blob(digest)
            except DigestMismatchError as e:  # e.g. a pack cut short
                return f"blobs: {digest}: {e}"
            except (FileNotFoundError, StoreCorruptError):
                return None  # deleted meanwhile (gc); not a damage
            finally:
                bar.advance(present[digest])
            if actual != digest:
                return f"blobs: {digest} is damaged (its bytes hash to {actual})"
            return None

        with (
            progress.bar("verifying blobs", report.bytes, bytes=True) as bar,
            ThreadPoolExecutor(4) as pool,
        ):
            report.problems.extend(p for p in pool.map(check, sorted(present)) if p)
        report.problems.extend(store.blobs.pack_problems())
    return report


@dataclass
class GcReport:
    deleted_blobs: int = 0
    deleted_bytes: int = 0
    kept_blobs: int = 0
    young_garbage: int = 0  # unreferenced, but within the grace period
    deleted_temp_files: int = 0
    # unreferenced and old, but kept: in a pack file that still holds wanted blobs, or reused
    # (renewed) while gc ran
    packed_garbage: int = 0
    dry_run: bool = False


def referenced_digests(store: Store) -> set[str]:
    """Every blob some version needs: its manifest and the stored files it lists."""
    marked: set[str] = set()
    for version in store.catalog.all_versions():
        marked.add(version.digest)
        try:
            manifest = Manifest.from_bytes(store.blobs.read(version.digest), version.digest)
        except TesseraError as e:
            raise StoreCorruptError(
                f"cannot collect garbage: {version.spec}: {e}. Nothing was deleted; "
                "run `tessera verify` and repair the store first"
            ) from None
        marked |= manifest.stored_digests()
    return marked


def gc(store: Store, grace_seconds: float, dry_run: bool = False) -> GcReport:
    report = GcReport(dry_run=dry_run)
    marked = referenced_digests(store)
    now = time.time()
    doomed: dict[str, int] = {}  # unreferenced and older than the grace period: size
    for info in store.blobs.list():
        if not is_digest(info.digest):
            continue  # not ours to delete; verify reports it
        if info.digest in marked:
            report.kept_blobs += 1
            continue
        if now - info.mtime <= grace_seconds:
            report.young_garbage += 1
            continue
        doomed[info.digest] = info.size
    # Deleted together, each file's mtime read once more just before it goes: a version
    # committed after the mark may have adopted a blob, and adopting renews its mtime
    # (LocalWriteBatch.reuse). A pack file goes only when none of its blobs is still wanted.
    deleted = store.blobs.delete_many(set(doomed), dry_run=dry_run, grace_seconds=grace_seconds)
    report.deleted_blobs = len(deleted)
    report.deleted_bytes = sum(doomed[d] for d in deleted)
    report.packed_garbage = len(doomed) - len(deleted)
    for temp, mtime in store.blobs.temp_files():
        if now - mtime > grace_seconds:
            report.deleted_temp_files += 1
            if not dry_run:
                temp.unlink(missing_ok=True)
    return report
