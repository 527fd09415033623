"""The ``tessera`` command line."""

from __future__ import annotations

import re
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from tessera.backend.local import LocalBackend
from tessera.errors import TesseraError
from tessera.names import check_name, parse_version_spec

app = typer.Typer(
    name="tessera",
    help="Version image datasets and log model predictions on them by reference.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console()
err = Console(stderr=True)

DirOption = Annotated[
    Path | None,
    typer.Option(
        "--dir",
        envvar="TESSERA_DIR",
        help="The store folder (default: ./.tessera, or $TESSERA_DIR).",
        show_default=False,
    ),
]


def _open(dir: Path | None) -> LocalBackend:
    backend = LocalBackend.open(dir)
    for run in backend.mark_stale_runs():
        err.print(
            f"[yellow]run {run.project}/{run.name} ({run.id}) ended without finishing: "
            "marked crashed[/yellow]"
        )
    return backend


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def parse_duration(text: str) -> float:
    """``90``, ``45s``, ``30m``, ``1h``, ``2d`` → seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match:
        raise typer.BadParameter(f"{text!r} is not a duration; write e.g. 90s, 30m, 1h or 2d")
    number, unit = match.groups()
    return float(number) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[unit]


@app.command("ls")
def list_command(
    project: Annotated[
        str | None, typer.Argument(help="Show this project's runs and artifacts.")
    ] = None,
    dir: DirOption = None,
) -> None:
    """List projects, or one project's runs and artifacts."""
    backend = _open(dir)
    try:
        if project is None:
            table = Table("project", "runs", "artifacts", "created", title="Projects")
            for p in backend.projects():
                table.add_row(p.name, str(p.run_count), str(p.artifact_count), _when(p.created_at))
            out.print(table)
            return
        check_name(project, "project")
        backend.catalog.project_id_or_raise(project)
        runs = Table("run", "id", "status", "started", "summary", title=f"Runs in {project}")
        for r in backend.runs(project):
            summary = ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in list(r.summary.items())[:4]
            )
            runs.add_row(r.name, r.id, r.status, _when(r.started_at), summary)
        out.print(runs)
        arts = Table(
            "artifact", "type", "versions", "latest", "size", title=f"Artifacts in {project}"
        )
        for a in backend.artifacts(project):
            versions = backend.versions(project, a.name)
            latest = versions[-1] if versions else None
            arts.add_row(
                a.name,
                a.type,
                str(len(versions)),
                latest.version if latest else "-",
                human_bytes(latest.size) if latest else "-",
            )
        out.print(arts)
    finally:
        backend.close()


@app.command()
def show(
    spec: Annotated[
        str,
        typer.Argument(help="project/name:version, e.g. mnist/weights:v2 or mnist/weights:latest"),
    ],
    project: Annotated[str | None, typer.Option(help="Project, if SPEC does not name one.")] = None,
    dir: DirOption = None,
) -> None:
    """Show one artifact version: its files, aliases and lineage."""
    backend = _open(dir)
    try:
        record = backend.resolve(parse_version_spec(spec), project)
        manifest = backend.read_manifest(record.digest)
        out.print(
            f"[bold]{record.spec}[/bold]  type={record.type}  "
            f"aliases={', '.join(record.aliases) or '-'}"
        )
        out.print(f"digest {record.digest}")
        out.print(
            f"{record.file_count} files, {human_bytes(record.size)}, created {_when(record.created_at)}"
        )
        if record.description:
            out.print(record.description)
        lineage = backend.lineage(record.id)
        for direction, label in (("logged", "logged by"), ("used", "used by")):
            names = ", ".join(f"{r.name} ({r.id})" for r in lineage[direction]) or "-"
            out.print(f"{label}: {names}")
        table = Table("path", "size", "digest", "reference")
        for entry in manifest.files.values():
            table.add_row(entry.path, human_bytes(entry.size), entry.digest[:16], entry.ref or "")
        out.print(table)
    finally:
        backend.close()


@app.command("verify")
def verify_command(
    contents: Annotated[
        bool,
        typer.Option("--contents/--no-contents", help="Re-hash every blob (slow on big stores)."),
    ] = True,
    dir: DirOption = None,
) -> None:
    """Check the store: every version has its manifest, every manifest's blobs exist, every blob
    matches its digest. Exits 1 and lists the problems if any."""
    from tessera.store.maintenance import verify

    backend = _open(dir)
    try:
        report = verify(backend.store, check_blob_contents=contents)
    finally:
        backend.close()
    summary = (
        f"{report.versions} versions, {report.blobs} blobs ({human_bytes(report.bytes)}), "
        f"{report.references} references"
    )
    if report.ok:
        out.print(f"[green]ok[/green]: {summary}")
        return
    for problem in report.problems:
        out.print(f"[red]problem[/red]: {problem}", highlight=False)
    out.print(f"{len(report.problems)} problems in {summary}")
    raise typer.Exit(1)


@app.command("gc")
def gc_command(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Report what would be deleted; delete nothing.")
    ] = False,
    grace: Annotated[
        str, typer.Option(help="Keep unreferenced blobs younger than this (e.g. 30m, 1h, 2d).")
    ] = "1h",
    dir: DirOption = None,
) -> None:
    """Delete blobs that no version references and that are older than the grace period."""
    from tessera.store.maintenance import gc

    seconds = parse_duration(grace)
    backend = _open(dir)
    try:
        report = gc(backend.store, seconds, dry_run=dry_run)
    finally:
        backend.close()
    verb = "would delete" if dry_run else "deleted"
    out.print(
        f"{verb} {report.deleted_blobs} blobs ({human_bytes(report.deleted_bytes)}) and "
        f"{report.deleted_temp_files} temporary files; kept {report.kept_blobs} referenced blobs"
        + (
            f" and {report.young_garbage} unreferenced ones younger than {grace}"
            if report.young_garbage
            else ""
        )
        + (
            f"; kept {report.packed_garbage} more unreferenced blobs (in pack files that still "
            "hold referenced ones, or reused while gc ran)"
            if report.packed_garbage
            else ""
        )
    )


def _frame_table(
    frame: Any, title: str | None = None, index: bool = True, limit: int = 50
) -> Table:
    table = Table(title=title)
    names = ([str(frame.index.name or "")] if index else []) + [str(c) for c in frame.columns]
    for name in names:
        table.add_column(name)
    for row in frame.head(limit).itertuples(index=index, name=None):
        table.add_row(*[_cell(v) for v in row])
    return table


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "-" if value != value else f"{value:.4f}"
    return str(value)


@app.command("compare")
def compare_command(
    dataset: Annotated[
        str,
        typer.Argument(
            help="name:v0, name:latest, or name (every version); project/name to be explicit."
        ),
    ],
    runs: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated run names or ids (default: every run with predictions)."
        ),
    ] = None,
    base: Annotated[
        str | None,
        typer.Option(help="Base run for McNemar and regressions (default: the first run)."),
    ] = None,
    new: Annotated[str | None, typer.Option(help="New run (default: the last run).")] = None,
    predictions: Annotated[
        str, typer.Option(help="Name of the predictions tables.")
    ] = "predictions",
    top: Annotated[int, typer.Option(help="How many regressions to list.")] = 10,
    dir: DirOption = None,
) -> None:
    """Compare the runs that logged predictions on a dataset: metrics, McNemar, regressions."""
    from tessera.api.compare import compare

    selected = [r.strip() for r in runs.split(",") if r.strip()] if runs else None
    with compare(dataset, runs=selected, predictions=predictions, dir=dir) as comparison:
        out.print(_frame_table(comparison.metrics(), title=f"Metrics on {dataset}"))
        out.print(comparison.note)
        if len(comparison.runs) < 2:
            return
        first = base or comparison.runs[0].label
        last = new or comparison.runs[-1].label
        test = comparison.mcnemar(first, last)
        verdict = (
            f"{last if test.better == 'new' else first} is better (p = {test.pvalue:.3g})"
            if test.pvalue < 0.05
            else f"no significant difference (p = {test.pvalue:.3g})"
        )
        out.print(
            f"McNemar {first} → {last}: {test.b} right→wrong, {test.c} wrong→right; {verdict}"
        )
        regressions = comparison.regressions(first, last)
        out.print(
            _frame_table(
                regressions.head(top),
                title=f"Top regressions {first} → {last} ({len(regressions)} in all)",
                index=False,
            )
        )


@app.command("sql")
def sql_command(
    query: Annotated[
        str,
        typer.Argument(
            help='One SELECT, e.g. "SELECT run, count(*) FROM predictions GROUP BY run".'
        ),
    ],
    limit: Annotated[int, typer.Option(help="Rows to print at most.")] = 100,
    dir: DirOption = None,
) -> None:
    """Read-only SQL over the views runs, datasets, samples and predictions."""
    import tessera

    frame = tessera.sql(query, dir=dir)
    out.print(_frame_table(frame, index=False, limit=limit))
    if len(frame) > limit:
        out.print(f"({len(frame)} rows; {limit} shown)")


ServerOption = Annotated[
    str | None,
    typer.Option(
        "--server",
        envvar="TESSERA_SERVER",
        help="Tessera server URL ($TESSERA_SERVER).",
        show_default=False,
    ),
]


def _require_server(server: str | None) -> str:
    from tessera.config import server_url

    url = server_url(server)
    if url is None:
        raise typer.BadParameter("give --server URL or set TESSERA_SERVER", param_hint="--server")
    return url


def _http(server: str | None, dir: Path | None = None) -> Any:
    from tessera.backend.http import HttpBackend
    from tessera.config import token_for

    url = _require_server(server)
    return HttpBackend.open(url, token_for(url), dir)


@app.command()
def server(
    dir: DirOption = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
    public_read: Annotated[
        bool, typer.Option("--public-read", help="Let anyone read every project without a token.")
    ] = False,
    max_blob_size: Annotated[
        str, typer.Option(help="Largest blob accepted, e.g. 512M, 64G.")
    ] = "64G",
    workers: Annotated[int, typer.Option(help="Worker processes (each shares the one store).")] = 1,
    catalog: Annotated[
        str | None,
        typer.Option(
            envvar="TESSERA_CATALOG",
            help="Catalog URL: sqlite:///PATH or postgresql+psycopg://user@host:port/db.",
        ),
    ] = None,
    blobs: Annotated[
        str | None,
        typer.Option(
            envvar="TESSERA_BLOBS",
            help="Blob store URL: file:///PATH or s3://bucket/prefix (AWS_* variables for S3).",
        ),
    ] = None,
) -> None:
    """Serve a store over HTTP (API under /api/v1). On first start, creates an admin and prints
    its token once."""
    import uvicorn

    from tessera.server.app import Settings, create_app
    from tessera.server.auth import hash_token, new_token
    from tessera.store import Store, default_dir
    from tessera.store.catalog import AuthCatalog

    root = Path(dir) if dir is not None else default_dir()
    store = Store.open(root, create=True, catalog=catalog, blobs=blobs)
    auth = AuthCatalog(store.catalog)
    if auth.user_count() == 0:
        admin = auth.ensure_user("admin", is_admin=True)
        token = new_token()
        auth.create_token(admin, "first admin token", hash_token(token))
        out.print(
            f"created user [bold]admin[/bold]; its token (shown once, keep it):\n{token}",
            highlight=False,
            soft_wrap=True,
        )
    store.close()
    settings = Settings(
        dir=root.absolute(),
        public_read=public_read,
        max_blob_bytes=int(parse_size(max_blob_size)),
        catalog=catalog,
        blobs=blobs,
    )
    err.print(
        f"serving {root.absolute()} on http://{host}:{port} (API: /api/v1, docs: /api/v1/docs)"
    )
    uvicorn.run(
        create_app(settings),
        host=host,
        port=port,
        log_level="warning",
        workers=None if workers == 1 else workers,
    )


@app.command()
def ui(
    dir: DirOption = None,
    port: Annotated[int, typer.Option(help="Port to listen on (on 127.0.0.1 only).")] = 8090,
) -> None:
    """Browse a local store in a web browser: projects, runs, tables, comparisons. Read-only,
    no sign-in, bound to 127.0.0.1 (use `tessera server` to share a store)."""
    from tessera.store import Store, default_dir
    from tessera.ui.views import serve_local

    root = Path(dir) if dir is not None else default_dir()
    Store.open(root).close()  # a clear error if there is no store there
    err.print(
        f"serving {root.absolute()} on http://127.0.0.1:{port} (read-only, this machine only)"
    )
    serve_local(root, port)


def parse_size(text: str) -> float:
    """``1024``, ``512K``, ``64M``, ``2G`` → bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)[bB]?\s*", text)
    if not match:
        raise typer.BadParameter(f"{text!r} is not a size; write e.g. 512M or 64G")
    number, unit = match.groups()
    return (
        float(number) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}[unit.lower()]
    )


@app.command()
def login(
    url: Annotated[str, typer.Argument(help="The server, e.g. http://127.0.0.1:8080")],
    token: Annotated[str | None, typer.Option(help="The token (asked for if not given).")] = None,
) -> None:
    """Save a token for a server in your user config (readable by you alone)."""
    import httpx

    from tessera import wire
    from tessera.config import normalise_url, save_token

    url = normalise_url(url)
    if token is None:
        token = typer.prompt("token", hide_input=True)
    try:
        response = httpx.get(
            f"{url}/api/v1/me", headers={"Authorization": f"Bearer {token}"}, timeout=30
        )
    except httpx.TransportError as e:
        raise TesseraError(f"cannot reach {url}: {e}") from None
    if response.status_code != 200:
        wire.raise_error(response.status_code, response.json())
    me = response.json()
    path = save_token(url, token)
    out.print(f"signed in to {url} as [bold]{me['user']}[/bold]; token saved in {path}")


token_app = typer.Typer(help="Create, list and revoke API tokens.", no_args_is_help=True)
app.add_typer(token_app, name="token")


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Option(help="A label for the token.")] = "token",
    user: Annotated[
        str | None, typer.Option(help="Another user (admins only; created if new).")
    ] = None,
    admin: Annotated[bool, typer.Option("--admin", help="Make that user a server admin.")] = False,
    server: ServerOption = None,
) -> None:
    """Create a token (shown once)."""
    backend = _http(server)
    try:
        data = backend.request(
            "POST", "/api/v1/tokens", json={"name": name, "user": user, "admin": admin}
        )
    finally:
        backend.close()
    out.print(f"token {data['id']} for {data['user']} (shown once):")
    out.print(data["token"], highlight=False, soft_wrap=True)


@token_app.command("list")
def token_list(server: ServerOption = None) -> None:
    """List your tokens (an admin sees everyone's)."""
    backend = _http(server)
    try:
        rows = backend.request("GET", "/api/v1/tokens")
    finally:
        backend.close()
    table = Table("id", "user", "name", "created", "revoked")
    for row in rows:
        table.add_row(
            row["id"], row["user"], row["name"], _when(row["created_at"]), _when(row["revoked_at"])
        )
    out.print(table)


@token_app.command("revoke")
def token_revoke(
    token_id: Annotated[str, typer.Argument(help="The token's id (tok_…).")],
    server: ServerOption = None,
) -> None:
    """Revoke a token: it stops working at once."""
    backend = _http(server)
    try:
        backend.request("DELETE", f"/api/v1/tokens/{token_id}")
    finally:
        backend.close()
    out.print(f"revoked {token_id}")


@app.command()
def member(
    project: Annotated[str, typer.Argument(help="The project.")],
    user: Annotated[str, typer.Argument(help="The user (created if new).")],
    role: Annotated[str, typer.Argument(help="reader, writer, admin, or none to remove.")],
    server: ServerOption = None,
) -> None:
    """Give a user a role in a project (needs the admin role there)."""
    backend = _http(server)
    try:
        backend.request(
            "PUT",
            f"/api/v1/projects/{project}/members/{user}",
            json={"role": None if role == "none" else role},
        )
    finally:
        backend.close()
    out.print(f"{user} is now {'not a member' if role == 'none' else 'a ' + role} of {project}")


@app.command()
def push(
    project: Annotated[
        list[str] | None, typer.Option(help="Only this project (repeatable).")
    ] = None,
    server: ServerOption = None,
    dir: DirOption = None,
) -> None:
    """Send runs and versions of the local store to a server; only missing blobs travel."""
    from tessera.sync import sync

    local = _open(dir)
    remote = _http(server, dir)
    try:
        report = sync(local, remote, project or None)
    finally:
        remote.close()
        local.close()
    out.print(
        f"pushed {report.runs} runs and {report.versions} versions "
        f"({report.new_versions} new) of {', '.join(report.projects) or 'no projects'}; "
        f"sent {report.blobs_sent} blobs ({human_bytes(report.bytes_sent)})"
    )


@app.command()
def pull(
    project: Annotated[
        list[str] | None, typer.Option(help="Only this project (repeatable).")
    ] = None,
    server: ServerOption = None,
    dir: DirOption = None,
) -> None:
    """Fetch runs and versions from a server into the local store; only missing blobs travel."""
    from tessera.backend.local import LocalBackend
    from tessera.sync import sync

    local = LocalBackend.open(dir, create=True)
    remote = _http(server, dir)
    try:
        report = sync(remote, local, project or None)
    finally:
        remote.close()
        local.close()
    out.print(
        f"pulled {report.runs} runs and {report.versions} versions "
        f"({report.new_versions} new) of {', '.join(report.projects) or 'no projects'}; "
        f"fetched {report.blobs_sent} blobs ({human_bytes(report.bytes_sent)})"
    )


@app.command()
def demo(
    dir: Annotated[Path, typer.Option(help="Store folder for the demo (created).")] = Path(
        "tessera-demo"
    ),
    dataset: Annotated[
        str, typer.Option(help="fashion-mnist (Debian's dataset-fashion-mnist) or digits.")
    ] = "fashion-mnist",
    ui: Annotated[
        bool, typer.Option("--ui", help="Start the web UI on the demo store afterwards.")
    ] = False,
    port: Annotated[int, typer.Option(help="Port for --ui (on 127.0.0.1 only).")] = 8080,
    limit: Annotated[
        int | None,
        typer.Option(min=50, help="Use only the first N test images (a quicker, smaller demo)."),
    ] = None,
) -> None:
    """Run the main job on real images: log a test set once, evaluate three models on it,
    find and fix suspect labels, and show what it cost."""
    from tessera.demo import run_demo

    if dataset not in ("fashion-mnist", "digits"):
        raise typer.BadParameter("choose fashion-mnist or digits", param_hint="--dataset")
    if (dir / "tessera.json").exists():
        raise TesseraError(f"{dir} already holds a store; pass another --dir or delete it")
    if ui:
        _check_port_free(port)  # before a minute of work, not after
    run_demo(dir, dataset, limit=limit, console=out)
    if ui:
        from tessera.ui.views import serve_local  # started like `tessera ui`

        out.print(f"web UI: http://127.0.0.1:{port}/")
        serve_local(dir, port)


def _check_port_free(port: int) -> None:
    import socket

    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            raise typer.BadParameter(
                f"port {port} on 127.0.0.1 is in use; pick another", param_hint="--port"
            ) from None


@app.command("migrate-store")
def migrate_store(
    src: Annotated[Path, typer.Argument(help="The store folder to copy from.")],
    dst: Annotated[Path, typer.Argument(help="The store folder to create or fill.")],
    catalog: Annotated[
        str | None,
        typer.Option(help="Destination catalog URL, e.g. postgresql+psycopg://user@host/db."),
    ] = None,
    blobs: Annotated[
        str | None, typer.Option(help="Destination blob URL, e.g. s3://bucket/prefix.")
    ] = None,
) -> None:
    """Copy a store to another backend (e.g. folder → PostgreSQL + S3), verifying every digest:
    runs, metrics, versions, aliases, lineage, users and tokens."""
    from tessera.backend.local import LocalBackend
    from tessera.store import Store
    from tessera.store.catalog import AuthCatalog
    from tessera.sync import sync

    source = LocalBackend(Store.open(src, local_only=True))
    target = LocalBackend(
        Store.open(dst, create=True, catalog=catalog, blobs=blobs, local_only=True)
    )
    try:
        report = sync(source, target)
        users = AuthCatalog(source.catalog).copy_to(AuthCatalog(target.catalog))
    finally:
        source.close()
        target.close()
    out.print(
        f"copied {report.runs} runs, {report.versions} versions and {users} users; "
        f"{report.blobs_sent} blobs ({human_bytes(report.bytes_sent)}), every digest verified"
    )


def main() -> None:
    try:
        app()
    except TesseraError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        sys.exit(1)
    except Exception as e:
        # Failures of the services a store lives on (S3, PostgreSQL): one line, no traceback.
        module = type(e).__module__
        if not module.startswith(("obstore", "sqlalchemy", "psycopg")):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        err.print(f"[red]error:[/red] the store's backing service failed: {first}", highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
