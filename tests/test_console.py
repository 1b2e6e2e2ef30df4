"""The web console (issue 18) in a real headless Chromium (Debian's ``chromium`` and ``chromium-driver``,
driven by Selenium): a 5-way task from real Omniglot images, with its support-set report (issue 37: a duplicate
flagged with its thumbnail), a query classified, the label shown equal to the SDK's answer on the same task; the screenshot is saved as a test artifact (``docs/console.png`` is
regenerated with ``FEWSHOT_CONSOLE_SCREENSHOT=docs/console.png make test``, docs/http-api.md)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from fewshot.models.episodes import EpisodeSampler
from fewshot.models.preprocess import encode_png as png
from fewshot_client import FewShotClient

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
OMNI = "omniglot-conv4-directsum"
NAMES = ["alpha", "beta", "gamma", "delta", "epsilon"]


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None or DRIVER is None:
        pytest.fail(
            "chromium and chromium-driver are not installed: `make test` installs them (apt-get install "
            "chromium chromium-driver); install them or run the tests through make"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


def test_the_console_adapts_a_5_way_task_and_shows_the_sdks_label(server, browser, omniglot_test, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.select import Select
    from selenium.webdriver.support.ui import WebDriverWait

    ep = EpisodeSampler(omniglot_test, 5, 2, 1, seed=17).episode(0)
    files = {}
    for k, (index, c) in enumerate(zip(ep.support, ep.support_labels)):
        path = tmp_path / f"{NAMES[c]}-{k}.png"
        path.write_bytes(png(omniglot_test.images[index]))
        files.setdefault(NAMES[c], []).append(str(path))
    copy = tmp_path / "alpha-copy.png"  # an exact duplicate: the report flags it, with its thumbnail
    copy.write_bytes(Path(files["alpha"][0]).read_bytes())
    files["alpha"].append(str(copy))
    query = tmp_path / "query.png"
    query.write_bytes(png(omniglot_test.images[ep.query[0]]))
    wait = WebDriverWait(browser, 60)
    browser.get(server.http_url + "/")
    wait.until(lambda d: len(Select(d.find_element(By.ID, "model")).options) > 0)
    Select(browser.find_element(By.ID, "model")).select_by_value(OMNI)
    for name in NAMES:
        browser.find_element(By.ID, "class-name").send_keys(name)
        browser.find_element(By.ID, "add-class").click()
        box = browser.find_element(By.CSS_SELECTOR, f'.class[data-name="{name}"]')
        box.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys("\n".join(files[name]))
    browser.find_element(By.ID, "unlabeled-files").send_keys(str(query))  # the report reads it, unlabeled
    wait.until(ready.element_to_be_clickable((By.ID, "adapt"))).click()
    status = wait.until(
        lambda d: d.find_element(By.ID, "adapt-status").get_attribute("data-task") and d.find_element(By.ID, "adapt-status")
    )
    task_id = status.get_attribute("data-task")
    estimate = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#report .estimate"))[0].text
    assert estimate.startswith("Expected accuracy on new images:"), estimate
    assert browser.find_element(By.CSS_SELECTOR, "#report .unlabeled").text.startswith("Read 1 unlabeled images: mean confidence")
    flagged = browser.find_element(By.CSS_SELECTOR, '#report .flag[data-kind="duplicate"]')
    assert flagged.get_attribute("data-index") == "2" and flagged.find_element(By.TAG_NAME, "img")  # alpha's third image
    browser.find_element(By.ID, "query-files").send_keys(str(query))
    wait.until(ready.element_to_be_clickable((By.ID, "classify"))).click()
    shown = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results .label"))[0].get_attribute("data-label")
    matches = browser.find_elements(By.CSS_SELECTOR, "#results .nearest .match")  # the answer explained, with thumbnails
    assert len(matches) == 3 and all(m.find_elements(By.TAG_NAME, "img") for m in matches)
    with FewShotClient(server.target) as client:
        task = client.task(task_id)
        assert sorted(task.labels) == sorted(NAMES) and client.task_info(task_id).support_size == 11
        expected = task.classify([query.read_bytes()])[0].label
    assert shown == expected
    assert browser.find_element(By.CSS_SELECTOR, f'#tasks tr[data-task="{task_id}"]')  # listed, with Delete
    out = Path(os.environ.get("FEWSHOT_CONSOLE_SCREENSHOT", tmp_path / "console.png"))
    out.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(out)) and out.stat().st_size > 10_000
    browser.find_element(By.CSS_SELECTOR, f'#tasks button[data-delete="{task_id}"]').click()
    wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, f'#tasks tr[data-task="{task_id}"]'))
    with FewShotClient(server.target) as client:
        assert not _exists(client, task_id)  # deleted from the console


def _exists(client: FewShotClient, task_id: str) -> bool:
    from fewshot_client import NotFound

    try:
        client.task_info(task_id)
        return True
    except NotFound:
        return False
