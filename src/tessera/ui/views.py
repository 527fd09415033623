"""The web UI: server-rendered pages (Jinja2, autoescaped everywhere) with htmx for partial
updates and plain CSS. No Node build step: htmx is vendored in ``static/``.

``mount_ui(app, backend, auth, public_read)`` adds the pages to ``tessera server``'s app (same
tokens and project roles as the API: a login page turns a token into a signed session cookie);
``create_local_app(dir)`` serves a local store with no auth, for ``tessera ui`` (bound to
127.0.0.1 by the CLI). Pages only read; every query runs in DuckDB on the server and only the
visible page of rows travels (see ``data.py``).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2
from fastapi import APIRouter, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.background import BackgroundTask

from tessera.backend.local import LocalBackend
from tessera.errors import AuthError, NotFoundError, NotSignedInError, TesseraError
from tessera.media import ImageError
from tessera.store.catalog import AuthCatalog, VersionRecord
from tessera.store.hashing import is_digest
from tessera.ui import charts
from tessera.ui.access import COOKIE, MAX_AGE, Sessions, Viewer, load_secret
from tessera.ui.data import (
    DEFAULT_PAGE_SIZE,
    LRU,
    PAGE_SIZES,
    TableSource,
    UIData,
    ViewError,
    flatten,
)
from tessera.ui.filters import FilterError
from tessera.ui.thumbs import SIZES, Thumbnails

HERE = Path(__file__).parent
COMPARE_PAGE_SIZES = (24, 48, 96)
QUICK_VIEWS = {
    "all": "All samples",
    "disagreements": "Disagreements",
    "regressions": "Regressions",
    "improvements": "Improvements",
    "hard": "Hard samples",
    "suspect": "Suspect labels",
}
MAX_HEATMAP_CLASSES = 30
IMMUTABLE = "private, max-age=31536000, immutable"
MEDIA_AUTH_SECONDS = 2.0  # an image request may reuse a token check this recent
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


# -- the UI's state --------------------------------------------------------------------------


@dataclass
class UI:
    backend: LocalBackend
    data: UIData
    sessions: Sessions
    templates: Jinja2Templates
    thumbs: Thumbnails
    blob_projects: Callable[[str], set[str]]

    def viewer(self, request: Request) -> Viewer:
        return self.sessions.viewer(request)


def _ui(request: Request) -> UI:
    return request.app.state.ui


class NeedsLogin(Exception):
    pass


class UIRoute(APIRoute):
    """Routes whose errors become HTML pages (the API's handlers answer JSON)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        original = super().get_route_handler()

        async def handler(request: Request) -> Response:
            try:
                return await original(request)
            except NeedsLogin:
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                return RedirectResponse(
                    _root(request) + "/login?" + urllib.parse.urlencode({"next": target}),
                    status_code=303,
                )
            except NotSignedInError as e:
                return _error(request, 401, "Sign in needed", str(e))
            except AuthError as e:
                return _error(request, 403, "Not allowed", str(e))
            except (NotFoundError, FileNotFoundError) as e:
                return _error(request, 404, "Not found", str(e))
            except (ViewError, TesseraError, ValueError) as e:
                return _error(request, 400, "Cannot show this", str(e))

        return handler


def _root(request: Request) -> str:
    return str(request.scope.get("root_path", "")).rstrip("/")


def _error(request: Request, status: int, title: str, message: str) -> Response:
    ui = _ui(request)
    try:
        viewer = ui.viewer(request)
    except TesseraError:
        viewer = None
    return render(
        request, "error.html", {"title": title, "message": message, "viewer": viewer}, status
    )


def render(request: Request, name: str, context: dict[str, Any], status: int = 200) -> HTMLResponse:
    ui = _ui(request)
    started = request.scope.get("tessera_ui_started", time.perf_counter())
    context = {"root": _root(request), "viewer": None, "title": "Tessera", **context}
    response = ui.templates.TemplateResponse(request, name, context, status_code=status)
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Cache-Control"] = "private, no-cache"
    response.headers["Server-Timing"] = f"app;dur={(time.perf_counter() - started) * 1000:.1f}"
    return response


def page_viewer(request: Request) -> Viewer:
    """The viewer of a page: anonymous visitors of a server without --public-read sign in."""
    request.scope["tessera_ui_started"] = time.perf_counter()
    viewer = _ui(request).viewer(request)
    if (
        viewer.principal is not None
        and viewer.principal.anonymous
        and not viewer.principal.public_read
    ):
        raise NeedsLogin()
    return viewer


def require_project(viewer: Viewer, project: str, what: str | None = None) -> None:
    """Raise NotFound unless the viewer may read ``project``. ``what`` names the thing asked
    for when the project came from a record (a run, a version): the refusal must not reveal
    the name of a project the viewer cannot see."""
    if not viewer.readable(project):
        if what is not None:
            raise NotFoundError(f"no {what} (or you may not read it)")
        raise NotFoundError(f"no project {project!r} (or you are not a member of it)")


def is_partial(request: Request, target: str) -> bool:
    return (
        request.headers.get("hx-request") == "true"
        and request.headers.get("hx-history-restore-request") != "true"
        and request.headers.get("hx-target") == target
    )


# -- templates -------------------------------------------------------------------------------


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(HERE / "templates")),
        autoescape=True,  # everywhere, whatever the file name
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        bytes=human_bytes,
        when=when,
        duration=duration,
        num=number,
        json=lambda v: json.dumps(v, ensure_ascii=False, default=str),
        short=lambda s, n=12: s[:n] if isinstance(s, str) else s,
        truncate_text=truncate_text,
    )
    env.globals.update(
        url=url, page_base=page_base, class_name=class_name, cell=cell, heat=charts.heat
    )
    return env


def url(root: str, path: str, **params: Any) -> str:
    """``root + path`` with a query string of the non-empty params (lists repeat)."""
    query = []
    for key, value in params.items():
        if value is None or value == "" or value is False:
            continue
        if isinstance(value, list | tuple):
            query += [(key, str(v)) for v in value]
        else:
            query.append((key, "1" if value is True else str(value)))
    return root + path + ("?" + urllib.parse.urlencode(query) if query else "")


def page_base(root: str, path: str, page_param: str = "page", **params: Any) -> str:
    """A URL ending in ``page=`` (or another page parameter), for pagers."""
    params.pop(page_param, None)
    base = url(root, path, **params)
    return base + ("&" if "?" in base else "?") + page_param + "="


def human_bytes(n: float | None) -> str:
    if n is None:
        return "—"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def when(ts: float | None) -> str:
    if ts is None:
        return "—"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds:
        return "—"
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {sec:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:
            return "—"
        if math.isinf(value):
            return "∞" if value > 0 else "-∞"
        if value == 0:
            return "0"
        if abs(value) >= 1e6 or abs(value) < 1e-3:
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}g}"
    return str(value)


def truncate_text(value: Any, limit: int = 200) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def class_name(classes: list[str] | None, value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "—"
    if classes and isinstance(value, int | float) and 0 <= int(value) < len(classes):
        return classes[int(value)]
    return str(value)


def cell(value: Any) -> str:
    """A table cell as text (the template escapes it)."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return number(value)
    if isinstance(value, list | tuple):
        shown = ", ".join(cell(v) for v in list(value)[:6])
        return f"[{shown}{', …' if len(value) > 6 else ''}] ({len(value)})"
    if isinstance(value, dict):
        return truncate_text(value, 160)
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    return truncate_text(str(value), 200)


# -- mounting --------------------------------------------------------------------------------


def mount_ui(
    app: FastAPI,
    backend: LocalBackend,
    auth: AuthCatalog | None,
    public_read: bool = False,
) -> None:
    """Add the web UI to ``app``. With ``auth`` (``tessera server``) pages need a session or a
    token as the API does; without it (``tessera ui``) every project of the store is shown."""
    root = backend.local_root()
    assert root is not None
    secret = load_secret(root) if auth is not None else None
    blob_cache: LRU[str, tuple[float, set[str]]] = LRU(50_000)

    def blob_projects(digest: str) -> set[str]:
        found = blob_cache.get(digest)
        now = time.monotonic()
        if found is not None and now - found[0] < 60:
            return found[1]
        if auth is not None:
            projects = auth.blob_projects(digest)
        else:
            projects = AuthCatalog(backend.catalog).blob_projects(digest)
        blob_cache.put(digest, (now, projects))
        return projects

    data = UIData(backend)
    app.state.ui = UI(
        backend=backend,
        data=data,
        sessions=Sessions(auth, public_read, secret),
        templates=Jinja2Templates(env=_environment()),
        thumbs=Thumbnails(root),
        blob_projects=blob_projects,
    )
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="tessera-ui-static")
    app.include_router(router)
    app.router.add_event_handler("shutdown", data.close)


def create_local_app(dir: str | os.PathLike[str]) -> FastAPI:
    """The UI alone over a local store, no auth: what ``tessera ui`` serves."""
    backend = LocalBackend.open(dir)
    app = FastAPI(title="Tessera", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.backend = backend
    mount_ui(app, backend, auth=None)
    app.router.add_event_handler("shutdown", backend.close)
    return app


def serve_local(dir: str | os.PathLike[str], port: int = 8090) -> None:
    """Serve ``create_local_app(dir)`` on 127.0.0.1 only, until interrupted."""
    import uvicorn

    uvicorn.run(create_local_app(dir), host="127.0.0.1", port=port, log_level="warning")


router = APIRouter(route_class=UIRoute, include_in_schema=False)


# -- sign in ---------------------------------------------------------------------------------


def _same_origin(request: Request) -> bool:
    """A form POST from another site is refused (the session cookie is SameSite=Lax, which
    already keeps it out of cross-site POSTs; this also covers sign-in and sign-out)."""
    origin = request.headers.get("origin")
    if not origin or origin == "null":
        return origin is None
    hosts = {request.headers.get("host"), request.headers.get("x-forwarded-host")}
    return urllib.parse.urlsplit(origin).netloc in hosts - {None}


def _safe_next(target: str | None) -> str:
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, next: str | None = None) -> Response:
    ui = _ui(request)
    if not ui.sessions.enabled:
        return RedirectResponse(_root(request) + "/", status_code=303)
    return render(request, "login.html", {"next": _safe_next(next), "error": None})


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request) -> Response:
    ui = _ui(request)
    if not ui.sessions.enabled:
        return RedirectResponse(_root(request) + "/", status_code=303)
    if not _same_origin(request):
        return _error(request, 403, "Not allowed", "sign in from this server's own page")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > 8192:
            return _error(request, 413, "Too large", "the sign-in form is too large")
    form = urllib.parse.parse_qs(body.decode("utf-8", "replace"))
    token = (form.get("token") or [""])[0].strip()
    target = _safe_next((form.get("next") or ["/"])[0])
    cookie = await run_in_threadpool(ui.sessions.cookie_for, token) if token else None
    if cookie is None:
        return render(
            request,
            "login.html",
            {"next": target, "error": "That token is unknown or revoked."},
            status=401,
        )
    response = RedirectResponse(_root(request) + target, status_code=303)
    response.set_cookie(
        COOKIE,
        cookie,
        max_age=MAX_AGE,
        httponly=True,
        samesite="lax",
        secure=request.url.scheme == "https",
        path=(_root(request) or "/"),
    )
    return response


@router.post("/logout")
def logout(request: Request) -> Response:
    if not _same_origin(request):
        return _error(request, 403, "Not allowed", "sign out from this server's own page")
    response = RedirectResponse(_root(request) + "/login", status_code=303)
    response.delete_cookie(COOKIE, path=(_root(request) or "/"), httponly=True, samesite="lax")
    return response


# -- projects --------------------------------------------------------------------------------


@router.get("/", response_class=HTMLResponse)
def projects_page(request: Request) -> Response:
    viewer = page_viewer(request)
    ui = _ui(request)
    ui.data.mark_stale_runs()
    rows = []
    for project in ui.backend.projects():
        if viewer.readable(project.name):
            rows.append({"project": project, "summary": ui.data.project_summary(project.name)})
    return render(request, "projects.html", {"viewer": viewer, "rows": rows, "title": "Projects"})


# -- one project -----------------------------------------------------------------------------


@router.get("/projects/{project}", response_class=HTMLResponse)
def project_page(
    request: Request,
    project: str,
    sort: str | None = None,
    desc: bool = False,
    page: int = 1,
) -> Response:
    viewer = page_viewer(request)
    require_project(viewer, project)
    ui = _ui(request)
    ui.backend.catalog.project_id_or_raise(project)
    ui.data.mark_stale_runs()
    runs = ui.backend.runs(project)
    counts: dict[str, int] = {}
    for run in runs:
        for where, values in (("config", run.config), ("summary", run.summary)):
            for key in flatten(values):
                counts[f"{where}.{key}"] = counts.get(f"{where}.{key}", 0) + 1
    available = sorted(counts, key=lambda k: (not k.startswith("summary."), k))[:300]
    chosen = request.query_params.getlist("cols")
    if chosen:
        keys = [k for k in chosen if k in counts][:20]
    else:
        summary_keys = [k for k in available if k.startswith("summary.")][:4]
        config_keys = [k for k in available if k.startswith("config.")][:3]
        keys = config_keys + summary_keys
    if sort is not None and sort not in (*keys, "name", "status", "started", "duration"):
        raise ViewError(f"cannot sort the runs by {sort!r}")
    size = 50
    page = max(1, page)
    run_rows, total = ui.data.runs_page(runs, keys, sort, desc, page, size)
    artifacts = []
    for artifact in ui.backend.artifacts(project):
        versions = ui.backend.versions(project, artifact.name)
        artifacts.append({"artifact": artifact, "versions": list(reversed(versions))[:50]})
    groups: dict[str, list[dict[str, Any]]] = {}
    for item in artifacts:
        groups.setdefault(item["artifact"].type, []).append(item)
    order = ["dataset", "predictions", "table"]
    grouped = sorted(
        groups.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else 9, kv[0])
    )
    return render(
        request,
        "project.html",
        {
            "viewer": viewer,
            "title": project,
            "project": project,
            "role": viewer.role(project),
            "runs": run_rows,
            "total": total,
            "page": page,
            "pages": max(1, -(-total // size)),
            "keys": keys,
            "available": available,
            "sort": sort,
            "desc": desc,
            "groups": grouped,
        },
    )


# -- one run ---------------------------------------------------------------------------------


@router.get("/runs/{run_id}", response_class=HTMLResponse)
def run_page(request: Request, run_id: str) -> Response:
    viewer = page_viewer(request)
    ui = _ui(request)
    ui.data.mark_stale_runs()
    run = ui.backend.run(run_id)
    require_project(viewer, run.project, f"run {run_id!r}")
    with ui.data.cursor() as cur:
        reduced = charts.reduce_history(cur, ui.backend.metric_history(run.id))
    metric_charts = [
        {"key": key, "chart": charts.line_chart(points)} for key, points in sorted(reduced.items())
    ]
    io = ui.backend.run_versions(run.id)
    tables = ui.backend.run_tables(run.id)
    return render(
        request,
        "run.html",
        {
            "viewer": viewer,
            "title": f"{run.name} · {run.project}",
            "run": run,
            "config": sorted(flatten(run.config).items()),
            "summary": sorted(flatten(run.summary).items()),
            "charts": metric_charts,
            "used": [v for v in io.get("used", []) if viewer.readable(v.project)],
            "logged": [v for v in io.get("logged", []) if viewer.readable(v.project)],
            "tables": [(v, row) for v, row in tables if viewer.readable(v.project)],
            "duration": (run.ended_at or time.time()) - run.started_at,
        },
    )


# -- one version -----------------------------------------------------------------------------


def _version(request: Request, viewer: Viewer, version_id: int) -> VersionRecord:
    record = _ui(request).backend.version_by_id(version_id)
    require_project(viewer, record.project, f"version {version_id}")
    return record


@router.get("/versions/{version_id}", response_class=HTMLResponse)
def version_page(
    request: Request,
    version_id: int,
    fpage: int = 1,
    change: str = "changed",
    dpage: int = 1,
) -> Response:
    viewer = page_viewer(request)
    ui = _ui(request)
    record = _version(request, viewer, version_id)
    info = ui.data.info(version_id)
    lineage = ui.backend.lineage(version_id)
    versions = ui.backend.versions(record.project, record.artifact)
    previous = next((v for v in versions if v.number == record.number - 1), None)
    diff = None
    diff_rows: list[dict[str, Any]] = []
    if change not in ("added", "removed", "changed"):
        raise ViewError("change must be added, removed or changed")
    if previous is not None:
        diff = ui.data.diff(previous.id, record.id)
        diff_rows = ui.data.diff_page(diff, change, max(1, dpage), 20)
        for d in diff_rows:
            for side in ("old", "new"):
                value = d[f"{side}_value"]
                if value is None:
                    d[f"{side}_text"] = None
                elif diff["by"] == "path":
                    d[f"{side}_text"] = human_bytes(int(value))
                else:
                    d[f"{side}_text"] = class_name(diff["classes"], int(value))
    file_size = 25
    file_count = info.files.num_rows
    fpage = min(max(1, fpage), max(1, -(-file_count // file_size)))
    files = ui.data.files_page(info, fpage, file_size)
    table_context = None
    if record.type in ("dataset", "table", "predictions") and info.parquet:
        table_context = _table_context(request, viewer, record, {"size": 20})
    return render(
        request,
        "version.html",
        {
            "viewer": viewer,
            "title": record.spec,
            "v": record,
            "info": info,
            "lineage": {
                k: [r for r in rs if viewer.readable(r.project)] for k, rs in lineage.items()
            },
            "versions": versions,
            "previous": previous,
            "diff": diff,
            "diff_rows": diff_rows,
            "change": change,
            "dpage": max(1, dpage),
            "files": files,
            "fpage": fpage,
            "fpages": max(1, -(-file_count // file_size)),
            "file_count": file_count,
            "table": table_context,
            "compare_ok": record.type == "dataset",
        },
    )


# -- the table viewer ------------------------------------------------------------------------


def _table_params(request: Request) -> dict[str, Any]:
    q = request.query_params
    try:
        page = int(q.get("page") or 1)
        size = int(q.get("size") or DEFAULT_PAGE_SIZE)
    except ValueError:
        raise ViewError("page and size must be whole numbers") from None
    if size not in PAGE_SIZES:
        size = DEFAULT_PAGE_SIZE
    return {
        "q": q.get("q") or "",
        "sort": q.get("sort") or None,
        "desc": q.get("desc") in ("1", "true", "on"),
        "page": max(1, page),
        "size": size,
        "cols": q.getlist("cols"),
    }


def _table_context(
    request: Request, viewer: Viewer, record: VersionRecord, params: dict[str, Any]
) -> dict[str, Any]:
    ui = _ui(request)
    params = {"q": "", "sort": None, "desc": False, "page": 1, "size": DEFAULT_PAGE_SIZE,
              "cols": [], **params}  # fmt: skip
    with ui.data.source(record.id) as src:
        columns = ui.data.choose_columns(src, params["cols"])
        error = None
        compiled = None
        try:
            compiled = ui.data.compile(src, params["q"])
        except FilterError as e:
            error = e
        if params["sort"] is not None and not src.sortable(params["sort"]):
            raise ViewError(f"cannot sort by {params['sort']!r}: no such column")
        if error is None:
            page = ui.data.page(
                src,
                columns,
                compiled,
                params["sort"],
                params["desc"],
                params["page"],
                params["size"],
            )
        else:
            page = None
        dataset_id = (
            src.version.id if src.kind == "dataset" else src.dataset.id if src.dataset else None
        )
        return {
            "v": record,
            "src": _source_view(src),
            "page": page,
            "columns": columns,
            "error": _error_view(params["q"], error),
            "params": params,
            "dataset_id": dataset_id,
            "custom_cols": bool(params["cols"]),
            "examples": _examples(src),
        }


def _examples(src: TableSource) -> list[str]:
    """Filter examples that fit this table."""
    first = json.dumps(src.classes[0], ensure_ascii=False) if src.classes else None
    out = []
    if src.kind == "predictions":
        if first and "label" in src.types:
            out.append(f"label = {first} and pred != label")
        if "score" in src.types:
            out.append("score < 0.5")
        if "correct" in src.types:
            out.append("not correct")
    elif src.kind == "dataset" and first:
        out.append(f"label = {first}")
    numeric = [c for c, k in src.schema.columns.items() if k == "number" and c not in ("score",)]
    if numeric and len(out) < 3:
        out.append(f"{numeric[0]} >= 1")
    if "id" in src.types:
        out.append('id in ("a", "b")')
    return out[:4]


@dataclass
class SourceView:
    """What templates need of a TableSource (it is unpinned once the page is built)."""

    kind: str
    columns: list[str]
    types: dict[str, str]
    classes: list[str] | None
    class_columns: set[str]
    image_columns: set[str]
    num_rows: int
    dataset: VersionRecord | None
    filterable: list[str]


def _source_view(src: TableSource) -> SourceView:
    return SourceView(
        kind=src.kind,
        columns=src.columns,
        types=src.types,
        classes=src.classes,
        class_columns=src.class_columns,
        image_columns=set(src.image_columns),
        num_rows=src.num_rows,
        dataset=src.dataset,
        filterable=[c for c, k in src.schema.columns.items() if k != "other"],
    )


def _error_view(text: str, error: FilterError | None) -> dict[str, Any] | None:
    if error is None:
        return None
    start = min(error.position, len(text))
    end = min(len(text), start + error.length)
    return {
        "message": error.message,
        "position": error.position + 1,
        "before": text[:start],
        "at": text[start:end] or " ",
        "after": text[end:],
    }


@router.get("/versions/{version_id}/rows", response_class=HTMLResponse)
def table_page(request: Request, version_id: int) -> Response:
    viewer = page_viewer(request)
    record = _version(request, viewer, version_id)
    context = _table_context(request, viewer, record, _table_params(request))
    if is_partial(request, "table-view"):
        return render(request, "_table.html", {"viewer": viewer, "t": context})
    return render(
        request,
        "table.html",
        {"viewer": viewer, "title": f"{record.spec} rows", "v": record, "t": context},
    )


@router.get("/versions/{version_id}/export.{fmt}")
def export_rows(request: Request, version_id: int, fmt: str) -> Response:
    viewer = page_viewer(request)
    if fmt not in ("csv", "parquet"):
        raise NotFoundError("export as .csv or .parquet")
    ui = _ui(request)
    record = _version(request, viewer, version_id)
    params = _table_params(request)
    fd, name = tempfile.mkstemp(prefix="tessera-export-", suffix=f".{fmt}")
    os.close(fd)
    target = Path(name)
    try:
        with ui.data.source(record.id) as src:
            columns = ui.data.choose_columns(src, params["cols"])
            if not params["cols"]:
                columns = [c for c in src.columns if c != "pixels"]
            compiled = ui.data.compile(src, params["q"])
            ui.data.export(src, columns, compiled, params["sort"], params["desc"], fmt, target)
    except FilterError as e:
        target.unlink(missing_ok=True)
        raise ViewError(f"filter: {e}") from None
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    filename = f"{record.project}-{record.artifact}-v{record.number}.{fmt}"
    return FileResponse(
        target,
        media_type="text/csv" if fmt == "csv" else "application/vnd.apache.parquet",
        filename=filename,
        background=BackgroundTask(target.unlink, missing_ok=True),
        headers={"Cache-Control": "private, no-store", "X-Content-Type-Options": "nosniff"},
    )


# -- compare ---------------------------------------------------------------------------------


def _compare_setup(request: Request, viewer: Viewer) -> dict[str, Any]:
    """Parse the compare page's parameters: dataset version, runs, base, new, view, cell."""
    ui = _ui(request)
    q = request.query_params
    try:
        dataset_id = int(q["dataset"]) if q.get("dataset") else None
        page = max(1, int(q.get("page") or 1))
        size = int(q.get("size") or 48)
    except ValueError:
        raise ViewError("dataset, page and size must be whole numbers") from None
    size = size if size in COMPARE_PAGE_SIZES else 48
    if dataset_id is None:
        return {"dataset": None}
    dataset = _version(request, viewer, dataset_id)
    if dataset.type != "dataset":
        raise ViewError(f"{dataset.spec} is not a dataset")
    tables = ui.data.prediction_tables(dataset.id, viewer.readable)
    if not tables:
        raise NotFoundError(f"no run logged predictions on {dataset.spec}")
    wanted = q.getlist("runs")
    if wanted:
        chosen = [item for item in tables if item[0].id in set(wanted)]
        if not chosen:
            raise NotFoundError("none of the chosen runs logged predictions on this dataset")
    else:
        chosen = tables
    entry = ui.data.comparison(dataset, chosen)
    runs = entry.comparison.runs
    ids = [r.id for r in runs]
    base = q.get("base") if q.get("base") in ids else ids[0]
    default_new = ids[-1] if ids[-1] != base else ids[0]
    new = q.get("new") if q.get("new") in ids else default_new
    view = q.get("view") or "all"
    if view not in QUICK_VIEWS:
        raise ViewError(f"unknown view {view!r}")
    cell_param = q.get("cell")
    cell_value = None
    if cell_param:
        try:
            r, tc, pc = (int(x) for x in cell_param.split("."))
        except ValueError:
            raise ViewError("cell must be run.true.pred indices") from None
        classes = entry.comparison.classes or []
        if not (0 <= r < len(runs)) or (
            classes and not (0 <= tc < len(classes) and 0 <= pc < len(classes))
        ):
            raise ViewError("no such confusion cell")
        cell_value = (r, tc, pc)
    return {
        "dataset": dataset,
        "tables": tables,
        "chosen": [item[0].id for item in chosen],
        "entry": entry,
        "runs": runs,
        "base": base,
        "new": new,
        "base_index": entry.run_index(base),
        "new_index": entry.run_index(new),
        "view": view,
        "cell": cell_value,
        "page": page,
        "size": size,
    }


def _compare_state(setup: dict[str, Any]) -> dict[str, Any]:
    """The query parameters that describe the compare page (for links and forms)."""
    return {
        "dataset": setup["dataset"].id,
        "runs": setup["chosen"] if len(setup["chosen"]) != len(setup["tables"]) else None,
        "base": setup["base"],
        "new": setup["new"],
    }


def _compare_samples(request: Request, setup: dict[str, Any]) -> dict[str, Any]:
    ui = _ui(request)
    entry = setup["entry"]
    c = entry.comparison
    classes = c.classes
    if setup["cell"] is not None:
        r, tc, pc = setup["cell"]
        ids = ui.data.cell_ids(entry, r, tc, pc)
        heading = f"{c.runs[r].label}: true {class_name(classes, tc)}, predicted {class_name(classes, pc)}"
    size = setup["size"]
    if setup["cell"] is None:
        heading = QUICK_VIEWS[setup["view"]]
        if setup["view"] in ("regressions", "improvements"):
            heading += f": {c.runs[setup['base_index']].label} → {c.runs[setup['new_index']].label}"
        total, page, page_ids = ui.data.compare_page(
            entry, setup["view"], setup["base_index"], setup["new_index"], setup["page"], size
        )
        pages = max(1, -(-total // size))
    else:
        total = len(ids)
        pages = max(1, -(-total // size))
        page = min(setup["page"], pages)
        page_ids = ids[(page - 1) * size : page * size]
    rows = ui.data.compare_rows(entry, page_ids)
    images = ui.data.images_of(setup["dataset"].id, page_ids)
    tiles = []
    for row in rows:
        preds = []
        for run in c.runs:
            pred, correct = row["preds"].get(run.index, (None, None))
            preds.append(
                {
                    "run": run.label,
                    "pred": "—" if pred is None else class_name(classes, pred),
                    "correct": None if correct is None else bool(correct),
                }
            )
        tiles.append(
            {
                "id": row["id"],
                "label": class_name(classes, row["label"]),
                "image": images.get(row["id"]),
                "preds": preds,
            }
        )
    state = _compare_state(setup)
    return {
        "heading": heading,
        "total": total,
        "tiles": tiles,
        "page": page,
        "pages": pages,
        "size": size,
        "view": setup["view"] if setup["cell"] is None else None,
        "cell": ".".join(map(str, setup["cell"])) if setup["cell"] else None,
        "state": state,
        "views": QUICK_VIEWS,
        "dataset": setup["dataset"],
    }


@router.get("/compare", response_class=HTMLResponse)
def compare_page(request: Request) -> Response:
    viewer = page_viewer(request)
    ui = _ui(request)
    setup = _compare_setup(request, viewer)
    if setup["dataset"] is None:
        choices = _dataset_choices(ui, viewer)
        return render(
            request,
            "compare_choose.html",
            {"viewer": viewer, "title": "Compare", "choices": choices},
        )
    entry = setup["entry"]
    c = entry.comparison
    view = _compare_view(ui, entry, setup["base_index"])
    samples = _compare_samples(request, setup)
    return render(
        request,
        "compare.html",
        {
            "viewer": viewer,
            "title": f"Compare on {setup['dataset'].spec}",
            "s": setup,
            "c": c,
            **view,
            "samples": samples,
            "state": _compare_state(setup),
            "built": entry.built_seconds,
        },
    )


def _compare_view(ui: UI, entry: Any, base: int) -> dict[str, Any]:
    """What the compare page shows above the grid, derived once per (comparison, base) from
    the cached summary: metric rows, the per-class chart and the heat maps' cells."""
    key = ("view", base)
    found = entry.lists.get(key)
    if found is not None:
        return found
    c = entry.comparison
    summary = ui.data.compare_summary(entry, base)
    classes = c.classes or [str(i) for i in range(summary["confusions"][0].shape[0])]
    frame = summary["metrics"]
    metric_names = [
        m
        for m in ("n", "accuracy", "macro_f1", "top5_accuracy", "log_loss", "ece")
        if m in frame.columns
    ]
    records = frame.to_dict("index")
    metrics = [
        {"run": run, "m": records[run.label], "test": summary["mcnemar"].get(run.index)}
        for run in c.runs
    ]
    f1 = summary["per_class"]["f1"].to_dict()
    bar = charts.bar_chart(
        classes, [r.label for r in c.runs], [[f1[(r.label, k)] for k in classes] for r in c.runs]
    )
    heatmaps = []
    if len(classes) <= MAX_HEATMAP_CLASSES:
        for run, confusion in zip(c.runs, summary["confusions"], strict=True):
            matrix = confusion.to_numpy()
            rows = []
            for t, counts in enumerate(matrix.tolist()):
                total = sum(counts)
                rows.append(
                    [
                        (
                            f"{run.index}.{t}.{p}",
                            f"heat-{charts.heat(n, total)}{' diag' if t == p else ''}",
                            n,
                        )
                        for p, n in enumerate(counts)
                    ]
                )
            heatmaps.append({"run": run, "rows": rows})
    found = {
        "classes": classes,
        "metrics": metrics,
        "metric_names": metric_names,
        "bar": bar,
        "heatmaps": heatmaps,
    }
    entry.lists.put(key, found)
    return found


@router.get("/compare/samples", response_class=HTMLResponse)
def compare_samples(request: Request) -> Response:
    viewer = page_viewer(request)
    setup = _compare_setup(request, viewer)
    if setup["dataset"] is None:
        raise ViewError("choose a dataset version")
    samples = _compare_samples(request, setup)
    response = render(request, "_compare_samples.html", {"viewer": viewer, "samples": samples})
    state = samples["state"]
    response.headers["HX-Push-Url"] = url(
        _root(request), "/compare", **state, view=samples["view"], cell=samples["cell"],
        page=samples["page"] if samples["page"] > 1 else None,
    )  # fmt: skip
    return response


def _dataset_choices(ui: UI, viewer: Viewer) -> list[dict[str, Any]]:
    counts: dict[int, set[str]] = {}
    for run, version, row in ui.backend.table_versions(kind="predictions", name="predictions"):
        if run is None or row.dataset_version_id is None or not viewer.readable(version.project):
            continue
        counts.setdefault(row.dataset_version_id, set()).add(run.id)
    out = []
    for version_id, runs in sorted(counts.items()):
        record = ui.backend.version_by_id(version_id)
        if viewer.readable(record.project):
            out.append({"version": record, "runs": len(runs)})
    return out


# -- one sample ------------------------------------------------------------------------------


@router.get("/sample", response_class=HTMLResponse)
def sample_page(request: Request, v: int, id: str) -> Response:
    viewer = page_viewer(request)
    ui = _ui(request)
    record = _version(request, viewer, v)
    if record.type != "dataset":
        raise ViewError(f"{record.spec} is not a dataset")
    row = ui.data.sample_row(record.id, id)
    if row is None:
        raise NotFoundError(f"no sample {id!r} in {record.spec}")
    info = ui.data.info(record.id)
    versions = ui.backend.versions(record.project, record.artifact)
    across = ui.data.sample_across_versions(versions, id)
    history = []
    for candidate in [record, *[x for x in reversed(versions) if x.id != record.id]]:
        tables = ui.data.prediction_tables(candidate.id, viewer.readable)
        if not tables:
            continue
        entry = ui.data.comparison(candidate, tables)
        with entry.lock:
            frame = entry.comparison.history(id)
        projects: dict[str, str] = {}
        for item in frame.to_dict("records"):
            run_id = item.get("run_id")
            if run_id and run_id not in projects:
                projects[run_id] = ui.backend.run(run_id).project
            if run_id and not viewer.readable(projects[run_id]):
                continue
            scores = item.get("scores")
            item["top_score"] = max(scores) if scores else None
            started = item.get("started_at")
            item["started_at"] = when(started.timestamp()) if hasattr(started, "timestamp") else "—"
            item["config"] = json.loads(item["config"]) if item.get("config") else {}
            history.append(item)
        break
    columns = [(k, val) for k, val in row.items() if k not in ("id", "image", "label", "pixels")]
    return render(
        request,
        "sample.html",
        {
            "viewer": viewer,
            "title": f"{id} · {record.spec}",
            "v": record,
            "sid": id,
            "row": row,
            "classes": info.classes,
            "columns": columns,
            "across": across,
            "history": history,
        },
    )


# -- images ----------------------------------------------------------------------------------


def _media_access(request: Request, digest: str) -> UI:
    ui = _ui(request)
    if not is_digest(digest):
        raise NotFoundError("no such image")
    viewer = ui.sessions.viewer(request, cache_seconds=MEDIA_AUTH_SECONDS)
    if not any(viewer.readable(p) for p in ui.blob_projects(digest)):
        raise NotFoundError("no such image in a project you may read")
    return ui


def _not_modified(request: Request, etag: str) -> Response | None:
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers={"ETag": etag, "Cache-Control": IMMUTABLE})
    return None


@router.get("/media/thumb/{size}/{digest}")
async def thumbnail(request: Request, size: int, digest: str) -> Response:
    """A cached thumbnail. The fast path (permission check, then one small file read) runs on
    the event loop: it costs less than a hop to the thread pool; making a missing thumbnail
    goes to the pool."""
    if size not in SIZES:
        raise NotFoundError(f"thumbnail sizes: {', '.join(map(str, SIZES))}")
    ui = _media_access(request, digest)
    etag = f'"{digest}-{size}"'
    cached = _not_modified(request, etag)
    if cached is not None:
        return cached
    path = ui.thumbs.path(digest, size)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        data = await run_in_threadpool(_make_thumbnail, ui, digest, size)
    return Response(
        data,
        media_type="image/webp",
        headers={"ETag": etag, "Cache-Control": IMMUTABLE, "X-Content-Type-Options": "nosniff"},
    )


def _blob_source(ui: UI, digest: str) -> Path | bytes:
    """The blob's local file, or its bytes where the store keeps none locally (S3)."""
    path = ui.backend.blob_path(digest)
    if path is not None:
        return path
    with ui.backend.open_blob(digest) as f:
        return f.read()


def _make_thumbnail(ui: UI, digest: str, size: int) -> bytes:
    source = _blob_source(ui, digest)
    try:
        return ui.thumbs.thumbnail(digest, size, source).read_bytes()
    except ImageError as e:
        raise NotFoundError(f"not an image: {e}") from None


@router.get("/media/image/{digest}")
def full_image(request: Request, digest: str) -> Response:
    ui = _media_access(request, digest)
    etag = f'"{digest}"'
    cached = _not_modified(request, etag)
    if cached is not None:
        return cached
    try:
        image, media_type = ui.thumbs.browser_image(digest, _blob_source(ui, digest))
    except ImageError as e:
        raise NotFoundError(f"not an image: {e}") from None
    headers = {
        "ETag": etag,
        "Cache-Control": IMMUTABLE,
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "default-src 'none'",
    }
    if isinstance(image, bytes):
        return Response(image, media_type=media_type, headers=headers)
    return FileResponse(image, media_type=media_type, headers=headers)
