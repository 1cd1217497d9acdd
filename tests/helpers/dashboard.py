"""A real MLflow server on 127.0.0.1 and a headless Chromium (Selenium) for the dashboard tests.

    with mlflow_server(backend_uri, artifacts_dir) as url:      # `mlflow server`, healthy on /health
        with browser() as driver:                                # headless system Chromium + chromedriver
            ...

`browser_missing()` says why no browser can run here (then the tests skip with that reason): Chromium and
chromedriver come from the system packages (`apt-get install chromium chromium-driver`), Selenium from pip.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")


def _which(names) -> str | None:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    return None


def browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    if _which(CHROMIUM) is None:
        return "no Chromium on PATH (apt-get install chromium chromium-driver)"
    if _which(["chromedriver"]) is None:
        return "no chromedriver on PATH (apt-get install chromium-driver)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(backend_uri: str, artifacts_dir: Path, timeout_s: float = 90.0) -> Iterator[str]:
    """`mlflow server` on a free 127.0.0.1 port (one worker, no job runner); yields its URL. Stopped by its own
    process group at exit."""
    port = free_port()
    log = open(Path(artifacts_dir).parent / f"mlflow-server-{port}.log", "w")  # noqa: SIM115 - closed below
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen([str(mlflow_cli), "server", "--backend-store-uri", backend_uri,
                             "--default-artifact-root", Path(artifacts_dir).resolve().as_uri(),
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not answer on {url}/health (see {log.name})")
            time.sleep(0.3)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        log.close()


@contextlib.contextmanager
def browser(width: int = 1440, height: int = 1000):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = _which(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}"):
        options.add_argument(arg)
    # the system chromedriver, named explicitly: Selenium Manager would otherwise try to download one
    driver = webdriver.Chrome(service=Service(_which(["chromedriver"])), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, predicate, timeout_s: float = 30.0, what: str = "the page"):
    """Poll `predicate(driver)` until it returns something truthy; fail naming `what`."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate(driver)
        except Exception as e:  # noqa: BLE001 - the page is still rendering
            last = e
        if last and not isinstance(last, Exception):
            return last
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what} (last: {last!r})")
