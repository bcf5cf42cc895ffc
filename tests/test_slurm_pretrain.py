"""The pretrain stage across two Slurm nodes (scripts/pretrain.sbatch on scripts/local_cluster.sh's
cluster: n1 and n2 on this host, one torchrun each through srun, gloo on the CPU): the plain run,
and a run whose node-1 task is killed after a checkpoint, requeued with `scontrol requeue`, which
resumes from that checkpoint and ends with the uninterrupted run's weights up to fp32 rounding."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pretrain_fixtures as fx
import psutil
import pytest
import torch

from lmforge.training import checkpoint
from tests.cluster_fixtures import (
    Cluster,
    slurm_cluster,  # noqa: F401 (a session fixture)
)

SBATCH = fx.REPO / "scripts" / "pretrain.sbatch"
# A global batch of 32 windows, 16 per node; a checkpoint every 10 steps.
RUN = {"max_steps": 40, "warmup_steps": 4, "eval_steps": 10, "save_steps": 10, "logging_steps": 5,
       "global_batch_size": 32, "save": "last", "parallel": "fsdp"}
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokens") / "tokens"
    fx.make_tokens(out)
    return out


def job_env(cluster: Cluster) -> dict[str, str]:
    # Both nodes are this host: node 0 is met on loopback (the nodes' names n1, n2 do not resolve).
    return fx.stage_env(**cluster.env, MASTER_ADDR="127.0.0.1", LMFORGE_VENV=sys.prefix)


def submit(root: Path, cluster: Cluster, wait: bool = False) -> subprocess.CompletedProcess:
    command = ["sbatch", "--parsable", f"--partition={cluster.partition}", "--time=0:10:00",
               *(["--wait"] if wait else []), str(SBATCH)]
    return subprocess.run(command, cwd=root, env=job_env(cluster), capture_output=True, text=True, check=False,
                          timeout=TIMEOUT_S)


def job(cluster: Cluster, job_id: str) -> dict[str, str]:
    shown = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=job_env(cluster), capture_output=True,
                           text=True, timeout=30, check=False)
    return dict(re.findall(r"(\w+)=(\S*)", shown.stdout))


def wait_for(what: str, ready, timeout: float = TIMEOUT_S, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while not (found := ready()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout} s\n" + (log.read_text()[-4000:] if log and log.exists() else ""))
        time.sleep(0.05)
    return found


def job_log(root: Path, job_id: str) -> Path:
    return root / f"slurm-pretrain-{job_id}.out"


def saved_weights(root: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(root / "models" / "pretrained" / "model.safetensors")


def node_task(job_id: str, node: int) -> psutil.Process | None:
    """The torchrun that srun started on `node` for this job (found by its Slurm environment)."""
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if "torch.distributed.run" not in " ".join(proc.info["cmdline"] or []):
                continue
            env = proc.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if env.get("SLURM_JOB_ID") == job_id and env.get("SLURM_NODEID") == str(node) and "SLURM_STEP_ID" in env:
            return proc
    return None


def kill_tree(proc: psutil.Process) -> None:
    """SIGKILL torchrun and its workers, as a node lost mid-run would lose them."""
    everyone = [proc, *proc.children(recursive=True)]
    for p in everyone:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(everyone, timeout=30)


def test_pretrain_on_two_slurm_nodes_survives_a_lost_node_and_a_requeue(slurm_cluster, tokens, tmp_path):  # noqa: F811
    # (a) The uninterrupted run: one sbatch, two nodes, the stage's command on each.
    start = time.perf_counter()
    reference = fx.project(tmp_path / "reference", RUN, tokens=tokens)
    done = submit(reference, slurm_cluster, wait=True)
    ref_id = done.stdout.strip().split(";")[0]
    log = job_log(reference, ref_id)
    assert done.returncode == 0, done.stderr + (log.read_text()[-4000:] if log.exists() else "")
    plain_s = time.perf_counter() - start
    output = log.read_text()
    assert "2 nodes x 1" in output
    metrics = json.loads((reference / "reports" / "pretrain" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["resumed_from"] == 0
    expected = saved_weights(reference)

    # (b) The same run, node 1's task killed once a checkpoint exists: the step fails on both nodes.
    start = time.perf_counter()
    killed = fx.project(tmp_path / "killed", RUN, tokens=tokens)
    submitted = submit(killed, slurm_cluster)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    log = job_log(killed, job_id)
    checkpoints = killed / "models" / "checkpoints"
    wait_for("a checkpoint", lambda: list(checkpoints.glob("*/latest")), log=log)
    kill_tree(wait_for("node 1's torchrun", lambda: node_task(job_id, 1), timeout=10, log=log))
    latest = next(checkpoints.glob("*/latest"))
    wait_for("the job to fail", lambda: job(slurm_cluster, job_id).get("JobState") in {"FAILED", "CANCELLED",
                                                                                        "COMPLETED"}, log=log)
    assert job(slurm_cluster, job_id)["JobState"] == "FAILED", log.read_text()[-4000:]
    held = checkpoint.read_state(latest.parent / latest.read_text().strip())["step"]
    assert 0 < held < RUN["max_steps"], "the kill must land mid-training"
    assert not (killed / "models" / "pretrained").exists()

    # Resubmitted (or, with LMFORGE_TEST_REQUEUE=1, requeued: the same job, but Slurm holds it back
    # CredExpire seconds, 120 by default, and letting it start sooner fails it with "Job credential
    # revoked"), the run resumes from the last whole checkpoint on both nodes.
    if os.environ.get("LMFORGE_TEST_REQUEUE") == "1":
        requeued = subprocess.run(["scontrol", "requeue", job_id], env=job_env(slurm_cluster), capture_output=True,
                                  text=True, timeout=30, check=False)
        assert requeued.returncode == 0, requeued.stderr
        restarts, marker = lambda s: s.get("Restarts", "0") != "0", "restart 1: 2 nodes"
    else:
        again = submit(killed, slurm_cluster)
        assert again.returncode == 0, again.stderr
        job_id = again.stdout.strip().split(";")[0]
        log = job_log(killed, job_id)
        restarts, marker = lambda s: True, "restart 0: 2 nodes"
    state = wait_for("the resumed job to end",
                     lambda: (s := job(slurm_cluster, job_id)).get("JobState") in {"COMPLETED", "FAILED"} and
                     restarts(s) and s, timeout=TIMEOUT_S, log=log)
    output = log.read_text()
    assert state["JobState"] == "COMPLETED", output[-4000:]
    killed_s = time.perf_counter() - start
    print(f"\ntwo-node pretrain on Slurm: plain {plain_s:.1f} s; killed at step {held}, resumed, {killed_s:.1f} s")
    assert marker in output
    assert f"from step-{held:09d}" in output, output[-4000:]
    metrics = json.loads((killed / "reports" / "pretrain" / "metrics.json").read_text())
    assert metrics["resumed_from"] == held > 0 and metrics["world_size"] == 2
    resumed = saved_weights(killed)
    assert resumed.keys() == expected.keys()
    for name, value in resumed.items():  # fp32 sums in another order, nothing more
        torch.testing.assert_close(value, expected[name], rtol=1e-3, atol=1e-3, msg=name)
