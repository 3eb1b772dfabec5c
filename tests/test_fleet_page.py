"""The fleet page at GET /: static files from the package with a strict
Content-Security-Policy, and a real browser (Playwright driving Debian's
Chromium) that pastes a token and sees machines (with their last reading's
value), sources and a plot with one point per reading, with a hostile
machine name shown as text; and a login form that says why a session ended."""
from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import shutil
from pathlib import Path

import pytest
import requests
from helpers import ROOT, make_tenant, post
from test_query import iso, us

CHROMIUM = "/usr/bin/chromium"
HOSTILE = "<img src=x onerror=alert(1)>"


def test_the_page_and_its_files_come_from_the_package_with_a_strict_policy(server):
    r = requests.get(server.url + "/", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"] == "text/html; charset=utf-8"
    csp = r.headers["content-security-policy"]
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert "script-src 'self'" in csp and "style-src 'self'" in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    # Nothing inline for the policy to refuse, and nothing from elsewhere.
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", r.text)
    assert "<style" not in r.text and " style=" not in r.text
    assert not re.search(r"\son[a-z]+=", r.text)  # no inline event handlers
    assert not re.search(r"(src|href)=\"(https?:)?//", r.text)
    for name, ctype in (("fleet.js", "text/javascript"), ("uPlot.iife.min.js", "text/javascript"),
                        ("fleet.css", "text/css"), ("uPlot-LICENSE.txt", "text/plain")):
        f = requests.get(f"{server.url}/static/{name}", timeout=10)
        assert f.status_code == 200 and f.headers["content-type"].startswith(ctype), name
    assert "Leon Sorokin" in requests.get(server.url + "/static/uPlot-LICENSE.txt", timeout=10).text
    assert "innerHTML" not in requests.get(server.url + "/static/fleet.js", timeout=10).text
    for bad in ("nope.js", "..%2Fapp.py", "index.html"):
        f = requests.get(f"{server.url}/static/{bad}", timeout=10)
        assert f.status_code == 404 and f.json()["detail"].startswith("no such")


def need_chromium() -> None:
    """Skip without Chromium; fail instead where CI promises one
    (HALTLESS_REQUIRE_BROWSER=1), so the browser test cannot vanish silently."""
    if not os.path.exists(CHROMIUM):
        msg = f"no Chromium at {CHROMIUM}: apt-get install chromium to run the browser tests"
        if os.environ.get("HALTLESS_REQUIRE_BROWSER") == "1":
            pytest.fail(msg)
        pytest.skip(msg)


@contextlib.contextmanager
def chromium():
    """Debian's Chromium under Playwright (which must never download a browser).
    Started after the test's own asyncio.run() calls: Playwright's sync API
    keeps an event loop running in this thread while it is open."""
    need_chromium()
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="pip install playwright to run the browser tests")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run"])
        try:
            yield b
        finally:
            b.close()


def test_the_fleet_page_shows_machines_sources_and_a_plot_in_a_real_browser(
        server, pg_dsn, tmp_path):
    need_chromium()
    tenant = make_tenant(pg_dsn, machines=("CNC-001", HOSTILE))
    token = server.token(tenant.org_id)
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    start = us(now) - 12 * 60_000_000
    readings = [{"machine_identifier": "CNC-001", "metric_name": "spindle_temp", "unit": "celsius",
                 "timestamp": iso(start + i * 60_000_000), "value": 40 + i % 5} for i in range(12)]
    readings += [{"machine_identifier": "CNC-001", "metric_name": "motor_current", "unit": "A",
                  "timestamp": iso(start + i * 1_000_000 + 1000), "value": round(11 + (i % 7) * 0.1
                  + (i // 60 % 3) * 0.4, 2)} for i in range(720)]
    # One metric sent without a unit, with one, and with a raw_tag too: one
    # series (README "Series identity"), so one plot, labelled as it is now.
    readings += [{"machine_identifier": "CNC-001", "metric_name": "coolant_temp",
                  "timestamp": iso(start + i * 60_000_000 + 30_000_000), "value": 18.0 + i,
                  **({"unit": "celsius"} if i >= 3 else {}),
                  **({"raw_tag": "ns2_i7"} if i >= 6 else {})} for i in range(9)]
    readings += [{"machine_identifier": HOSTILE, "metric_name": HOSTILE,
                  "timestamp": iso(us(now) - 5_000_000), "value": 1.5}]
    for i in range(0, len(readings), 1000):
        r = post(server, tenant.key, {"readings": readings[i:i + 1000]})
        assert r.json()["rejected_count"] == 0, r.text
    src = requests.post(server.url + "/api/v1/ingest-sources", timeout=10,
                        headers={"Authorization": f"Bearer {token}"},
                        json={"machine_id": str(tenant.machines["CNC-001"]),
                              "name": "Line 3 Modbus", "protocol": "modbus",
                              "host": "127.0.0.1", "port": 1502, "poll_interval_seconds": 5,
                              "is_active": True,
                              "config": {"registers": [{"address": 100, "metric_name": "t"}]}})
    assert src.status_code == 201, src.text
    current = [start + i * 1_000_000 + 1000 for i in range(720)]
    newest = max((r for r in readings if r["machine_identifier"] == "CNC-001"),
                 key=lambda r: r["timestamp"])
    last = f"{newest['metric_name']} = {newest['value']:g} {newest['unit']}"
    with chromium() as browser:
        shot = see_the_page(browser, server, token, tmp_path, current, last)
    assert shot.stat().st_size > 10_000


def see_the_page(browser, server, token, tmp_path, current: list[int], last: str) -> Path:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems, dialogs = [], []
    page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(server.url + "/")
    page.fill("#token", token)
    page.click("#login button[type=submit]")
    rows = page.locator("#machines tbody tr")
    rows.nth(1).wait_for(timeout=10_000)
    assert rows.count() == 2
    names = sorted(rows.nth(i).locator("td").first.inner_text() for i in range(2))
    assert names == sorted(["CNC-001", HOSTILE])  # the hostile name is text ...
    assert page.locator("#machines img").count() == 0  # ... and never an element
    cnc = next(rows.nth(i) for i in range(2) if rows.nth(i).locator("td").first.inner_text() == "CNC-001")
    # Last reading: the newest reading's series and value, and how long ago (exactly, on hover).
    last_cell = cnc.locator("td").nth(2)
    assert last_cell.inner_text().startswith(last + " · ") and last_cell.inner_text().endswith(
        " ago"), (last_cell.inner_text(), last)
    assert last_cell.locator("time").get_attribute("datetime").endswith("Z")
    source = page.locator("#sources tbody tr")
    assert source.count() == 1
    cells = source.first.locator("td").all_inner_texts()
    assert cells[:5] == ["Line 3 Modbus", "CNC-001", "modbus", "127.0.0.1:1502", "waiting"]
    # The token stays in this tab's session storage: not in the URL, no cookie.
    assert page.evaluate("sessionStorage.getItem('haltless.token')") == token
    assert token not in page.url and page.context.cookies() == []
    page.screenshot(path=str(tmp_path / "fleet-list.png"), full_page=True)

    page.click("text=CNC-001")
    plot = page.locator('.plot[data-metric="spindle_temp"]')
    plot.wait_for(timeout=10_000)
    assert plot.get_attribute("data-points") == "12"  # one bucket per reading at ~1 s per pixel
    assert plot.locator("canvas").count() == 1
    assert plot.locator("h3").inner_text() == "spindle_temp (celsius)"
    coolant = page.locator('.plot[data-metric="coolant_temp"]')
    assert coolant.count() == 1
    assert coolant.locator("h3").inner_text() == "coolant_temp (celsius) [ns2_i7]"
    assert coolant.get_attribute("data-points") == "9"
    # An hour at ~1 px per bucket: several readings per bucket, drawn as a min-max band.
    page.click("#ranges button[data-range='3600']")
    page.wait_for_function("""() => {
        const p = document.querySelector('.plot[data-metric="motor_current"]');
        return p && p.dataset.interval !== "1";  // redrawn for the hour, not the 15 minutes
    }""", timeout=10_000)
    band = page.locator('.plot[data-metric="motor_current"]')
    step = int(band.get_attribute("data-interval")) * 1_000_000
    assert step > 1_000_000
    assert band.get_attribute("data-points") == str(len({t // step for t in current}))
    assert page.locator('.plot[data-metric="spindle_temp"]').get_attribute("data-points") == "12"
    shot = tmp_path / "fleet-page.png"
    page.screenshot(path=str(shot), full_page=True)
    if os.environ.get("HALTLESS_UPDATE_SCREENSHOT") == "1":
        shutil.copy(shot, ROOT / "docs" / "fleet-page.png")

    page.goto(server.url + "/#machine=" + requests.utils.quote(HOSTILE, safe=""))
    hostile = page.locator(".plot h3", has_text=HOSTILE)
    hostile.wait_for(timeout=10_000)
    assert hostile.inner_text() == HOSTILE
    assert page.locator(".plot").count() == 1
    assert page.locator("#machine-title").inner_text() == HOSTILE
    assert page.locator("#plots img").count() == 0
    # Axes on a 24-hour clock (no am/pm); the legend's values only under the cursor.
    ticks = page.evaluate("""() => [...document.querySelectorAll('.plot')].map(
        (p) => p.innerText).join(' ')""")
    assert " AM" not in ticks and " PM" not in ticks, ticks

    # A machine that does not exist: nothing of the previous one stays under its name.
    page.goto(server.url + "/#machine=NOPE")
    page.locator("#plots p.error").wait_for(timeout=10_000)
    assert page.locator("#machine-title").inner_text() == "NOPE"
    assert page.locator(".plot").count() == 0
    assert page.locator("#plots p.error").inner_text() == 'No machine "NOPE" in your organization.'
    assert "refresh failed" in page.locator("#status").inner_text()
    problems[:] = [p for p in problems if "404" not in p]  # the browser logs the 404 itself
    assert dialogs == [], dialogs  # alert(1) never ran
    assert problems == [], problems  # no CSP violation, no script error
    print(f"screenshots: {tmp_path}")
    return shot


def test_the_login_form_says_the_session_expired_or_why_the_token_was_refused(server, pg_dsn):
    need_chromium()
    tenant = make_tenant(pg_dsn, machines=("CNC-001",))
    with chromium() as browser:
        page = browser.new_page()
        errors, sent = [], []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: sent.append(r.headers.get("authorization"))
                if "/api/" in r.url else None)
        page.goto(server.url + "/")
        assert page.locator("#login-message").is_hidden()  # nothing to explain yet
        message = page.locator("#login-message")

        # A token that expires while the page is open: back to the form at
        # once, saying why, and nothing read with it left on the page.
        page.fill("#token", server.token(tenant.org_id, ttl=8))
        page.click("#login button[type=submit]")
        page.locator("#machines tbody tr").first.wait_for(timeout=7_000)
        message.wait_for(state="visible", timeout=20_000)
        assert re.fullmatch(r"Session expired at \d\d:\d\d:\d\d: .*Sign in again with a new "
                            r"token from haltless token create\.", message.inner_text()), \
            message.inner_text()
        assert page.locator("#fleet").is_hidden() and page.locator("#token").is_visible()
        assert page.evaluate("sessionStorage.getItem('haltless.token')") is None

        # A token pasted after it expired: said at once, no request made with it.
        stale = server.token(tenant.org_id, ttl=-60)
        page.fill("#token", stale)
        page.click("#login button[type=submit]")
        assert message.inner_text().startswith("Session expired at ")

        # A token the server refuses for another reason: the server's reason.
        page.fill("#token", "not-a-token")
        page.click("#login button[type=submit]")
        page.wait_for_function("() => document.getElementById('login-message')"
                               ".textContent.startsWith('The token was refused')", timeout=10_000)
        assert message.inner_text() == "The token was refused (invalid token). Paste another."
        assert "Bearer not-a-token" in sent and f"Bearer {stale}" not in sent
        assert errors == [], errors
