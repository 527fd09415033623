"""tessera.sql and the compare / sql commands.

The views must return exactly the rows the store holds, every statement that is not a single
SELECT must be refused before it runs (leaving the store, and the folder, as they were), and the
command line prints tables, the McNemar verdict and regressions, or one error line.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import tessera
from conftest import MAIN_KINDS, store_state
from tessera.analysis.queries import QueryError

CLASSES = ["cat", "dog", "fox"]
IDS = [f"s{i:02d}" for i in range(12)]
LABELS = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
WRONG = (LABELS + 1) % 3
# base is right on s00 and s04 only; new is right everywhere but s04 and s11:
# one regression (s04), nine improvements, McNemar p = 2 * (1 + 10) / 2**10
BASE = np.where(np.isin(np.arange(12), [0, 4]), LABELS, WRONG)
NEW = np.where(np.isin(np.arange(12), [4, 11]), WRONG, LABELS)
V1_LABELS = np.array([1, 0, 0, 0, 1, 1, 1, 1])  # pets:v1: s00 relabelled, s08..s11 dropped

both = pytest.mark.both_backends(kinds=MAIN_KINDS)
# the command line prints the same whatever the store: checked on two kinds (time)
cli_kinds = pytest.mark.both_backends(kinds=["local", "postgres+s3"])


def tessera_cli_all(commands):
    """Run ``tessera`` commands as a user does, each in its own process, all at once (start-up
    dominates: importing the package takes a few seconds); returns one result per command."""
    env = {**os.environ, "COLUMNS": "200"}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", "from tessera.cli import main; main()", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for args in commands
    ]
    results = []
    for process, args in zip(processes, commands, strict=True):
        stdout, stderr = process.communicate(timeout=120)
        results.append(subprocess.CompletedProcess(args, process.returncode, stdout, stderr))
    return results


def images(count, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (3, 3, 3), dtype=np.uint8) for _ in range(count)]


def dataset(name, ids, labels, pictures, classes=CLASSES, **columns):
    out = tessera.Dataset(name, classes=classes)
    for i, (sid, label, picture) in enumerate(zip(ids, labels, pictures, strict=True)):
        out.add(sid, picture, int(label), **{k: v[i] for k, v in columns.items()})
    return out


def scores_for(pred, seed):
    rng = np.random.default_rng(seed)
    scores = rng.random((len(pred), len(CLASSES)))
    scores[np.arange(len(pred)), pred] += 1.0
    return scores


def build_store(root):
    """zoo: pets:v0 (12 samples), pets:v1 (8), runs base and new on v0 (new also a "probe"
    table on v1); farm: cows:v0 (5) with one run."""
    pictures = images(12)
    with tessera.init(project="zoo", name="maker", dir=root) as run:
        v0 = run.log_dataset(dataset("pets", IDS, LABELS, pictures))
        v1 = run.log_dataset(dataset("pets", IDS[:8], V1_LABELS, pictures[:8]))
    ids = {}
    for name, pred, seed, lr in (("base", BASE, 1, 0.1), ("new", NEW, 2, 0.01)):
        with tessera.init(project="zoo", name=name, config={"lr": lr}, dir=root) as run:
            run.log_predictions(v0, IDS, pred=pred, scores=scores_for(pred, seed))
            if name == "new":
                run.log_predictions(v1, IDS[:3], name="probe", pred=[2, 2, 2])
            ids[name] = run.id
    with tessera.init(project="farm", name="farmer", dir=root) as run:
        cows = run.log_dataset(
            dataset(
                "cows",
                ["c1", "c2", "c3", "c4", "c5"],
                [0, 1, 1, 0, 1],
                images(5, 9),
                ["holstein", "jersey"],
            )
        )
        run.log_predictions(cows, cows.ids, pred=[0, 1, 0, 0, 1])
        ids["farmer"] = run.id
    return ids


@pytest.fixture
def store(backend_kind, shared_stores, monkeypatch):
    """The store of ``build_store``, one per kind, only read by the tests that share it."""
    root, ids = shared_stores.get("sql", backend_kind, build_store, monkeypatch)
    return {"dir": root, "ids": ids}


def rows(frame):
    return [tuple(r) for r in frame.itertuples(index=False, name=None)]


# -- views -------------------------------------------------------------------------------------


@both
def test_runs_view(store):
    frame = tessera.sql(
        "SELECT project, name, id, status, config, summary FROM runs ORDER BY started_at",
        dir=store["dir"],
    )
    assert frame["name"].tolist() == ["maker", "base", "new", "farmer"]
    assert frame["project"].tolist() == ["zoo", "zoo", "zoo", "farm"]
    assert set(frame["status"]) == {"finished"}
    assert [json.loads(c) for c in frame["config"]] == [{}, {"lr": 0.1}, {"lr": 0.01}, {}]
    assert frame["id"].tolist()[1:] == [store["ids"][k] for k in ("base", "new", "farmer")]
    typed = tessera.sql(
        "SELECT name FROM runs WHERE config->>'lr' = '0.01' AND ended_at >= started_at",
        dir=store["dir"],
    )
    assert typed["name"].tolist() == ["new"]


@both
def test_datasets_view(store):
    frame = tessera.sql(
        "SELECT project, dataset, version, samples, classes FROM datasets ORDER BY ALL",
        dir=store["dir"],
    )
    assert [r[:4] for r in rows(frame)] == [
        ("farm", "cows", "v0", 5),
        ("zoo", "pets", "v0", 12),
        ("zoo", "pets", "v1", 8),
    ]
    assert [json.loads(c) for c in frame["classes"]] == [["holstein", "jersey"], CLASSES, CLASSES]
    # only datasets: the predictions tables are not dataset versions
    assert len(tessera.sql("SELECT digest FROM datasets", dir=store["dir"])) == 3


@both
def test_samples_view(store):
    counts = tessera.sql(
        "SELECT project, dataset, version, count(*) AS n FROM samples GROUP BY ALL ORDER BY ALL",
        dir=store["dir"],
    )
    assert rows(counts) == [
        ("farm", "cows", "v0", 5),
        ("zoo", "pets", "v0", 12),
        ("zoo", "pets", "v1", 8),
    ]
    for version, ids, labels in (("v0", IDS, LABELS), ("v1", IDS[:8], V1_LABELS)):
        frame = tessera.sql(
            "SELECT id, label, width, height FROM samples WHERE dataset = 'pets' "
            f"AND version = '{version}' ORDER BY id",
            dir=store["dir"],
        )
        assert frame["id"].tolist() == ids
        assert frame["label"].tolist() == labels.tolist()
        assert set(frame["width"]) == set(frame["height"]) == {3}


@both
def test_predictions_view(store):
    d = store["dir"]
    counts = tessera.sql(
        'SELECT project, run, run_id, "table", dataset, version, count(*) AS n '
        'FROM predictions GROUP BY ALL ORDER BY project, run, "table"',
        dir=d,
    )
    ids = store["ids"]
    assert rows(counts) == [
        ("farm", "farmer", ids["farmer"], "predictions", "cows", "v0", 5),
        ("zoo", "base", ids["base"], "predictions", "pets", "v0", 12),
        ("zoo", "new", ids["new"], "predictions", "pets", "v0", 12),
        ("zoo", "new", ids["new"], "probe", "pets", "v1", 3),
    ]
    base = tessera.sql(
        "SELECT id, pred, scores FROM predictions WHERE run = 'base' ORDER BY id", dir=d
    )
    assert base["id"].tolist() == IDS
    assert base["pred"].tolist() == BASE.tolist()
    np.testing.assert_allclose(
        np.stack(base["scores"].to_numpy()), scores_for(BASE, 1).astype(np.float32)
    )
    probe = tessera.sql("SELECT id, pred, scores FROM predictions WHERE \"table\" = 'probe'", dir=d)
    assert sorted(probe["id"]) == IDS[:3] and probe["scores"].isna().all()
    # predictions join their samples on id and dataset version: accuracy per run
    accuracy = tessera.sql(
        "SELECT p.run, avg((p.pred = s.label)::INTEGER) AS accuracy FROM predictions AS p "
        "JOIN samples AS s USING (project, dataset, version, id) "
        "WHERE p.\"table\" = 'predictions' GROUP BY p.run ORDER BY p.run",
        dir=d,
    )
    assert rows(accuracy) == [
        ("base", pytest.approx(2 / 12)),
        ("farmer", pytest.approx(4 / 5)),
        ("new", pytest.approx(10 / 12)),
    ]


@both
def test_views_of_a_store_without_datasets(store_dir):
    with tessera.init(project="p", dir=store_dir):
        pass
    for view in ("datasets", "samples", "predictions"):
        assert tessera.sql(f"SELECT count(*) AS n FROM {view}", dir=store_dir)["n"].tolist() == [0]
    assert tessera.sql("SELECT name FROM runs", dir=store_dir)["name"].tolist() == ["run-1"]
    empty = tessera.sql("SELECT project, dataset, version FROM samples", dir=store_dir)
    assert empty.empty


@both
def test_one_sample_table_in_two_projects(store_dir):
    for project in ("a", "b"):  # identical content: the same Parquet blob behind two versions
        with tessera.init(project=project, dir=store_dir) as run:
            run.log_dataset(dataset("d", IDS[:4], LABELS[:4], images(4)))
    frame = tessera.sql(
        "SELECT project, count(*) AS n FROM samples GROUP BY project ORDER BY project",
        dir=store_dir,
    )
    assert rows(frame) == [("a", 4), ("b", 4)]


@both
def test_user_columns_named_like_tags_do_not_shadow_them(store_dir):
    with tessera.init(project="p", name="r", dir=store_dir) as run:
        version = run.log_dataset(
            dataset("pets", IDS[:4], LABELS[:4], images(4), dataset=["x"] * 4, version=[7] * 4)
        )
        run.log_predictions(version, IDS[:4], pred=LABELS[:4], run=np.arange(4))
    samples = tessera.sql("SELECT DISTINCT dataset, version FROM samples", dir=store_dir)
    assert rows(samples) == [("pets", "v0")]
    predictions = tessera.sql("SELECT DISTINCT run FROM predictions", dir=store_dir)
    assert predictions["run"].tolist() == ["r"]


# -- refusals ----------------------------------------------------------------------------------


@both
@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("DROP VIEW runs", "only SELECT queries are allowed (got DROP)"),
        ("DELETE FROM runs", "only SELECT queries are allowed (got DELETE)"),
        ("INSERT INTO runs SELECT * FROM runs", "only SELECT queries are allowed (got INSERT)"),
        ("UPDATE runs SET name = 'x'", "only SELECT queries are allowed (got UPDATE)"),
        ("COPY (SELECT * FROM samples) TO 'out.csv'", "only SELECT queries are allowed (got COPY)"),
        ("CREATE TABLE t AS SELECT * FROM runs", "only SELECT queries are allowed (got CREATE)"),
        ("ATTACH 'other.db' AS other", "only SELECT queries are allowed (got ATTACH)"),
        ("SET threads = 1", "only SELECT queries are allowed (got SET)"),
        ("SELECT * FROM runs; DROP VIEW runs", "give exactly one statement, got 2"),
        (";", "give exactly one statement, got 0"),
        ("", "give a SELECT statement"),
        ("SELECT * FROM query('COPY runs TO ''q.csv''')", "SELECT"),
    ],
)
def test_non_select_statements_are_refused(store, tmp_path, query, message):
    before = store_state(store["dir"])
    files = sorted(os.listdir(tmp_path))  # the working folder: nothing may be written there
    with pytest.raises(QueryError) as info:
        tessera.sql(query, dir=store["dir"])
    assert message in str(info.value)
    assert isinstance(info.value, tessera.TesseraError)
    assert store_state(store["dir"]) == before
    assert sorted(os.listdir(tmp_path)) == files


@both
def test_select_forms_that_are_accepted(store):
    d = store["dir"]
    assert tessera.sql("SELECT count(*) AS n FROM runs;", dir=d)["n"].tolist() == [4]
    assert tessera.sql(
        "WITH r AS (SELECT name FROM runs WHERE project = 'farm') SELECT * FROM r", dir=d
    )["name"].tolist() == ["farmer"]
    assert tessera.sql("FROM datasets SELECT dataset ORDER BY 1", dir=d)["dataset"].tolist() == [
        "cows",
        "pets",
        "pets",
    ]


# -- the command line --------------------------------------------------------------------------


def one_error_line(result, text):
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and text in lines[0], lines[0]


SQL_QUERY = (
    "SELECT run, \"table\", count(*) AS n FROM predictions WHERE project = 'zoo' "
    "GROUP BY ALL ORDER BY ALL"
)
CLI = {
    "sql": ["sql", SQL_QUERY, "--limit", "2"],
    # new is the better run; compared the other way round, its mistakes are the regressions
    "compare": ["compare", "pets:v0", "--base", "new", "--new", "base", "--top", "3"],
    "unknown dataset": ["compare", "nope"],
    "unknown run": ["compare", "pets:v0", "--base", "ghost"],
    "not a select": ["sql", "DROP VIEW runs"],
    "syntax error": ["sql", "SELEC 1"],
}


_CLI_RESULTS: dict[str, dict[str, subprocess.CompletedProcess]] = {}


@pytest.fixture
def cli(store, backend_kind):
    """Every command of this module, run once per kind against the shared store (which must
    not change)."""
    if backend_kind not in _CLI_RESULTS:
        before = store_state(store["dir"])
        results = tessera_cli_all([[*args, "--dir", str(store["dir"])] for args in CLI.values()])
        assert store_state(store["dir"]) == before
        _CLI_RESULTS[backend_kind] = dict(zip(CLI, results, strict=True))
    return _CLI_RESULTS[backend_kind]


@cli_kinds
def test_cli_sql(cli):
    result = cli["sql"]
    assert result.returncode == 0, result.stderr
    header = next(line for line in result.stdout.splitlines() if "┃" in line and "run" in line)
    assert [c.strip() for c in header.strip("┃ ").split("┃")] == ["run", "table", "n"]
    lines = [line for line in result.stdout.splitlines() if "│" in line]
    cells = [[c.strip() for c in line.strip("│ ").split("│")] for line in lines]
    assert cells == [["base", "predictions", "12"], ["new", "predictions", "12"]]
    assert "(3 rows; 2 shown)" in result.stdout


@cli_kinds
def test_cli_compare_prints_metrics_mcnemar_and_regressions(cli, store):
    result = cli["compare"]
    assert result.returncode == 0, result.stderr
    out = result.stdout
    with tessera.compare("pets:v0", dir=store["dir"]) as c:
        metrics = c.metrics()
        regressions = c.regressions("new", "base")
    assert "Metrics on pets:v0" in out
    header = next(line for line in out.splitlines() if "accuracy" in line)
    assert [c.strip() for c in header.strip("┃ ").split("┃")] == [
        "run",
        "n",
        "accuracy",
        "macro_f1",
        "log_loss",
        "ece",
    ]
    for run in ("base", "new"):
        row = next(line for line in out.splitlines() if line.startswith(f"│ {run} "))
        cells = [c.strip() for c in row.strip("│ ").split("│")]
        assert cells == [run, "12"] + [
            f"{metrics.loc[run, column]:.4f}"
            for column in ("accuracy", "macro_f1", "log_loss", "ece")
        ]
    assert metrics.loc["base", "accuracy"] == pytest.approx(2 / 12)
    assert "12 samples predicted by all 2 runs" in out
    p = 2 * (1 + 10) / 2**10  # exact two-sided binomial, b = 9, c = 1
    assert f"McNemar new → base: 9 right→wrong, 1 wrong→right; new is better (p = {p:.3g})" in out
    assert "Top regressions new → base (9 in all)" in out
    shown = [line for line in out.splitlines() if line.startswith("│ s")]
    assert [line.split("│")[1].strip() for line in shown] == regressions["id"].tolist()[:3]
    assert len(regressions) == 9


@cli_kinds
@pytest.mark.parametrize(
    ("command", "message"),
    [
        ("unknown dataset", "no dataset named 'nope' in this store"),
        ("unknown run", "no run 'ghost' in this comparison; runs: base, new"),
        ("not a select", "only SELECT queries are allowed (got DROP)"),
    ],
)
def test_cli_errors_are_one_line(cli, command, message):
    one_error_line(cli[command], message)


@cli_kinds
def test_cli_syntax_error_is_one_line(cli):
    one_error_line(cli["syntax error"], "syntax error")


def test_duckdb_reads_a_large_parquet_blob_from_the_bucket(s3_env, tmp_path):
    """Parquet blobs of several MiB in S3 are read whole and right (through obstore's fsspec
    file, DuckDB's reads beyond the first 2 MiB came back short)."""
    import io

    import duckdb
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tessera.store.s3 import S3BlobStore

    values = np.random.default_rng(0).random(600_000)
    sink = io.BytesIO()
    pq.write_table(pa.table({"v": values}), sink, row_group_size=100_000)
    data = sink.getvalue()
    assert len(data) > 4 * 1024 * 1024
    store = S3BlobStore(s3_env.new_prefix(), tmp_path / "cache")
    store.create()
    digest = store.put_bytes(data)
    con = duckdb.connect()
    count, total = con.execute(
        f"SELECT count(*), sum(v) FROM read_parquet('{store.duckdb_path(digest)}')"
    ).fetchone()
    assert count == len(values)
    assert total == pytest.approx(values.sum())
