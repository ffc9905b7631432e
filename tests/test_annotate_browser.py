"""The labeling app in headless Chromium: log in with a token, label three tasks with the keyboard
only (a tie and a flag among them), skip one, and watch the admin page's counts and agreement
update. Screenshots of each page are saved under the test's tmp dir (paths printed)."""

from __future__ import annotations

import shutil
import threading
import time

import pytest

pytest.importorskip("uvicorn", reason="the annotate extra is not installed (pip install -e '.[annotate]')")

from annotate_helpers import make_project  # noqa: E402
from preflab.annotate import tasks  # noqa: E402
from preflab.annotate.app import create_app  # noqa: E402
from preflab.annotate.loadtest import free_port  # noqa: E402
from preflab.annotate.project import load_project  # noqa: E402
from preflab.annotate.stats import project_stats  # noqa: E402
from preflab.feedback.store import PreferenceStore  # noqa: E402

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,1000")


@pytest.fixture
def driver():
    if not CHROMIUM or not DRIVER:
        pytest.skip("headless Chromium is not installed (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for f in FLAGS:
        opts.add_argument(f)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield d
    d.quit()


@pytest.fixture
def server(tmp_path):
    """The app on a loopback port, in a thread of this process; bob has ranked four tasks already."""
    import uvicorn

    path = tmp_path / "s.sqlite"
    project, tokens = make_project(path)
    with PreferenceStore(path) as store:
        for _ in range(4):
            t = tasks.next_task(store, project, "bob")
            tasks.submit(store, project, "bob", t["task_id"], {"order": [[0], [1], [2], [3]]})
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(path), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.started, "the app did not start"
    yield f"http://127.0.0.1:{port}", tokens, path
    srv.should_exit = True
    thread.join(timeout=10)


def _fmt(v):  # as admin.js shows a number
    return "-" if v is None else (str(int(v)) if float(v).is_integer() else f"{v:.3f}")


def test_label_by_keyboard_then_admin_sees_it(server, driver, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    url, tokens, path = server
    shots = tmp_path / "screenshots"
    shots.mkdir()
    wait = WebDriverWait(driver, 15)

    # Each read is one script call: the admin page re-renders every 5 s, and an element found in
    # one call could be replaced before the next one reads it.
    def text(el_id):
        return driver.execute_script(
            "const e = document.getElementById(arguments[0]); return e ? e.innerText.trim() : null", el_id)

    def cells(css):
        return driver.execute_script(
            "return [...document.querySelectorAll(arguments[0])].map(e => e.innerText.trim())", css)

    def keys(*ks):
        ActionChains(driver).send_keys(*ks).perform()

    def log_in(token, lands_on):
        driver.get(url + "/login")
        driver.find_element(By.ID, "token").send_keys(token, Keys.ENTER)
        wait.until(lambda d: d.current_url == url + lands_on)

    def shot(name):
        p = shots / name
        assert driver.save_screenshot(str(p)) and p.stat().st_size > 5_000
        print(f"screenshot: {p}")

    # the admin before: bob's 4 rankings, nobody to agree with
    driver.get(url + "/")
    wait.until(lambda d: d.current_url == url + "/login")
    shot("login.png")
    log_in(tokens["boss"], "/admin")
    wait.until(lambda d: text("p-done") == "4")
    assert text("p-skipped") == "0" and "-" in text("slice-all")
    shot("admin-before.png")
    driver.find_element(By.ID, "logout").click()
    wait.until(lambda d: d.current_url == url + "/login")

    # alice labels three tasks by keyboard, then skips one
    log_in(tokens["alice"], "/")
    wait.until(lambda d: text("task-id") not in ("-", ""))
    seen = []
    plan = [("1", "2", "3", "4", "f", "3", Keys.ESCAPE, "r", "6"),  # strict; hallucination + score 6 on A
            ("1", "1", "2", "3"),  # A and B tied
            (Keys.ARROW_RIGHT, "1", "3", "4", Keys.ARROW_DOWN, Keys.ARROW_DOWN)]  # B 1, C 3, D 4, then A 2
    for i, ks in enumerate(plan):
        task_id = text("task-id")
        seen.append(int(task_id))
        keys(*ks)
        ranks = cells(".card .rank")
        assert "unranked" not in ranks, ranks
        if i == 1:
            assert ranks == ["rank 1", "rank 1", "rank 2", "rank 3"]
            shot("label.png")
        keys(Keys.ENTER)
        wait.until(lambda d, t=task_id: text("task-id") != t and "Saved" in text("status"))
    skipped = int(text("task-id"))
    keys("s")
    wait.until(lambda d: text("task-id") != str(skipped) and "Skipped" in text("status"))
    assert text("done-count") == "3"
    severe = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
    assert severe == []

    with PreferenceStore(path) as store:
        mine = store.rankings(labeler="alice")
        assert sorted(r.meta["task_id"] for r in mine) == sorted(seen)
        first = next(r for r in mine if r.meta["task_id"] == seen[0])
        a = first.meta["display"][0]  # the candidate alice saw as A
        assert first.meta["response_flags"][a] == ["hallucination"] and first.meta["scores"][a] == 6
        assert first.order[0] == [a] and len(first.order) == 4
        assert [len(t) for t in next(r for r in mine if r.meta["task_id"] == seen[1]).order] == [2, 1, 1]
        third = next(r for r in mine if r.meta["task_id"] == seen[2])
        b = third.meta["display"][1]
        assert third.order[0] == [b] and third.time_s is not None and third.time_s >= 0  # measured in the page
        assert store.query("SELECT labeler FROM annotate_skips WHERE task_id = ?", (skipped,))[0][0] == "alice"
        expected = project_stats(store, load_project(store))

    # the admin after: 7 done, 1 skipped, agreement between alice and bob on 3 shared prompts
    driver.find_element(By.ID, "logout").click()
    wait.until(lambda d: d.current_url == url + "/login")
    log_in(tokens["boss"], "/admin")
    wait.until(lambda d: text("p-done") == "7")
    assert text("p-skipped") == "1"
    a = expected["agreement"]["all"]
    assert a["groups"] == 3 and a["pairwise"] is not None
    assert cells("#slice-all td") == ["all", "3", _fmt(a["pairwise"]), str(a["pairs"]), _fmt(a["krippendorff_alpha"]),
                     _fmt(a["loo_majority"])]
    driver.set_window_size(1400, 2200)  # the whole page in the screenshot
    alice = cells("#labeler-alice td")
    assert alice[:3] == ["alice", "3", "1"] and alice[6] != "-"
    shot("admin-after.png")
