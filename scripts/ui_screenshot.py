"""Screenshot of the MLflow UI's runs table (the README's picture): starts `mlflow ui` on 127.0.0.1
against a store, opens the experiment's runs table in headless Chromium (Selenium, the system's
chromium and chromedriver), expands every pipeline execution into its stage runs, and saves a PNG.

    .venv/bin/python scripts/ui_screenshot.py                      # mlflow.db + mlartifacts -> docs/img/mlflow-runs.png
    .venv/bin/python scripts/ui_screenshot.py --store other.db --out /tmp/runs.png
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def experiment_id(store: Path, name: str) -> str:
    row = sqlite3.connect(store).execute("SELECT experiment_id FROM experiments WHERE name = ?", (name,)).fetchone()
    if row is None:
        sys.exit(f"no experiment {name!r} in {store}: run the pipeline first (make repro)")
    return str(row[0])


def start_ui(store: Path, artifacts: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen(
        [
            str(mlflow),
            "ui",
            "--backend-store-uri",
            f"sqlite:///{store.resolve()}",
            "--artifacts-destination",
            str(artifacts.resolve()),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    sys.exit("mlflow ui did not start within 120 s")


def browser(profile: str, width: int, height: int):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        sys.exit("needs chromium and chromedriver on PATH (apt-get install -y chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        f"--user-data-dir={profile}",
        f"--window-size={width},{height}",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


# MLflow 3.17's runs table: the `+` before a parent run's name; the assistant side panel's close button.
EXPANDER = "button[data-component-id*='runnamecellrenderer']"
CLOSE_PANEL = "button[aria-label='Close']"


def click_all(driver, selector: str) -> int:
    """Click every visible element matching ``selector``; how many were clicked."""
    from selenium.webdriver.common.by import By

    buttons = [b for b in driver.find_elements(By.CSS_SELECTOR, selector) if b.is_displayed()]
    for button in buttons:
        driver.execute_script("arguments[0].click();", button)
        time.sleep(0.5)
    return len(buttons)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--store", type=Path, default=ROOT / "mlflow.db", help="sqlite store (default: the repository's mlflow.db)"
    )
    parser.add_argument("--artifacts", type=Path, default=ROOT / "mlartifacts", help="its artifact folder")
    parser.add_argument("--experiment", default="petpipe")
    parser.add_argument(
        "--expect",
        action="append",
        default=[],
        help="text the table must show before the picture is taken (repeatable)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "mlflow-runs.png")
    parser.add_argument("--size", default="1800x1000", help="window WIDTHxHEIGHT")
    args = parser.parse_args(argv)
    from selenium.webdriver.support.wait import WebDriverWait

    runs_url = f"#/experiments/{experiment_id(args.store, args.experiment)}/runs"
    proc, url = start_ui(args.store, args.artifacts)
    width, height = (int(v) for v in args.size.split("x"))
    try:
        with tempfile.TemporaryDirectory() as profile:
            driver = browser(profile, width, height)
            try:
                driver.get(f"{url}/{runs_url}")
                expected = args.expect or ["repro@"]
                WebDriverWait(driver, 90).until(
                    lambda d: all(text in d.find_element("tag name", "body").text for text in expected)
                )
                time.sleep(2)  # charts and icons finish drawing
                click_all(driver, CLOSE_PANEL)
                expanded = click_all(driver, EXPANDER)
                WebDriverWait(driver, 30).until(
                    lambda d: "finetune" in d.find_element("tag name", "body").text or not expanded
                )
                time.sleep(1)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                driver.save_screenshot(str(args.out))
            finally:
                driver.quit()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
    print(f"{args.out}: {url}/{runs_url} ({expanded} executions expanded)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
