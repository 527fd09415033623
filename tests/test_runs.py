"""Runs: lifecycle, metrics, summary, config, and how they end."""

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import tessera
from tessera.errors import InvalidNameError, RunFinishedError, StoreNotFoundError

both = pytest.mark.both_backends


@both
def test_run_lifecycle_metrics_and_summary(store_dir):
    with tessera.init(
        project="p", name="first", config={"lr": 0.1, "layers": [1, 2]}, dir=store_dir
    ) as run:
        assert run.status == "running"
        run.log({"loss": 1.0, "val": {"acc": 0.5}})
        run.log({"loss": np.float32(0.5)})
        run.log({"loss": 0.25}, step=10)
        run.log({"loss": 0.2})
        run.summary["best"] = np.int64(3)
        assert run.history()["loss"] == [(0, 1.0), (1, 0.5), (10, 0.25), (11, 0.2)]
        assert run.history()["val/acc"] == [(0, 0.5)]
    with tessera.open_store(store_dir) as store:
        (record,) = store.runs("p")
        assert record.name == "first"
        assert record.status == "finished"
        assert record.config == {"lr": 0.1, "layers": [1, 2]}
        assert record.summary == {"loss": 0.2, "val/acc": 0.5, "best": 3}
        assert record.ended_at >= record.started_at
        assert store.history(record.id)["loss"][-1] == (11, 0.2)


@both
def test_default_run_names_and_tessera_dir_env(store_dir, monkeypatch):
    monkeypatch.setenv("TESSERA_DIR", str(store_dir))
    with tessera.init(project="p") as a, tessera.init(project="p") as b:
        assert (a.name, b.name) == ("run-1", "run-2")
        assert a.id != b.id
    assert (store_dir / "tessera.json").exists()  # the store (or a server's cache) is there


@both
def test_exception_marks_run_failed(store_dir):
    with pytest.raises(ZeroDivisionError), tessera.init(project="p", dir=store_dir) as run:
        1 / 0  # noqa: B018
    with tessera.open_store(store_dir) as store:
        assert store.run(run.id).status == "failed"


@both
def test_finished_run_refuses_more_logging(store_dir):
    run = tessera.init(project="p", dir=store_dir)
    run.finish()
    run.finish()  # idempotent
    with pytest.raises(RunFinishedError, match="has finished"):
        run.log({"x": 1})
    with pytest.raises(RunFinishedError):
        run.summary["x"] = 1


@both
@pytest.mark.parametrize(
    ("data", "error"),
    [
        ({"x": "text"}, TypeError),
        ({"x": [1, 2]}, TypeError),
        ({3: 1.0}, TypeError),
        ("loss", TypeError),
    ],
)
def test_bad_metrics_are_refused_and_nothing_is_logged(store_dir, data, error):
    with tessera.init(project="p", dir=store_dir) as run:
        with pytest.raises(error):
            run.log(data)
        assert run.history() == {}


@both
def test_bad_step_and_config(store_dir):
    with tessera.init(project="p", dir=store_dir) as run:
        for step in (-1, 1.5, "3", True):
            with pytest.raises(ValueError, match="step"):
                run.log({"x": 1}, step=step)
    with pytest.raises(TypeError, match=r"config\.fn"):
        tessera.init(project="p", config={"fn": print}, dir=store_dir)
    with pytest.raises(InvalidNameError):
        tessera.init(project="no spaces", dir=store_dir)
    with pytest.raises(InvalidNameError):
        tessera.init(project="p", name="../x", dir=store_dir)


@both
def test_non_finite_metrics_become_null(store_dir):
    with tessera.init(project="p", dir=store_dir) as run:
        run.log({"loss": float("nan"), "inf": float("inf")})
        assert run.history() == {"inf": [(0, None)], "loss": [(0, None)]}


def test_open_store_needs_an_existing_store(tmp_path):
    with pytest.raises(StoreNotFoundError, match="no Tessera store"):
        tessera.open_store(tmp_path / "nothing")


def _run_script(store_dir, body: str, **kwargs) -> subprocess.Popen:
    script = textwrap.dedent(
        f"""
        import sys, time, tessera
        run = tessera.init(project="p", name="child", dir={str(store_dir)!r})
        print(run.id, flush=True)
        """
    ) + textwrap.dedent(body)
    return subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, **kwargs
    )


@pytest.mark.both_backends(kinds=["local", "http", "postgres+s3"])
def test_process_exit_without_finish_marks_finished(store_dir):
    child = _run_script(store_dir, "run.log({'x': 1})\n")
    run_id = child.stdout.readline().strip()
    assert child.wait(60) == 0
    with tessera.open_store(store_dir) as store:
        assert store.run(run_id).status == "finished"


@pytest.mark.both_backends(kinds=["local", "http", "postgres+s3"])
def test_uncaught_exception_marks_failed(store_dir):
    child = _run_script(store_dir, "raise SystemError('boom')\n", stderr=subprocess.DEVNULL)
    run_id = child.stdout.readline().strip()
    assert child.wait(60) == 1
    with tessera.open_store(store_dir) as store:
        assert store.run(run_id).status == "failed"


@pytest.mark.both_backends(kinds=["local", "http", "postgres+s3"])
def test_killed_process_is_marked_crashed(store_dir):
    child = _run_script(store_dir, "time.sleep(60)\n")
    run_id = child.stdout.readline().strip()
    with tessera.open_store(store_dir) as store:
        assert store.run(run_id).status == "running"  # alive: left alone
    os.kill(child.pid, signal.SIGKILL)
    child.wait(60)
    with tessera.open_store(store_dir) as store:
        record = store.run(run_id)
        assert record.status == "crashed"
        assert record.ended_at is not None
