"""The catalog: projects, runs, metrics, artifacts, versions, aliases and lineage, in SQL.

One class, ``Catalog``, holds every query, written in SQLAlchemy Core so that the same code runs
on SQLite (embedded, WAL) and PostgreSQL. Writes that must be serialised — version numbering
above all — rely on the database (a counter row updated in the transaction, unique constraints),
never on in-process locks, so several processes or server replicas can write at once.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event

from tessera.errors import (
    ConflictError,
    NotFoundError,
    StoreCorruptError,
    StoreFormatError,
)
from tessera.names import VersionSpec
from tessera.store import schema as t

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
HEAD_REVISION = "0004"  # keep equal to the newest file in migrations/versions
RUN_STATUSES = ("running", "finished", "failed", "crashed")


@dataclass(frozen=True)
class ProjectRecord:
    id: int
    name: str
    created_at: float
    run_count: int = 0
    artifact_count: int = 0


@dataclass(frozen=True)
class RunRecord:
    id: str
    project: str
    name: str
    status: str
    config: dict[str, Any]
    summary: dict[str, Any]
    started_at: float
    ended_at: float | None
    heartbeat_at: float
    host: str
    pid: int
    pid_started: str


@dataclass(frozen=True)
class VersionRecord:
    id: int
    project: str
    artifact: str
    type: str
    description: str | None
    number: int
    digest: str
    size: int
    file_count: int
    run_id: str | None
    created_at: float
    aliases: tuple[str, ...] = field(default=())

    @property
    def version(self) -> str:
        return f"v{self.number}"

    @property
    def spec(self) -> str:
        return f"{self.project}/{self.artifact}:v{self.number}"


@dataclass(frozen=True)
class SampleRow:
    """One image of a dataset version, as the sample index keeps it."""

    sample_id: str
    digest: str
    pixels: str


@dataclass(frozen=True)
class SampleMatch:
    """Where an image is stored already: a sample of a dataset version."""

    version_id: int
    sample_id: str
    digest: str


@dataclass(frozen=True)
class TableRow:
    name: str
    kind: str  # "table" or "predictions"
    dataset_version_id: int | None
    num_rows: int


@dataclass(frozen=True)
class ArtifactRecord:
    id: int
    project: str
    name: str
    type: str
    description: str | None
    version_count: int
    created_at: float


class Catalog:
    def __init__(self, url: str, *, sqlite_path: Path | None = None):
        self.url = url
        self.engine = _make_engine(url)
        self._sqlite_path = sqlite_path

    # -- connections and schema ----------------------------------------------------------------

    @contextmanager
    def read(self) -> Iterator[sa.Connection]:
        with self._translate_errors(), self.engine.connect() as conn, conn.begin():
            yield conn

    @contextmanager
    def write(self) -> Iterator[sa.Connection]:
        """A transaction that takes the write lock at its start (SQLite: BEGIN IMMEDIATE)."""
        with (
            self._translate_errors(),
            self.engine.connect().execution_options(tessera_write=True) as conn,
            conn.begin(),
        ):
            yield conn

    @contextmanager
    def _translate_errors(self) -> Iterator[None]:
        try:
            yield
        except sa.exc.DatabaseError as e:
            message = str(e.orig) if e.orig is not None else str(e)
            if "not a database" in message or "malformed" in message:
                raise StoreCorruptError(
                    f"the catalog at {self._sqlite_path or self.url} is damaged ({message}); "
                    "restore it from a backup"
                ) from None
            raise

    def revision(self) -> str | None:
        with self.read() as conn:
            return self._revision_on(conn)

    @staticmethod
    def _revision_on(conn: sa.Connection) -> str | None:
        if not sa.inspect(conn).has_table("alembic_version"):
            return None
        return conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()

    def upgrade(self, blobs: Any = None) -> None:
        """Bring the schema to the newest revision; refuse a catalog written by a newer Tessera."""
        current = self.revision()
        if current == HEAD_REVISION:
            return
        known = {p.stem.split("_", 1)[0] for p in (MIGRATIONS_DIR / "versions").glob("*.py")}
        if current is not None and current not in known:
            raise StoreFormatError(
                f"the catalog at {self._sqlite_path or self.url} has schema revision {current}, "
                "written by a newer Tessera; upgrade Tessera (pip install -U tessera)"
            )
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        with self.engine.connect().execution_options(tessera_write=True) as conn:
            if conn.dialect.name == "postgresql":
                # Several servers may start at once: one migrates, the others wait.
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(7465737365726100)"))
                if self._revision_on(conn) == HEAD_REVISION:
                    conn.commit()
                    return
            cfg.attributes["connection"] = conn
            cfg.attributes["blobs"] = blobs
            command.upgrade(cfg, "head")
            conn.commit()

    def dispose(self) -> None:
        self.engine.dispose()

    # -- projects ----------------------------------------------------------------------------

    def ensure_project(self, conn: sa.Connection, name: str) -> int:
        found = conn.execute(sa.select(t.projects.c.id).where(t.projects.c.name == name)).scalar()
        if found is not None:
            return found
        conn.execute(_insert_ignore(conn, t.projects, {"name": name, "created_at": time.time()}))
        return conn.execute(
            sa.select(t.projects.c.id).where(t.projects.c.name == name)
        ).scalar_one()

    def projects(self) -> list[ProjectRecord]:
        runs = (
            sa.select(sa.func.count())
            .where(t.runs.c.project_id == t.projects.c.id)
            .scalar_subquery()
        )
        arts = (
            sa.select(sa.func.count())
            .where(t.artifacts.c.project_id == t.projects.c.id)
            .scalar_subquery()
        )
        query = sa.select(t.projects, runs.label("runs"), arts.label("arts")).order_by(
            t.projects.c.name
        )
        with self.read() as conn:
            return [
                ProjectRecord(r.id, r.name, r.created_at, r.runs, r.arts)
                for r in conn.execute(query)
            ]

    def project_id_or_raise(self, name: str) -> int:
        with self.read() as conn:
            found = conn.execute(
                sa.select(t.projects.c.id).where(t.projects.c.name == name)
            ).scalar()
        if found is None:
            existing = [p.name for p in self.projects()]
            raise NotFoundError(
                f"no project {name!r}; projects in this store: {', '.join(existing) or '(none)'}"
            )
        return found

    # -- runs --------------------------------------------------------------------------------

    def create_run(
        self,
        project: str,
        name: str | None,
        config: dict[str, Any],
        host: str,
        pid: int,
        pid_started: str,
    ) -> RunRecord:
        now = time.time()
        run_id = secrets.token_hex(8)
        with self.write() as conn:
            project_id = self.ensure_project(conn, project)
            if name is None:
                count = conn.execute(
                    sa.select(sa.func.count()).where(t.runs.c.project_id == project_id)
                ).scalar_one()
                name = f"run-{count + 1}"
            conn.execute(
                t.runs.insert().values(
                    id=run_id,
                    project_id=project_id,
                    name=name,
                    status="running",
                    config=config,
                    summary={},
                    started_at=now,
                    ended_at=None,
                    heartbeat_at=now,
                    host=host,
                    pid=pid,
                    pid_started=pid_started,
                )
            )
        return self.run(run_id)

    def _run_query(self) -> sa.Select:
        return sa.select(t.runs, t.projects.c.name.label("project")).join(
            t.projects, t.projects.c.id == t.runs.c.project_id
        )

    def run(self, run_id: str) -> RunRecord:
        with self.read() as conn:
            row = conn.execute(self._run_query().where(t.runs.c.id == run_id)).first()
        if row is None:
            raise NotFoundError(f"no run with id {run_id!r}")
        return _run_record(row)

    def runs(self, project: str | None = None, status: str | None = None) -> list[RunRecord]:
        query = self._run_query().order_by(t.runs.c.started_at, t.runs.c.id)
        if project is not None:
            query = query.where(t.projects.c.name == project)
        if status is not None:
            query = query.where(t.runs.c.status == status)
        with self.read() as conn:
            return [_run_record(r) for r in conn.execute(query)]

    def update_run(self, run_id: str, **values: Any) -> None:
        with self.write() as conn:
            conn.execute(t.runs.update().where(t.runs.c.id == run_id).values(**values))

    def finish_run(self, run_id: str, status: str, only_if_running: bool = False) -> bool:
        """Set a final status; with ``only_if_running``, leave an already-ended run alone."""
        assert status in RUN_STATUSES
        query = t.runs.update().where(t.runs.c.id == run_id)
        if only_if_running:
            query = query.where(t.runs.c.status == "running")
        with self.write() as conn:
            result = conn.execute(query.values(status=status, ended_at=time.time()))
            return result.rowcount > 0

    def import_run(self, record: RunRecord) -> None:
        """Insert or overwrite a run with its id (push and pull copy runs between stores)."""
        values = {
            "name": record.name,
            "status": record.status,
            "config": record.config,
            "summary": record.summary,
            "started_at": record.started_at,
            "ended_at": record.ended_at,
            "heartbeat_at": record.heartbeat_at,
            "host": record.host,
            "pid": record.pid,
            "pid_started": record.pid_started,
        }
        with self.write() as conn:
            project_id = self.ensure_project(conn, record.project)
            exists = conn.execute(
                sa.select(t.runs.c.project_id).where(t.runs.c.id == record.id)
            ).first()
            if exists is None:
                conn.execute(t.runs.insert().values(id=record.id, project_id=project_id, **values))
            elif exists.project_id != project_id:
                raise ConflictError(f"run {record.id} belongs to another project")
            else:
                conn.execute(t.runs.update().where(t.runs.c.id == record.id).values(**values))

    def replace_metrics(self, run_id: str, rows: list[tuple[int, str, float | None]]) -> None:
        """Make a run's metric history exactly ``rows`` (step, key, value)."""
        now = time.time()
        with self.write() as conn:
            conn.execute(t.metrics.delete().where(t.metrics.c.run_id == run_id))
            if rows:
                conn.execute(
                    t.metrics.insert(),
                    [
                        {"run_id": run_id, "step": s, "key": k, "value": v, "logged_at": now}
                        for s, k, v in rows
                    ],
                )

    def log_metrics(
        self, run_id: str, step: int, values: dict[str, float | None], summary: dict[str, Any]
    ) -> None:
        """Append one step of metric values and store the run's updated summary, atomically."""
        now = time.time()
        rows = [
            {"run_id": run_id, "step": step, "key": k, "value": v, "logged_at": now}
            for k, v in values.items()
        ]
        with self.write() as conn:
            if rows:
                conn.execute(t.metrics.insert(), rows)
            conn.execute(
                t.runs.update()
                .where(t.runs.c.id == run_id)
                .values(summary=summary, heartbeat_at=now)
            )

    def metric_history(self, run_id: str) -> list[tuple[int, str, float | None]]:
        query = (
            sa.select(t.metrics.c.step, t.metrics.c.key, t.metrics.c.value)
            .where(t.metrics.c.run_id == run_id)
            .order_by(t.metrics.c.key, t.metrics.c.step, t.metrics.c.id)
        )
        with self.read() as conn:
            return [(r.step, r.key, r.value) for r in conn.execute(query)]

    def last_step(self, run_id: str) -> int | None:
        with self.read() as conn:
            return conn.execute(
                sa.select(sa.func.max(t.metrics.c.step)).where(t.metrics.c.run_id == run_id)
            ).scalar()

    # -- artifacts and versions --------------------------------------------------------------

    def commit_version(
        self,
        *,
        project: str,
        name: str,
        type: str,
        description: str | None,
        digest: str,
        size: int,
        file_count: int,
        run_id: str | None,
        aliases: tuple[str, ...] = (),
        samples: list[SampleRow] | None = None,
        table: TableRow | None = None,
        blob_digests: set[str] | None = None,
    ) -> tuple[VersionRecord, bool]:
        """Record a version whose blobs and manifest are already stored.

        Returns the version and whether it is new. Content identical to an existing version of
        the same artifact returns that version (its aliases still move as asked). ``samples``
        (a dataset's images) and ``table`` (a table's description) are recorded with a new
        version, in the same transaction.
        """
        now = time.time()
        blob_digests = {digest, *(blob_digests or ())}
        with self.write() as conn:
            project_id = self.ensure_project(conn, project)
            artifact = conn.execute(
                sa.select(t.artifacts).where(
                    t.artifacts.c.project_id == project_id, t.artifacts.c.name == name
                )
            ).first()
            if artifact is None:
                # Two writers may create the artifact at once (PostgreSQL): one insert wins.
                conn.execute(
                    _insert_ignore(
                        conn,
                        t.artifacts,
                        {
                            "project_id": project_id,
                            "name": name,
                            "type": type,
                            "description": description,
                            "created_at": now,
                            "version_count": 0,
                        },
                    )
                )
                artifact = conn.execute(
                    sa.select(t.artifacts).where(
                        t.artifacts.c.project_id == project_id, t.artifacts.c.name == name
                    )
                ).one()
            # Lock the artifact row before looking for identical content, so two writers of the
            # same content cannot both create a version (PostgreSQL; SQLite's BEGIN IMMEDIATE
            # serialises writers already).
            artifact = conn.execute(
                sa.select(t.artifacts).where(t.artifacts.c.id == artifact.id).with_for_update()
            ).one()
            if artifact.type != type:
                raise ConflictError(
                    f"artifact {project}/{name} has type {artifact.type!r}, not {type!r}; "
                    "use another name or the same type"
                )
            elif description is not None and description != artifact.description:
                conn.execute(
                    t.artifacts.update()
                    .where(t.artifacts.c.id == artifact.id)
                    .values(description=description)
                )
            existing = conn.execute(
                sa.select(t.versions.c.id).where(
                    t.versions.c.artifact_id == artifact.id, t.versions.c.digest == digest
                )
            ).scalar()
            created = existing is None
            if created:
                number = (
                    conn.execute(
                        t.artifacts.update()
                        .where(t.artifacts.c.id == artifact.id)
                        .values(version_count=t.artifacts.c.version_count + 1)
                        .returning(t.artifacts.c.version_count)
                    ).scalar_one()
                    - 1
                )
                version_id = conn.execute(
                    t.versions.insert()
                    .values(
                        artifact_id=artifact.id,
                        number=number,
                        digest=digest,
                        size=size,
                        file_count=file_count,
                        run_id=run_id,
                        created_at=now,
                    )
                    .returning(t.versions.c.id)
                ).scalar_one()
                self._set_alias(conn, artifact.id, "latest", version_id)
                _insert_many(
                    conn,
                    t.version_blobs,
                    ("digest", "version_id"),
                    ((d, version_id) for d in sorted(blob_digests)),
                )
                _insert_many(
                    conn,
                    t.samples_index,
                    ("version_id", "sample_id", "digest", "pixels"),
                    ((version_id, s.sample_id, s.digest, s.pixels) for s in samples or ()),
                )
                if table is not None:
                    conn.execute(
                        t.tables.insert().values(
                            version_id=version_id,
                            name=table.name,
                            kind=table.kind,
                            dataset_version_id=table.dataset_version_id,
                            num_rows=table.num_rows,
                        )
                    )
            else:
                version_id = existing
            for alias in aliases:
                self._set_alias(conn, artifact.id, alias, version_id)
            if run_id is not None:
                self._link(conn, run_id, version_id, "logged")
        return self.version_by_id(version_id), created

    def _set_alias(
        self, conn: sa.Connection, artifact_id: int, alias: str, version_id: int
    ) -> None:
        insert = _dialect_insert(conn)(t.aliases).values(
            artifact_id=artifact_id, alias=alias, version_id=version_id
        )
        conn.execute(
            insert.on_conflict_do_update(
                index_elements=["artifact_id", "alias"], set_={"version_id": version_id}
            )
        )

    def _link(self, conn: sa.Connection, run_id: str, version_id: int, direction: str) -> None:
        conn.execute(
            _insert_ignore(
                conn,
                t.lineage,
                {
                    "run_id": run_id,
                    "version_id": version_id,
                    "direction": direction,
                    "at": time.time(),
                },
            )
        )

    def record_use(self, run_id: str, version_id: int) -> None:
        with self.write() as conn:
            self._link(conn, run_id, version_id, "used")

    def set_alias(self, project: str, artifact: str, alias: str, number: int) -> VersionRecord:
        version = self.resolve(VersionSpec(project, artifact, f"v{number}"), project)
        with self.write() as conn:
            artifact_id = conn.execute(
                sa.select(t.versions.c.artifact_id).where(t.versions.c.id == version.id)
            ).scalar_one()
            self._set_alias(conn, artifact_id, alias, version.id)
        return self.version_by_id(version.id)

    def _version_query(self) -> sa.Select:
        return (
            sa.select(
                t.versions,
                t.artifacts.c.name.label("artifact"),
                t.artifacts.c.type,
                t.artifacts.c.description,
                t.projects.c.name.label("project"),
            )
            .join(t.artifacts, t.artifacts.c.id == t.versions.c.artifact_id)
            .join(t.projects, t.projects.c.id == t.artifacts.c.project_id)
        )

    def _version_records(self, conn: sa.Connection, query: sa.Select) -> list[VersionRecord]:
        rows = conn.execute(query).all()
        if not rows:
            return []
        alias_rows = conn.execute(
            sa.select(t.aliases.c.version_id, t.aliases.c.alias).where(
                t.aliases.c.version_id.in_([r.id for r in rows])
            )
        ).all()
        by_version: dict[int, list[str]] = {}
        for version_id, alias in alias_rows:
            by_version.setdefault(version_id, []).append(alias)
        return [
            VersionRecord(
                id=r.id,
                project=r.project,
                artifact=r.artifact,
                type=r.type,
                description=r.description,
                number=r.number,
                digest=r.digest,
                size=r.size,
                file_count=r.file_count,
                run_id=r.run_id,
                created_at=r.created_at,
                aliases=tuple(sorted(by_version.get(r.id, []))),
            )
            for r in rows
        ]

    def version_by_id(self, version_id: int) -> VersionRecord:
        with self.read() as conn:
            found = self._version_records(
                conn, self._version_query().where(t.versions.c.id == version_id)
            )
        if not found:
            raise NotFoundError(f"no version with id {version_id}")
        return found[0]

    def resolve(self, spec: VersionSpec, default_project: str | None) -> VersionRecord:
        """The version a ``[project/]name:selector`` names, or NotFoundError listing what exists."""
        project = spec.project or default_project
        if project is None:
            raise NotFoundError(
                f"artifact reference {spec.name!r} needs a project: write 'project/{spec.name}'"
            )
        with self.read() as conn:
            query = self._version_query().where(
                t.projects.c.name == project, t.artifacts.c.name == spec.name
            )
            number = spec.number
            if number is not None:
                query = query.where(t.versions.c.number == number)
            else:
                query = query.join(t.aliases, t.aliases.c.version_id == t.versions.c.id).where(
                    t.aliases.c.alias == spec.selector
                )
            found = self._version_records(conn, query)
        if found:
            return found[0]
        existing = self.versions(project, spec.name, must_exist=False)
        if not existing:
            artifacts = [a.name for a in self.artifacts(project)]
            raise NotFoundError(
                f"no artifact {spec.name!r} in project {project!r}; artifacts there: "
                f"{', '.join(artifacts) or '(none)'}"
            )
        aliases = sorted({a for v in existing for a in v.aliases})
        raise NotFoundError(
            f"{project}/{spec.name} has no version {spec.selector!r}; versions: "
            f"{', '.join(v.version for v in existing)}; aliases: {', '.join(aliases) or '(none)'}"
        )

    def versions(self, project: str, artifact: str, must_exist: bool = True) -> list[VersionRecord]:
        with self.read() as conn:
            found = self._version_records(
                conn,
                self._version_query()
                .where(t.projects.c.name == project, t.artifacts.c.name == artifact)
                .order_by(t.versions.c.number),
            )
        if not found and must_exist:
            self.resolve(VersionSpec(project, artifact, "latest"), project)  # raises NotFound
        return found

    def all_versions(self) -> list[VersionRecord]:
        with self.read() as conn:
            return self._version_records(
                conn,
                self._version_query().order_by(
                    t.projects.c.name, t.artifacts.c.name, t.versions.c.number
                ),
            )

    def artifacts(self, project: str | None = None) -> list[ArtifactRecord]:
        query = (
            sa.select(t.artifacts, t.projects.c.name.label("project"))
            .join(t.projects, t.projects.c.id == t.artifacts.c.project_id)
            .order_by(t.projects.c.name, t.artifacts.c.name)
        )
        if project is not None:
            query = query.where(t.projects.c.name == project)
        with self.read() as conn:
            return [
                ArtifactRecord(
                    r.id, r.project, r.name, r.type, r.description, r.version_count, r.created_at
                )
                for r in conn.execute(query)
            ]

    def lineage(self, version_id: int) -> dict[str, list[RunRecord]]:
        """Runs that logged and that used a version."""
        query = (
            self._run_query()
            .add_columns(t.lineage.c.direction)
            .join(t.lineage, t.lineage.c.run_id == t.runs.c.id)
            .where(t.lineage.c.version_id == version_id)
            .order_by(t.lineage.c.at)
        )
        out: dict[str, list[RunRecord]] = {"logged": [], "used": []}
        with self.read() as conn:
            for row in conn.execute(query):
                out[row.direction].append(_run_record(row))
        return out

    def find_samples(
        self,
        digests: list[str],
        pixels: list[str],
        projects: set[str] | None = None,
        prefer: Sequence[int] = (),
        project: str | None = None,
    ) -> tuple[dict[str, SampleMatch], dict[str, SampleMatch]]:
        """Dataset samples whose image has one of these content digests, or pixel digests.

        Where several samples match, the first of these wins: a sample of a version in
        ``prefer`` (the datasets the logging run used or logged), then one of a version of
        ``project``, then the newest version. A table logged by a run that evaluated ``v0`` thus
        binds to ``v0`` even once ``v1`` holds the same images, and never to another project's
        copy when its own has them. With ``projects``, only versions of those projects are
        considered (the server passes what the caller may read).
        """
        by_digest: dict[str, SampleMatch] = {}
        by_pixels: dict[str, SampleMatch] = {}
        preferred = set(prefer)
        ix = t.samples_index
        with self.read() as conn:
            for column, wanted, out in (
                (ix.c.digest, digests, by_digest),
                (ix.c.pixels, pixels, by_pixels),
            ):
                best: dict[str, tuple[tuple[bool, bool, int], SampleMatch]] = {}
                unique = sorted(set(wanted))
                for start in range(0, len(unique), 500):
                    query = (
                        sa.select(
                            ix.c.version_id, ix.c.sample_id, ix.c.digest, column, t.projects.c.name
                        )
                        .join(t.versions, t.versions.c.id == ix.c.version_id)
                        .join(t.artifacts, t.artifacts.c.id == t.versions.c.artifact_id)
                        .join(t.projects, t.projects.c.id == t.artifacts.c.project_id)
                        .where(column.in_(unique[start : start + 500]))
                    )
                    if projects is not None:
                        query = query.where(t.projects.c.name.in_(sorted(projects)))
                    for row in conn.execute(query):
                        key = row[3]
                        rank = (row.version_id in preferred, row.name == project, row.version_id)
                        if key not in best or rank > best[key][0]:
                            best[key] = rank, SampleMatch(row.version_id, row.sample_id, row.digest)
                out.update((key, match) for key, (_rank, match) in best.items())
        return by_digest, by_pixels

    def version_by_digest(self, project: str, artifact: str, digest: str) -> VersionRecord | None:
        with self.read() as conn:
            found = self._version_records(
                conn,
                self._version_query().where(
                    t.projects.c.name == project,
                    t.artifacts.c.name == artifact,
                    t.versions.c.digest == digest,
                ),
            )
        return found[0] if found else None

    def table_row(self, version_id: int) -> TableRow | None:
        with self.read() as conn:
            row = conn.execute(
                sa.select(t.tables).where(t.tables.c.version_id == version_id)
            ).first()
        if row is None:
            return None
        return TableRow(row.name, row.kind, row.dataset_version_id, row.num_rows)

    def run_tables(self, run_id: str) -> list[tuple[VersionRecord, TableRow]]:
        """The tables a run logged, oldest first."""
        with self.read() as conn:
            rows = conn.execute(
                sa.select(t.tables, t.lineage.c.at)
                .join(t.lineage, t.lineage.c.version_id == t.tables.c.version_id)
                .where(t.lineage.c.run_id == run_id, t.lineage.c.direction == "logged")
                .order_by(t.lineage.c.at)
            ).all()
        return [
            (
                self.version_by_id(r.version_id),
                TableRow(r.name, r.kind, r.dataset_version_id, r.num_rows),
            )
            for r in rows
        ]

    def table_versions(
        self,
        kind: str | None = None,
        name: str | None = None,
        dataset_version_ids: list[int] | None = None,
    ) -> list[tuple[RunRecord | None, VersionRecord, TableRow]]:
        """Table versions with the runs that logged them (one entry per logging run), oldest
        run first; filtered by kind, table name and the dataset versions they are bound to."""
        query = (
            sa.select(t.tables, t.lineage.c.run_id.label("logged_by"))
            .outerjoin(
                t.lineage,
                sa.and_(
                    t.lineage.c.version_id == t.tables.c.version_id,
                    t.lineage.c.direction == "logged",
                ),
            )
            .order_by(t.lineage.c.at, t.tables.c.version_id)
        )
        if kind is not None:
            query = query.where(t.tables.c.kind == kind)
        if name is not None:
            query = query.where(t.tables.c.name == name)
        if dataset_version_ids is not None:
            query = query.where(t.tables.c.dataset_version_id.in_(dataset_version_ids))
        with self.read() as conn:
            rows = conn.execute(query).all()
        runs = {r.id: r for r in self.runs()}
        out = []
        for row in rows:
            run = runs.get(row.logged_by) if row.logged_by else None
            table = TableRow(row.name, row.kind, row.dataset_version_id, row.num_rows)
            out.append((run, self.version_by_id(row.version_id), table))
        out.sort(key=lambda item: item[0].started_at if item[0] else 0.0)
        return out

    def run_versions(self, run_id: str) -> dict[str, list[VersionRecord]]:
        """Versions a run used (inputs) and logged (outputs)."""
        out: dict[str, list[VersionRecord]] = {}
        with self.read() as conn:
            for direction in ("used", "logged"):
                query = (
                    self._version_query()
                    .join(t.lineage, t.lineage.c.version_id == t.versions.c.id)
                    .where(t.lineage.c.run_id == run_id, t.lineage.c.direction == direction)
                    .order_by(t.lineage.c.at)
                )
                out[direction] = self._version_records(conn, query)
        return out


ROLES = ("reader", "writer", "admin")


@dataclass(frozen=True)
class UserRecord:
    id: int
    name: str
    is_admin: bool


@dataclass(frozen=True)
class TokenRecord:
    id: str
    user: str
    name: str
    created_at: float
    revoked_at: float | None


class AuthCatalog:
    """Users, tokens and project members: the server's access control, in the same catalog."""

    def __init__(self, catalog: Catalog):
        self.catalog = catalog

    def user_count(self) -> int:
        with self.catalog.read() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(t.users)).scalar_one()

    def ensure_user(self, name: str, is_admin: bool = False) -> UserRecord:
        with self.catalog.write() as conn:
            conn.execute(
                _insert_ignore(
                    conn, t.users, {"name": name, "is_admin": is_admin, "created_at": time.time()}
                )
            )
            if is_admin:  # an existing user is promoted (never demoted) by an admin
                conn.execute(t.users.update().where(t.users.c.name == name).values(is_admin=True))
            row = conn.execute(sa.select(t.users).where(t.users.c.name == name)).one()
        return UserRecord(row.id, row.name, bool(row.is_admin))

    def user(self, name: str) -> UserRecord:
        with self.catalog.read() as conn:
            row = conn.execute(sa.select(t.users).where(t.users.c.name == name)).first()
        if row is None:
            raise NotFoundError(f"no user {name!r}")
        return UserRecord(row.id, row.name, bool(row.is_admin))

    def create_token(self, user: UserRecord, name: str, token_hash: str) -> TokenRecord:
        token_id = "tok_" + secrets.token_hex(6)
        now = time.time()
        with self.catalog.write() as conn:
            conn.execute(
                t.tokens.insert().values(
                    id=token_id, user_id=user.id, name=name, hash=token_hash, created_at=now
                )
            )
        return TokenRecord(token_id, user.name, name, now, None)

    def tokens(self, user: UserRecord | None = None) -> list[TokenRecord]:
        query = (
            sa.select(t.tokens, t.users.c.name.label("user"))
            .join(t.users, t.users.c.id == t.tokens.c.user_id)
            .order_by(t.tokens.c.created_at)
        )
        if user is not None:
            query = query.where(t.tokens.c.user_id == user.id)
        with self.catalog.read() as conn:
            return [
                TokenRecord(r.id, r.user, r.name, r.created_at, r.revoked_at)
                for r in conn.execute(query)
            ]

    def revoke_token(self, token_id: str, user: UserRecord | None = None) -> bool:
        query = t.tokens.update().where(t.tokens.c.id == token_id, t.tokens.c.revoked_at.is_(None))
        if user is not None:
            query = query.where(t.tokens.c.user_id == user.id)
        with self.catalog.write() as conn:
            return conn.execute(query.values(revoked_at=time.time())).rowcount > 0

    def user_for_token(self, token_hash: str) -> UserRecord | None:
        """The user of a live token, or None (unknown or revoked)."""
        with self.catalog.read() as conn:
            row = conn.execute(
                sa.select(t.users)
                .join(t.tokens, t.tokens.c.user_id == t.users.c.id)
                .where(t.tokens.c.hash == token_hash, t.tokens.c.revoked_at.is_(None))
            ).first()
        return None if row is None else UserRecord(row.id, row.name, bool(row.is_admin))

    def set_member(self, project: str, user: UserRecord, role: str | None) -> None:
        """Give ``user`` a role in ``project`` (created if new); ``None`` removes them."""
        if role is not None and role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        with self.catalog.write() as conn:
            project_id = self.catalog.ensure_project(conn, project)
            conn.execute(
                t.members.delete().where(
                    t.members.c.project_id == project_id, t.members.c.user_id == user.id
                )
            )
            if role is not None:
                conn.execute(
                    t.members.insert().values(project_id=project_id, user_id=user.id, role=role)
                )

    def roles(self, user: UserRecord) -> dict[str, str]:
        """``{project: role}`` for every project the user is a member of."""
        with self.catalog.read() as conn:
            rows = conn.execute(
                sa.select(t.projects.c.name, t.members.c.role)
                .join(t.members, t.members.c.project_id == t.projects.c.id)
                .where(t.members.c.user_id == user.id)
            ).all()
        return {name: role for name, role in rows}

    def members(self, project: str) -> list[tuple[str, str]]:
        with self.catalog.read() as conn:
            rows = conn.execute(
                sa.select(t.users.c.name, t.members.c.role)
                .join(t.members, t.members.c.user_id == t.users.c.id)
                .join(t.projects, t.projects.c.id == t.members.c.project_id)
                .where(t.projects.c.name == project)
                .order_by(t.users.c.name)
            ).all()
        return [(name, role) for name, role in rows]

    def project_exists(self, project: str) -> bool:
        with self.catalog.read() as conn:
            return (
                conn.execute(sa.select(t.projects.c.id).where(t.projects.c.name == project)).first()
                is not None
            )

    def copy_to(self, other: AuthCatalog) -> int:
        """Copy users, tokens (still hashed) and memberships into another catalog; returns
        how many users were copied. Existing entries in ``other`` are kept."""
        with self.catalog.read() as conn:
            users = conn.execute(sa.select(t.users)).all()
            tokens = conn.execute(sa.select(t.tokens)).all()
            members = conn.execute(
                sa.select(
                    t.members.c.role,
                    t.users.c.name.label("user"),
                    t.projects.c.name.label("project"),
                )
                .join(t.users, t.users.c.id == t.members.c.user_id)
                .join(t.projects, t.projects.c.id == t.members.c.project_id)
            ).all()
        new_ids = {u.id: other.ensure_user(u.name, bool(u.is_admin)) for u in users}
        with other.catalog.write() as conn:
            for token in tokens:
                conn.execute(
                    _insert_ignore(
                        conn,
                        t.tokens,
                        {
                            "id": token.id,
                            "user_id": new_ids[token.user_id].id,
                            "name": token.name,
                            "hash": token.hash,
                            "created_at": token.created_at,
                            "revoked_at": token.revoked_at,
                        },
                    )
                )
        names = {record.name: record for record in new_ids.values()}
        for member in members:
            other.set_member(member.project, names[member.user], member.role)
        return len(users)

    def grant_blobs(self, project: str, digests: list[str]) -> None:
        """Record that ``project`` uploaded these blobs' bytes (so it may commit them)."""
        now = time.time()
        with self.catalog.write() as conn:
            project_id = self.catalog.ensure_project(conn, project)
            # One executemany: a statement per digest made a pack of 800 small blobs spend
            # longer in the catalog than in storing the bytes.
            _insert_many(
                conn,
                t.blob_grants,
                ("project_id", "digest", "created_at"),
                ((project_id, digest, now) for digest in sorted(set(digests))),
                skip_existing=True,
            )

    def usable_blobs(self, project: str, digests: set[str], readable: set[str]) -> set[str]:
        """The digests ``project`` may name without uploading them: uploaded to it before, or
        in a version of a project in ``readable`` (the projects the caller may read)."""
        out: set[str] = set()
        wanted = sorted(digests)
        with self.catalog.read() as conn:
            for start in range(0, len(wanted), 500):
                chunk = wanted[start : start + 500]
                out.update(
                    conn.execute(
                        sa.select(t.blob_grants.c.digest)
                        .join(t.projects, t.projects.c.id == t.blob_grants.c.project_id)
                        .where(t.projects.c.name == project, t.blob_grants.c.digest.in_(chunk))
                    ).scalars()
                )
                out.update(
                    conn.execute(
                        sa.select(t.version_blobs.c.digest)
                        .distinct()
                        .join(t.versions, t.versions.c.id == t.version_blobs.c.version_id)
                        .join(t.artifacts, t.artifacts.c.id == t.versions.c.artifact_id)
                        .join(t.projects, t.projects.c.id == t.artifacts.c.project_id)
                        .where(
                            t.projects.c.name.in_(sorted(readable | {project})),
                            t.version_blobs.c.digest.in_(chunk),
                        )
                    ).scalars()
                )
        return out

    def blob_projects(self, digest: str) -> set[str]:
        """Projects with a version that needs this blob."""
        return self.blobs_projects([digest]).get(digest, set())

    def blobs_projects(self, digests: list[str]) -> dict[str, set[str]]:
        """For each of these blobs, the projects with a version that needs it (one query per
        500 digests; a digest no version names is absent)."""
        out: dict[str, set[str]] = {}
        unique = sorted(set(digests))
        with self.catalog.read() as conn:
            for start in range(0, len(unique), 500):
                rows = conn.execute(
                    sa.select(t.version_blobs.c.digest, t.projects.c.name)
                    .distinct()
                    .join(t.artifacts, t.artifacts.c.project_id == t.projects.c.id)
                    .join(t.versions, t.versions.c.artifact_id == t.artifacts.c.id)
                    .join(t.version_blobs, t.version_blobs.c.version_id == t.versions.c.id)
                    .where(t.version_blobs.c.digest.in_(unique[start : start + 500]))
                )
                for digest, project in rows:
                    out.setdefault(digest, set()).add(project)
        return out


def _run_record(row: Any) -> RunRecord:
    return RunRecord(
        id=row.id,
        project=row.project,
        name=row.name,
        status=row.status,
        config=row.config,
        summary=row.summary,
        started_at=row.started_at,
        ended_at=row.ended_at,
        heartbeat_at=row.heartbeat_at,
        host=row.host,
        pid=row.pid,
        pid_started=row.pid_started,
    )


def _dialect_insert(conn: sa.Connection) -> Any:
    """The INSERT construct with ON CONFLICT support for this connection's database."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert


def _insert_many(
    conn: sa.Connection,
    table: sa.Table,
    columns: tuple[str, ...],
    rows: Iterable[tuple[Any, ...]],
    *,
    skip_existing: bool = False,
) -> None:
    """Insert many rows in the connection's transaction; ``skip_existing``: rows whose unique
    key is already there are left out, not an error.

    ``COPY`` on PostgreSQL, where an executemany of a 10,000-file version's rows took most of a
    second in round trips (an executemany, pipelined, where rows may exist: COPY cannot skip
    them). On SQLite (in-process) the driver's own executemany of tuples: SQLAlchemy's, of one
    dict per row, spent longer building parameters than SQLite spent inserting."""
    if conn.dialect.name == "postgresql":
        if skip_existing:
            insert = _dialect_insert(conn)(table).on_conflict_do_nothing()
            values = [dict(zip(columns, row, strict=True)) for row in rows]
            if values:
                conn.execute(insert, values)
            return
        from psycopg import sql

        statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
            sql.Identifier(table.name), sql.SQL(", ").join(map(sql.Identifier, columns))
        )
        with conn.connection.driver_connection.cursor() as cursor, cursor.copy(statement) as copy:
            for row in rows:
                copy.write_row(row)
        return
    # Table and column names are this module's own, never user input.
    statement = (
        f"INSERT {'OR IGNORE ' if skip_existing else ''}INTO {table.name} "
        f"({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
    )
    rows = iter(rows)
    while batch := list(itertools.islice(rows, 50_000)):  # bounded memory for 1M samples
        conn.exec_driver_sql(statement, batch)


def _insert_ignore(conn: sa.Connection, table: sa.Table, values: dict[str, Any]) -> Any:
    """INSERT that does nothing when a unique key already exists, on SQLite and PostgreSQL."""
    return _dialect_insert(conn)(table).values(**values).on_conflict_do_nothing()


def _make_engine(url: str) -> sa.Engine:
    if not url.startswith("sqlite"):
        return sa.create_engine(url, pool_pre_ping=True)
    engine = sa.create_engine(url, connect_args={"timeout": 60})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event decide how transactions start (see below).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=60000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        # Writers take the lock up front, so two writers never deadlock upgrading read locks;
        # readers never block anyone in WAL mode.
        immediate = conn.get_execution_options().get("tessera_write")
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine
