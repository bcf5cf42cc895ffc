"""The Prefect UI in a real browser (issue #39): headless Chromium from Debian's packages, driven by
Selenium through Debian's chromedriver, against a Prefect server this test starts on 127.0.0.1 and
`python -m flows.deployments` serving a small real DVC project.

The deployments page lists the four deployments; the on-demand deployment's Run -> Custom run
form submits a run of a cheap stage `hello`; the run's page shows the stage as a task named
`hello` and the line the stage printed before it slept, logged while the stage still ran.
A failed step leaves screenshots and page sources in test-artifacts/browser/ (or
$LMFORGE_TEST_ARTIFACTS)."""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
import uuid
from datetime import timedelta

import pytest

from tests.browser import (Background, Steps, artifacts_dir, chromium, prefect_env, require_browser,
                           start_prefect_server, tail, wait_until)
from tests.conftest import ROOT
from tests.test_flows import add_stages

DEPLOYMENTS = {"nightly", "on-demand", "tune-worker", "promote"}
SLEEP = 4  # seconds the stage sleeps between its two lines
STARTED = f"hello: started, sleeping {SLEEP} s"
DONE = "hello: done"
# A script, not `python -c "..."`: DVC echoes a stage's command into its output, and a command
# holding STARTED would put the line in the log before the stage printed it.
HELLO_SCRIPT = f"""import time
from pathlib import Path
print({STARTED!r}, flush=True)
time.sleep({SLEEP})
print({DONE!r}, flush=True)
Path("hello.txt").write_text("hello from the browser test")
"""
HELLO_STAGE = {"cmd": "python hello.py", "deps": ["hello.py"], "outs": ["hello.txt"]}
TERMINAL = {"Completed", "Failed", "Crashed", "Cancelled", "TimedOut"}


@pytest.fixture(autouse=True)
def _browser():
    """Skip (or fail, in CI) before starting any server when there is no browser to drive."""
    require_browser()


@pytest.fixture
def prefect_server(tmp_path):
    """A Prefect server of this test's own on 127.0.0.1 (its own PREFECT_HOME and database)."""
    server, base = start_prefect_server(tmp_path / "prefect-home", tmp_path / "prefect-server.log")
    try:
        yield base
    finally:
        server.stop()


@pytest.fixture
def served_project(dvc_repo, prefect_server, tmp_path):
    """The temp DVC project with this checkout's flows/ and a cheap stage `hello`, its four
    deployments served by `python -m flows.deployments` (which also runs their flow runs)."""
    shutil.copytree(ROOT / "flows", dvc_repo / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    (dvc_repo / "hello.py").write_text(HELLO_SCRIPT)
    add_stages(dvc_repo, {"hello": HELLO_STAGE})  # before serving: the flow may read the stage names
    env = {**prefect_env(tmp_path / "prefect-home", f"{prefect_server}/api"),
           "PREFECT_RUNNER_POLL_FREQUENCY": "2", "LMFORGE_TRACKING": "off"}
    serve = Background([sys.executable, "-m", "flows.deployments"], tmp_path / "serve.log", cwd=dvc_repo, env=env)
    try:
        yield dvc_repo, serve
    finally:
        serve.stop()


def api_client(base: str):
    """A sync Prefect client of the test's server (the test process's own settings untouched)."""
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(f"{base}/api")


def clock(text: str) -> int:
    """Seconds into the day of a time the UI shows ("04:43:42 AM" or "16:43:42")."""
    found = re.search(r"(\d{1,2}):(\d{2}):(\d{2})\s*([AP]M)?", text)
    assert found, f"no time of day in {text!r}"
    hours, minutes, seconds, half = found.groups()
    hours = int(hours) % 12 + (12 if half == "PM" else 0) if half else int(hours)
    return hours * 3600 + int(minutes) * 60 + int(seconds)


def log_rows(driver) -> list[dict]:
    """The Logs tab's rows: message, the time shown, the task's name (if the task logged it)."""
    from selenium.webdriver.common.by import By

    rows = []
    for row in driver.find_elements(By.CSS_SELECTOR, ".log-row"):
        trailing = [e.text.strip() for e in row.find_elements(By.CSS_SELECTOR, ".log-row__trailing > div")]
        logger = row.find_elements(By.CSS_SELECTOR, ".log-row__logger")
        rows.append({"message": row.find_element(By.CSS_SELECTOR, ".log-row__content").text,
                     "time": trailing[0] if trailing else "",
                     "task": trailing[1] if len(trailing) > 2 else None,
                     "logger": logger[0].text.strip() if logger else ""})
    return rows


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_the_ui_lists_the_deployments_runs_a_stage_and_shows_its_task_and_live_log(served_project, prefect_server,
                                                                                   tmp_path, request):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    repo, serve = served_project
    base = prefect_server
    started = time.monotonic()

    def serve_log() -> str:
        return f"serve.log:\n{tail(serve.log)}"

    def registered() -> bool:
        assert serve.alive(), f"python -m flows.deployments exited ({serve.process.returncode}); {serve_log()}"
        with api_client(base) as client:
            return DEPLOYMENTS <= {d.name for d in client.read_deployments()}

    wait_until(registered, 120, lambda: f"the four deployments were not registered; {serve_log()}")

    driver = chromium()
    steps = Steps(driver, artifacts_dir(request.node.name),
                  logs={"serve": serve.log, "prefect-server": tmp_path / "prefect-server.log"})
    run_name = f"browser-hello-{uuid.uuid4().hex[:8]}"
    try:
        with steps.step("deployments page lists the four deployments"):
            driver.get(f"{base}/deployments")

            def listed() -> set[str]:
                links = driver.find_elements(By.CSS_SELECTOR, "a[href*='/deployments/deployment/']")
                names = {a.text.strip() for a in links}
                return DEPLOYMENTS <= names and names

            names = wait_until(listed, 60, lambda: "the deployments page did not list "
                               f"{sorted(DEPLOYMENTS)}; links seen: "
                               f"{sorted(a.text for a in driver.find_elements(By.CSS_SELECTOR, 'a'))}")
            assert DEPLOYMENTS <= names, f"deployments listed: {sorted(names)}"

        with steps.step("open the on-demand deployment"):
            driver.find_element(By.LINK_TEXT, "on-demand").click()
            wait_until(lambda: "/deployments/deployment/" in driver.current_url
                       and driver.find_elements(By.XPATH, "//button[normalize-space(.)='Run']"),
                       30, "the on-demand deployment's page with its Run button did not open")

        with steps.step("Run -> Custom run opens the run form"):
            driver.find_element(By.XPATH, "//button[normalize-space(.)='Run']").click()
            wait_until(lambda: driver.find_element(By.XPATH, "//button[normalize-space(.)='Custom run']"), 10,
                       "the Run menu has no 'Custom run'").click()
            wait_until(lambda: driver.current_url.split("?")[0].endswith("/run")
                       and driver.find_elements(By.XPATH, "//button[normalize-space(.)='Submit']"),
                       30, "the custom run form (with a Submit button) did not open")

        with steps.step("name the run"):
            name_input = wait_until(
                lambda: driver.find_element(By.XPATH, "//*[normalize-space(text())='Run Name']/following::input[1]"),
                10, "the form has no Run Name input")
            name_input.send_keys(Keys.CONTROL, "a")
            name_input.send_keys(Keys.DELETE)
            name_input.send_keys(run_name)
            assert name_input.get_attribute("value") == run_name, \
                f"Run Name holds {name_input.get_attribute('value')!r}, not {run_name!r}"

        # The parameters as JSON: whatever widgets the flow's parameter schema gives (lists,
        # enums, defaults), the JSON input takes the whole set as one value.
        with steps.step("switch the parameters to JSON input"):
            menu = driver.find_element(
                By.XPATH, "//h3[normalize-space(.)='Parameters']/following::button[1]")
            menu.click()
            wait_until(lambda: driver.find_element(By.XPATH, "//button[normalize-space(.)='Use JSON input']"), 10,
                       "the Parameters menu offers no 'Use JSON input'").click()
            editor = wait_until(
                lambda: driver.find_element(By.CSS_SELECTOR, ".schema-form-property-kind-json textarea"), 10,
                "no JSON editor appeared for the parameters")

        with steps.step("set targets to the hello stage"):
            params = json.loads(editor.get_attribute("value") or "{}")
            assert "targets" in params or not params, f"the form's parameters have no targets: {params}"
            params["targets"] = ["hello"]
            editor.send_keys(Keys.CONTROL, "a")
            editor.send_keys(Keys.DELETE)
            editor.send_keys(json.dumps(params))
            typed = json.loads(editor.get_attribute("value"))
            assert typed == params, f"the JSON input holds {typed}, not {params}"

        with steps.step("submit the run"):
            driver.find_element(By.XPATH, "//button[normalize-space(.)='Submit']").click()

            def submitted():
                with api_client(base) as client:
                    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

                    runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[run_name])))
                return runs[0] if runs else None

            flow_run = wait_until(submitted, 30, lambda: f"Submit created no flow run named {run_name} "
                                  "(a validation error on the form?)")
            assert flow_run.parameters.get("targets") == ["hello"], \
                f"the run was submitted with parameters {flow_run.parameters}"
            wait_until(lambda: not driver.current_url.split("?")[0].endswith("/run"), 15,
                       "the form stayed open after Submit")

        with steps.step("open the run's page"):
            links = driver.find_elements(By.XPATH, f"//a[normalize-space(.)='{run_name}']")
            if links:  # the deployment page's "Next run" card or its runs list
                links[0].click()
            else:
                driver.get(f"{base}/runs/flow-run/{flow_run.id}")
            wait_until(lambda: str(flow_run.id) in driver.current_url, 30,
                       lambda: f"the run's page did not open (at {driver.current_url})")

        with steps.step("the run completes"):
            def badge() -> str | None:
                text = driver.find_element(By.CSS_SELECTOR, ".page-heading-flow-run .state-badge").text.strip()
                return text if text in TERMINAL else None

            final = wait_until(badge, 180, lambda: f"the run's page shows no final state; {serve_log()}", interval=1)
            assert final == "Completed", f"the run ended {final}; {serve_log()}"
            assert (repo / "hello.txt").read_text() == "hello from the browser test", "the hello stage wrote nothing"

        with steps.step("the Task Runs tab names the stage task hello"):
            driver.find_element(By.XPATH, "//*[contains(@class,'tab')][normalize-space(.)='Task Runs']").click()

            def task_names() -> list[str]:
                return [a.text.strip() for a in
                        driver.find_elements(By.CSS_SELECTOR, ".task-run-list-item__breadcrumbs a") if a.text.strip()]

            names = wait_until(lambda: "hello" in task_names() and task_names(), 30,
                               lambda: f"no task run named hello in the Task Runs tab: {task_names()}")
            generic = [n for n in names if n.startswith("run_stage")]
            assert not generic, f"stage tasks carry the function's name, not the stage's: {names}"

        with steps.step("the Logs tab shows the line the stage printed before it slept"):
            driver.find_element(By.XPATH, "//*[contains(@class,'tab')][normalize-space(.)='Logs']").click()

            def line_rows() -> tuple[dict, dict] | None:
                rows = log_rows(driver)
                line = [r for r in rows if STARTED in r["message"].splitlines()]
                end = [r for r in rows if r["task"] == "hello" and r["message"].startswith("Finished in state")]
                return (line[0], end[0]) if line and end else None

            line, end = wait_until(line_rows, 30, lambda: f"the Logs tab shows no {STARTED!r} line and the "
                                   f"hello task's end: {[r['message'][:80] for r in log_rows(driver)]}")
            assert line["task"] == "hello", f"the line is not shown as the hello task's log: {line}"
            assert DONE not in line["message"].splitlines(), (
                f"the UI shows {STARTED!r} and {DONE!r}, printed {SLEEP} s apart, in one log row: the stage's "
                f"output reached the log only once the stage was over:\n{line['message']}")
            # Times shown to the second: a line logged as it was printed is shown SLEEP s or more
            # before the task's end; one logged when the stage ended, a second or so before.
            assert clock(end["time"]) - clock(line["time"]) >= SLEEP - 1, (
                f"the stage printed {STARTED!r} {SLEEP} s before it ended, yet the UI shows it logged at "
                f"{line['time']} and the task's end at {end['time']}")

        with steps.step("the API has the line logged while the stage ran"):
            from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId, TaskRunFilter, \
                TaskRunFilterFlowRunId

            with api_client(base) as client:
                tasks = client.read_task_runs(
                    task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[flow_run.id])))
                logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])))
            hello = [t for t in tasks if t.name == "hello"]
            assert hello, f"no task run named hello: {[t.name for t in tasks]}"
            hello = hello[0]
            printed = [log for log in logs if STARTED in log.message.splitlines()]
            assert printed, f"no log record holds {STARTED!r}: {[log.message[:80] for log in logs]}"
            record = printed[0]
            assert record.task_run_id == hello.id, "the line was not logged as the hello task's"
            assert DONE not in record.message, \
                f"{STARTED!r} and {DONE!r} ({SLEEP} s later) reached the log as one record: {record.message!r}"
            assert hello.end_time and record.timestamp <= hello.end_time - timedelta(seconds=SLEEP - 2), (
                f"{STARTED!r} was logged at {record.timestamp}, the hello task ended at {hello.end_time}: "
                f"not while the stage ran ({SLEEP} s of sleep after the line)")
    finally:
        driver.quit()
    print(f"browser test: {time.monotonic() - started:.0f} s from serving to the last check")
