"""The web UI, end to end: a real store made by the seed workflow, the real server (and
``tessera ui``) under uvicorn, and Debian's Chromium driven by Playwright.

Browser tests skip only when /usr/bin/chromium is absent (``apt-get install chromium``); the
HTTP-level tests always run. Screenshots of every page go to ``test-output/ui/`` at the top of
the repository (a folder that ignores itself in git).
"""

from __future__ import annotations

import io
import os
import re
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

import tessera
from conftest import ThreadedServer, store_state
from tessera.backend.local import LocalBackend
from tessera.names import parse_version_spec
from tessera.ui.views import number

CHROMIUM = Path("/usr/bin/chromium")
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="Debian's Chromium is not installed at /usr/bin/chromium (apt-get install chromium)",
)
BROWSER_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
OUTPUT = Path(__file__).resolve().parent.parent / "test-output" / "ui"

CLASSES = ["T-shirt", "Shirt", "Sneaker", '<script>alert("label")</script>']
XSS_RUN = "<script>alert(1)</script>"
XSS_CONFIG = '"><img src=x onerror=alert(2)>'
XSS_CELL = "<img src=x onerror=alert(3)>"
BIG_ROWS = 5000


# -- the seed store ----------------------------------------------------------------------------


def _jpegs(root: Path, count: int) -> list[tuple[str, Path, int]]:
    """Small JPEGs with a shape per class (square, disc, triangle, stripe)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(count):
        k = i % len(CLASSES)
        image = Image.new("RGB", (32, 32), tuple(int(c) for c in rng.integers(30, 220, 3)))
        draw = ImageDraw.Draw(image)
        if k == 0:
            draw.rectangle([8, 8, 24, 24], fill=(240, 240, 240))
        elif k == 1:
            draw.ellipse([6, 6, 26, 26], fill=(20, 20, 20))
        elif k == 2:
            draw.polygon([(4, 28), (16, 4), (28, 28)], fill=(250, 200, 0))
        else:
            draw.line([(0, 0), (31, 31)], fill=(255, 0, 0), width=4)
        path = root / f"s{i:03d}.jpg"
        image.save(path, quality=90)
        out.append((f"s{i:03d}", path, k))
    return out


def seed_store(store: Path, work: Path) -> dict[str, Any]:
    """The seed workflow: a dataset of JPEGs with classes (two versions), three runs that log
    metrics, predictions by id and a Table with Images; payloads that must stay text in a run
    name, a config value, a class name and a table cell; a big table; a private project."""
    items = _jpegs(work / "imgs", 60)
    ds = tessera.Dataset("fashion", classes=CLASSES, description="small test set")
    for sid, path, k in items:
        ds.add(sid, path, k, split="test" if int(sid[1:]) % 2 else "val")
    with tessera.init(project="seed", name="make-data", dir=store) as run:
        run.log_dataset(ds)
    # v1: s003's image changes, s007's label changes, s005 goes, s060 and s061 arrive
    items = _jpegs(work / "imgs2", 62)
    changed = work / "changed.jpg"
    Image.new("RGB", (32, 32), (0, 128, 255)).save(changed)
    ds = tessera.Dataset("fashion", classes=CLASSES)
    for sid, path, k in items:
        if sid == "s005":
            continue
        ds.add(
            sid,
            changed if sid == "s003" else path,
            (k + 1) % len(CLASSES) if sid == "s007" else k,
            split="test",
        )
    with tessera.init(project="seed", name="fix-labels", dir=store) as run:
        run.use_dataset("fashion:v0")
        run.log_dataset(ds)
    rng = np.random.default_rng(1)
    runs: dict[str, str] = {}
    for name, accuracy, lr in (("baseline", 0.6, 0.1), ("bigger", 0.8, 0.01), ("xss", 0.7, 0.05)):
        config = {"lr": lr, "arch": XSS_CONFIG if name == "xss" else "resnet", "opt": {"m": 0.9}}
        with tessera.init(project="seed", name=name, config=config, dir=store) as run:
            dsv = run.use_dataset("fashion:v1")
            for step in range(25):
                run.log(
                    {
                        "loss": float(np.exp(-step / 8) + rng.random() * 0.05),
                        "val": {"acc": accuracy * (1 - np.exp(-step / 5))},
                    },
                    step=step,
                )
            labels = np.array(dsv.table(["label"]).column("label").to_pylist())
            n = len(labels)
            pred = np.where(rng.random(n) < accuracy, labels, rng.integers(0, len(CLASSES), n))
            scores = rng.random((n, len(CLASSES))).astype("float32")
            scores[np.arange(n), pred] += 2
            scores /= scores.sum(1, keepdims=True)
            run.log_predictions(dsv, dsv.ids, pred=pred, scores=scores)
            table = tessera.Table(columns=["image", "note", "confidence"])
            for sid, path, _k in items[:12]:
                if sid not in ("s003", "s005"):
                    note = XSS_CELL if sid == "s000" else f"note {sid}"
                    table.add_data(tessera.Image(path), note, float(rng.random()))
            run.log({"eval": table})
            run.summary["acc"] = float((pred == labels).mean())
            runs[name] = run.id
    with tessera.init(project="seed", name="big-table", dir=store) as run:
        big = pa.table(
            {
                "id": [f"r{i:05d}" for i in range(BIG_ROWS)],
                "value": np.arange(BIG_ROWS, dtype=np.float64) / 7,
                "text": [f"row number {i} with some padding text" for i in range(BIG_ROWS)],
            }
        )
        run.log({"big": tessera.Table.from_arrow(big)})
    backend = LocalBackend.open(store)
    try:
        # Run names are checked when logged; a pushed or imported store may still hold any
        # text, so the UI must show it as text.
        backend.catalog.update_run(runs["xss"], name=XSS_RUN)
    finally:
        backend.close()
    with tessera.init(project="secret", name="hidden-run", config={"x": 1}, dir=store) as run:
        private = tessera.Dataset("private-set", classes=["a", "b"])
        for i in range(4):
            private.add(f"p{i}", np.full((8, 8, 3), 40 * i + 7, np.uint8), i % 2)
        run.log_dataset(private)

    backend = LocalBackend.open(store)
    try:

        def vid(spec: str) -> int:
            return backend.resolve(parse_version_spec(spec), None).id

        ids = {
            "v0": vid("seed/fashion:v0"),
            "v1": vid("seed/fashion:v1"),
            "preds": {k: vid(f"seed/predictions:v{i}") for i, k in enumerate(runs)},
            "eval": vid("seed/eval:v0"),
            "big": vid("seed/big:v0"),
            "private": vid("secret/private-set:v0"),
        }
        secret_manifest = backend.read_manifest(backend.version_by_id(ids["private"]).digest)
        ids["secret_image"] = next(
            e.digest for e in secret_manifest.files.values() if e.path.startswith("images/")
        )
        seed_manifest = backend.read_manifest(backend.version_by_id(ids["v1"]).digest)
        ids["seed_image"] = seed_manifest.files["images/s001.jpg"].digest
    finally:
        backend.close()
    return {"store": store, "runs": runs, **ids}


@pytest.fixture(scope="session")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("ui-seed")
    with pytest.MonkeyPatch.context() as mp:
        for key in list(os.environ):
            if key.startswith("TESSERA_"):
                mp.delenv(key)
        return seed_store(root / "store", root)


@pytest.fixture(scope="session")
def server(seeded: dict[str, Any]):
    """The real server app (API + UI) under uvicorn, on the seeded store."""
    srv = ThreadedServer(seeded["store"])
    srv.reader_token = srv.token_for("reader", project="seed", role="reader")
    yield srv
    srv.stop()


def client(server: ThreadedServer, token: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=60)


def comparison(seeded: dict[str, Any]) -> tessera.Comparison:
    return tessera.compare(
        "seed/fashion:v1", runs=list(seeded["runs"].values()), dir=seeded["store"]
    )


# -- the browser -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def browser():
    if not CHROMIUM.exists():
        pytest.skip("Debian's Chromium is not installed at /usr/bin/chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        yield chromium
        chromium.close()


class Tab:
    """A page that records console errors, page errors and dialogs."""

    def __init__(self, context: Any, base: str):
        self.context = context
        self.base = base
        self.page = context.new_page()
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.page.on(
            "console",
            lambda m: (
                self.errors.append(f"{m.text} at {m.location}") if m.type == "error" else None
            ),
        )
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.add_init_script(
            "document.addEventListener('securitypolicyviolation', e => console.error("
            "'CSP', e.violatedDirective, e.sample, e.sourceFile, e.lineNumber, "
            "e.target && e.target.outerHTML && e.target.outerHTML.slice(0, 300)))"
        )

        def dialog(d: Any) -> None:
            self.dialogs.append(d.message)
            d.dismiss()

        self.page.on("dialog", dialog)

    def visit(self, path: str, status: int = 200) -> Any:
        response = self.page.goto(self.base + path)
        assert response is not None and response.status == status, (path, response)
        self.page.wait_for_load_state("load")
        return response

    def shot(self, name: str) -> Path:
        OUTPUT.mkdir(parents=True, exist_ok=True)
        ignore = OUTPUT.parent / ".gitignore"
        if not ignore.exists():
            ignore.write_text("# test screenshots and reports; never committed\n*\n")
        path = OUTPUT / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def clean(self) -> None:
        assert self.errors == [], self.errors
        assert self.dialogs == [], self.dialogs


def sign_in(browser: Any, server: ThreadedServer, token: str) -> Any:
    """A browser context signed in through the login form."""
    context = browser.new_context(viewport={"width": 1366, "height": 850})
    tab = Tab(context, server.url)
    tab.visit("/")  # redirected to the login page
    assert "/login" in tab.page.url
    tab.page.fill("#token", token)
    tab.page.click("main button[type=submit]")
    tab.page.wait_for_url(server.url + "/")
    tab.clean()
    tab.page.close()
    return context


@pytest.fixture(scope="session")
def admin(browser: Any, server: ThreadedServer):
    context = sign_in(browser, server, server.admin_token)
    yield context
    context.close()


@pytest.fixture
def tab(admin: Any, server: ThreadedServer):
    t = Tab(admin, server.url)
    yield t
    t.page.close()


# -- every page --------------------------------------------------------------------------------


@needs_chromium
def test_every_page_loads_without_console_errors(tab: Tab, seeded: dict[str, Any]) -> None:
    runs = seeded["runs"]
    pages = {
        "1-projects": "/",
        "2-project": "/projects/seed",
        "3-run": f"/runs/{runs['bigger']}",
        "3-run-xss": f"/runs/{runs['xss']}",
        "4-dataset-version": f"/versions/{seeded['v1']}",
        "4-predictions-version": f"/versions/{seeded['preds']['bigger']}",
        "5-table-dataset": f"/versions/{seeded['v1']}/rows",
        "5-table-predictions": f"/versions/{seeded['preds']['baseline']}/rows",
        "5-table-generic": f"/versions/{seeded['eval']}/rows",
        "5-table-big": f"/versions/{seeded['big']}/rows",
        "6-compare-choose": "/compare",
        "6-compare": f"/compare?dataset={seeded['v1']}",
        "7-sample": f"/sample?v={seeded['v1']}&id=s003",
    }
    for name, path in pages.items():
        tab.visit(path)
        assert tab.page.locator("h1").first.is_visible(), name
        # images on the page (below the fold too) are served to this session
        sources = tab.page.eval_on_selector_all("img[src]", "els => els.map(e => e.src)")
        for src in sorted(set(sources))[:12]:
            response = tab.page.request.get(src)
            assert response.status == 200, (name, src)
            assert response.headers["content-type"].startswith("image/"), src
        for alt in tab.page.eval_on_selector_all(
            "main img", "els => els.map(e => e.getAttribute('alt'))"
        ):
            assert alt, f"an image without alt text on {name}"
        tab.page.wait_for_load_state("networkidle")
        tab.shot(name)
        tab.clean()
    # the login page, in a fresh context
    context = tab.context.browser.new_context()
    fresh = Tab(context, tab.base)
    fresh.visit("/login")
    fresh.shot("0-login")
    fresh.clean()
    context.close()


@needs_chromium
def test_run_page_charts_and_links(tab: Tab, seeded: dict[str, Any]) -> None:
    tab.visit(f"/runs/{seeded['runs']['baseline']}")
    charts = tab.page.locator("figure.chart svg[role=img]")
    assert charts.count() == 2  # loss and val/acc
    assert tab.page.locator("figure.chart path.line").count() == 2
    assert tab.page.get_by_text("val/acc", exact=True).count() >= 1
    tab.page.get_by_role("link", name="predictions", exact=True).click()
    tab.page.wait_for_url(re.compile(r"/versions/\d+/rows"))
    assert tab.page.locator("tr[data-row]").count() == 50
    tab.clean()


# -- compare -----------------------------------------------------------------------------------


def _ids_in_grid(tab: Tab) -> list[str]:
    return tab.page.eval_on_selector_all(
        "#samples [data-sample-id]", "els => els.map(e => e.dataset.sampleId)"
    )


@needs_chromium
def test_confusion_cell_lists_exactly_its_samples(tab: Tab, seeded: dict[str, Any]) -> None:
    with comparison(seeded) as c:
        run = c.runs[0]
        matrix = c.confusion(run.index).to_numpy()
        off = matrix.copy()
        np.fill_diagonal(off, -1)
        true, pred = np.unravel_index(off.argmax(), off.shape)
        expected = c.samples(run.index, int(true), int(pred))["id"].tolist()
        diagonal = c.samples(run.index, 1, 1)["id"].tolist()
    assert 0 < len(expected) <= 48
    tab.visit(f"/compare?dataset={seeded['v1']}")
    button = tab.page.locator(
        f'table.heatmap[data-run="{run.id}"] button[value="{run.index}.{true}.{pred}"]'
    )
    assert button.inner_text() == str(len(expected))
    button.click()
    tab.page.wait_for_function(
        "n => document.querySelectorAll('#samples [data-sample-id]').length === n "
        "&& document.querySelector('#samples h2').textContent.includes('predicted')",
        arg=len(expected),
    )
    assert _ids_in_grid(tab) == expected
    assert f"cell={run.index}.{true}.{pred}" in tab.page.url  # the URL can be shared
    # keyboard: focus another cell and press Enter
    cell = tab.page.locator(f'table.heatmap[data-run="{run.id}"] button[value="{run.index}.1.1"]')
    cell.focus()
    tab.page.keyboard.press("Enter")
    tab.page.wait_for_function(
        "n => document.querySelectorAll('#samples [data-sample-id]').length === n",
        arg=len(diagonal),
    )
    assert _ids_in_grid(tab) == diagonal
    tab.shot("6-compare-cell")
    tab.clean()


@needs_chromium
def test_quick_filters_match_the_comparison(tab: Tab, seeded: dict[str, Any]) -> None:
    with comparison(seeded) as c:
        base, new = c.runs[0], c.runs[1]
        regressions = c.regressions(base.index, new.index)["id"].tolist()
        improvements = c.improvements(base.index, new.index)["id"].tolist()
        disagreements = c.disagreements()["id"].tolist()
        hard = c.hard_samples(k=1000)["id"].tolist()
    tab.visit(f"/compare?dataset={seeded['v1']}&base={base.id}&new={new.id}")
    for view, expected in (
        ("regressions", regressions),
        ("improvements", improvements),
        ("disagreements", disagreements),
        ("hard", hard),
    ):
        assert expected, view
        tab.page.click(f'#samples a[data-view="{view}"]')
        tab.page.wait_for_function(
            "v => document.querySelector('#samples .chip.active') && "
            "location.search.includes('view=' + v)",
            arg=view,
        )
        assert _ids_in_grid(tab) == expected[:48], view  # the first page
        assert f"{len(expected)} samples" in tab.page.inner_text("#samples h2"), view
        if view == "regressions":
            # each tile marks the base right and the new run wrong
            tile = tab.page.locator(f'#samples [data-sample-id="{expected[0]}"]')
            marks = tile.locator("ul.preds li")
            assert marks.nth(base.index).get_attribute("class") == "right"
            assert marks.nth(new.index).get_attribute("class") == "wrong"
            tab.shot("6-compare-regressions")
    tab.clean()


def test_compare_metrics_and_mcnemar(server: ThreadedServer, seeded: dict[str, Any]) -> None:
    with comparison(seeded) as c:
        metrics = c.metrics()
        test = c.mcnemar(c.runs[0].index, c.runs[1].index)
        second = c.runs[1].id
    with client(server, server.admin_token) as http:
        html = http.get("/compare", params={"dataset": seeded["v1"]}).text
    row = re.search(rf'<tr data-run="{second}">(.*?)</tr>', html, re.S).group(1)
    assert f">{number(metrics.iloc[1]['accuracy'])}<" in row
    assert f">{test.b}<" in row and f">{test.c}<" in row
    assert number(test.pvalue, 3) in row


# -- escaping ----------------------------------------------------------------------------------


@needs_chromium
def test_script_payloads_are_shown_as_text(tab: Tab, seeded: dict[str, Any]) -> None:
    checks = {
        "/projects/seed": [XSS_RUN, XSS_CONFIG],
        f"/runs/{seeded['runs']['xss']}": [XSS_RUN, XSS_CONFIG],
        f"/versions/{seeded['eval']}/rows": [XSS_CELL],
        f"/versions/{seeded['preds']['xss']}/rows": [CLASSES[3]],
        f"/compare?dataset={seeded['v1']}": [XSS_RUN, CLASSES[3]],
        f"/sample?v={seeded['v1']}&id=s003": [CLASSES[3], XSS_RUN],
    }
    for path, texts in checks.items():
        tab.visit(path)
        tab.page.wait_for_load_state("networkidle")
        for text in texts:
            assert tab.page.get_by_text(text, exact=False).count() >= 1, (path, text)
            assert text in tab.page.inner_text("main"), (path, text)
        assert tab.page.locator("img[src=x]").count() == 0, path
        assert tab.page.locator("script").count() == 2, path  # htmx and ui.js only
    assert tab.dialogs == []
    tab.clean()


def test_payloads_are_escaped_in_the_html(server: ThreadedServer, seeded: dict[str, Any]) -> None:
    with client(server, server.admin_token) as http:
        html = http.get(f"/runs/{seeded['runs']['xss']}").text
        table = http.get(f"/versions/{seeded['eval']}/rows").text
    assert XSS_RUN not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert XSS_CONFIG not in html and "&#34;&gt;&lt;img src=x onerror=alert(2)&gt;" in html
    assert XSS_CELL not in table and "&lt;img src=x onerror=alert(3)&gt;" in table


# -- the filter --------------------------------------------------------------------------------


@needs_chromium
def test_filter_injection_is_rejected_without_effect(tab: Tab, seeded: dict[str, Any]) -> None:
    before = store_state(seeded["store"])
    tab.visit(f"/versions/{seeded['preds']['baseline']}/rows")
    tab.page.fill("#filter-q", "1; DROP TABLE runs")
    tab.page.press("#filter-q", "Enter")
    error = tab.page.locator("#filter-error")
    error.wait_for()
    assert "unexpected ';'" in error.inner_text()
    assert "at character 2" in error.inner_text()
    assert tab.page.locator("#filter-error mark").inner_text() == ";"
    assert tab.page.locator("tr[data-row]").count() == 0
    query = urllib.parse.parse_qs(urllib.parse.urlparse(tab.page.url).query)
    assert query["q"] == ["1; DROP TABLE runs"]  # the URL keeps the state
    tab.shot("5-filter-error")
    # a payload inside a string literal is a bound value: it matches nothing, and runs nothing
    tab.page.fill("#filter-q", 'id = "x\'); DROP TABLE runs; --"')
    tab.page.press("#filter-q", "Enter")
    tab.page.get_by_text("No rows match.").wait_for()
    tab.page.fill("#filter-q", 'label = "x\\"); DROP TABLE runs; --"')
    tab.page.press("#filter-q", "Enter")
    tab.page.get_by_text("is not a class of column 'label'").wait_for()
    tab.clean()
    assert store_state(seeded["store"]) == before
    assert httpx.get(tab.base + "/api/v1/health").status_code == 200


def test_filters_sorts_and_columns_over_http(
    server: ThreadedServer, seeded: dict[str, Any]
) -> None:
    version = seeded["preds"]["baseline"]
    with client(server, server.admin_token) as http:
        html = http.get(
            f"/versions/{version}/rows",
            params={"q": 'label = "Shirt" and pred != label', "size": 200},
        ).text
        rows = re.findall(r"<tr data-row.*?</tr>", html, re.S)
        with comparison(seeded) as c:
            expected = c.samples(c.runs[0].index, "Shirt", None)
            expected = expected[expected["pred"] != "Shirt"]["id"].tolist()
        assert [re.search(r'data-id="([^"]+)"', r).group(1) for r in rows] == expected
        assert all("<td>Shirt</td>" in r for r in rows)
        # sorted by score, descending
        html = http.get(f"/versions/{version}/rows", params={"sort": "score", "desc": 1}).text
        scores = [float(s) for s in re.findall(r'<td class="num">([0-9.]+)</td>\s*</tr>', html)]
        assert len(scores) == 50 and scores == sorted(scores, reverse=True)
        # chosen columns only
        html = http.get(f"/versions/{version}/rows", params=[("cols", "id"), ("cols", "pred")]).text
        header = re.search(r"<thead>(.*?)</thead>", html, re.S).group(1)
        assert ">id" in header and ">pred" in header and ">score" not in header
        # a sort or column that names no column is refused, not passed to SQL
        for params in ({"sort": "id; DROP TABLE runs"}, {"cols": 'x" FROM runs --'}):
            response = http.get(f"/versions/{version}/rows", params=params)
            assert response.status_code == 400, params
            assert "no such column" in response.text or "no column" in response.text


# -- who may see what --------------------------------------------------------------------------


def test_private_projects_need_a_session(server: ThreadedServer, seeded: dict[str, Any]) -> None:
    with client(server) as anonymous:
        for path in ("/", "/projects/secret", f"/versions/{seeded['private']}"):
            response = anonymous.get(path, follow_redirects=False)
            assert response.status_code == 303, path
            assert response.headers["location"].startswith("/login?next=")
        for digest in (seeded["secret_image"], seeded["seed_image"]):
            assert anonymous.get(f"/media/thumb/64/{digest}").status_code == 404
        page = anonymous.get("/", follow_redirects=True)
        assert "secret" not in page.text and "Sign in" in page.text
    with client(server, server.reader_token) as reader:
        projects = reader.get("/").text
        assert 'data-project="seed"' in projects and "secret" not in projects
        assert reader.get("/projects/secret").status_code == 404
        hidden = reader.get(f"/versions/{seeded['private']}")
        assert hidden.status_code == 404 and "secret" not in hidden.text  # not even its name
        hidden_run = reader.get(f"/runs/{seeded['runs']['baseline']}")
        assert hidden_run.status_code == 200
        assert reader.get(f"/sample?v={seeded['private']}&id=p0").status_code == 404
        assert reader.get(f"/media/thumb/64/{seeded['secret_image']}").status_code == 404
        assert reader.get(f"/media/thumb/64/{seeded['seed_image']}").status_code == 200
        project = reader.get("/projects/seed").text
        assert "reader · read-only" in project
        assert 'method="post"' not in project  # the UI only reads


@needs_chromium
def test_reader_signs_in_and_sees_only_their_projects(
    browser: Any, server: ThreadedServer, seeded: dict[str, Any]
) -> None:
    context = browser.new_context()
    tab = Tab(context, server.url)
    tab.visit("/projects/secret")
    assert "/login" in tab.page.url and "secret" not in tab.page.inner_text("main")
    tab.page.fill("#token", "tsr_not-a-token")
    tab.page.click("main button[type=submit]")
    tab.page.get_by_text("unknown or revoked").wait_for()
    tab.errors.clear()  # the 401 of the failed sign-in is logged by the browser
    tab.page.fill("#token", server.reader_token)
    tab.page.click("main button[type=submit]")
    tab.page.wait_for_load_state("load")
    assert "Not found" in tab.page.inner_text("main")  # back to /projects/secret: invisible
    tab.errors.clear()  # the 404 itself
    tab.visit("/")
    assert tab.page.locator("[data-project]").evaluate_all(
        "e => e.map(x => x.dataset.project)"
    ) == ["seed"]
    cookies = {c["name"]: c for c in context.cookies()}
    session = cookies["tessera_session"]
    assert session["httpOnly"] and session["sameSite"] == "Lax"
    tab.shot("1-projects-reader")
    tab.page.click("header button:has-text('Sign out')")
    tab.page.wait_for_url(re.compile("/login"))
    tab.clean()
    context.close()


def test_session_cookie(server: ThreadedServer) -> None:
    with client(server) as http:
        bad = http.post("/login", data={"token": "tsr_nope", "next": "/"})
        assert bad.status_code == 401 and "unknown or revoked" in bad.text
        token = server.token_for("cookie-user", project="seed", role="reader")
        ok = http.post("/login", data={"token": token, "next": "https://evil.example/"})
        assert ok.status_code == 303 and ok.headers["location"] == "/"  # no open redirect
        cookie = ok.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Path=/" in cookie
        value = ok.cookies["tessera_session"]
        assert token not in cookie  # the cookie holds a signed hash, never the token
        cross = http.post(
            "/login", data={"token": token}, headers={"Origin": "https://evil.example"}
        )
        assert cross.status_code == 403 and "set-cookie" not in cross.headers

    def home(session: str) -> int:
        headers = {"Cookie": f"tessera_session={session}"}
        return httpx.get(server.url + "/", headers=headers).status_code

    assert home(value) == 200
    forged = value[:-3] + ("AAA" if not value.endswith("AAA") else "BBB")
    assert home(forged) == 303
    # revoking the token ends its sessions at once
    auth = server.app.state.auth
    for record in auth.tokens(auth.user("cookie-user")):
        auth.revoke_token(record.id)
    assert home(value) == 303


# -- one page of rows --------------------------------------------------------------------------


def test_only_one_page_of_rows_travels(server: ThreadedServer, seeded: dict[str, Any]) -> None:
    with client(server, server.admin_token) as http:
        sizes = {}
        for size in (20, 50, 200):
            html = http.get(f"/versions/{seeded['big']}/rows", params={"size": size}).text
            assert html.count("<tr data-row") == size
            sizes[size] = len(html.encode())
        assert sizes[50] < 60_000 and sizes[200] < 180_000, sizes  # the table has 5,000 rows
        last = http.get(f"/versions/{seeded['big']}/rows", params={"size": 200, "page": 25}).text
        assert last.count("<tr data-row") == 200 and 'data-id="r04999"' in last
        beyond = http.get(f"/versions/{seeded['big']}/rows", params={"size": 200, "page": 999})
        assert beyond.text.count("<tr data-row") == 200  # clamped to the last page
        # an htmx request gets the table fragment alone
        fragment = http.get(
            f"/versions/{seeded['big']}/rows",
            params={"page": 2},
            headers={"HX-Request": "true", "HX-Target": "table-view"},
        ).text
        assert fragment.lstrip().startswith('<section id="table-view"')
        assert fragment.count("<tr data-row") == 50 and "<html" not in fragment
        # the compare grid is paged too
        grid = http.get(
            "/compare/samples",
            params={"dataset": seeded["v1"], "size": 24},
            headers={"HX-Request": "true", "HX-Target": "samples"},
        )
        assert grid.text.count("data-sample-id=") == 24
        assert grid.headers["HX-Push-Url"].startswith("/compare?dataset=")


@needs_chromium
def test_paging_in_the_browser(tab: Tab, seeded: dict[str, Any]) -> None:
    tab.visit(f"/versions/{seeded['big']}/rows?size=20")
    assert tab.page.locator("tr[data-row]").count() == 20
    first = tab.page.locator("tr[data-row]").first.get_attribute("data-id")
    tab.page.locator("nav.pager a[rel=next]").first.click()
    tab.page.wait_for_function(
        "f => document.querySelector('tr[data-row]').dataset.id !== f", arg=first
    )
    assert tab.page.locator("tr[data-row]").count() == 20
    assert "page=2" in tab.page.url
    assert tab.page.locator("tr[data-row]").first.get_attribute("data-id") == "r00020"
    tab.page.select_option("#page-size", "50")
    tab.page.wait_for_function("() => document.querySelectorAll('tr[data-row]').length === 50")
    # sort by a header link, with the keyboard
    tab.page.locator("thead a", has_text="value").focus()
    tab.page.keyboard.press("Enter")
    tab.page.wait_for_url(re.compile("sort=value"))
    tab.page.locator("thead a", has_text="value").click()  # again: descending
    tab.page.wait_for_url(re.compile("desc=1"))
    tab.page.wait_for_function(
        "() => document.querySelector('tr[data-row]').dataset.id === 'r04999'"
    )
    tab.clean()


@needs_chromium
def test_full_size_image_on_click(tab: Tab, seeded: dict[str, Any]) -> None:
    tab.visit(f"/versions/{seeded['v1']}/rows")
    tab.page.locator("a.thumb").first.click()
    dialog = tab.page.locator("dialog#lightbox")
    dialog.wait_for(state="visible")
    tab.page.wait_for_function("() => document.getElementById('lightbox-img').naturalWidth === 32")
    assert tab.page.locator("#lightbox-img").get_attribute("alt").startswith("image of s000")
    tab.page.keyboard.press("Escape")
    dialog.wait_for(state="hidden")
    tab.clean()


# -- exports -----------------------------------------------------------------------------------


def test_export_filtered_rows(server: ThreadedServer, seeded: dict[str, Any]) -> None:
    version = seeded["preds"]["bigger"]
    with comparison(seeded) as c:
        table = c.table()
        wrong = table[~table["bigger/correct"]]["id"].tolist()
    with client(server, server.admin_token) as http:
        csv = http.get(f"/versions/{version}/export.csv", params={"q": "pred != label"})
        assert csv.status_code == 200 and csv.headers["content-type"].startswith("text/csv")
        assert "attachment" in csv.headers["content-disposition"]
        lines = csv.text.strip().splitlines()
        header = lines[0].replace('"', "").split(",")
        assert header[:3] == ["id", "image", "label"] and "label_name" in header
        assert [line.split(",")[0].strip('"') for line in lines[1:]] == wrong
        parquet = http.get(
            f"/versions/{version}/export.parquet", params={"q": "not correct", "sort": "id"}
        )
        frame = pq.read_table(io.BytesIO(parquet.content)).to_pandas()
        assert frame["id"].tolist() == sorted(wrong)
        assert frame["scores"].map(len).eq(len(CLASSES)).all()
        assert set(frame["pred_name"]) <= set(CLASSES)
        bad = http.get(f"/versions/{version}/export.csv", params={"q": "1; DROP TABLE runs"})
        assert bad.status_code == 400


# -- images ------------------------------------------------------------------------------------


def test_thumbnails_are_cached_and_immutable(
    server: ThreadedServer, seeded: dict[str, Any]
) -> None:
    digest = seeded["seed_image"]
    with client(server, server.admin_token) as http:
        first = http.get(f"/media/thumb/128/{digest}")
        assert first.status_code == 200 and first.headers["content-type"] == "image/webp"
        assert "immutable" in first.headers["cache-control"]
        etag = first.headers["etag"]
        assert digest in etag
        with Image.open(io.BytesIO(first.content)) as image:
            assert image.format == "WEBP" and max(image.size) <= 128
        cached = seeded["store"] / "cache" / "thumbs" / "128" / digest[:2] / f"{digest}.webp"
        assert cached.is_file()
        assert not list((seeded["store"] / "blobs").rglob("*.webp"))
        again = http.get(f"/media/thumb/128/{digest}", headers={"If-None-Match": etag})
        assert again.status_code == 304 and again.content == b""
        full = http.get(f"/media/image/{digest}")
        assert full.headers["content-type"] == "image/jpeg"
        assert full.headers["x-content-type-options"] == "nosniff"
        assert http.get(f"/media/thumb/100/{digest}").status_code == 404
        assert http.get("/media/thumb/64/not-a-digest").status_code == 404
        # a blob that is not an image (a sample table) is not served as one
        backend = server.app.state.backend
        manifest = backend.read_manifest(backend.version_by_id(seeded["v1"]).digest)
        table_digest = manifest.files["samples.parquet"].digest
        assert http.get(f"/media/image/{table_digest}").status_code == 404


# -- tessera ui --------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening_addresses(port: int) -> set[str]:
    found = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if int(hex_port, 16) == port and state == "0A":
                found.add(address)
    return found


def test_tessera_ui_serves_a_local_store_on_loopback(
    seeded: dict[str, Any], tmp_path: Path
) -> None:
    port = _free_port()
    log = tmp_path / "ui.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", "from tessera.cli import main; main()", "ui",
             "--dir", str(seeded["store"]), "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
                break
            except httpx.TransportError:
                assert process.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        assert response.status_code == 200
        # no sign-in on a local store: every project is listed
        assert 'data-project="seed"' in response.text and 'data-project="secret"' in response.text
        assert "local store" in response.text
        assert _listening_addresses(port) == {"0100007F"}  # 127.0.0.1 only
        rows = httpx.get(f"http://127.0.0.1:{port}/versions/{seeded['v1']}/rows", timeout=30)
        assert rows.text.count("<tr data-row") == 50
    finally:
        process.terminate()
        process.wait(30)
    from typer.testing import CliRunner

    from tessera.cli import app
    from tessera.errors import StoreNotFoundError

    missing = CliRunner().invoke(app, ["ui", "--dir", str(tmp_path / "nowhere")])
    assert isinstance(missing.exception, StoreNotFoundError)
    assert "no Tessera store" in str(missing.exception)


# -- a store in PostgreSQL and S3 ----------------------------------------------------------------


@pytest.mark.both_backends(kinds=["postgres+s3"])
def test_pages_read_tables_from_the_bucket(store_dir: Path) -> None:
    """The table viewer, version diffs, compare and the project page over a PostgreSQL
    catalog and S3 blobs: DuckDB reads the Parquet blobs from the bucket (they used to be
    handed to DuckDB as s3:// URLs it had no filesystem for)."""
    rng = np.random.default_rng(4)
    ids = [f"s{i}" for i in range(8)]
    labels = [i % 2 for i in range(8)]
    dataset = tessera.Dataset("pets", classes=["cat", "dog"])
    for sid, label in zip(ids, labels, strict=True):
        dataset.add(sid, rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), label)
    with tessera.init(project="zoo", name="maker", dir=store_dir) as run:
        v0 = run.log_dataset(dataset)
        dataset.add("s8", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), 0)
        run.log_dataset(dataset)
    tables = {}
    for name, pred in (("base", [0] * 8), ("new", labels)):
        with tessera.init(project="zoo", name=name, dir=store_dir) as run:
            tables[name] = run.log_predictions(v0, ids, pred=pred)
    server = ThreadedServer(store_dir)  # the folder's marker names the database and bucket
    try:
        with (
            tessera.open_store(store_dir) as browser,
            client(server, server.admin_token) as http,
        ):
            vid = {
                spec: browser.artifact(spec)._record.id for spec in ("zoo/pets:v0", "zoo/pets:v1")
            }
            pred_id = browser.artifact(tables["new"].spec)._record.id
            assert http.get("/projects/zoo").status_code == 200
            rows = http.get(f"/versions/{vid['zoo/pets:v0']}/rows", params={"size": 200}).text
            assert sorted(re.findall(r'data-id="([^"]+)"', rows)) == ids
            page = http.get(f"/versions/{pred_id}/rows", params={"q": "pred != label"})
            assert page.status_code == 200 and page.text.count("<tr data-row") == 0
            diff = http.get(f"/versions/{vid['zoo/pets:v1']}")
            assert diff.status_code == 200 and "s8" in diff.text
            compare = http.get("/compare", params={"dataset": vid["zoo/pets:v0"]})
            assert compare.status_code == 200
            assert "base" in compare.text and "new" in compare.text
            grid = http.get(
                "/compare/samples",
                params={"dataset": vid["zoo/pets:v0"], "size": 24},
                headers={"HX-Request": "true", "HX-Target": "samples"},
            )
            assert grid.text.count("data-sample-id=") == 8
            exported = http.get(f"/versions/{pred_id}/export.csv")
            assert exported.status_code == 200 and exported.text.count("\n") == 9
    finally:
        server.stop()
