"""PostgreSQL 15 and the shared servers on it, for tests: one of each per session, on loopback.

`postgres`: scripts/local_postgres.sh up in a fresh folder on a free port (databases optuna,
mlflow, prefect; the role's password only in the folder's 0600 pgpass, which PGPASSFILE names).
`stack`: scripts/stack.sh up on that PostgreSQL: an MLflow tracking server, a Prefect server, the
lmforge-process pool and a worker, each on a free 127.0.0.1 port.
Without PostgreSQL 15 or psycopg the tests that use them skip with the install line, or fail
when LMFORGE_CLUSTER_REQUIRED=1 (CI sets it: a missing install must not pass as a skip).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cluster_fixtures import skip_or_fail
from tests.conftest import BIN, ROOT

PG_BIN = Path(os.environ.get("LMFORGE_PG_BIN", "/usr/lib/postgresql/15/bin"))
SCRIPTS = ROOT / "scripts"


def need_postgres() -> None:
    missing = []
    if not (PG_BIN / "pg_ctl").exists():
        missing.append(f"PostgreSQL 15 at {PG_BIN} (apt-get install -y postgresql)")
    try:
        import psycopg  # noqa: F401 - SQLAlchemy 2.1's driver for postgresql:// URLs
    except ImportError:
        missing.append("psycopg (the dev extra: pip install -c constraints.txt -e '.[dev]')")
    if not missing:
        return
    skip_or_fail("needs " + " and ".join(missing))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def state_folder(prefix: str) -> Path:
    # Directly under /tmp, 0755: run as root, the server runs as `postgres`, which must reach its
    # data folder (pytest's tmp folders are 0700 and root's), and unix socket paths are short.
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    folder.chmod(0o755)
    return folder


def script(name: str, *args: str, env: dict[str, str], timeout: float = 240,
           check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["bash", str(SCRIPTS / name), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"scripts/{name} {' '.join(args)} exited {done.returncode}:\n"
                             f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


@dataclass(frozen=True)
class Postgres:
    state: Path
    port: int
    env: dict[str, str]  # what scripts/local_postgres.sh needs to find this instance again

    @property
    def pgpass(self) -> Path:
        return self.state / "pgpass"

    def url(self, database: str, driver: str = "postgresql") -> str:
        # No password in it: libpq and asyncpg read it from PGPASSFILE.
        return f"{driver}://lmforge@127.0.0.1:{self.port}/{database}"


@pytest.fixture(scope="session")
def postgres():
    need_postgres()
    state = state_folder("lmforge-pg-")
    port = free_port()
    env = {**os.environ, "LMFORGE_PG_PORT": str(port)}
    patch = pytest.MonkeyPatch()
    try:
        script("local_postgres.sh", "up", str(state), env=env)
        patch.setenv("PGPASSFILE", str(state / "pgpass"))  # for clients in this process and its children
        yield Postgres(state, port, env)
    finally:
        patch.undo()
        script("local_postgres.sh", "down", str(state), env=env, check=False)
        shutil.rmtree(state, ignore_errors=True)


@dataclass(frozen=True)
class Stack:
    state: Path
    mlflow_url: str
    prefect_api_url: str


@pytest.fixture(scope="session")
def stack(postgres):
    state = state_folder("lmforge-stack-")
    mlflow_port, prefect_port = free_port(), free_port()
    # The worker and the flow runs it starts inherit this environment: the venv's tools first,
    # none of a test's tracking switches.
    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "LMFORGE_TRACKING",
                        "LMFORGE_EXPERIMENT", "LMFORGE_OPTUNA_STORAGE")}
    env.update(postgres.env, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", LMFORGE_PG_DIR=str(postgres.state),
               LMFORGE_STACK_MLFLOW_PORT=str(mlflow_port), LMFORGE_STACK_PREFECT_PORT=str(prefect_port),
               PREFECT_UI_ENABLED="false")
    try:
        script("stack.sh", "up", str(state), env=env)
        yield Stack(state, f"http://127.0.0.1:{mlflow_port}", f"http://127.0.0.1:{prefect_port}/api")
    finally:
        script("stack.sh", "down", str(state), env=env, check=False)
        shutil.rmtree(state, ignore_errors=True)
