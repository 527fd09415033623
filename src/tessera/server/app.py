"""The HTTP API (``/api/v1``): every operation the Python API needs, over a LocalBackend.

The server keeps no state outside the store (counters aside), so replicas can share one store.
Blob bytes are hashed on arrival and refused on a digest mismatch; a version is committed only
when every blob it names is present.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
from collections.abc import Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import anyio
from fastapi import Depends, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field

from tessera import wire
from tessera.backend.local import LocalBackend
from tessera.errors import (
    AuthError,
    DigestMismatchError,
    MissingBlobsError,
    NotFoundError,
    NotSignedInError,
    TesseraError,
)
from tessera.names import check_alias, check_name, parse_version_spec
from tessera.runtime import ProcessIdentity
from tessera.server.auth import Principal, hash_token, new_token
from tessera.store import Store
from tessera.store.catalog import AuthCatalog, RunRecord
from tessera.store.hashing import check_digest, file_pieces, new_hasher
from tessera.store.packs import FRAME_HEADER

DEFAULT_MAX_BLOB_BYTES = 64 * 1024**3
MAX_PACK_BYTES = 64 * 1024 * 1024  # clients send packs of at most 16 MiB of blobs
HANDOFF_BYTES = 1024 * 1024  # a pack upload reaches its store in pieces of this size
PACK_UPLOADS = 64  # pack uploads stored at once; more wait, their bodies queued
MAX_FETCH_BLOBS = 4096  # blobs per POST /blobs/fetch
FETCH_BUFFER = 1024 * 1024  # bytes of a fetch response handed to the event loop at once
UPLOAD_PIECE = 4 * 1024 * 1024  # a streamed blob is hashed and written in pieces this large


@dataclass
class Settings:
    dir: Path
    public_read: bool = False
    max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES
    catalog: str | None = None  # URL; None: from the environment or the store marker
    blobs: str | None = None


@dataclass
class Counters:
    """What this server process has received and sent: proof of what a client sent or
    fetched (or did not)."""

    blob_bytes_received: int = 0
    blobs_received: int = 0
    blobs_stored: int = 0
    blobs_already_present: int = 0
    blobs_sent: int = 0  # whole blobs answered by GET /blobs/{digest} or POST /blobs/fetch
    requests: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **amounts: int) -> None:
        with self._lock:
            for key, value in amounts.items():
                setattr(self, key, getattr(self, key) + value)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {k: v for k, v in vars(self).items() if not k.startswith("_")}


# -- request bodies ------------------------------------------------------------------------------


class DigestList(BaseModel):
    digests: list[str] = Field(max_length=100_000)
    project: str


class MissingBlobs(BaseModel):
    missing: list[str]


class FetchBlobs(BaseModel):
    digests: list[str] = Field(max_length=MAX_FETCH_BLOBS)


class ProcessBody(BaseModel):
    host: str = Field(max_length=255)
    pid: int
    started: str = Field(max_length=32)


class RunCreate(BaseModel):
    name: str | None = None
    config: dict[str, Any] = {}
    process: ProcessBody | None = None  # the client process that owns the run


class RunImport(BaseModel):
    record: dict[str, Any]
    metrics: list[tuple[int, str, float | None]] | None = None


class RunUpdate(BaseModel):
    status: str | None = None
    only_if_running: bool = False
    summary: dict[str, Any] | None = None
    heartbeat: bool = False


class MetricsBody(BaseModel):
    step: int
    values: dict[str, float | None]
    summary: dict[str, Any]


class VersionCommit(BaseModel):
    name: str
    type: str
    description: str | None = None
    digest: str
    run_id: str | None = None
    aliases: list[str] = []


class UseBody(BaseModel):
    version_id: int


class FindSamples(BaseModel):
    digests: list[str] = []
    pixels: list[str] = []
    prefer: list[int] = []  # dataset version ids whose samples win (see Catalog.find_samples)
    project: str | None = None


class TokenCreate(BaseModel):
    name: str = "token"
    user: str | None = None
    admin: bool = False


class MemberSet(BaseModel):
    role: str | None


# -- the caller ----------------------------------------------------------------------------------


def principal(request: Request) -> Principal:
    """The caller, from the ``Authorization: Bearer <token>`` header (or anonymous)."""
    auth: AuthCatalog = request.app.state.auth
    settings: Settings = request.app.state.settings
    header = request.headers.get("authorization", "")
    user = None
    if header:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise NotSignedInError("the Authorization header must be 'Bearer <token>'")
        user = auth.user_for_token(hash_token(token.strip()))
        if user is None:
            raise NotSignedInError(
                "this token is unknown or revoked: sign in again (tessera login)"
            )
    return Principal(user, auth, settings.public_read)


Caller = Annotated[Principal, Depends(principal)]


# -- the app -------------------------------------------------------------------------------------


def create_app(settings: Settings) -> FastAPI:
    backend = LocalBackend(
        Store.open(settings.dir, create=True, catalog=settings.catalog, blobs=settings.blobs)
    )
    auth = AuthCatalog(backend.catalog)
    counters = Counters()
    app = FastAPI(
        title="Tessera",
        version="1",
        description="Versioned image datasets and predictions by reference.",
        openapi_url="/api/v1/openapi.json",
        docs_url="/api/v1/docs",
    )
    app.state.backend = backend
    app.state.auth = auth
    app.state.settings = settings
    app.state.counters = counters

    @app.exception_handler(TesseraError)
    async def tessera_error(request: Request, exc: TesseraError) -> JSONResponse:
        return JSONResponse(wire.error_body(exc), status_code=wire.status_of(exc))

    @app.exception_handler(ValueError)
    async def value_error(request: Request, exc: ValueError) -> JSONResponse:
        return JSONResponse({"error": "ValueError", "message": str(exc)}, status_code=400)

    app.add_middleware(_CountRequests, counters=counters)

    def run_project(run_id: str) -> tuple[RunRecord, str]:
        record = backend.run(run_id)
        return record, record.project

    def version_project(version_id: int) -> str:
        return backend.version_by_id(version_id).project

    # -- service ---------------------------------------------------------------------------

    @app.get("/api/v1/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/api/v1/stats")
    def stats(caller: Caller) -> dict[str, int]:
        caller.require_user()
        return counters.snapshot()

    @app.get("/api/v1/me")
    def me(caller: Caller) -> dict[str, Any]:
        user = caller.require_user()
        return {"user": user.name, "admin": user.is_admin, "roles": caller.roles()}

    # -- tokens and members ----------------------------------------------------------------

    @app.post("/api/v1/tokens")
    def create_token(body: TokenCreate, caller: Caller) -> dict[str, Any]:
        user = caller.require_user()
        if (body.user and body.user != user.name) or body.admin:
            if not caller.is_admin:
                raise AuthError("only an admin may create tokens for other users or admins")
            check_name(body.user or user.name, "user")
            user = auth.ensure_user(body.user or user.name, is_admin=body.admin)
        token = new_token()
        record = auth.create_token(user, body.name, hash_token(token))
        return {"token": token, **wire.dump(record)}

    @app.get("/api/v1/tokens")
    def list_tokens(caller: Caller) -> list[dict[str, Any]]:
        user = caller.require_user()
        return wire.dump(auth.tokens(None if caller.is_admin else user))

    @app.delete("/api/v1/tokens/{token_id}")
    def revoke_token(token_id: str, caller: Caller) -> dict[str, bool]:
        user = caller.require_user()
        if not auth.revoke_token(token_id, None if caller.is_admin else user):
            raise NotFoundError(f"no live token {token_id!r} of yours")
        return {"revoked": True}

    @app.put("/api/v1/projects/{project}/members/{user_name}")
    def set_member(project: str, user_name: str, body: MemberSet, caller: Caller) -> dict[str, Any]:
        check_name(project, "project")
        check_name(user_name, "user")
        caller.require_writer_or_create(project)
        caller.require(project, "admin")
        auth.set_member(project, auth.ensure_user(user_name), body.role)
        return {"project": project, "user": user_name, "role": body.role}

    @app.get("/api/v1/projects/{project}/members")
    def list_members(project: str, caller: Caller) -> list[dict[str, str]]:
        caller.require(project, "reader")
        return [{"user": u, "role": r} for u, r in auth.members(project)]

    # -- blobs -----------------------------------------------------------------------------

    @app.post("/api/v1/blobs/missing", response_model=MissingBlobs)
    def missing(body: DigestList, caller: Caller) -> Response:
        caller.require_writer_or_create(body.project)
        for digest in body.digests:
            check_digest(digest)
        absent = backend.store.blobs.missing(body.digests)
        absent |= unusable(caller, body.project, set(body.digests) - absent)
        # Rendered here: FastAPI's validation of a 10,000-digest answer against the model
        # cost more than finding which were missing.
        return JSONResponse({"missing": sorted(absent)})

    def trusted(caller: Principal) -> bool:
        """True if the caller may name any stored blob (an admin, or a public-read server)."""
        return caller.is_admin or settings.public_read

    def unusable(caller: Principal, project: str, present: set[str]) -> set[str]:
        """Stored blobs the caller must still upload to name them in ``project``: a digest is
        not a capability, so a blob only projects the caller cannot read hold does not count."""
        if trusted(caller) or not present:
            return set()
        return present - auth.usable_blobs(project, present, set(caller.roles()))

    @app.put("/api/v1/blobs/{digest}")
    async def put_blob(
        digest: str, request: Request, caller: Caller, project: str = Query(...)
    ) -> Response:
        check_digest(digest)
        await run_in_threadpool(caller.require_writer_or_create, project)
        declared = request.headers.get("content-length")
        if declared is not None and int(declared) > settings.max_blob_bytes:
            return _too_large(settings.max_blob_bytes)
        blobs = backend.store.blobs
        fd, temp = blobs._new_temp()
        hasher = new_hasher()
        size = 0
        try:
            try:
                # Hash and write in large pieces on a worker thread (both release the GIL):
                # the event loop keeps reading the socket meanwhile, instead of stalling every
                # other upload while it hashes and writes 64 KiB at a time.
                pending: list[bytes] = []
                buffered = 0
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > settings.max_blob_bytes:
                        return _too_large(settings.max_blob_bytes)
                    pending.append(chunk)
                    buffered += len(chunk)
                    if buffered >= UPLOAD_PIECE:
                        await run_in_threadpool(_hash_and_write, hasher, fd, pending)
                        pending, buffered = [], 0
                if pending:
                    await run_in_threadpool(_hash_and_write, hasher, fd, pending)
            finally:
                os.close(fd)
            counters.add(blob_bytes_received=size, blobs_received=1)
            actual = hasher.hexdigest()
            if actual != digest:
                raise DigestMismatchError(
                    f"the uploaded bytes hash to {actual}, not {digest}; nothing was stored"
                )
            stored = await run_in_threadpool(_adopt, blobs, digest, temp)
        finally:
            temp.unlink(missing_ok=True)
        counters.add(blobs_stored=int(stored), blobs_already_present=int(not stored))
        await run_in_threadpool(auth.grant_blobs, project, [digest])
        return JSONResponse({"digest": digest, "size": size, "stored": stored})

    # Each pack upload's store waits on a thread for the body as the client sends it: not the
    # shared pool's threads, which forty slow uploads would hold from every other request.
    pack_threads = anyio.CapacityLimiter(PACK_UPLOADS)

    @app.post("/api/v1/blobs/pack")
    async def put_pack(request: Request, caller: Caller, project: str = Query(...)) -> Response:
        """Many small blobs in one request: frames of [64-byte hex digest][u64 size][bytes]."""
        await run_in_threadpool(caller.require_writer_or_create, project)
        declared = request.headers.get("content-length")
        if declared is not None and int(declared) > MAX_PACK_BYTES:
            return _too_large(MAX_PACK_BYTES, "pack")
        # The store parses, hashes and writes the frames on a thread of its own while the
        # body is still arriving: the answer follows the last byte closely, instead of after
        # all 16 MiB were received and only then stored. A folder store writes the new frames
        # into one pack file (a file per 20 KiB blob cost the file system more than receiving
        # it), a bucket stores them as objects; a mismatch refuses them all.
        body: queue.SimpleQueue[list[bytes] | BaseException | None] = queue.SimpleQueue()
        storing = asyncio.ensure_future(
            anyio.to_thread.run_sync(
                backend.store.blobs.put_pack,
                _until_none(body),
                settings.max_blob_bytes,
                limiter=pack_threads,
            )
        )
        size = 0
        try:
            # Handed over a mebibyte at a time: a hand-over per 64 KiB chunk woke the store's
            # thread (and passed the GIL) so often that switching threads took a quarter of
            # the server's CPU.
            pending: list[bytes] = []
            buffered = 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > MAX_PACK_BYTES:
                    raise _PackTooLarge
                pending.append(chunk)
                buffered += len(chunk)
                if buffered >= HANDOFF_BYTES:
                    body.put(pending)
                    pending, buffered = [], 0
            body.put(pending)
        except BaseException as e:
            # The store discards what it wrote, and stops.
            body.put(ConnectionAbortedError("the upload ended before its body did"))
            with suppress(BaseException):
                await storing
            if isinstance(e, _PackTooLarge):
                return _too_large(MAX_PACK_BYTES, "pack")
            raise
        body.put(None)
        counters.add(blob_bytes_received=size)
        receipt = await storing
        await run_in_threadpool(auth.grant_blobs, project, receipt.received)
        counters.add(
            blobs_received=len(receipt.received),
            blobs_stored=receipt.stored,
            blobs_already_present=len(receipt.received) - receipt.stored,
        )
        return JSONResponse({"received": len(receipt.received), "stored": receipt.stored})

    def _require_readable(digest: str, projects: Iterable[str], caller: Principal) -> None:
        """A blob is readable only through a version of a project the caller may read."""
        if not any(caller.readable(p) for p in projects):
            if caller.anonymous and not settings.public_read:
                caller.require_user()
            raise NotFoundError(f"no blob {digest} in a project you may read")

    def _blob_response(digest: str, caller: Principal) -> Response:
        check_digest(digest)
        _require_readable(digest, auth.blob_projects(digest), caller)
        path = backend.store.blobs.local_path(digest)
        headers = {
            "ETag": f'"{digest}"',
            "Cache-Control": "private, max-age=31536000, immutable",
        }
        return FileResponse(path, media_type="application/octet-stream", headers=headers)

    @app.get("/api/v1/blobs/{digest}")
    def get_blob(digest: str, caller: Caller, request: Request) -> Response:
        if request.headers.get("if-none-match") == f'"{digest}"':
            check_digest(digest)
            _require_readable(digest, auth.blob_projects(digest), caller)
            return Response(status_code=304, headers={"ETag": f'"{digest}"'})
        response = _blob_response(digest, caller)
        counters.add(blobs_sent=1)
        return response

    @app.post("/api/v1/blobs/fetch")
    def fetch_blobs(body: FetchBlobs, caller: Caller) -> Response:
        """Many blobs in one response, in the order asked: frames of [64-byte hex digest][u64
        size][bytes], as ``POST /blobs/pack`` takes them. A GET per small blob spent more time
        on requests and permission queries than on bytes. Every blob must be in a version of a
        project the caller may read; otherwise nothing is sent."""
        for digest in body.digests:
            check_digest(digest)
        projects = auth.blobs_projects(body.digests)
        for digest in body.digests:
            _require_readable(digest, projects.get(digest, ()), caller)
        blobs = backend.store.blobs
        if blobs.local_root != backend.store.root:
            # A bucket: download into the cache first, so a missing object is a clean error
            # before the response starts, not a stream cut short.
            backend.fetch(body.digests)
        counters.add(blobs_sent=len(body.digests))

        def pieces() -> Iterator[bytes]:
            # Opened one at a time (a packed blob is read from its pack); the size comes from
            # the open blob, not from another request to the bucket.
            for digest in body.digests:
                with blobs.open(digest) as f:
                    size = f.seek(0, os.SEEK_END)
                    f.seek(0)
                    yield FRAME_HEADER.pack(digest.encode(), size)
                    yield from file_pieces(f)

        def frames() -> Iterator[bytes]:
            # Starlette runs each step of a plain iterator in a worker thread: a hand-off per
            # 20 KiB blob cost more than the blob. Small pieces travel together.
            buffer = bytearray()
            for piece in pieces():
                buffer += piece
                if len(buffer) >= FETCH_BUFFER:
                    yield bytes(buffer)
                    buffer.clear()
            if buffer:
                yield bytes(buffer)

        return StreamingResponse(frames(), media_type="application/octet-stream")

    # -- runs ------------------------------------------------------------------------------

    @app.post("/api/v1/projects/{project}/runs")
    def create_run(project: str, body: RunCreate, caller: Caller) -> dict[str, Any]:
        check_name(project, "project")
        if body.name is not None:
            check_name(body.name, "run")
        caller.require_writer_or_create(project)
        # The client's process owns the run; without one, only heartbeats tell it is alive.
        process = ProcessIdentity("(unknown)", 0, "")
        if body.process is not None:
            process = ProcessIdentity(body.process.host, body.process.pid, body.process.started)
        return wire.dump(backend.create_run(project, body.name, body.config, process))

    @app.put("/api/v1/projects/{project}/runs/{run_id}")
    def import_run(project: str, run_id: str, body: RunImport, caller: Caller) -> dict[str, Any]:
        caller.require_writer_or_create(project)
        record = wire.load(RunRecord, {**body.record, "project": project, "id": run_id})
        backend.import_run(record)
        if body.metrics is not None:
            backend.replace_metrics(run_id, [tuple(m) for m in body.metrics])
        return wire.dump(backend.run(run_id))

    @app.get("/api/v1/projects/{project}/runs")
    def list_runs(project: str, caller: Caller) -> list[dict[str, Any]]:
        caller.require(project, "reader")
        backend.mark_stale_runs()
        return wire.dump(backend.runs(project))

    @app.get("/api/v1/runs")
    def all_runs(caller: Caller) -> list[dict[str, Any]]:
        if caller.anonymous and not settings.public_read:
            caller.require_user()
        backend.mark_stale_runs()
        return wire.dump([r for r in backend.runs() if caller.readable(r.project)])

    @app.get("/api/v1/runs/{run_id}")
    def get_run(run_id: str, caller: Caller) -> dict[str, Any]:
        backend.mark_stale_runs()
        record, project = run_project(run_id)
        caller.require(project, "reader", hidden=True)
        return wire.dump(record)

    @app.patch("/api/v1/runs/{run_id}")
    def update_run(run_id: str, body: RunUpdate, caller: Caller) -> dict[str, Any]:
        _, project = run_project(run_id)
        caller.require(project, "writer", hidden=True)
        changed = True
        if body.summary is not None:
            backend.set_summary(run_id, body.summary)
        if body.heartbeat:
            backend.heartbeat(run_id)
        if body.status is not None:
            changed = backend.finish_run(run_id, body.status, body.only_if_running)
        return {"changed": changed}

    @app.post("/api/v1/runs/{run_id}/metrics")
    def log_metrics(run_id: str, body: MetricsBody, caller: Caller) -> dict[str, bool]:
        _, project = run_project(run_id)
        caller.require(project, "writer", hidden=True)
        backend.log_metrics(run_id, body.step, body.values, body.summary)
        return {"ok": True}

    @app.get("/api/v1/runs/{run_id}/metrics")
    def metric_history(run_id: str, caller: Caller) -> list[tuple[int, str, float | None]]:
        _, project = run_project(run_id)
        caller.require(project, "reader", hidden=True)
        return backend.metric_history(run_id)

    @app.post("/api/v1/runs/{run_id}/uses")
    def record_use(run_id: str, body: UseBody, caller: Caller) -> dict[str, bool]:
        _, project = run_project(run_id)
        caller.require(project, "writer", hidden=True)
        caller.require(version_project(body.version_id), "reader", hidden=True)
        backend.record_use(run_id, body.version_id)
        return {"ok": True}

    @app.get("/api/v1/runs/{run_id}/versions")
    def run_versions(run_id: str, caller: Caller) -> dict[str, list[dict[str, Any]]]:
        _, project = run_project(run_id)
        caller.require(project, "reader", hidden=True)
        return {
            k: wire.dump([v for v in vs if caller.readable(v.project)])
            for k, vs in backend.run_versions(run_id).items()
        }

    @app.get("/api/v1/runs/{run_id}/tables")
    def run_tables(run_id: str, caller: Caller) -> list[list[dict[str, Any]]]:
        _, project = run_project(run_id)
        caller.require(project, "reader", hidden=True)
        return [[wire.dump(v), wire.dump(t)] for v, t in backend.run_tables(run_id)]

    # -- artifacts and versions ------------------------------------------------------------

    @app.get("/api/v1/projects")
    def list_projects(caller: Caller) -> list[dict[str, Any]]:
        if caller.anonymous and not settings.public_read:
            caller.require_user()
        return wire.dump([p for p in backend.projects() if caller.readable(p.name)])

    @app.get("/api/v1/artifacts")
    def list_artifacts(caller: Caller, project: str | None = None) -> list[dict[str, Any]]:
        if project is not None:
            caller.require(project, "reader")
        elif caller.anonymous and not settings.public_read:
            caller.require_user()
        return wire.dump([a for a in backend.artifacts(project) if caller.readable(a.project)])

    @app.get("/api/v1/projects/{project}/artifacts/{artifact}/versions")
    def list_versions(project: str, artifact: str, caller: Caller) -> list[dict[str, Any]]:
        caller.require(project, "reader")
        return wire.dump(backend.versions(project, artifact))

    @app.get("/api/v1/versions")
    def all_versions(caller: Caller) -> list[dict[str, Any]]:
        if caller.anonymous and not settings.public_read:
            caller.require_user()
        return wire.dump([v for v in backend.all_versions() if caller.readable(v.project)])

    @app.get("/api/v1/resolve")
    def resolve(spec: str, caller: Caller, project: str | None = None) -> dict[str, Any]:
        parsed = parse_version_spec(spec)
        owner = parsed.project or project
        if owner is not None:
            caller.require(owner, "reader")
        record = backend.resolve(parsed, project)
        caller.require(record.project, "reader", hidden=True)
        return wire.dump(record)

    @app.post("/api/v1/projects/{project}/versions")
    def commit_version(project: str, body: VersionCommit, caller: Caller) -> dict[str, Any]:
        check_name(project, "project")
        check_name(body.name, "artifact")
        check_name(body.type, "artifact type")
        aliases = tuple(check_alias(a) for a in body.aliases)
        check_digest(body.digest)
        caller.require_writer_or_create(project)
        if body.run_id is not None:
            _run, run_project_name = run_project(body.run_id)
            if run_project_name != project:
                raise AuthError(f"run {body.run_id} belongs to another project")
        if not backend.store.blobs.has(body.digest):
            raise MissingBlobsError(
                f"the manifest {body.digest} is not stored; upload it, then commit",
                [body.digest],
            )
        manifest = backend.read_manifest(body.digest)
        needed = {body.digest, *manifest.stored_digests()}
        refused = set()
        if not trusted(caller):  # else the commit's own presence check is all that is needed
            refused = unusable(caller, project, needed - backend.store.blobs.missing(needed))
        if refused:
            raise MissingBlobsError(
                f"{len(refused)} blobs this version names were not uploaded to {project!r}; "
                "upload them, then commit",
                sorted(refused),
            )
        record, created = backend.commit_version(
            project=project,
            name=body.name,
            type=body.type,
            description=body.description,
            manifest=manifest,
            digest=body.digest,
            run_id=body.run_id,
            aliases=aliases,
        )
        return {"version": wire.dump(record), "created": created}

    @app.get("/api/v1/versions/{version_id}")
    def get_version(version_id: int, caller: Caller) -> dict[str, Any]:
        record = backend.version_by_id(version_id)
        caller.require(record.project, "reader", hidden=True)
        return wire.dump(record)

    @app.get("/api/v1/versions/{version_id}/lineage")
    def lineage(version_id: int, caller: Caller) -> dict[str, list[dict[str, Any]]]:
        caller.require(version_project(version_id), "reader", hidden=True)
        return {
            k: wire.dump([r for r in rs if caller.readable(r.project)])
            for k, rs in backend.lineage(version_id).items()
        }

    @app.get("/api/v1/versions/{version_id}/table")
    def table_row(version_id: int, caller: Caller) -> dict[str, Any] | None:
        caller.require(version_project(version_id), "reader", hidden=True)
        return wire.dump(backend.table_row(version_id))

    @app.get("/api/v1/tables")
    def table_versions(
        caller: Caller,
        kind: str | None = None,
        name: str | None = None,
        dataset_version_ids: Annotated[list[int] | None, Query()] = None,
    ) -> list[list[Any]]:
        if caller.anonymous and not settings.public_read:
            caller.require_user()
        found = backend.table_versions(kind, name, dataset_version_ids)
        return [
            [wire.dump(run), wire.dump(version), wire.dump(row)]
            for run, version, row in found
            if caller.readable(version.project)
        ]

    @app.post("/api/v1/samples/find")
    def find_samples(body: FindSamples, caller: Caller) -> dict[str, dict[str, Any]]:
        if caller.anonymous and not settings.public_read:
            caller.require_user()
        visible_projects = None if caller.is_admin or settings.public_read else set(caller.roles())
        by_digest, by_pixels = backend.catalog.find_samples(
            body.digests, body.pixels, visible_projects, body.prefer, body.project
        )

        def visible(found: dict[str, Any]) -> dict[str, Any]:
            return {
                k: wire.dump(v)
                for k, v in found.items()
                if caller.readable(backend.version_by_id(v.version_id).project)
            }

        return {"digests": visible(by_digest), "pixels": visible(by_pixels)}

    from tessera.ui import mount_ui

    mount_ui(app, backend, auth, settings.public_read)
    return app


def _too_large(limit: int, what: str = "blob") -> JSONResponse:
    option = " (--max-blob-size)" if what == "blob" else ""
    return JSONResponse(
        {
            "error": "BlobTooLargeError",
            "message": f"{what} larger than this server's limit of {limit:,} bytes{option}",
        },
        status_code=413,
    )


def _adopt(blobs: Any, digest: str, temp: Path) -> bool:
    """Move a received, verified temp file into the store; False if it was already there."""
    with blobs.batch() as batch:
        if batch.reuse(digest):
            return False
        batch.put_verified_file(temp, digest)
    return True


class _PackTooLarge(Exception):
    pass


def _until_none(body: queue.SimpleQueue[list[bytes] | BaseException | None]) -> Iterator[bytes]:
    """The chunks put in ``body`` (lists of them) until None; an exception put there is raised
    (the store then keeps nothing)."""
    while (chunks := body.get()) is not None:
        if isinstance(chunks, BaseException):
            raise chunks
        yield from chunks


def _hash_and_write(hasher: Any, fd: int, chunks: list[bytes]) -> None:
    for chunk in chunks:
        hasher.update(chunk)
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view) :]


class _CountRequests:
    """Counts requests. A plain ASGI wrapper: Starlette's ``BaseHTTPMiddleware`` (what
    ``@app.middleware`` makes) relays every request body through an extra task and queue,
    which cost more CPU than storing the blobs in it."""

    def __init__(self, app: Any, counters: Counters):
        self.app = app
        self.counters = counters

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.counters.add(requests=1)
        await self.app(scope, receive, send)
