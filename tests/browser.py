"""Browser-test helpers: headless Chromium from Debian packages driven by Selenium through
Debian's chromedriver, a Prefect server started on 127.0.0.1 for one test, and screenshots plus
page sources kept as test artifacts when a step fails.

CI (.ci/run) installs `chromium chromium-driver` with apt and sets LMFORGE_BROWSER_REQUIRED=1,
so a missing browser fails there; elsewhere the browser tests are skipped without one."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import ROOT

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WINDOW = (1400, 1000)
_SAFE = re.compile(r"[^\w.-]+")
INSTALL_HINT = "apt-get install -y chromium chromium-driver (Debian's packages), then .venv/bin/pip install -e '.[dev]'"


def require_browser() -> None:
    """Skip (or, with LMFORGE_BROWSER_REQUIRED set, fail) when Chromium, its driver or Selenium is missing."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    if missing:
        message = f"browser test needs {', '.join(missing)}: {INSTALL_HINT}"
        if os.environ.get("LMFORGE_BROWSER_REQUIRED"):
            pytest.fail(message)
        pytest.skip(message)


def artifacts_dir(test_name: str) -> Path:
    """Where a failed browser test leaves its screenshots: $LMFORGE_TEST_ARTIFACTS or
    test-artifacts/browser/ at the repository root, one folder a test (emptied when it starts)."""
    base = Path(os.environ.get("LMFORGE_TEST_ARTIFACTS") or ROOT / "test-artifacts" / "browser")
    folder = base / _SAFE.sub("_", test_name)
    shutil.rmtree(folder, ignore_errors=True)
    return folder


def chromium(download_dir: Path | None = None):
    """Headless Chromium at WINDOW's size, through /usr/bin/chromedriver (Selenium Manager never
    runs: both paths are given)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={WINDOW[0]},{WINDOW[1]}", "--lang=en-US", "--no-first-run",
                "--disable-extensions", "--disable-background-networking"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_window_size(*WINDOW)
    driver.set_page_load_timeout(60)
    return driver


class Steps:
    """Named steps of a browser test. A step that fails leaves NN-<step>.png (and -tall.png),
    .html and .url in the artifacts folder, plus copies of the given logs, then fails the test
    with the step's name. LMFORGE_BROWSER_SCREENSHOTS=all keeps every step's, passed or not."""

    def __init__(self, driver, folder: Path, logs: dict[str, Path] | None = None):
        self.driver, self.folder, self.logs, self.count = driver, folder, logs or {}, 0

    def save(self, name: str) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        stem = self.folder / f"{self.count:02d}-{_SAFE.sub('_', name)}"
        try:
            self.driver.save_screenshot(str(stem.with_suffix(".png")))
            stem.with_suffix(".html").write_text(self.driver.page_source)
            stem.with_suffix(".url").write_text(self.driver.current_url + "\n")
            # The whole page too: what failed is often below the fold (a tall window; the UI
            # scrolls inside its own panes, so the document's height says little).
            self.driver.set_window_size(WINDOW[0], 3000)
            self.driver.save_screenshot(str(stem.with_name(stem.name + "-tall.png")))
            self.driver.set_window_size(*WINDOW)
        except Exception as error:  # a dead browser: keep what can be kept
            stem.with_suffix(".error").write_text(f"{type(error).__name__}: {error}\n")
        for label, path in self.logs.items():
            if path.exists():
                shutil.copy(path, self.folder / f"{label}.log")
        return stem

    @contextmanager
    def step(self, name: str):
        self.count += 1
        try:
            yield
            if os.environ.get("LMFORGE_BROWSER_SCREENSHOTS") == "all":  # every step's, to look at
                self.save(name)
        except BaseException as error:
            if isinstance(error, (KeyboardInterrupt, pytest.skip.Exception)):
                raise
            stem = self.save(name)
            raise AssertionError(f"browser step {self.count} ({name}) failed: {error}\n"
                                 f"screenshot and page: {stem}.png, {stem}.html") from error


def wait_until(condition, timeout: float, message, interval: float = 0.5):
    """condition()'s first truthy value within timeout seconds, else an AssertionError with
    message (a string, or a function giving one at the time of failure). Exceptions from
    condition count as not yet (an element that is not there yet)."""
    deadline = time.monotonic() + timeout
    last_error = None
    while True:
        try:
            value = condition()
            if value:
                return value
        except AssertionError:
            raise
        except Exception as error:
            last_error = error
        if time.monotonic() > deadline:
            text = message() if callable(message) else message
            suffix = f" (last error: {type(last_error).__name__}: {last_error})" if last_error else ""
            raise AssertionError(f"{text} within {timeout:.0f} s{suffix}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else f"({path} not written)"


class Background:
    """A process started in its own session, its output in a log file; stop() ends its group
    (the flow-run processes a serve process starts included)."""

    def __init__(self, command: list[str], log: Path, **popen):
        self.log = log
        self._out = open(log, "w")
        self.process = subprocess.Popen(command, stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True,
                                        **popen)

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.alive():
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.process.wait(timeout=20)
        self._out.close()


def prefect_env(home: Path, api_url: str) -> dict[str, str]:
    """The environment for the Prefect server and the processes that report to it."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "PREFECT_HOME": str(home), "PREFECT_API_URL": api_url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PYTHONUNBUFFERED": "1"}


def start_prefect_server(home: Path, log: Path, timeout: float = 120) -> tuple[Background, str]:
    """`prefect server start` on a free port of 127.0.0.1 with its own PREFECT_HOME (and so its
    own SQLite database); returns it once /api/health answers, with the server's base URL."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = Background([str(Path(sys.executable).with_name("prefect")), "server", "start", "--host", "127.0.0.1",
                         "--port", str(port)], log, env=prefect_env(home, f"{base}/api"), cwd=home)

    def healthy() -> bool:
        if not server.alive():
            raise AssertionError(f"prefect server exited ({server.process.returncode}):\n{tail(log)}")
        with urllib.request.urlopen(f"{base}/api/health", timeout=2) as answer:
            return answer.status == 200

    try:
        wait_until(healthy, timeout, lambda: f"prefect server on {base} did not answer /api/health:\n{tail(log)}")
    except BaseException:
        server.stop()
        raise
    return server, base
