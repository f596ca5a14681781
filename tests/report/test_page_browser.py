"""The report page and the `dvc plots show` page in a real browser: headless Chromium (Debian's, driven by
Selenium through Debian's chromedriver) opens each from a file with networking off, and nothing may
leave the file. Screenshots are saved beside the pages (report.png, dvc_plots.png in the test's tmp folder)."""

from __future__ import annotations

import configparser
import json
import shutil
import subprocess

import pytest
import yaml
from conftest import BIN, stage_env
from stage_code import ROOT
from synthetic_report import PATHS, PET_BREEDS, SECTIONS, write_synthetic_run

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Debian's chromium and chromium-driver on PATH (apt-get install -y chromium chromium-driver; "
    ".ci/run installs them)",
)
LOCAL = ("file://", "data:")  # the only requests a page opened from a file may make
DVC_ENV = stage_env(DVC_NO_ANALYTICS="1")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # never let anything download a browser
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
        "--host-resolver-rules=MAP * ~NOTFOUND",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
        "--window-size=1280,900",
    ):
        options.add_argument(flag)
    options.set_capability(
        "goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"}
    )  # every request, every console message
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.set_network_conditions(offline=True, latency=0, download_throughput=0, upload_throughput=0)
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def pets_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pets37-browser")
    write_synthetic_run(root, PET_BREEDS)
    return root


def open_file(driver, path) -> list[str]:
    """Open ``path``; the URLs of every request the page made."""
    from selenium.webdriver.support.wait import WebDriverWait

    driver.get("about:blank")
    driver.get_log("performance")  # drop what the browser did before the page
    driver.get(path.as_uri())
    WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.readyState") == "complete")
    events = [json.loads(entry["message"])["message"] for entry in driver.get_log("performance")]
    return [e["params"]["request"]["url"] for e in events if e["method"] == "Network.requestWillBeSent"]


def images_decoded(driver) -> list[tuple[str, bool, int]]:
    return driver.execute_script(
        "return [...document.images].map((i) => [i.alt || i.src.slice(-40), i.complete, i.naturalWidth])"
    )


def screenshot(driver, path) -> None:
    """The whole page: the window made as tall as the document first."""
    driver.set_window_size(1280, driver.execute_script("return document.documentElement.scrollHeight"))
    driver.save_screenshot(str(path))
    driver.set_window_size(1280, 900)
    assert path.stat().st_size > 0


def column(driver, table, index: int) -> list[str]:
    return [cell.text for cell in table.find_elements("css selector", f"tbody tr td:nth-child({index + 1})")]


def test_report_page_offline(browser, pets_run):
    requests = open_file(browser, pets_run / PATHS["report"])
    assert requests and all(url.startswith(LOCAL) for url in requests), [
        u[:80] for u in requests if not u.startswith(LOCAL)
    ]
    images = images_decoded(browser)
    assert len(images) == 7 and all(complete and width > 0 for _, complete, width in images), images
    assert [s.get_attribute("id") for s in browser.find_elements("css selector", "body > section")] == SECTIONS

    table = browser.find_element("css selector", "#per-class table")
    headers = [th.text for th in table.find_elements("css selector", "thead th")]
    f1 = headers.index("f1")
    table.find_elements("css selector", "thead th button")[f1].click()
    ascending = [float(v) for v in column(browser, table, f1)]
    assert (
        ascending == sorted(ascending)
        and len(ascending) == 37
        and ascending != [float(v) for v in sorted(ascending, reverse=True)]
    )
    assert table.find_elements("css selector", "thead th")[f1].get_attribute("aria-sort") == "ascending"
    table.find_elements("css selector", "thead th button")[f1].click()
    assert [float(v) for v in column(browser, table, f1)] == sorted(ascending, reverse=True)
    assert not [m for m in browser.get_log("browser") if m["level"] == "SEVERE"]
    screenshot(browser, pets_run / "report.png")


def dvc_repo(root) -> None:
    """``root`` as a DVC repository (no git) with this project's dvc.yaml, plots template and its .dvc/config
    setting."""
    subprocess.run([str(BIN / "dvc"), "init", "--no-scm", "-q"], cwd=root, env=DVC_ENV, check=True)
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(ROOT / "assets" / "vega", root / "assets" / "vega")
    shutil.copytree(
        ROOT / ".dvc" / "plots", root / ".dvc" / "plots"
    )  # custom templates (log_x: the LR finder's log-scale axis)
    config = configparser.ConfigParser()
    config.read(ROOT / ".dvc" / "config")
    assert config["plots"]["html_template"] == "../assets/vega/plots.html"  # relative to .dvc/
    config["core"]["no_scm"] = "true"
    with open(root / ".dvc" / "config", "w") as f:
        config.write(f)


def test_dvc_plots_page_draws_offline(browser, pets_run):
    dvc_repo(pets_run)
    out = pets_run / "dvc_plots"
    result = subprocess.run(
        [str(BIN / "dvc"), "plots", "show", "-o", str(out)], cwd=pets_run, env=DVC_ENV, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    page = (out / "index.html").read_text()
    assert "cdn.jsdelivr" not in page and "vegaEmbed" in page

    plots = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    charts = [next(iter(p)) for p in plots if isinstance(p, dict)]  # vega plots: loss, accuracy, ..., confusion
    requests = open_file(browser, out / "index.html")
    assert all(url.startswith(LOCAL) for url in requests), [u[:80] for u in requests if not u.startswith(LOCAL)]
    from selenium.webdriver.support.wait import WebDriverWait

    drawn = (
        "return [...arguments[0]].map((id) => "
        "{ const c = document.querySelector(`#${id} canvas`); return c ? c.width : 0; })"
    )
    WebDriverWait(browser, 30).until(lambda d: all(width > 0 for width in d.execute_script(drawn, charts)))
    images = images_decoded(browser)
    assert len(images) == sum(isinstance(p, str) for p in plots) and all(
        complete and width > 0 for _, complete, width in images
    ), images
    assert not [m for m in browser.get_log("browser") if m["level"] == "SEVERE"]
    screenshot(browser, pets_run / "dvc_plots.png")
