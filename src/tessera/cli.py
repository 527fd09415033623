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


def main() -> None:
    try:
        app()
    except TesseraError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
