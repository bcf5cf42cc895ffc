"""The data stages on a real Slurm cluster (scripts/local_cluster.sh: slurmctld and two slurmd on
this host, so the project folder is shared as a cluster's filesystem would be): clean, split and
tokenize submit their shards as array jobs through datatrove's SlurmPipelineExecutor and write the
local executor's bytes; a job cancelled mid-way keeps the shards it finished."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.cluster_fixtures import Cluster, cluster_env, cluster_script
from tests.cluster_fixtures import slurm_cluster  # noqa: F401 (a session fixture)
from tests.conftest import run
from tests.test_data_plane import folder_bytes, glob_params, web_corpus

STAGES = [["tasks.clean", "corpus"], ["tasks.split", "corpus"], ["tasks.tokenize"]]
OUTPUTS = ("data/clean/corpus", "data/split/corpus", "data/tokens")


def on_slurm(repo: Path, sources, corpus: Path, cluster: Cluster, workers: int = 2) -> None:
    glob_params(repo, sources, corpus, workers=workers, **{
        "data_engine.executor": "slurm",
        "data_engine.slurm": {"partition": cluster.partition, "time": "0:10:00", "cpus_per_task": 1,
                              "mem_per_cpu_gb": 1, "venv_path": sys.prefix}})


def run_stages(repo: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    for stage in STAGES:
        run(["python", "-m", *stage], repo, env=env)
    return time.perf_counter() - start


def test_the_script_brings_two_nodes_up_and_leaves_nothing_running(tmp_path):
    from tests.cluster_fixtures import skip_or_fail, why_no_cluster

    reason = why_no_cluster()
    if reason:
        skip_or_fail(reason)
    state = tmp_path / "cluster"
    env = cluster_env(state)
    try:
        for _ in range(2):  # a second up finds it up
            assert "up, partition lmforge" in cluster_script("up", state, env).stdout
        pids = {p.read_text().strip() for p in state.rglob("*.pid")}
        assert len(pids) == 4, f"munged, slurmctld and two slurmd: {pids}"
        hosts = subprocess.run(["srun", "-p", "lmforge", "-N2", "-n2", "printenv", "SLURMD_NODENAME"], env={**os.environ, **env},
                               capture_output=True, text=True, timeout=60)
        assert sorted(hosts.stdout.split()) == ["n1", "n2"], hosts.stderr
        assert "n1" in cluster_script("status", state, env).stdout
    finally:
        for _ in range(2):  # a second down finds it down
            assert "down" in cluster_script("down", state, env).stdout
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)
    assert not list(state.rglob("*.pid"))


def test_clean_split_and_tokenize_on_slurm_write_the_local_executors_bytes(slurm_cluster, dvc_repo, sources, tmp_path):  # noqa: F811
    corpus = web_corpus(tmp_path / "web", shards=2, per_shard=60)  # one shard per node
    env = slurm_cluster.env
    glob_params(dvc_repo, sources, corpus, workers=2)
    run(["python", "-m", "tasks.ingest", "corpus"], dvc_repo)
    local_s = run_stages(dvc_repo, env)
    expected = {out: folder_bytes(dvc_repo / out) for out in OUTPUTS}
    reports = {p.name: json.loads(p.read_text()) for p in (dvc_repo / "reports/clean").glob("*.json")}

    for out in OUTPUTS:
        subprocess.run(["rm", "-rf", str(dvc_repo / out)], check=True)
    on_slurm(dvc_repo, sources, corpus, slurm_cluster)
    slurm_s = run_stages(dvc_repo, env)
    print(f"\nclean+split+tokenize of 2 shards: local {local_s:.1f} s, slurm {slurm_s:.1f} s")
    for out in OUTPUTS:
        assert folder_bytes(dvc_repo / out) == expected[out], f"{out} differs on Slurm"
    again = json.loads((dvc_repo / "reports/clean/corpus.json").read_text())
    assert again["shards"] == 2 == reports["corpus.json"]["shards"]
    logs = list((dvc_repo / "data/.work").rglob("slurm/*.out")) if (dvc_repo / "data/.work").exists() else []
    assert not logs, "the scratch folder, Slurm logs included, is removed once a stage is done"


def test_a_job_cancelled_mid_way_keeps_the_shards_it_finished(slurm_cluster, dvc_repo, sources, tmp_path):  # noqa: F811
    corpus = web_corpus(tmp_path / "web", shards=4, per_shard=30)
    glob_params(dvc_repo, sources, corpus, workers=1)
    run(["python", "-m", "tasks.ingest", "corpus"], dvc_repo)
    run(["python", "-m", "tasks.clean", "corpus"], dvc_repo)
    expected = folder_bytes(dvc_repo / "data/clean/corpus")

    # One array task at a time (workers: 1): cancelled once the first shard is marked complete,
    # the job has finished some shards and not all of them.
    on_slurm(dvc_repo, sources, corpus, slurm_cluster, workers=1)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **slurm_cluster.env}
    stage = [sys.executable, "-m", "tasks.clean", "corpus"]
    child = subprocess.Popen(stage, cwd=dvc_repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    marks = first_completion_marks(dvc_repo, child)
    array_job = next((marks.parent / "slurm").glob("*_*.out")).name.split("_")[0]  # %A_%a.out
    subprocess.run(["scancel", array_job], env=env, check=True)  # as a person would: by the job's id
    _, err = child.communicate(timeout=120)
    assert child.returncode != 0 and "unfinished" in err, err
    finished = [p.name for p in marks.iterdir()]
    assert 0 < len(finished) < 4, "cancelled after its first shard and before its last"
    left = subprocess.run(["squeue", "-h", "-p", slurm_cluster.partition, "-o", "%i %j %r"], env=env,
                          capture_output=True, text=True, check=True).stdout
    assert not left.strip(), f"a cancelled stage leaves no job behind in the queue:\n{left}"

    on_slurm(dvc_repo, sources, corpus, slurm_cluster, workers=2)  # not in the work folder's key
    rerun = subprocess.Popen(stage, cwd=dvc_repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    submitted = ranks_submitted(marks.parent, rerun)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert sorted(submitted) == sorted(set(range(4)) - {int(name) for name in finished}), "only unfinished shards run again"
    assert folder_bytes(dvc_repo / "data/clean/corpus") == expected
    report = json.loads((dvc_repo / "reports/clean/corpus.json").read_text())
    assert report["shards_resumed"] == len(finished) and report["shards"] == 4


def first_completion_marks(repo: Path, child: subprocess.Popen) -> Path:
    """The completions folder of clean's shard step, once it holds a mark."""
    deadline = time.time() + 120
    while time.time() < deadline and child.poll() is None:
        for folder in (repo / "data/.work").glob("clean-corpus-*/cleaning/datatrove/completions"):
            if any(folder.iterdir()):
                return folder
        time.sleep(0.05)
    raise AssertionError(f"no shard completed within 120 s (stage exit code {child.poll()})")


def ranks_submitted(logging_dir: Path, child: subprocess.Popen) -> list[int]:
    """The ranks datatrove hands the rerun's array job (ranks_to_run.json, rewritten at submission),
    read before the stage removes its scratch folder."""
    listing = logging_dir / "ranks_to_run.json"
    before = listing.stat().st_mtime_ns
    deadline = time.time() + 120
    while time.time() < deadline and child.poll() is None:
        try:
            if listing.stat().st_mtime_ns != before:
                time.sleep(0.05)  # written in one go by datatrove: let it land
                return json.loads(listing.read_text())
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.02)
    raise AssertionError(f"the rerun submitted no job (stage exit code {child.poll()})")
