"""A real local Slurm cluster for tests (scripts/local_cluster.sh): slurmctld and two slurmd on
this host, brought up once per session and down at its end. Use it with
`pytest_plugins = ["tests.cluster_fixtures"]` or by importing `slurm_cluster`.

Where Slurm or munge is missing (or we are not root), the tests that need the cluster skip and
say what to install; with LMFORGE_CLUSTER_REQUIRED=1 (CI) they fail instead, so a machine that
lost the packages cannot pass by skipping."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "local_cluster.sh"
PARTITION = "lmforge"
INSTALL = "apt-get install -y slurm-wlm munge"


@dataclass(frozen=True)
class Cluster:
    state: Path  # the cluster's folder: slurm.conf, logs, pid files
    partition: str
    env: dict[str, str]  # what a client (sbatch, squeue, a stage submitting jobs) needs: SLURM_CONF

    def script(self, command: str, check: bool = True) -> subprocess.CompletedProcess:
        return cluster_script(command, self.state, self.env, check)


def cluster_script(command: str, state: Path, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(SCRIPT), command, str(state)], env={**os.environ, **env}, capture_output=True,
                            text=True, timeout=180)
    if check and result.returncode != 0:
        raise AssertionError(f"local_cluster.sh {command} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def why_no_cluster() -> str | None:
    """What this machine lacks to run the cluster, or None."""
    missing = [tool for tool in ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scancel")
               if not shutil.which(tool) and not Path("/usr/sbin", tool).exists()]
    if missing:
        return f"Slurm or munge is not installed (no {', '.join(missing)}): {INSTALL}"
    if os.geteuid() != 0:
        return "the local Slurm cluster runs its daemons and jobs as root"
    return None


def skip_or_fail(reason: str) -> None:
    if os.environ.get("LMFORGE_CLUSTER_REQUIRED") == "1":
        pytest.fail(f"LMFORGE_CLUSTER_REQUIRED=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def free_ports(count: int) -> int:
    """The first of `count` consecutive free TCP ports (slurmctld, then one per slurmd), so that
    a cluster of a concurrent test session, or a developer's, is never joined by mistake."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("", 0))
            first = probe.getsockname()[1]
        if first + count > 65535:
            continue
        try:
            held = []
            for port in range(first, first + count):
                sock = socket.socket()
                held.append(sock)
                sock.bind(("", port))
            return first
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
    raise RuntimeError(f"no {count} consecutive free TCP ports")


def cluster_env(state: Path) -> dict[str, str]:
    return {"LMFORGE_CLUSTER_DIR": str(state), "LMFORGE_CLUSTER_PORT": str(free_ports(3)),
            "LMFORGE_CLUSTER_PARTITION": PARTITION, "SLURM_CONF": str(state / "slurm.conf")}


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> Cluster:
    reason = why_no_cluster()
    if reason:
        skip_or_fail(reason)
    state = tmp_path_factory.mktemp("slurm")
    cluster = Cluster(state, PARTITION, cluster_env(state))
    try:
        cluster.script("up")
        yield cluster
    finally:
        cluster.script("down", check=False)
