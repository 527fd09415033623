"""Runs: one execution of user code, its config, metrics, summary and the artifacts it touched."""

from __future__ import annotations

import atexit
import contextlib
import numbers
import sys
import threading
import warnings
import weakref
from collections.abc import Iterator, Mapping, MutableMapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

from tessera.api.artifact import Artifact, ArtifactVersion
from tessera.api.versions import version_object
from tessera.backend.base import Backend
from tessera.errors import NotFoundError, RunFinishedError
from tessera.gcpause import gc_paused
from tessera.jsonvalues import to_json
from tessera.names import check_alias, check_name, parse_version_spec
from tessera.runtime import HEARTBEAT_SECONDS
from tessera.store.catalog import RunRecord, VersionRecord
from tessera.store.manifest import Manifest

if TYPE_CHECKING:
    from tessera.api.dataset import Dataset, DatasetVersion
    from tessera.api.predictions import PredictionWriter
    from tessera.api.table import Table, TableVersion

# The dataset, table and prediction modules (numpy, pyarrow, Pillow) are imported inside the
# methods that need them: a run that logs metrics and files never pays for them.


class Run:
    """A run in progress. Use it as a context manager, or call ``finish()``.

    Leaving the ``with`` block on an exception marks the run ``failed``; a process that ends
    without finishing marks it ``finished`` (``failed`` after an uncaught exception); a process
    that is killed leaves it ``running`` until Tessera notices and marks it ``crashed``.
    """

    def __init__(self, backend: Backend, record: RunRecord, owns_backend: bool = True):
        self._backend = backend
        self._record = record
        self._owns_backend = owns_backend
        self._step = 0
        self._lock = threading.Lock()
        self._finished = False
        # Dataset versions this run logged or used, latest last: an image cell of a table it
        # logs is bound to a sample of one of these first (see Catalog.find_samples).
        self._datasets: list[int] = []
        self.summary = RunSummary(self)
        self._stop_heartbeat = threading.Event()
        self._heartbeat = threading.Thread(
            target=_heartbeat_loop,
            args=(weakref.ref(self), self._stop_heartbeat),
            name=f"tessera-heartbeat-{record.id}",
            daemon=True,
        )
        self._heartbeat.start()
        _open_runs.add(self)

    def __repr__(self) -> str:
        return f"<Run {self.project}/{self.name} id={self.id} status={self.status}>"

    # -- identity ----------------------------------------------------------------------------

    @property
    def id(self) -> str:
        return self._record.id

    @property
    def name(self) -> str:
        return self._record.name

    @property
    def project(self) -> str:
        return self._record.project

    @property
    def config(self) -> dict[str, Any]:
        return dict(self._record.config)

    @property
    def status(self) -> str:
        return "running" if not self._finished else self._backend.run(self.id).status

    # -- logging -----------------------------------------------------------------------------

    def log(self, data: Mapping[str, Any], step: int | None = None) -> None:
        """Log metric values at a step (default: one past the previous step).

        Nested dicts are flattened with ``/`` (``{"val": {"acc": 1}}`` logs ``val/acc``). Each
        value also becomes the run's summary value for that key.
        """
        self._check_open()
        if not isinstance(data, Mapping):
            raise TypeError(f"run.log() takes a dict of metric values, got {type(data).__name__}")
        table_module = sys.modules.get("tessera.api.table")  # no Table exists before its import
        tables = (
            {k: v for k, v in data.items() if isinstance(v, table_module.Table)}
            if table_module is not None
            else {}
        )
        values = _flatten_metrics({k: v for k, v in data.items() if k not in tables})
        for key, table in tables.items():
            self.log_table(key, table)
        if not values:
            return
        with self._lock:
            if step is None:
                step = self._step
            elif not isinstance(step, numbers.Integral) or isinstance(step, bool) or step < 0:
                raise ValueError(f"step must be a non-negative integer, got {step!r}")
            step = int(step)
            self._step = max(self._step, step + 1)
            self.summary._data.update(values)
            self._backend.log_metrics(self.id, step, values, self.summary._data)

    def _commit(
        self,
        manifest: Manifest,
        name: str,
        type: str,
        description: str | None,
        aliases: tuple[str, ...] = (),
    ) -> VersionRecord:
        """Store ``manifest`` (its files are stored already) and record it as a version of
        ``name`` logged by this run: the new version, or the identical one that existed."""
        digest = self._backend.put_manifest(self.project, manifest)
        record, _created = self._backend.commit_version(
            project=self.project,
            name=name,
            type=type,
            description=description,
            manifest=manifest,
            digest=digest,
            run_id=self.id,
            aliases=aliases,
        )
        return record

    def log_artifact(
        self, artifact: Artifact, aliases: tuple[str, ...] | list[str] = ()
    ) -> ArtifactVersion:
        """Store an artifact's files and record a new version (or return the identical one)."""
        self._check_open()
        if not isinstance(artifact, Artifact):
            raise TypeError(f"log_artifact takes a tessera.Artifact, got {type(artifact).__name__}")
        aliases = _aliases(aliases)
        if not len(artifact):
            raise ValueError(
                f"artifact {artifact.name!r} has no files; add some with add_file or add_dir"
            )
        with gc_paused():
            entries = self._backend.upload(self.project, list(artifact._sources.values()))
            manifest = Manifest.build(entries, artifact.metadata)
            record = self._commit(
                manifest, artifact.name, artifact.type, artifact.description, aliases
            )
        return ArtifactVersion(self._backend, record, manifest, run=self)

    def use_artifact(self, spec: str) -> ArtifactVersion:
        """The version ``name:v1`` / ``name:latest`` / ``name:alias`` / ``project/name:...``,
        recorded as an input of this run."""
        self._check_open()
        record = self._backend.resolve(parse_version_spec(spec), self.project)
        self._backend.record_use(self.id, record.id)
        return version_object(self._backend, record, run=self)

    # -- datasets, tables and predictions ----------------------------------------------------

    def log_dataset(
        self, dataset: Dataset, aliases: tuple[str, ...] | list[str] = ()
    ) -> DatasetVersion:
        """Store a dataset: each image once (files keep their bytes), plus its sample table."""
        from tessera.api.dataset import Dataset, DatasetVersion, store_dataset

        self._check_open()
        if not isinstance(dataset, Dataset):
            raise TypeError(f"log_dataset takes a tessera.Dataset, got {type(dataset).__name__}")
        aliases = _aliases(aliases)
        with gc_paused():
            manifest = store_dataset(self._backend, self.project, dataset)
            record = self._commit(manifest, dataset.name, "dataset", dataset.description, aliases)
        self._datasets.append(record.id)
        return DatasetVersion(self._backend, record, manifest, run=self)

    def use_dataset(self, spec: str) -> DatasetVersion:
        """A dataset version (``name:latest``, ``name:v0``, ``project/name:alias``) as an input."""
        self._check_open()
        record = self._backend.resolve(parse_version_spec(spec), self.project)
        if record.type != "dataset":  # check before recording the use: a refusal leaves no trace
            raise NotFoundError(f"{record.spec} is a {record.type!r} artifact, not a dataset")
        self._backend.record_use(self.id, record.id)
        self._datasets.append(record.id)
        from tessera.api.dataset import DatasetVersion

        return DatasetVersion(self._backend, record, run=self)

    def log_table(self, name: str, table: Table) -> TableVersion:
        """Store a table; ``Image`` cells that match a dataset sample become references to it."""
        from tessera.api.table import Table, TableVersion, UnmatchedImagesWarning, store_table

        self._check_open()
        check_name(name, "table")
        if not isinstance(table, Table):
            raise TypeError(f"log_table takes a tessera.Table, got {type(table).__name__}")
        manifest, row, unmatched, new_bytes = store_table(
            self._backend, self.project, name, table, prefer=self._datasets
        )
        record = self._commit(manifest, name, "table", None)
        if row.dataset_version_id is not None:
            self._backend.record_use(self.id, row.dataset_version_id)
        if unmatched:
            warnings.warn(
                f"{unmatched} images in table {name!r} matched no dataset sample and were stored "
                f"as new media ({new_bytes:,} new bytes). To reference dataset images instead, "
                "log predictions by sample id: run.log_predictions(dataset_version, ids, ...)",
                UnmatchedImagesWarning,
                stacklevel=3,
            )
        return TableVersion(self._backend, record, manifest, run=self)

    def predictions(self, dataset: DatasetVersion, name: str = "predictions") -> PredictionWriter:
        """Stream predictions batch by batch: ``with run.predictions(dsv) as p: p.add(ids=...,
        pred=..., scores=...)``. Stored when the block ends without an exception."""
        from tessera.api.predictions import PredictionWriter

        self._check_open()
        return PredictionWriter(self, dataset, name)

    def log_predictions(
        self, dataset: DatasetVersion, ids: Any, name: str = "predictions", **columns: Any
    ) -> TableVersion:
        """Log predictions on ``dataset`` by sample id: ``pred``, ``scores``, ``loss``, …"""
        writer = self.predictions(dataset, name)
        try:
            writer.add(ids, **columns)
        except BaseException:
            writer.abort()
            raise
        return writer.close()

    def tables(self) -> list[TableVersion]:
        """The tables and predictions this run logged, oldest first."""
        from tessera.api.table import TableVersion

        return [
            TableVersion(self._backend, record, run=self)
            for record, _row in self._backend.run_tables(self.id)
        ]

    def history(self) -> dict[str, list[tuple[int, float | None]]]:
        """Every logged metric: ``{key: [(step, value), ...]}``."""
        out: dict[str, list[tuple[int, float | None]]] = {}
        for step, key, value in self._backend.metric_history(self.id):
            out.setdefault(key, []).append((step, value))
        return out

    # -- ending ------------------------------------------------------------------------------

    def finish(self, status: str = "finished") -> None:
        """End the run (``finished`` or ``failed``). Calling it again does nothing."""
        if status not in ("finished", "failed"):
            raise ValueError(f"status must be 'finished' or 'failed', got {status!r}")
        with self._lock:
            if self._finished:
                return
            self._finished = True
        self._stop_heartbeat.set()
        _open_runs.discard(self)
        self._backend.finish_run(self.id, status)
        if self._owns_backend:
            self._backend.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.finish("failed" if exc_type is not None else "finished")

    def _check_open(self) -> None:
        if self._finished:
            raise RunFinishedError(
                f"run {self.name} ({self.id}) has finished; start a new one with tessera.init()"
            )


class RunSummary(MutableMapping[str, Any]):
    """The run's final values, stored as they change. ``run.log`` keeps it up to date."""

    def __init__(self, run: Run):
        self._run = run
        self._data: dict[str, Any] = dict(run._record.summary)

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._run._check_open()
        self._data[key] = to_json(value, f"summary[{key!r}]")
        self._run._backend.set_summary(self._run.id, self._data)

    def __delitem__(self, key: str) -> None:
        self._run._check_open()
        del self._data[key]
        self._run._backend.set_summary(self._run.id, self._data)

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"RunSummary({self._data!r})"

    def update(self, *args: Any, **kwargs: Any) -> None:  # one write for many keys
        self._run._check_open()
        for key, value in dict(*args, **kwargs).items():
            self._data[key] = to_json(value, f"summary[{key!r}]")
        self._run._backend.set_summary(self._run.id, self._data)


def _aliases(aliases: tuple[str, ...] | list[str] | str) -> tuple[str, ...]:
    if isinstance(aliases, str):
        aliases = (aliases,)
    return tuple(check_alias(a) for a in aliases)


def _flatten_metrics(data: Mapping[str, Any], prefix: str = "") -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key, value in data.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"metric names must be non-empty strings, got {key!r}")
        name = f"{prefix}{key}"
        if len(name) > 256:
            raise ValueError(f"metric name {name[:40]!r}… is longer than 256 characters")
        if isinstance(value, Mapping):
            out.update(_flatten_metrics(value, f"{name}/"))
            continue
        item = getattr(value, "item", None)  # numpy scalars, 0-d arrays, 1-element tensors
        if callable(item) and not isinstance(value, numbers.Number):
            with contextlib.suppress(ValueError, RuntimeError):
                value = item()
        if isinstance(value, numbers.Real):
            number = float(value)
            out[name] = number if number == number and abs(number) != float("inf") else None
        else:
            raise TypeError(
                f"run.log(): {name!r} is a {type(value).__name__}; metrics must be numbers "
                "(put text and other values in run.summary or the config)"
            )
    return out


# -- process end -------------------------------------------------------------------------------

_open_runs: weakref.WeakSet[Run] = weakref.WeakSet()


def _heartbeat_loop(run_ref: weakref.ref[Run], stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_SECONDS):
        run = run_ref()
        if run is None:
            return
        # A missed heartbeat must never disturb the user's program.
        with contextlib.suppress(Exception):
            run._backend.heartbeat(run.id)
        del run


@atexit.register
def _finish_open_runs() -> None:
    failed = getattr(sys, "last_value", None) is not None  # an uncaught exception ended main
    for run in list(_open_runs):
        with contextlib.suppress(Exception):
            run.finish("failed" if failed else "finished")
