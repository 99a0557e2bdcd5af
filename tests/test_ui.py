"""The reviewer's pages under /ui/: login, cookies and XSRF over plain HTTP, what each role
sees, safe rendering of hostile outputs, the 5,000-session list target, and the pages driven
in a real headless Chromium (the system's ``chromium`` package, through Playwright)."""

from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
import sys
import uuid
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Iterator

import httpx
import nbformat
import pytest

from tests.conftest import GatewayProcess, run, start_gateway

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
XSRF_FIELD = re.compile(r'name="_xsrf" value="([^"]+)"')


class PageTags(HTMLParser):
    """Every element and attribute name of a page, as a browser's parser sees them."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []
        self.attributes: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.names.append(tag)
        self.attributes.extend(name for name, _ in attrs)


def token_for(gateway: GatewayProcess, name: str, role: str) -> str:
    done = subprocess.run([sys.executable, "-m", "gateway", "token", "create", "--name", name, "--role", role,
                           "--data-dir", str(gateway.data_dir)], capture_output=True, text=True, check=True)
    return done.stdout.strip()


def browser_client(gateway: GatewayProcess) -> httpx.Client:
    """A cookie-keeping client with no Authorization header, like a browser."""
    return httpx.Client(base_url=gateway.url, timeout=60, follow_redirects=False)


def log_in(client: httpx.Client, token: str) -> httpx.Response:
    form = client.get("/ui/login")
    xsrf = XSRF_FIELD.search(form.text)
    assert xsrf, form.text
    return client.post("/ui/login", data={"token": token, "_xsrf": xsrf.group(1), "next": "/ui/sessions"})


@pytest.fixture(scope="module")
def cast(gateway: GatewayProcess) -> Iterator[dict[str, Any]]:
    """Two agents and a reviewer; the first agent's session has a plot, an error, a table,
    hostile HTML and a file."""
    suffix = uuid.uuid4().hex[:6]
    tokens = {"ann": token_for(gateway, f"ann-{suffix}", "agent"), "ben": token_for(gateway, f"ben-{suffix}", "agent"),
              "rev": token_for(gateway, f"rev-{suffix}", "reviewer")}
    ann = gateway.client(token=tokens["ann"])
    ben = gateway.client(token=tokens["ben"])
    session = ann.post("/v1/sessions", json={"labels": {"task": f"ui-{suffix}"}}).json()
    sid = session["id"]
    assert run(ann, sid, "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()")["status"] == "ok"
    assert run(ann, sid, "1 / 0")["status"] == "error"
    assert run(ann, sid, "import pandas as pd\npd.DataFrame({'city': ['Oslo', '<script>alert(1)</script>'], "
                         "'n': [1, 2]})")["status"] == "ok"
    assert run(ann, sid, "from IPython.display import HTML, display\n"
                         "display(HTML('<img src=x onerror=\"parent.document.title=1\"><b id=marker>bold</b>'))\n"
                         "print('</pre><script>document.title=2</script>')")["status"] == "ok"
    ann.put(f"/v1/sessions/{sid}/files/report.html", content=b"<script>alert(1)</script>")
    other = ben.post("/v1/sessions", json={}).json()
    yield {"tokens": tokens, "session": session, "other": other, "suffix": suffix}
    ann.delete(f"/v1/sessions/{sid}")
    ben.delete(f"/v1/sessions/{other['id']}")
    ann.close()
    ben.close()


# -- login, cookies, XSRF -----------------------------------------------------------------------

def test_pages_ask_for_a_login_first(gateway: GatewayProcess) -> None:
    with browser_client(gateway) as browser:
        response = browser.get("/ui/sessions?state=idle")
        assert response.status_code == 302
        assert response.headers["Location"] == "/ui/login?next=%2Fui%2Fsessions%3Fstate%3Didle"
        assert browser.get("/ui/").headers["Location"] == "/ui/sessions"


def test_login_sets_a_strict_httponly_cookie_and_the_form_needs_its_xsrf_token(gateway: GatewayProcess,
                                                                               cast: dict[str, Any]) -> None:
    with browser_client(gateway) as browser:
        form = browser.get("/ui/login")
        xsrf_cookie = form.headers["Set-Cookie"]
        assert "_xsrf=" in xsrf_cookie and "HttpOnly" in xsrf_cookie and "SameSite=Strict" in xsrf_cookie
        missing = browser.post("/ui/login", data={"token": cast["tokens"]["rev"]})
        assert missing.status_code == 403 and "XSRF" in missing.text
        assert "agent_gateway_login" not in browser.cookies
        forged = browser.post("/ui/login", data={"token": cast["tokens"]["rev"], "_xsrf": "2|00|11|22"})
        assert forged.status_code == 403
        done = log_in(browser, cast["tokens"]["rev"])
        assert done.status_code == 303 and done.headers["Location"] == "/ui/sessions"
        cookie = done.headers["Set-Cookie"]
        assert cookie.startswith("agent_gateway_login=")
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/ui/" in cookie
        assert cast["tokens"]["rev"] not in cookie.split(";")[0].replace('"', "")
        page = browser.get("/ui/sessions")
        assert page.status_code == 200 and f"rev-{cast['suffix']} (reviewer)" in page.text
        assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
        # Logging out needs the form's token too, then the cookie is gone.
        assert browser.post("/ui/logout").status_code == 403
        xsrf = XSRF_FIELD.search(page.text)
        assert xsrf is not None
        assert browser.post("/ui/logout", data={"_xsrf": xsrf.group(1)}).status_code == 303
        assert browser.get("/ui/sessions").status_code == 302


def test_a_wrong_token_is_refused_and_audited(gateway: GatewayProcess) -> None:
    with browser_client(gateway) as browser:
        refused = log_in(browser, "not-a-token-" + uuid.uuid4().hex)
        assert refused.status_code == 401 and "That token is not valid." in refused.text
        assert "agent_gateway_login" not in browser.cookies
    with gateway.client() as admin:
        done = subprocess.run([sys.executable, "-m", "gateway", "audit", "export", "--data-dir", str(gateway.data_dir)],
                              capture_output=True, text=True, check=True)
        refusals = [json.loads(line) for line in done.stdout.splitlines() if '"auth_failed"' in line]
        assert any(event["details"]["path"] == "/ui/login" for event in refusals)
        assert admin.get("/v1/health").status_code == 200


def test_a_revoked_token_logs_the_browser_out(gateway: GatewayProcess) -> None:
    name = f"short-lived-{uuid.uuid4().hex[:6]}"
    token = token_for(gateway, name, "reviewer")
    with browser_client(gateway) as browser:
        assert log_in(browser, token).status_code == 303
        assert browser.get("/ui/sessions").status_code == 200
        subprocess.run([sys.executable, "-m", "gateway", "token", "revoke", "--name", name, "--data-dir",
                        str(gateway.data_dir)], check=True, capture_output=True)
        import time

        deadline = time.monotonic() + 5
        while browser.get("/ui/sessions").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert browser.get("/ui/sessions").status_code == 302


# -- roles --------------------------------------------------------------------------------------

def test_each_role_sees_what_it_may(gateway: GatewayProcess, cast: dict[str, Any]) -> None:
    sid, other = cast["session"]["id"], cast["other"]["id"]
    with browser_client(gateway) as ben, browser_client(gateway) as rev, browser_client(gateway) as ann:
        log_in(ben, cast["tokens"]["ben"]), log_in(rev, cast["tokens"]["rev"]), log_in(ann, cast["tokens"]["ann"])
        ben_list = ben.get("/ui/sessions").text
        assert other in ben_list and sid not in ben_list
        assert sid not in ben.get(f"/ui/sessions?owner={cast['session']['owner']}").text
        for path in (f"/ui/sessions/{sid}", f"/ui/sessions/{sid}/notebook.ipynb",
                     f"/ui/sessions/{sid}/files/report.html"):
            refused = ben.get(path)
            assert refused.status_code == 404, path
            assert "session_not_found" in refused.text and f"ui-{cast['suffix']}" not in refused.text
            assert rev.get(path).status_code == 200, path
            assert ann.get(path).status_code == 200, path
        assert sid in rev.get(f"/ui/sessions?label=task:ui-{cast['suffix']}").text
        assert other not in rev.get(f"/ui/sessions?label=task:ui-{cast['suffix']}").text


def test_the_session_page_renders_outputs_without_running_them(gateway: GatewayProcess, cast: dict[str, Any]) -> None:
    sid = cast["session"]["id"]
    with gateway.client(token=cast["tokens"]["rev"]) as reviewer:  # a header token works too
        page = reviewer.get(f"/ui/sessions/{sid}")
    assert page.status_code == 200
    html = page.text
    assert re.search(r'<img class="image-output" alt="image/png output" src="data:image/png;base64,iVBOR', html)
    assert "ZeroDivisionError" in html and 'data-status="error"' in html
    # Outputs never reach the page as markup: HTML outputs sit escaped in a sandboxed srcdoc.
    tags = PageTags()
    tags.feed(html)
    assert "script" not in tags.names and not [a for a in tags.attributes if a.startswith("on")]
    assert "b" not in tags.names and tags.names.count("iframe") == 2
    assert "&lt;/pre&gt;&lt;script&gt;document.title=2&lt;/script&gt;" in html
    assert html.count('<iframe class="html-output" sandbox=""') == 2
    assert "report.html" in html and f"/ui/sessions/{sid}/notebook.ipynb" in html
    assert f"agent-gateway attach {sid}" in html
    assert "session_created" in html and "execute" in html


def test_workspace_files_are_downloads_never_pages(gateway: GatewayProcess, cast: dict[str, Any]) -> None:
    with gateway.client(token=cast["tokens"]["rev"]) as reviewer:
        response = reviewer.get(f"/ui/sessions/{cast['session']['id']}/files/report.html")
    assert response.content == b"<script>alert(1)</script>"
    assert response.headers["Content-Disposition"].startswith("attachment;")
    assert response.headers["Content-Security-Policy"] == "sandbox"
    assert response.headers["X-Content-Type-Options"] == "nosniff"


def test_bad_filters_get_a_clear_error_page(gateway: GatewayProcess, cast: dict[str, Any]) -> None:
    with gateway.client(token=cast["tokens"]["rev"]) as reviewer:
        bad = reviewer.get("/ui/sessions?state=sleeping")
        assert bad.status_code == 400 and "invalid_query" in bad.text
        assert reviewer.get("/ui/sessions?label=nocolon").status_code == 400


# -- 5,000 sessions -----------------------------------------------------------------------------

def server_ms(response: httpx.Response) -> float:
    match = re.search(r"render;dur=([0-9.]+)", response.headers["Server-Timing"])
    assert match, response.headers
    return float(match.group(1))


def test_the_sessions_list_stays_fast_with_5000_sessions(tmp_path: Path) -> None:
    from gateway.store import Store

    data_dir = tmp_path / "many"
    data_dir.mkdir()
    store = Store(data_dir / "gateway.db")
    rows = []
    for i in range(5000):
        at = f"2026-01-{1 + i // 200:02d}T{(i % 200) // 60:02d}:{i % 60:02d}:00.000000Z"
        rows.append({"id": f"s_bulk{i:06d}", "kernel_id": str(uuid.uuid4()), "kernel": "python3",
                     "state": "paused" if i % 3 else "terminated", "owner": f"agent-{i % 40}",
                     "labels": json.dumps({"batch": str(i % 10)}), "created_at": at, "last_activity": at,
                     "steps": i % 50})
    with store.conn:
        store.conn.executemany("INSERT INTO sessions (id, kernel_id, kernel, state, owner, labels, created_at, "
                               "last_activity, steps) VALUES (:id, :kernel_id, :kernel, :state, :owner, :labels, "
                               ":created_at, :last_activity, :steps)", rows)
    store.close()
    gateway = start_gateway(data_dir, extra_args=("--pool-size", "0"))
    try:
        with gateway.client() as admin:
            first = admin.get("/ui/sessions")
            assert first.status_code == 200 and first.text.count("<tr data-session=") == 50
            cursor = re.search(r'href="(/ui/sessions\?cursor=[^"]+)" rel="next"', first.text)
            assert cursor
            paths = ["/ui/sessions", "/ui/sessions?state=paused", "/ui/sessions?owner=agent-7",
                     "/ui/sessions?label=batch:3", cursor.group(1).replace("&amp;", "&")]
            for path in paths:
                timings = [server_ms(admin.get(path)) for _ in range(7)]
                print(f"{path}: server time median {statistics.median(timings):.1f} ms, max {max(timings):.1f} ms")
                assert statistics.median(timings) < 100, (path, timings)
            second = admin.get(cursor.group(1).replace("&amp;", "&")).text
            assert "s_bulk004949" in second and "s_bulk004999" not in second
    finally:
        assert gateway.stop() == 0


# -- a real browser -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    if CHROMIUM is None:
        pytest.skip("no system Chromium (Debian package 'chromium'; .ci/run installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is in the [test] extra")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


def test_a_reviewer_logs_in_lists_opens_and_downloads_in_chromium(gateway: GatewayProcess, cast: dict[str, Any],
                                                                   chromium: Any, tmp_path: Path) -> None:
    sid = cast["session"]["id"]
    context = chromium.new_context(accept_downloads=True)
    page = context.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    try:
        page.goto(f"{gateway.url}/ui/sessions/{sid}")
        assert page.url.startswith(f"{gateway.url}/ui/login?next=")
        page.fill("input[name=token]", cast["tokens"]["rev"])
        page.click("button[type=submit]")
        page.wait_for_selector("#trajectory")
        assert page.url == f"{gateway.url}/ui/sessions/{sid}"  # back where the reviewer was going
        cookies = {c["name"]: c for c in context.cookies()}
        assert cookies["agent_gateway_login"]["httpOnly"] and cookies["agent_gateway_login"]["sameSite"] == "Strict"
        assert page.evaluate("document.cookie") == ""  # nothing readable from scripts

        # The list, filtered by label, leads to the session.
        page.goto(f"{gateway.url}/ui/sessions")
        page.fill("input[name=label]", f"task:ui-{cast['suffix']}")
        page.click("form.filters button[type=submit]")
        page.wait_for_selector(f"tr[data-session='{sid}']")
        assert page.locator("#sessions tbody tr").count() == 1
        page.click(f"tr[data-session='{sid}'] a")
        page.wait_for_selector("#trajectory")

        # The plot is a real, decoded image; the error and the statuses are shown.
        plot = page.locator("img.image-output").first
        assert plot.evaluate("img => img.complete && img.naturalWidth") > 100
        assert "ZeroDivisionError: division by zero" in page.locator(".step[data-status='error']").inner_text()
        assert page.locator(".step .status").all_inner_texts().count("ok") >= 3
        # The table renders inside its sandboxed frame; the hostile HTML runs nothing.
        table = page.frame_locator("iframe.html-output").first.locator("table")
        assert "Oslo" in table.inner_text()
        assert page.frame_locator("iframe.html-output").nth(1).locator("#marker").inner_text() == "bold"
        assert page.title().endswith("Agent Kernel Gateway") and dialogs == []

        # The notebook downloads and is a valid trajectory.
        with page.expect_download() as info:
            page.click("#download-notebook")
        target = tmp_path / "downloaded.ipynb"
        info.value.save_as(target)
        notebook = nbformat.read(target, as_version=4)
        nbformat.validate(notebook)
        sources = [cell.source for cell in notebook.cells if cell.cell_type == "code"]
        assert "1 / 0" in sources and any("plt.plot" in source for source in sources)
        page.screenshot(path=str(tmp_path / "session.png"), full_page=True)

        page.click("header button[type=submit]")  # log out
        page.wait_for_selector("input[name=token]")
        page.goto(f"{gateway.url}/ui/sessions")
        assert "/ui/login" in page.url
    finally:
        context.close()
