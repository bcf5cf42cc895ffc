"""A registered version loads, predicts and serves in a Python environment without lmforge.

The environment: a fresh venv (no pip, nothing installed) whose one .pth file lists this project's
site-packages. A .pth line only adds a directory to sys.path; the .pth files inside that directory
are not processed, so the editable install of lmforge (a .pth finder there) is not importable, while
mlflow, torch and transformers are. Everything runs with cwd outside the repo and no PYTHONPATH, so
lmforge can come only from the model's own code (code_paths).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
from importlib.metadata import version
from pathlib import Path

import pytest

from tests.test_serve import free_port, post, stop_server, wait_for_ping
from tests.tiny_models import NEGATIVE, POSITIVE

NAME = "portable-sentiment"
URI = f"models:/{NAME}@champion"
CHAT_NAME = "portable-chat"


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> str:
    """A registry whose portable-sentiment@champion is the tiny classifier and portable-chat@champion
    the tiny chat model, registered as the stage does."""
    import mlflow

    from lmforge.config import load_params
    from lmforge.registry import registration as registry
    from tasks.register import MODELS
    from tests.test_register import make_project

    folder = tmp_path_factory.mktemp("portable")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    patch = pytest.MonkeyPatch()
    patch.setenv("MLFLOW_TRACKING_URI", uri)
    patch.delenv("LMFORGE_EXPERIMENT", raising=False)
    patch.delenv("LMFORGE_TRACKING", raising=False)
    mlflow.MlflowClient(tracking_uri=uri).create_experiment("lmforge", artifact_location=str(folder / "artifacts"))
    root = make_project(folder / "proj", "portable")
    params = load_params(root / "params.yaml")
    with registry.using(uri) as client:
        registry.register_model(MODELS["sentiment"], params, root, log=lambda _: None)
        assert registry.promote(NAME, params.register_.sentiment.gate, client=client).promoted
        registry.register_model(MODELS["chat"], params, root, log=lambda _: None)
        assert registry.promote(CHAT_NAME, params.register_.chat.gate, client=client).promoted
    yield uri
    patch.undo()


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> Path:
    """The python of a venv that sees this project's packages but not lmforge."""
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / "project_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # `mlflow models serve` starts `uvicorn` from PATH: the bare venv's, so it runs the bare python
    uvicorn = venv / "bin" / "uvicorn"
    uvicorn.write_text(f"#!{python}\nimport sys\nfrom uvicorn.main import main\nsys.exit(main())\n")
    uvicorn.chmod(0o755)
    return python


def bare_env(python: Path, uri: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = os.pathsep.join([str(python.parent), "/usr/bin", "/bin"])  # not this project's .venv/bin
    env["MLFLOW_TRACKING_URI"] = uri
    return env


def run_bare(python: Path, uri: str, code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-c", code], cwd=cwd, env=bare_env(python, uri), capture_output=True,
                          text=True, timeout=300)


LOAD_AND_PREDICT = f"""
import json, sys
import mlflow.pyfunc, pandas as pd
model = mlflow.pyfunc.load_model({URI!r})
answer = model.predict(pd.DataFrame({{"text": [{POSITIVE!r}, {NEGATIVE!r}]}}))
print(json.dumps({{"labels": answer["label"].tolist(), "serving": sys.modules["lmforge.registry.serving"].__file__}}))
"""


def test_a_registered_version_loads_and_predicts_without_lmforge(registry, bare_python, tmp_path):
    missing = run_bare(bare_python, registry, "import lmforge", tmp_path)
    assert missing.returncode != 0 and "No module named 'lmforge'" in missing.stderr

    loaded = run_bare(bare_python, registry, LOAD_AND_PREDICT, tmp_path)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    answer = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert answer["labels"] == ["positive", "negative"]
    # the wrapper class resolved from the code logged with the model, nowhere else
    assert "/code/lmforge/registry/serving.py" in answer["serving"]


CHAT_ANSWER = f"""
import json, sys
import mlflow.pyfunc, pandas as pd
model = mlflow.pyfunc.load_model("models:/{CHAT_NAME}@champion")
answer = model.predict(pd.DataFrame({{"text": ["hi 3", "what now?"]}}), params={{"max_new_tokens": 4}})
print(json.dumps({{"replies": answer["generated_text"].tolist(), "wrapper": type(model.unwrap_python_model()).__name__}}))
"""


def test_a_registered_chat_version_answers_through_its_template_without_lmforge(registry, bare_python, tmp_path):
    loaded = run_bare(bare_python, registry, CHAT_ANSWER, tmp_path)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    answer = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert answer["wrapper"] == "ChatGenerator" and len(answer["replies"]) == 2
    assert all(isinstance(reply, str) for reply in answer["replies"])


def test_a_registered_version_pins_its_requirements_and_carries_only_its_code(registry):
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=URI, tracking_uri=registry))
    pins = dict(line.split("==") for line in (local / "requirements.txt").read_text().split())
    for package in ("mlflow", "cloudpickle", "torch", "transformers", "tokenizers", "safetensors", "pandas", "numpy"):
        assert pins[package] == version(package).split("+")[0], package
    assert all(re.fullmatch(r"[\w.-]+", v) for v in pins.values())
    code = sorted(p.relative_to(local / "code").as_posix() for p in (local / "code").rglob("*.py"))
    assert code == ["lmforge/__init__.py", "lmforge/registry/__init__.py", "lmforge/registry/guard.py",
                    "lmforge/registry/serving.py"]


def test_a_registered_version_serves_without_lmforge(registry, bare_python, tmp_path):
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [str(bare_python), "-m", "mlflow", "models", "serve", "-m", URI, "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port)],
        cwd=tmp_path, env=bare_env(bare_python, registry), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_ping(server, base, tmp_path / "serve.log", 180)
        status, body = post(f"{base}/invocations", json.dumps({"inputs": [POSITIVE, NEGATIVE]}).encode())
        assert status == 200, body
        assert [p["label"] for p in body["predictions"]] == ["positive", "negative"]
        # the request guard travels with the model too
        status, body = post(f"{base}/invocations", json.dumps({"inputs": ["SECRET"] * 100}).encode())
        assert status == 400 and "SECRET" not in json.dumps(body) and "the limit is" in body["message"]
    finally:
        stop_server(server)
        log.close()
