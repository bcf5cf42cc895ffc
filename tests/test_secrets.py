"""No credential in anything a run writes: passwords in a tracking URI and in tune.storage are
used, but never land in the repo, the MLflow store, the reports or what `lmforge trace` shows."""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from lmforge.redaction import redact, redact_all
from tests.conftest import BIN
from tests.test_register import make_project
from tests.test_serve import free_port, stop_server

TRACKING_PASSWORD = "trk-pw-5b1e0d"
STORAGE_PASSWORD = "opt-pw-93c7aa"


@pytest.mark.parametrize("text, shown", [
    ("postgresql://tuner:hunter2@db:5432/optuna", "postgresql://tuner:***@db:5432/optuna"),
    ("https://ghp_token@example.invalid/repo.git", "https://***@example.invalid/repo.git"),
    ("http://u:p@ss@host:5000/x", "http://u:***@host:5000/x"),  # an unescaped @ in the password
    ("https://b.invalid/x?X-Amz-Credential=c&X-Amz-Signature=abc&api_key=k&n=1",
     "https://b.invalid/x?X-Amz-Credential=***&X-Amz-Signature=***&api_key=***&n=1"),
    ("runs at sqlite:////tmp/mlflow.db, 3 trials", "runs at sqlite:////tmp/mlflow.db, 3 trials"),
])
def test_redact_masks_what_authenticates_and_keeps_the_rest(text, shown):
    assert redact(text) == shown


def test_redact_all_keeps_the_structure():
    payload = {"tune": {"storage": "mysql://a:b@db/x", "trials": 8, "urls": ["http://c:d@e"]}}
    assert redact_all(payload) == {"tune": {"storage": "mysql://a:***@db/x", "trials": 8, "urls": ["http://c:***@e"]}}


def files_holding(folder: Path, secret: str) -> list[str]:
    needle = secret.encode()
    return [str(p) for p in folder.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_no_password_reaches_the_repo_the_store_or_trace(tmp_path, monkeypatch, capsys):
    store = tmp_path / "server"
    store.mkdir()
    port = free_port()
    log = (tmp_path / "mlflow-server.log").open("w")
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
         "--default-artifact-root", str(store / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        cwd=tmp_path, env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "mlflow-server.log").read_text()
                time.sleep(0.5)
        uri = f"http://lmforge:{TRACKING_PASSWORD}@127.0.0.1:{port}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        root = make_project(tmp_path / "proj", "secret")
        params = yaml.safe_load((root / "params.yaml").read_text())
        params["tune"] = {**(params.get("tune") or {}), "storage": f"postgresql://tuner:{STORAGE_PASSWORD}@db.invalid/optuna"}
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        monkeypatch.chdir(root)
        from tasks import cli, register, summarize

        register.main(["--only", "sentiment"])
        monkeypatch.setattr("sys.argv", ["summarize"])
        summarize.main()
        assert cli.main(["trace", "models:/secret-sentiment@challenger"]) == 0
        shown = capsys.readouterr()
    finally:
        stop_server(server)
        log.close()

    assert "secret-sentiment" in (root / "reports/summary.md").read_text()  # it did run, and reached the store
    assert "postgresql://tuner:***@db.invalid/optuna" in shown.out  # trace shows the params, masked
    for secret in (TRACKING_PASSWORD, STORAGE_PASSWORD):
        assert secret not in shown.out + shown.err
        leaked = files_holding(root, secret)
        assert leaked in ([], [str(root / "params.yaml")]), leaked  # only where the user wrote it
        assert files_holding(store, secret) == []
