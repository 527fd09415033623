#!/usr/bin/env python3
"""Run every benchmark and write ``bench/report.json`` and ``bench/report.md``.

    python bench/run.py                 # everything, full sizes
    python bench/run.py --quick         # smaller sizes: a smoke test
    python bench/run.py --only store    # one module (repeatable)
    python bench/run.py --workdir DIR   # scratch space (default: bench/work/, same disk as /work)

Adding a benchmark: create ``bench/bench_<topic>.py`` with

    def run(workdir: Path, quick: bool) -> list[dict]: ...

``workdir`` is an empty folder of its own, deleted afterwards. Each dict is one figure; build
it with ``benchlib.result(...)``. Keys: ``name``, ``value``, ``unit``, ``reference`` (the floor
or reference, measured in the same run, same unit), ``reference_name`` (what it is, e.g.
``"cp -r"``), ``ratio`` and ``ratio_meaning``, ``target`` (text, e.g. ``"<= 2x cp -r"``),
``passed`` (True/False, or None for informational figures), ``notes``, ``extra`` (raw samples,
breakdowns). Progress goes to stderr through ``benchlib.log``.

Nothing here asserts on time in tests; a missed target is reported, not raised. The exit status
is 1 if a module crashed, 2 with ``--strict`` if a target was missed, else 0.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import importlib.metadata
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

import benchlib  # noqa: E402

REQUIRED = ("name", "value", "unit")


def discover() -> dict[str, Path]:
    """``{topic: path}`` for every ``bench_<topic>.py`` next to this file."""
    return {p.stem[len("bench_") :]: p for p in sorted(BENCH_DIR.glob("bench_*.py"))}


def load(topic: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{topic}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    if not callable(getattr(module, "run", None)):
        raise TypeError(f"{path.name} has no run(workdir, quick) function")
    return module


def select(available: dict[str, Path], only: list[str] | None) -> dict[str, Path]:
    if not only:
        return available
    chosen = {}
    for name in only:
        topic = name.removesuffix(".py").removeprefix("bench_")
        if topic not in available:
            sys.exit(f"no benchmark {name!r}; available: {', '.join(available) or '(none)'}")
        chosen[topic] = available[topic]
    return chosen


def normalise(topic: str, row: Any) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise TypeError(f"bench_{topic}.run() returned a {type(row).__name__}, not a dict")
    missing = [k for k in REQUIRED if k not in row]
    if missing:
        raise ValueError(f"bench_{topic}: result {row.get('name')!r} lacks {missing}")
    full = benchlib.result(row["name"], row["value"], row["unit"])
    full.update(row)
    if "floor" in row and full.get("reference") is None:  # accept either spelling
        full["reference"] = row["floor"]
    full["module"] = topic
    return full


def host_info(workdir: Path) -> dict[str, Any]:
    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None
            )
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = round(int(f.readline().split()[1]) / 1024**2, 1)
    except (OSError, ValueError, IndexError):
        pass
    return {
        "hostname": platform.node(),
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "mem_gib": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "tessera": _tessera_version(),
        "tessera_path": _tessera_path(),
        "git": _git_state(),
        "workdir_fs": benchlib.fs_info(workdir),
        "same_device_as_repo": os.stat(workdir).st_dev == os.stat(REPO).st_dev,
        "loadavg_start": os.getloadavg(),
    }


def _tessera_version() -> str | None:
    # Metadata only: importing tessera here would grow this process, and every child it spawns
    # inherits its RSS high-water mark in wait4()'s ru_maxrss.
    try:
        return importlib.metadata.version("tessera")
    except importlib.metadata.PackageNotFoundError:
        return None


def _tessera_path() -> str | None:
    spec = importlib.util.find_spec("tessera")
    return str(Path(spec.origin).parent) if spec is not None and spec.origin else None


def _git_state() -> str | None:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return head + (" (src/ has uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


# -- formatting --------------------------------------------------------------------------------


def fmt_number(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value == 0:
            return "0"
        magnitude = abs(value)
        if magnitude >= 100:
            return f"{value:,.0f}"
        if magnitude >= 10:
            return f"{value:.1f}"
        if magnitude >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    return str(value)


def fmt_value(value: Any, unit: str) -> str:
    text = fmt_number(value)
    return f"{text} {unit}" if unit and value is not None else text


def fmt_reference(row: dict[str, Any]) -> str:
    if row.get("reference") is None:
        return "—"
    ref = fmt_value(row["reference"], row["unit"])
    return f"{ref} ({row['reference_name']})" if row.get("reference_name") else ref


def fmt_ratio(row: dict[str, Any]) -> str:
    return "—" if row.get("ratio") is None else f"{row['ratio']:.2f}x"


def fmt_passed(row: dict[str, Any]) -> str:
    if row.get("error"):
        return "ERROR"
    return {True: "pass", False: "FAIL", None: "info"}[row.get("passed")]


def markdown(report: dict[str, Any]) -> str:
    host = report["host"]
    fs = host["workdir_fs"]
    lines = [
        "# Tessera benchmark report",
        "",
        f"- started: {report['generated_at']} ({report['duration_s']:.0f} s, "
        f"{'QUICK mode: reduced sizes, a smoke test, not representative' if report['quick'] else 'full sizes'})",
        f"- host: {host['cpus']} CPUs ({host['cpu_model']}), {host['mem_gib']} GiB RAM, "
        f"kernel {host['kernel']}, Python {host['python']}, tessera {host['tessera']} "
        f"at {host['git']}",
        f"- disk: {fs['source']} ({fs['fstype']}"
        f"{', no journal' if fs.get('journal') is False else ''}) mounted at {fs['mount']} "
        f"({fs.get('options')}); same device as the repository: {host['same_device_as_repo']}",
        f"- load average at start / end: {_load(host['loadavg_start'])} / "
        f"{_load(report.get('loadavg_end'))}",
        "- the load average counts this benchmark's own processes too (about 1-2 here); a "
        "higher one means other work shared the machine and the figures are noisier",
        *_busy_warning(report),
        "- every floor/reference was measured in the same run, on the same disk; ratio: see "
        "each figure's note (value ÷ floor for times and throughputs, speed-up for re-logs)",
        "",
        "| figure | value | floor / reference (same run) | ratio | target | result |",
        "|---|---|---|---|---|---|",
    ]
    for row in report["results"]:
        lines.append(
            f"| `{row['name']}` | {fmt_value(row['value'], row['unit'])} | "
            f"{fmt_reference(row)} | {fmt_ratio(row)} | {row.get('target') or '—'} | "
            f"{'**FAIL**' if fmt_passed(row) in ('FAIL', 'ERROR') else fmt_passed(row)} |"
        )
    lines += ["", "## Notes", ""]
    for row in report["results"]:
        note = row.get("error") or row.get("notes")
        if note:
            meaning = f" Ratio: {row['ratio_meaning']}." if row.get("ratio_meaning") else ""
            lines.append(f"- `{row['name']}`: {note}{meaning}")
    lines += ["", "Raw samples and breakdowns: `report.json`.", ""]
    return "\n".join(lines)


def _busy_warning(report: dict[str, Any]) -> list[str]:
    cpus = report["host"]["cpus"] or 1
    loads = [report["host"]["loadavg_start"][0]]
    loads += [m.get("loadavg_after", [0])[0] for m in report["modules"].values()]
    if max(loads) <= cpus:
        return []
    return [
        f"- **WARNING: the machine was busy** (1-minute load up to {max(loads):.1f} on {cpus} "
        "CPUs): other processes competed for CPU and disk, so times are inflated and noisy; "
        "the floors were measured interleaved with the figures they judge, which limits but "
        "does not remove the effect"
    ]


def _load(values: Any) -> str:
    return "—" if not values else " ".join(f"{v:.2f}" for v in values)


def summary(report: dict[str, Any]) -> str:
    rows = [("figure", "value", "floor / reference", "ratio", "target", "result")]
    for row in report["results"]:
        rows.append(
            (
                row["name"],
                fmt_value(row["value"], row["unit"]),
                fmt_reference(row),
                fmt_ratio(row),
                row.get("target") or "",
                fmt_passed(row),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = [
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows
    ]
    out.insert(1, "  ".join("-" * w for w in widths))
    verdicts = [fmt_passed(r) for r in report["results"]]
    out.append("")
    out.append(
        f"{verdicts.count('pass')} passed, {verdicts.count('FAIL')} failed, "
        f"{verdicts.count('info')} informational, {verdicts.count('ERROR')} errors "
        f"in {report['duration_s']:.0f} s{' (QUICK mode)' if report['quick'] else ''}"
    )
    out += [line.removeprefix("- ").replace("**", "") for line in _busy_warning(report)]
    return "\n".join(out)


# -- main --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke test")
    parser.add_argument(
        "--only", action="append", metavar="NAME", help="run only bench_NAME.py (repeatable)"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        help="scratch space; a temporary folder is made inside it and removed "
        "afterwards (default: bench/work/, on the same disk as the repo)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument(
        "--out",
        type=Path,
        default=BENCH_DIR,
        help="where report.json and report.md go (default: bench/)",
    )
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument(
        "--strict", action="store_true", help="exit with status 2 if a target is missed"
    )
    args = parser.parse_args(argv)

    available = discover()
    if args.list:
        print("\n".join(available))
        return 0
    chosen = select(available, args.only)

    base = (args.workdir or BENCH_DIR / "work").absolute()
    made_base = not base.exists()
    base.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="run-", dir=base))
    report: dict[str, Any] = {
        "generated_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "argv": sys.argv[1:] if argv is None else argv,
        "host": host_info(scratch),
        "modules": {},
        "results": [],
    }
    started = time.perf_counter()
    crashed = False
    try:
        for topic, path in chosen.items():
            workdir = scratch / topic
            workdir.mkdir()
            benchlib.log(f"== bench_{topic} ({'quick' if args.quick else 'full'}) in {workdir}")
            t0 = time.perf_counter()
            entry: dict[str, Any] = {
                "path": str(path.relative_to(REPO)),
                "loadavg_before": os.getloadavg(),
            }
            try:
                rows = load(topic, path).run(workdir, args.quick)
                report["results"] += [normalise(topic, row) for row in rows]
            except Exception as e:
                crashed = True
                entry["error"] = "".join(traceback.format_exception(e))
                report["results"].append(
                    {
                        **benchlib.result(f"{topic}.error", None, ""),
                        "module": topic,
                        "error": f"{type(e).__name__}: {e}",
                    }
                )
                print(entry["error"], file=sys.stderr)
            finally:
                entry["seconds"] = time.perf_counter() - t0
                entry["loadavg_after"] = os.getloadavg()
                report["modules"][topic] = entry
                if not args.keep:
                    benchlib.remove(workdir)
    finally:
        if args.keep:
            benchlib.log(f"kept the scratch folder {scratch}")
        else:
            benchlib.remove(scratch)
            if made_base:
                with contextlib.suppress(OSError):
                    base.rmdir()

    names = [r["name"] for r in report["results"]]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        print(f"warning: duplicate figure names {duplicates}", file=sys.stderr)
    report["duration_s"] = time.perf_counter() - started
    report["loadavg_end"] = os.getloadavg()

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (args.out / "report.md").write_text(markdown(report))
    print(summary(report))
    print(f"\nwrote {args.out / 'report.json'} and {args.out / 'report.md'}")

    if crashed:
        return 1
    if args.strict and any(r.get("passed") is False for r in report["results"]):
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
