"""The report renders in headless Chromium with no console errors (`pytest -m browser`)."""

from __future__ import annotations

import shutil

import pytest

from preflab.evals.report import SECTIONS, write_report
from test_report import make_run

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,4000")


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


def test_report_renders_without_console_errors(tmp_path, driver):
    from selenium.webdriver.common.by import By

    page = write_report(make_run(tmp_path))
    driver.get(page.resolve().as_uri())
    headings = [h.text for h in driver.find_elements(By.TAG_NAME, "h2")]
    assert headings == [title for _, title, _ in SECTIONS]
    images = driver.find_elements(By.TAG_NAME, "img")
    assert len(images) == 8  # the compare plot too
    # every embedded PNG decoded: a broken data URI has naturalWidth 0
    assert all(driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", i)
               for i in images)
    severe = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
    assert severe == []
    shot = tmp_path / "report.png"
    assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
