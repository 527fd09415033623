"""``tessera demo``, run as a user runs it: a real process on real images (scikit-learn's
digits, a few hundred of them so the test stays quick), the report it prints, and ``--ui``
serving the result until Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

import tessera
from services import free_port

pytest.importorskip("sklearn", reason="the demo needs scikit-learn (pip install -e '.[demo]')")

CLI = [sys.executable, "-c", "from tessera.cli import main; main()"]
ENV = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}  # no wrapped messages


def _wait_for_page(url: str, process: subprocess.Popen[str]) -> httpx.Response:
    """The URL is printed just before uvicorn starts listening: poll until it answers."""
    deadline = time.monotonic() + 60
    while True:
        assert process.poll() is None, f"the demo exited early: {process.stderr.read()}"  # type: ignore[union-attr]
        try:
            return httpx.get(url, timeout=5)
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.mark.slow
def test_demo_prints_the_report_then_serves_the_ui_until_ctrl_c(tmp_path):
    store = tmp_path / "demo"
    port = free_port()
    command = ["demo", "--dataset", "digits", "--limit", "300", "--dir", str(store)]
    process = subprocess.Popen(
        [*CLI, *command, "--ui", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        printed = []
        for line in process.stdout:  # type: ignore[union-attr]
            printed.append(line)
            if line.startswith("web UI: "):
                break
        report = "".join(printed)
        url = re.search(r"web UI: (http://127\.0\.0\.1:\d+/)", report)
        assert url is not None, report + process.stderr.read()  # type: ignore[union-attr]
        assert url.group(1) == f"http://127.0.0.1:{port}/"

        # Everything issue #8 asks the report to show.
        assert re.search(r"dataset demo/digits:v0: .* of images", report)
        assert "Bytes added per evaluation" in report and "storing the images again" in report
        assert "Metrics on demo/digits:v0" in report
        assert re.search(r"McNemar \w+ → \w+ \(the two best\): \d+ right→wrong", report)
        assert "top regressions" in report
        assert f"tessera ui --dir {store}" in report
        assert "Time per phase" in report
        # The byte accounting adds up to what is on disk.
        assert re.search(r"blob folder on disk: (.*); the figures above add up to \1\n", report)

        home = _wait_for_page(url.group(1), process)
        assert home.status_code == 200 and "demo" in home.text
        project = httpx.get(f"{url.group(1)}projects/demo", timeout=10)
        assert project.status_code == 200
        for run in ("logreg", "boosting", "mlp"):
            assert run in project.text

        process.send_signal(signal.SIGINT)  # what Ctrl-C does
        process.wait(timeout=60)
        errors = process.stderr.read()  # type: ignore[union-attr]
        assert process.returncode == 0, errors
        assert "Traceback" not in errors
        with pytest.raises(httpx.TransportError):
            httpx.get(url.group(1), timeout=5)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    # The store the demo left is a complete one: three evaluations of v0, all verified.
    with tessera.open_store(store) as browser:
        runs = {r.name for r in browser.runs("demo")}
    assert {"log-testset", "logreg", "boosting", "mlp"} <= runs
    verify = subprocess.run([*CLI, "verify", "--dir", str(store)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_demo_refuses_a_bad_limit_and_an_existing_store(tmp_path):
    bad = subprocess.run(
        [*CLI, "demo", "--dataset", "digits", "--limit", "3", "--dir", str(tmp_path / "d")],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert bad.returncode == 2 and "--limit" in bad.stderr
    assert not (tmp_path / "d").exists()
    tessera.init(project="p", dir=tmp_path / "s").finish()
    taken = subprocess.run(
        [*CLI, "demo", "--dir", str(tmp_path / "s")], capture_output=True, text=True, env=ENV
    )
    assert taken.returncode == 1 and "already holds a store" in taken.stderr
    assert "Traceback" not in taken.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        command = [*CLI, "demo", "--dir", str(tmp_path / "u"), "--ui", "--port", port]
        in_use = subprocess.run(command, capture_output=True, text=True, env=ENV)
    assert in_use.returncode == 2 and "in use" in in_use.stderr
    assert not (tmp_path / "u").exists()  # refused before any work
