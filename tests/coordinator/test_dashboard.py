"""The web dashboard in a real headless browser (Debian's chromium driven by Playwright) over a
live `crowdtrain serve` with two real `crowdtrain join` workers: the empty state before anyone
joins, the loss chart, the leaderboard and the round counter as the run trains, and the
page once the coordinator is gone. Leaves screenshots in test-artifacts/ (dashboard.png is
the finished run). Without a browser: the static files' caching headers (ETag, 304)."""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from swarm_helpers import Swarm, copy_run

from crowdtrain.cli.status import fetch_status
from crowdtrain.coordinator.dashboard import mount_web
from crowdtrain.wire import protocol
from crowdtrain.wire.protocol import Refusal, RoundSummary, Status, VolunteerSummary

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-quic"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def sync_playwright_or_fail():
    """Playwright's entry point, after checking that the browser and the package are there:
    a missing one fails the test (CI installs both), it does not skip it."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install it with `apt-get install -y chromium` "
                    "(the dashboard test drives Debian's chromium; `playwright install` is not "
                    "used)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the dashboard test needs the playwright package: pip install playwright")
    return sync_playwright()


def launch(p):
    return p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def round_number(page) -> int:
    m = re.match(r"\s*(\d+)", page.text_content("#round") or "")
    return int(m.group(1)) if m else -1


@pytest.fixture
def swarm(tiny_run, tmp_path):
    s = Swarm(copy_run(tiny_run, tmp_path / "run", inner_steps=20, rounds=4, round_seconds=60),
              tmp_path)
    yield s
    s.stop()


def new_page(browser, errors: list[str]):
    """A 1440 px page that records JS errors and console errors into `errors`."""
    page = browser.new_page(viewport={"width": 1440, "height": 1000})
    page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
    page.on("console", lambda m: errors.append(f"console: {m.text}")
            if m.type == "error" else None)
    return page


@pytest.mark.slow
def test_dashboard_follows_a_live_swarm(swarm):
    playwright = sync_playwright_or_fail()
    s = swarm
    s.serve()
    run_name = fetch_status(s.url).run_name
    errors: list[str] = []
    with playwright as p:
        browser = launch(p)
        try:
            page = new_page(browser, errors)
            page.goto(s.url + "/")
            # before anyone joins: the run's name, round 0, empty states that say how to join
            page.wait_for_function("n => document.getElementById('run-name').textContent === n",
                                   arg=run_name, timeout=10_000)
            assert round_number(page) == 0
            assert page.is_visible("#leaderboard-empty")
            assert "crowdtrain join " + s.url in page.text_content("#leaderboard-empty")
            assert page.is_visible("#volunteers-empty") and page.is_visible("#refusals-empty")
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "dashboard-empty.png"), full_page=True)

            s.join("alice")
            s.join("bob")
            first = round_number(page)
            page.wait_for_function(
                "document.querySelectorAll('#leaderboard tbody tr').length >= 2", timeout=60_000)
            board = page.text_content("#leaderboard")
            assert "alice" in board and "bob" in board
            # a round closes: the counter advances and the chart shows held-out loss points
            page.wait_for_function(
                f"parseInt(document.getElementById('round').textContent) > {first}",
                timeout=90_000)
            page.wait_for_function("document.querySelectorAll('.val-point').length > 0",
                                   timeout=30_000)
            later = round_number(page)
            assert later > first
            assert page.locator(".val-point").count() > 0
            page.wait_for_function("document.querySelectorAll('.train-point').length > 0",
                                   timeout=30_000)
            # until the run finishes (or a time limit): the counter keeps advancing
            try:
                page.wait_for_function(
                    "document.getElementById('round').textContent.includes('finished')",
                    timeout=60_000)
            except Exception:
                pass
            page.wait_for_timeout(2500)  # one more poll: the last val loss, final figures
            assert round_number(page) >= later
            assert page.locator(".val-point").count() >= 2
            assert "alice" in page.text_content("#volunteers")
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
            # the same run through the terminal view and the metrics route
            st = fetch_status(s.url)
            assert {v.name for v in st.volunteers} == {"alice", "bob"}
            metrics = page.request.get(s.url + "/metrics").text()
            assert "crowdtrain_rounds_closed_total" in metrics
            # the coordinator goes away: the page keeps its figures and says so
            assert not errors, errors
            shown = page.text_content("#round")
            s.procs["coordinator"].kill()
            page.wait_for_selector("#conn:not([hidden])", timeout=15_000)
            assert "Cannot reach the coordinator" in page.text_content("#conn")
            assert "offline" in page.text_content("#state-pill")
            assert page.text_content("#round") == shown
            assert "alice" in page.text_content("#leaderboard")
            page.set_viewport_size({"width": 900, "height": 900})  # the narrower layout
            page.wait_for_timeout(400)
            page.screenshot(path=str(ARTIFACTS / "dashboard-offline.png"), full_page=True)
            # the browser logs the refused connections; nothing else may go wrong
            errors = [e for e in errors if "ERR_CONNECTION_REFUSED" not in e]
        finally:
            browser.close()
    assert not errors, errors



HOSTILE = '<img src=x onerror="window.pwned=1">'


def busy_status(now: float) -> Status:
    """60 closed rounds and an open one, 60 volunteers, refusals (one with markup in it)."""
    rounds = []
    t = now - 61 * 40
    for r in range(61):
        open_ = r == 60
        rounds.append(RoundSummary(
            round=r, state="open" if open_ else "closed", opened_at=t,
            closed_at=None if open_ else t + 38, contributions=0 if open_ else 12 + r % 5,
            refused=int(r % 17 == 3), tokens=0 if open_ else 1_500_000 + 20_000 * (r % 7),
            train_loss=None if open_ else 3.0 + 7 * math.exp(-r / 12) - 0.05,
            val_loss=3.0 + 7 * math.exp(-r / 12), bytes_in=0 if open_ else 1_250_000_000,
            bytes_out=1_300_000_000 + 10_000_000 * (r % 3)))
        t += 40
    vols = [VolunteerSummary(name=f"volunteer-{i:02d}", device="cuda" if i % 3 else "cpu",
                             last_seen=now - 10 * i + 5, rounds=60 - i,
                             tokens=3_000_000 - 45_000 * i, accepted=60 - i, refused=i % 4,
                             tokens_per_s=40_000.0 - 500 * i)
            for i in range(60)]
    refusals = [Refusal(round=57 - i, volunteer=f"volunteer-{i:02d}", at=now - 100 * i - 30,
                        reason="payload scale is not finite" if i else HOSTILE)
                for i in range(5)]
    return Status(api_version=1, run_name="shakespeare-1b", round=60, finished=False,
                  params=1_100_048_384, payload_bytes=1_250_000_000,
                  full_model_bytes=4_400_193_536, rounds=rounds, volunteers=vols,
                  initial_val_loss=10.0, refusals=refusals, round_deadline=now + 25)


class FakeCoordinator:
    def __init__(self, status: Status) -> None:
        self._status = status

    def status(self) -> Status:
        return self._status


@pytest.mark.slow
def test_dashboard_renders_a_busy_run():
    """A big run without a swarm: the page is served by the web routes through an in-process
    client, the browser's requests are routed to it."""
    playwright = sync_playwright_or_fail()
    st = busy_status(time.time())
    fake = FakeCoordinator(st)
    app = FastAPI()
    app.get(protocol.STATUS)(fake.status)
    mount_web(app, fake)
    client = TestClient(app)

    def serve(route):
        r = client.get(route.request.url.replace("http://dashboard.test", ""))
        route.fulfill(status=r.status_code, body=r.content,
                      headers={"content-type": r.headers.get("content-type", "text/plain")})

    errors: list[str] = []
    with playwright as p:
        browser = launch(p)
        try:
            page = new_page(browser, errors)
            page.route("http://dashboard.test/**", serve)
            page.goto("http://dashboard.test/")
            page.wait_for_function("document.querySelectorAll('.val-point').length > 0")
            assert page.text_content("#round") == "60"
            assert page.locator(".val-point").count() == 61  # initial model + rounds 1..60
            assert page.locator(".train-point").count() == 60
            assert page.locator("#leaderboard tbody tr").count() == 51  # top 50 + "10 more"
            assert "and 10 more volunteers" in page.text_content("#leaderboard")
            assert page.locator("#volunteers tbody tr").count() == 13  # seen within 120 s
            assert "volunteer-00" in page.text_content("#leaderboard tbody tr:first-child")
            assert "1,100,048,384" in page.text_content("#run-meta")
            assert "3,000,000" in page.text_content("#leaderboard")
            assert page.locator("#refusals li").count() == 5
            # text from the server is shown as text, never interpreted as markup
            assert HOSTILE in page.text_content("#refusals")
            assert page.locator("#refusals img").count() == 0
            assert page.evaluate("window.pwned") is None
            assert "closes within" in page.text_content("#round-progress")
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "dashboard-busy.png"), full_page=True)
        finally:
            browser.close()
    assert not errors, errors


def test_static_files_are_revalidated_by_etag():
    """Every dashboard file (the page at / too) comes with an ETag and no-cache: the browser
    asks again on each load and gets 304 Not Modified while its copy is current; a name that is
    not a file in the folder is a 404."""
    app = FastAPI()
    mount_web(app, FakeCoordinator(busy_status(time.time())))
    client = TestClient(app)
    for path in ("/", "/dashboard/index.html", "/dashboard/app.js", "/dashboard/style.css"):
        r = client.get(path)
        assert r.status_code == 200 and r.headers["cache-control"] == "no-cache", path
        etag = r.headers["etag"]
        again = client.get(path, headers={"If-None-Match": etag})
        assert again.status_code == 304 and again.content == b"", path
        assert client.get(path, headers={"If-None-Match": '"other"'}).status_code == 200
    assert client.get("/").content == client.get("/dashboard/index.html").content
    for path in ("/dashboard/nope.js", "/dashboard/%2E%2E", "/dashboard/%2E%2E%2Fdashboard.py",
                 "/dashboard/%2E"):  # the folder itself is not a file
        assert client.get(path).status_code == 404, path
