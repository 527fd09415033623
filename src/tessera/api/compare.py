"""Compare evaluations: every prediction on a dataset joined by sample id, in DuckDB.

``tessera.compare("testset:v0")`` finds every run that logged a predictions table on that dataset
version, joins them on sample id with the labels, and answers from there: metrics, per-class
metrics, confusion matrices and their cells, disagreements, regressions and improvements, an
exact McNemar test, bootstrap intervals, the history of one sample, hard samples and suspect
labels. Predictions are reduced to small count arrays inside DuckDB; only results reach Python.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from tessera.analysis import metrics as m
from tessera.analysis.queries import connect, parquet_paths, sql_list
from tessera.api.dataset import DatasetVersion
from tessera.backend.base import Backend
from tessera.config import open_backend
from tessera.errors import NotFoundError, TesseraError
from tessera.names import check_name, parse_version_spec
from tessera.store.catalog import RunRecord, VersionRecord

ECE_BINS = 15


class CompareError(TesseraError, ValueError):
    """A comparison that cannot be made as asked."""


@dataclass(frozen=True)
class ComparedRun:
    """One run in a comparison, and the predictions table version it contributed."""

    index: int
    label: str  # unique within the comparison: the run name, or name-id when names repeat
    run: RunRecord
    table: VersionRecord
    dataset: VersionRecord
    has_scores: bool

    @property
    def name(self) -> str:
        return self.run.name

    @property
    def id(self) -> str:
        return self.run.id

    @property
    def config(self) -> dict[str, Any]:
        return self.run.config


def compare(
    dataset: str,
    runs: list[str] | str | None = None,
    predictions: str = "predictions",
    project: str | None = None,
    dir: str | os.PathLike[str] | None = None,
    server: str | None = None,
) -> Comparison:
    """Join every predictions table logged on ``dataset`` by sample id.

    ``dataset`` is ``"name:v0"``, ``"name:latest"`` or ``"name"`` (every version: samples join
    on id across versions, the newest label counts, and samples whose image changed are
    flagged). ``runs`` selects runs by name or id (default: every run that logged
    ``predictions`` on it).
    """
    backend = open_backend(dir, server)
    try:
        return Comparison(backend, dataset, runs, predictions, project, owns_backend=True)
    except BaseException:
        backend.close()
        raise


class Comparison:
    def __init__(
        self,
        backend: Backend,
        dataset: str,
        runs: list[str] | str | None,
        predictions: str,
        project: str | None,
        owns_backend: bool = False,
    ):
        self._backend = backend
        self._owns_backend = owns_backend
        check_name(predictions, "table")
        self.predictions_name = predictions
        self.versions = _dataset_versions(backend, dataset, project)
        self.dataset = dataset
        self.every_version = len(self.versions) > 1 or ":" not in dataset
        latest = self.versions[-1]
        self.classes: list[str] | None = DatasetVersion(backend, latest).classes
        self._con = connect()
        self.runs = _select_runs(backend, self._con, self.versions, predictions, runs, dataset)
        self._build()

    # -- set-up ------------------------------------------------------------------------------

    def _build(self) -> None:
        con = self._con
        backend = self._backend
        parts = []
        for number, version in enumerate(self.versions):
            path = backend.duckdb_source(DatasetVersion(backend, version).samples_digest)
            parts.append(
                f"SELECT id, label, image, {number} AS vnum FROM read_parquet({sql_list([path])})"
            )
        con.execute(
            "CREATE TABLE labels AS SELECT (row_number() OVER (ORDER BY min(vnum), id) - 1)::INTEGER "
            "AS sid, id, arg_max(label, vnum) AS label, count(DISTINCT image) > 1 AS changed, "
            f"max(vnum) AS vnum FROM ({' UNION ALL '.join(parts)}) GROUP BY id"
        )
        selects = []
        for run in self.runs:
            paths = parquet_paths(backend, backend.read_manifest(run.table.digest))
            names = parquet_columns(con, paths[0])
            source = f"read_parquet({sql_list(paths)})"
            scores = "scores::FLOAT[]" if "scores" in names else "NULL::FLOAT[]"
            pred = "pred" if "pred" in names else "NULL::INTEGER"
            if "pred" not in names and "scores" not in names:
                raise CompareError(
                    f"run {run.label}'s table {run.table.spec} has neither pred nor scores"
                )
            selects.append(
                f"SELECT {run.index}::SMALLINT AS run, l.sid, l.label, "
                "COALESCE(t.pred, list_position(t.s, list_max(t.s)) - 1)::INTEGER AS pred, "
                "t.s[l.label + 1] AS score, "
                "t.s[l.label + 1] / list_sum(t.s) AS p_true, "
                "list_max(t.s) / list_sum(t.s) AS conf, "
                "len(list_filter(t.s, lambda x: x > t.s[l.label + 1]))::INTEGER AS rank_true "
                f"FROM (SELECT id, {pred} AS pred, {scores} AS s FROM {source}) AS t "
                "JOIN labels AS l USING (id) WHERE l.label IS NOT NULL"
            )
        con.execute(f"CREATE TABLE p_all AS {' UNION ALL '.join(selects)}")
        count = len(self.runs)
        # A predictions table holds each id once, so a sample's row count is its run count.
        con.execute(
            "CREATE TABLE p AS SELECT *, pred = label AS correct FROM p_all WHERE sid IN "
            f"(SELECT sid FROM p_all GROUP BY sid HAVING count(*) = {count})"
        )
        predicted, common = con.execute(
            "SELECT (SELECT count(DISTINCT sid) FROM p_all), (SELECT count(DISTINCT sid) FROM p)"
        ).fetchone()
        con.execute("DROP TABLE p_all")  # every query reads p; the copy would only hold memory
        self.n_common = int(common)
        self.left_out = int(predicted - common)
        self.unpredicted = int(
            con.execute("SELECT count(*) FROM labels WHERE label IS NOT NULL").fetchone()[0]
            - predicted
        )

    def close(self) -> None:
        self._con.close()
        if self._owns_backend:
            self._backend.close()

    def __enter__(self) -> Comparison:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<Comparison {self.dataset} runs={[r.label for r in self.runs]} "
            f"common={self.n_common} left_out={self.left_out}>"
        )

    @property
    def note(self) -> str:
        """Which samples were compared, in a sentence."""
        text = f"{self.n_common} samples predicted by all {len(self.runs)} runs"
        if self.left_out:
            text += f"; {self.left_out} predicted by only some runs were left out"
        return text

    def _run(self, which: str | int | ComparedRun) -> ComparedRun:
        if isinstance(which, ComparedRun):
            return which
        if isinstance(which, int) and not isinstance(which, bool) and 0 <= which < len(self.runs):
            return self.runs[which]
        for run in self.runs:
            if which in (run.label, run.id, run.name):
                return run
        raise NotFoundError(
            f"no run {which!r} in this comparison; runs: {', '.join(r.label for r in self.runs)}"
        )

    def _class_names(self, values: Any) -> Any:
        if not self.classes:
            return values
        array = np.asarray(values, dtype=np.float64)
        codes = np.where(np.isnan(array), -1, array).astype(np.int64)
        codes[(codes < 0) | (codes >= len(self.classes))] = -1
        return pd.Categorical.from_codes(codes, categories=self.classes)

    def _num_classes(self) -> int:
        if self.classes:
            return len(self.classes)
        top = self._con.execute("SELECT greatest(max(label), max(pred)) FROM p").fetchone()[0]
        return int(top or 0) + 1

    # -- metrics -----------------------------------------------------------------------------

    def _confusions(self) -> np.ndarray:
        """R x C x C counts (run, true, predicted) over the common samples."""
        c = self._num_classes()
        out = np.zeros((len(self.runs), c, c), dtype=np.int64)
        rows = self._con.execute(
            "SELECT run, label, pred, count(*) FROM p WHERE pred >= 0 AND pred < ? GROUP BY ALL",
            [c],
        ).fetchall()
        for run, label, pred, n in rows:
            out[run, label, pred] = n
        return out

    def metrics(self) -> pd.DataFrame:
        """Per run: n, accuracy, macro_f1, top5_accuracy (scores and more than five classes),
        log_loss and ece (15 bins) where scores exist."""
        confusions = self._confusions()
        classes = confusions.shape[1]
        extra = {
            run: (n, top5, logloss)
            for run, n, top5, logloss in self._con.execute(
                "SELECT run, count(*), avg((rank_true < 5)::INTEGER), "
                "avg(-ln(greatest(p_true, 1e-15))) FROM p GROUP BY run"
            ).fetchall()
        }
        bins = self._con.execute(
            f"SELECT run, least(floor(conf * {ECE_BINS}), {ECE_BINS - 1})::INTEGER AS b, "
            "count(*), sum(conf), sum(correct::INTEGER) FROM p WHERE conf IS NOT NULL "
            "GROUP BY ALL"
        ).fetchall()
        ece_counts = np.zeros((len(self.runs), 3, ECE_BINS))
        for run, b, n, conf, correct in bins:
            ece_counts[run, :, b] = (n, conf, correct)
        rows = []
        for run in self.runs:
            n, top5, logloss = extra.get(run.index, (0, None, None))
            confusion = confusions[run.index]
            row: dict[str, Any] = {
                "run": run.label,
                "n": int(n),
                "accuracy": m.accuracy(confusion),
                "macro_f1": m.macro_f1(confusion),
            }
            if run.has_scores:  # avg() over no common samples is NULL: report NaN
                if classes > 5:
                    row["top5_accuracy"] = float("nan") if top5 is None else float(top5)
                row["log_loss"] = float("nan") if logloss is None else float(logloss)
                row["ece"] = m.expected_calibration_error(*ece_counts[run.index])
            rows.append(row)
        return pd.DataFrame(rows).set_index("run")

    def per_class(self) -> pd.DataFrame:
        """Per run and class: precision, recall, f1, support."""
        confusions = self._confusions()
        names = self.classes or [str(i) for i in range(confusions.shape[1])]
        frames = []
        for run in self.runs:
            stats = m.per_class(confusions[run.index])
            frames.append(pd.DataFrame({"run": run.label, "class": names, **stats}))
        return pd.concat(frames, ignore_index=True).set_index(["run", "class"])

    def confusion(self, run: str | int) -> pd.DataFrame:
        """The confusion matrix of one run: rows the true class, columns the predicted."""
        r = self._run(run)
        matrix = self._confusions()[r.index]
        names = self.classes or [str(i) for i in range(matrix.shape[0])]
        frame = pd.DataFrame(
            matrix, index=pd.Index(names, name="true"), columns=pd.Index(names, name="predicted")
        )
        return frame

    def _class_index(self, value: str | int | None, what: str) -> int | None:
        if value is None:
            return None
        if isinstance(value, str):
            if not self.classes or value not in self.classes:
                raise NotFoundError(f"unknown {what} class {value!r}; classes: {self.classes}")
            return self.classes.index(value)
        return int(value)

    def samples(
        self, run: str | int, true: str | int | None = None, pred: str | int | None = None
    ) -> pd.DataFrame:
        """The samples in one confusion cell (``true`` and ``pred``), row or column."""
        r = self._run(run)
        where = ["p.run = ?"]
        params: list[Any] = [r.index]
        t = self._class_index(true, "true")
        if t is not None:
            where.append("p.label = ?")
            params.append(t)
        q = self._class_index(pred, "predicted")
        if q is not None:
            where.append("p.pred = ?")
            params.append(q)
        frame = self._con.execute(
            "SELECT l.id, p.label, p.pred, p.score, p.conf FROM p JOIN labels AS l USING (sid) "
            f"WHERE {' AND '.join(where)} ORDER BY l.id",
            params,
        ).df()
        frame["label"] = self._class_names(frame["label"])
        frame["pred"] = self._class_names(frame["pred"])
        return frame

    # -- row-level views ---------------------------------------------------------------------

    def table(self, where: str | None = None, params: list[Any] | None = None) -> pd.DataFrame:
        """One row per common sample: id, label, and per run ``<run>/pred``, ``<run>/correct``,
        ``<run>/score`` (score of the true class, where scores exist).

        ``where`` keeps only some samples, filtered in DuckDB before any row reaches pandas: a
        query returning ``sid`` values over the tables ``p`` (one row per run and sample:
        ``run``, ``sid``, ``label``, ``pred``, ``score``, ``p_true``, ``conf``, ``correct``)
        and ``labels`` (``sid``, ``id``, ``label``), with ``?`` placeholders bound from
        ``params``; e.g. ``table("SELECT sid FROM p WHERE NOT correct AND conf > ?", [0.9])``.
        """
        # p holds exactly one row per run for every compared sample, so the rows of the kept
        # samples sorted by (sid, run) reshape into one row per sample without a pivot (3 x
        # runs conditional aggregates were most of disagreements()' time), and sorting those
        # few columns in numpy is cheaper than an ORDER BY over the joined rows.
        filter_sql = f"SEMI JOIN ({where}) AS keep USING (sid)" if where else ""
        long = self._con.execute(
            f"SELECT sid, run, label, pred, correct, score FROM p {filter_sql}", params or []
        ).df()
        long = long.iloc[np.lexsort((long["run"].to_numpy(), long["sid"].to_numpy()))]
        count = len(self.runs)

        def per_sample(column: str) -> np.ndarray:
            return long[column].to_numpy().reshape(-1, count)

        sids = per_sample("sid")[:, 0]
        self._con.register("_kept", pd.DataFrame({"sid": sids}))
        try:
            names = self._con.execute(
                "SELECT l.id, l.changed FROM _kept AS k JOIN labels AS l USING (sid) ORDER BY sid"
            ).df()
        finally:
            self._con.unregister("_kept")
        frame = pd.DataFrame(
            {"id": names["id"], "label": self._class_names(per_sample("label")[:, 0])}
        )
        if self.every_version:
            frame["image_changed"] = names["changed"].to_numpy()
        preds, correct, scores = per_sample("pred"), per_sample("correct"), per_sample("score")
        for run in self.runs:  # run.index is the run's position: p.run sorts in this order
            frame[f"{run.label}/pred"] = self._class_names(preds[:, run.index])
            frame[f"{run.label}/correct"] = correct[:, run.index]
            if run.has_scores:
                frame[f"{run.label}/score"] = scores[:, run.index]
        return frame

    def disagreements(self) -> pd.DataFrame:
        """``table()`` restricted to samples on which the runs do not all agree."""
        return self.table("SELECT sid FROM p GROUP BY sid HAVING min(pred) <> max(pred)")

    def _flips(self, base: str | int, new: str | int, base_correct: bool) -> pd.DataFrame:
        b, n = self._run(base), self._run(new)
        frame = self._con.execute(
            "SELECT l.id, a.label, a.pred AS base_pred, z.pred AS new_pred, "
            "a.score AS base_score, z.score AS new_score, z.conf AS new_confidence "
            "FROM p AS a JOIN p AS z ON a.sid = z.sid AND z.run = ? "
            "JOIN labels AS l ON l.sid = a.sid "
            "WHERE a.run = ? AND a.correct = ? AND z.correct = ? "
            "ORDER BY z.conf DESC NULLS LAST, l.id",
            [n.index, b.index, base_correct, not base_correct],
        ).df()
        for column in ("label", "base_pred", "new_pred"):
            frame[column] = self._class_names(frame[column])
        return frame

    def regressions(self, base: str | int, new: str | int) -> pd.DataFrame:
        """Samples ``base`` got right and ``new`` got wrong, most confident mistakes first."""
        return self._flips(base, new, base_correct=True)

    def improvements(self, base: str | int, new: str | int) -> pd.DataFrame:
        """Samples ``base`` got wrong and ``new`` got right."""
        return self._flips(base, new, base_correct=False)

    def mcnemar(self, base: str | int, new: str | int) -> m.McNemar:
        """Exact McNemar test on the common samples: is ``new`` really different from ``base``?"""
        b, n = self._run(base), self._run(new)
        right_wrong, wrong_right = self._con.execute(
            "SELECT count(*) FILTER (WHERE a.correct AND NOT z.correct), "
            "count(*) FILTER (WHERE NOT a.correct AND z.correct) "
            "FROM p AS a JOIN p AS z ON a.sid = z.sid WHERE a.run = ? AND z.run = ?",
            [b.index, n.index],
        ).fetchone()
        return m.mcnemar_exact(int(right_wrong), int(wrong_right))

    def bootstrap_ci(
        self,
        base: str | int,
        new: str | int,
        metric: str = "accuracy",
        n_boot: int = 2000,
        level: float = 0.95,
        seed: int = 0,
    ) -> dict[str, float]:
        """Bootstrap confidence interval of ``metric(new) - metric(base)`` (accuracy or
        macro_f1), resampling the common samples."""
        b, n = self._run(base), self._run(new)
        c = self._num_classes()
        cells = np.zeros((c, c, c), dtype=np.int64)
        for label, bp, np_, count in self._con.execute(
            "SELECT a.label, a.pred, z.pred, count(*) FROM p AS a JOIN p AS z ON a.sid = z.sid "
            "WHERE a.run = ? AND z.run = ? AND a.pred BETWEEN 0 AND ? AND z.pred BETWEEN 0 AND ? "
            "GROUP BY ALL",
            [b.index, n.index, c - 1, c - 1],
        ).fetchall():
            cells[label, bp, np_] = count
        diff, low, high = m.bootstrap_difference(cells, metric, n_boot, level, seed)
        return {
            "metric": metric,
            "difference": diff,
            "low": low,
            "high": high,
            "level": level,
            "n_boot": n_boot,
        }

    def hard_samples(self, k: int = 20) -> pd.DataFrame:
        """The samples most runs get wrong (ties: lowest mean score of the true class first)."""
        frame = self._con.execute(
            "SELECT l.id, any_value(p.label) AS label, count(*) FILTER (WHERE NOT p.correct) "
            "AS wrong, count(*) AS runs, avg(p.p_true) AS mean_true_probability "
            "FROM p JOIN labels AS l USING (sid) GROUP BY l.sid, l.id "
            "HAVING count(*) FILTER (WHERE NOT p.correct) > 0 "
            "ORDER BY wrong DESC, mean_true_probability ASC NULLS LAST, l.id LIMIT ?",
            [int(k)],
        ).df()
        frame["label"] = self._class_names(frame["label"])
        return frame

    def suspect_labels(
        self, k: int = 20, min_confidence: float = 0.5, min_runs: int | None = None
    ) -> pd.DataFrame:
        """Samples where several runs confidently agree on a class other than the label:
        candidate label errors. ``min_runs`` defaults to half the runs (at least 2, or 1 when
        only one run is compared)."""
        if min_runs is None:
            min_runs = min(len(self.runs), max(2, (len(self.runs) + 1) // 2))
        frame = self._con.execute(
            "WITH votes AS (SELECT sid, pred, count(*) AS n, avg(conf) AS confidence "
            "FROM p WHERE NOT correct AND coalesce(conf, 1.0) >= ? GROUP BY sid, pred), "
            "best AS (SELECT sid, arg_max(pred, n) AS suggested, max(n) AS runs_agreeing, "
            "arg_max(confidence, n) AS mean_confidence FROM votes GROUP BY sid) "
            "SELECT l.id, l.label, b.suggested, b.runs_agreeing, b.mean_confidence "
            "FROM best AS b JOIN labels AS l USING (sid) WHERE b.runs_agreeing >= ? "
            "ORDER BY runs_agreeing DESC, mean_confidence DESC NULLS LAST, l.id LIMIT ?",
            [float(min_confidence), int(min_runs), int(k)],
        ).df()
        frame["label"] = self._class_names(frame["label"])
        frame["suggested"] = self._class_names(frame["suggested"])
        return frame

    def history(self, id: object) -> pd.DataFrame:
        """Every prediction ever logged on sample ``id``: across runs, predictions tables and
        versions of this dataset, with each run's config."""
        sid = str(id)
        rows = []
        versions = _dataset_versions(
            self._backend, f"{self.versions[0].project}/{self.versions[0].artifact}", None
        )
        by_id = {v.id: v for v in versions}
        for run, table, row in self._backend.table_versions(
            kind="predictions", dataset_version_ids=list(by_id)
        ):
            paths = parquet_paths(self._backend, self._backend.read_manifest(table.digest))
            found = self._con.execute(
                f"SELECT * FROM read_parquet({sql_list(paths)}) WHERE id = ?", [sid]
            ).df()
            if found.empty:
                continue
            record = found.iloc[0].to_dict()
            dataset = by_id[row.dataset_version_id]  # type: ignore[index]
            pred = record.get("pred")
            scores = record.get("scores")
            rows.append(
                {
                    "run": run.name if run else None,
                    "run_id": run.id if run else None,
                    "started_at": pd.to_datetime(run.started_at, unit="s") if run else None,
                    "table": table.spec,
                    "dataset_version": dataset.version,
                    "pred": self.classes[int(pred)]
                    if self.classes and pred is not None and pred == pred
                    else pred,
                    "scores": None if scores is None else np.asarray(scores).tolist(),
                    "config": json.dumps(run.config) if run else None,
                }
            )
        if not rows:
            found = self._con.execute("SELECT 1 FROM labels WHERE id = ?", [sid]).fetchone()
            if found is None:
                raise NotFoundError(f"no sample {sid!r} in any version of {self.dataset}")
        return pd.DataFrame(rows)


def _dataset_versions(backend: Backend, dataset: str, project: str | None) -> list[VersionRecord]:
    spec = parse_version_spec(dataset)
    every = ":" not in dataset
    owner = spec.project or project
    if owner is None:
        owners = sorted(
            {a.project for a in backend.artifacts() if a.name == spec.name and a.type == "dataset"}
        )
        if not owners:
            raise NotFoundError(f"no dataset named {spec.name!r} in this store")
        if len(owners) > 1:
            raise CompareError(
                f"dataset {spec.name!r} exists in several projects ({', '.join(owners)}); "
                "write project/name or pass project="
            )
        owner = owners[0]
    if every:
        versions = backend.versions(owner, spec.name)
    else:
        versions = [backend.resolve(spec, owner)]
    if versions[0].type != "dataset":
        raise CompareError(f"{versions[0].spec} is a {versions[0].type!r} artifact, not a dataset")
    return versions


def parquet_columns(con: Any, path: str) -> set[str]:
    rows = con.execute("SELECT name FROM parquet_schema(?)", [path]).fetchall()
    return {r[0] for r in rows}


def _select_runs(
    backend: Backend,
    con: Any,
    versions: list[VersionRecord],
    predictions: str,
    runs: list[str] | str | None,
    dataset: str,
) -> list[ComparedRun]:
    found = backend.table_versions(
        kind="predictions", name=predictions, dataset_version_ids=[v.id for v in versions]
    )
    by_version = {v.id: v for v in versions}
    latest: dict[str, tuple[RunRecord, VersionRecord, VersionRecord]] = {}
    for run, table, row in found:
        if run is None or row.dataset_version_id is None:
            continue
        latest[run.id] = (run, table, by_version[row.dataset_version_id])  # later ones win
    if not latest:
        raise NotFoundError(
            f"no run logged a predictions table named {predictions!r} on {dataset}; log some "
            "with run.log_predictions(dataset_version, ids, pred=..., scores=...)"
        )
    chosen = sorted(latest.values(), key=lambda item: (item[0].started_at, item[0].id))
    if runs is not None:
        wanted = [runs] if isinstance(runs, str) else list(runs)
        if not wanted:
            raise CompareError(
                "runs= selects no runs; give run names or ids, or leave it out for every run"
            )
        picked = []
        for key in wanted:
            matches = [item for item in chosen if key in (item[0].name, item[0].id)]
            if not matches:
                names = ", ".join(item[0].name for item in chosen)
                raise NotFoundError(
                    f"no run {key!r} logged {predictions!r} on {dataset}; runs: {names}"
                )
            picked += [item for item in matches if item not in picked]
        chosen = picked
    names = [item[0].name for item in chosen]
    out = []
    for index, (run, table, version) in enumerate(chosen):
        label = run.name if names.count(run.name) == 1 else f"{run.name}-{run.id[:6]}"
        manifest = backend.read_manifest(table.digest)
        paths = parquet_paths(backend, manifest)
        has_scores = "scores" in parquet_columns(con, paths[0])
        out.append(ComparedRun(index, label, run, table, version, has_scores))
    return out
