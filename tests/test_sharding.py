"""pretrain.parallel fsdp (FSDP2), DCP checkpoints that resume on another number of processes, and
the launch over several hosts: real torchrun runs of the stage, two gloo processes on the CPU."""

from __future__ import annotations

import csv
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import pretrain_fixtures as fx
from lmforge.config.pretrain import PretrainParams
from lmforge.training import checkpoint
from lmforge.training.model import every_nth_block
from tasks.pretrain import LaunchError, launch_command

# A global batch of 32 windows: 16 per process on two, two micro-batches of 16 on one.
RUN = {"max_steps": 40, "warmup_steps": 4, "eval_steps": 10, "save_steps": 10, "logging_steps": 5,
       "global_batch_size": 32, "save": "last"}


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokens") / "tokens"
    fx.make_tokens(out)
    return out


def torchrun(root: Path, nproc: int, *, env: dict[str, str] | None = None, timeout: int = 240,
             **popen) -> subprocess.CompletedProcess | subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "tasks.pretrain"]
    if popen:
        return subprocess.Popen(command, cwd=root, env=env or fx.stage_env(), **popen)
    return subprocess.run(command, cwd=root, env=env or fx.stage_env(), capture_output=True, text=True,
                          timeout=timeout)


def train_losses(root: Path) -> list[float]:
    with (root / "reports" / "pretrain" / "train_loss.csv").open() as handle:
        return [float(row["train_loss"]) for row in csv.DictReader(handle)]


def saved_weights(root: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(root / "models" / "pretrained" / "model.safetensors")


def assert_ok(done: subprocess.CompletedProcess) -> str:
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    return output


def test_fsdp_trains_like_ddp_and_saves_a_plain_transformers_folder(tokens, tmp_path):
    from transformers import AutoModelForCausalLM

    ddp = fx.project(tmp_path / "ddp", RUN, tokens=tokens)
    fsdp = fx.project(tmp_path / "fsdp", {**RUN, "parallel": "fsdp", "activation_checkpointing": 1}, tokens=tokens)
    assert_ok(torchrun(ddp, 2))
    output = assert_ok(torchrun(fsdp, 2))
    assert "fsdp: 2 blocks and the root sharded over 2 processes" in output

    # The same global batches, the same fp32 math in another order: the curves agree closely.
    ddp_losses, fsdp_losses = train_losses(ddp), train_losses(fsdp)
    assert len(ddp_losses) == len(fsdp_losses) == 8
    assert fsdp_losses[-1] < fsdp_losses[0] - 1.0, fsdp_losses  # it learns
    torch.testing.assert_close(torch.tensor(fsdp_losses), torch.tensor(ddp_losses), rtol=1e-3, atol=1e-3)

    # Sharded checkpoints: each process wrote its own shard.
    folder = checkpoint.latest_checkpoint(next((fsdp / "models" / "checkpoints").iterdir()))
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= {p.name for p in folder.iterdir()}

    # The saved folder is a plain transformers model with the last weights.
    saved = fsdp / "models" / "pretrained"
    model = AutoModelForCausalLM.from_pretrained(saved)
    # The best weights gathered from the shards load into the unsharded model (its tied embedding once).
    checkpoint.load_weights(folder.parent / checkpoint.BEST, model)
    model = AutoModelForCausalLM.from_pretrained(saved)
    reference = AutoModelForCausalLM.from_pretrained(ddp / "models" / "pretrained")
    assert not any("_checkpoint_wrapped_module" in name for name in saved_weights(fsdp))
    for (name, mine), (_, theirs) in zip(model.state_dict().items(), reference.state_dict().items()):
        torch.testing.assert_close(mine, theirs, rtol=1e-3, atol=1e-3, msg=f"{name} differs from DDP's")
    x = torch.randint(0, model.config.vocab_size, (1, 16))
    assert torch.isfinite(model(input_ids=x).logits).all()


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants, as a crashed host would lose them. torchrun starts
    each worker in a session of its own, so killing torchrun's process group would leave them training."""
    import psutil

    parent = psutil.Process(pid)
    everyone = [parent, *parent.children(recursive=True)]
    for proc in everyone:
        proc.send_signal(signal.SIGKILL)
    psutil.wait_procs(everyone, timeout=30)


def kill_after_first_checkpoint(root: Path) -> int:
    """Start the stage on two processes, SIGKILL every process once a checkpoint exists; the step it holds."""
    proc = torchrun(root, 2, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while not list((root / "models" / "checkpoints").glob("*/latest")):
        assert proc.poll() is None, proc.stdout.read().decode()[-4000:]
        assert time.monotonic() < deadline, "no checkpoint within 180 s"
        time.sleep(0.02)
    kill_tree(proc.pid)
    proc.wait()
    latest = next((root / "models" / "checkpoints").glob("*/latest"))
    step = checkpoint.read_state(latest.parent / latest.read_text().strip())["step"]
    assert 0 < step < RUN["max_steps"], "the kill must land mid-training"
    assert not (root / "models" / "pretrained").exists()
    return step


def test_a_run_killed_on_two_processes_resumes_on_one_and_on_two(tokens, tmp_path):
    overrides = {**RUN, "parallel": "fsdp"}
    reference = fx.project(tmp_path / "reference", overrides, tokens=tokens)
    assert_ok(torchrun(reference, 2))
    expected = saved_weights(reference)

    # The killed run writes its checkpoints from a thread (async_checkpoint, which leaves the run
    # key alone): `latest` moves only once a checkpoint is whole, so the kill lands while the next
    # one may still be written, and the resumes start from the last whole one.
    killed = fx.project(tmp_path / "killed", {**overrides, "async_checkpoint": True}, tokens=tokens)
    killed_at = kill_after_first_checkpoint(killed)
    on_two = tmp_path / "on-two"
    shutil.copytree(killed, on_two)

    # One process (no torchrun, no process group): the shards are read back whole.
    one = subprocess.run([sys.executable, "-m", "tasks.pretrain"], cwd=killed, env=fx.stage_env(),
                         capture_output=True, text=True, timeout=240)
    output = assert_ok(one)
    assert f"from step-{killed_at:09d}" in output
    assert "written by 2 processes, this run has 1" in output and "parallel fsdp on one process" in output
    output = assert_ok(torchrun(on_two, 2))
    assert f"from step-{killed_at:09d}" in output and "written by" not in output

    for root in (killed, on_two):
        metrics = json.loads((root / "reports" / "pretrain" / "metrics.json").read_text())
        assert metrics["resumed_from"] == killed_at
        # The checkpoint's history ends at its step, though it was published a checkpoint later.
        with (root / "reports" / "pretrain" / "train_loss.csv").open() as handle:
            steps = [int(row["step"]) for row in csv.DictReader(handle)]
        assert steps == sorted(set(steps)) and steps[-1] == RUN["max_steps"], steps
        resumed = saved_weights(root)
        assert resumed.keys() == expected.keys()
        for name, value in resumed.items():  # fp32 sums in another order, nothing more
            torch.testing.assert_close(value, expected[name], rtol=1e-3, atol=1e-3, msg=f"{root.name}: {name}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_hosts_run_the_same_stage_command(tokens, tmp_path):
    # Two "hosts" on this machine: each runs `python -m tasks.pretrain` (the stage's command, what
    # `dvc repro` runs) with its NODE_RANK; they meet at MASTER_ADDR:MASTER_PORT, one process each.
    root = fx.project(tmp_path / "proj", {**RUN, "parallel": "fsdp", "nnodes": 2}, tokens=tokens)
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-m", "tasks.pretrain"], cwd=root,
                              env=fx.stage_env(NODE_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    outputs = [proc.communicate(timeout=240)[0] for proc in procs]
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-4000:]
    assert "--nnodes=2 --node_rank=0" in outputs[0] and "--nnodes=2 --node_rank=1" in outputs[1]
    metrics = json.loads((root / "reports" / "pretrain" / "metrics.json").read_text())
    assert metrics["world_size"] == 2


def test_the_launch_command_follows_params_and_environment():
    p = PretrainParams(device="cuda")
    assert launch_command(p, [], {}, gpus=1) is None
    assert launch_command(p, [], {"LOCAL_RANK": "0"}, gpus=8) is None  # already a torchrun worker
    command = launch_command(p, ["--params", "x.yaml"], {}, gpus=8)
    assert command[3:] == ["--nproc_per_node=8", "--standalone", "-m", "tasks.pretrain", "--params", "x.yaml"]
    two = PretrainParams(device="cuda", nnodes=2, rdzv_endpoint="node0:29500")
    command = launch_command(two, [], {"NODE_RANK": "1"}, gpus=8)
    assert command[3:] == ["--nproc_per_node=8", "--nnodes=2", "--node_rank=1", "--rdzv_backend=static",
                           "--rdzv_endpoint=node0:29500", "-m", "tasks.pretrain"]
    from_env = launch_command(p, [], {"PET_NNODES": "4", "PET_NODE_RANK": "3", "PET_RDZV_ENDPOINT": "h:1"}, gpus=2)
    assert "--nnodes=4" in from_env and "--node_rank=3" in from_env and "--rdzv_endpoint=h:1" in from_env
    with pytest.raises(LaunchError, match="set NODE_RANK on each host"):
        launch_command(two, [], {}, gpus=8)
    assert launch_command(PretrainParams(device="cpu", nproc_per_node=2), [], {}, gpus=0)[3] == "--nproc_per_node=2"


def test_activation_checkpointing_and_global_batch_knobs():
    assert every_nth_block("none", 6) == [] and every_nth_block("full", 3) == [0, 1, 2]
    assert every_nth_block(2, 6) == [0, 2, 4]
    with pytest.raises(ValueError, match="not both"):
        PretrainParams(global_batch_size=32, gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="not a multiple of batch_size"):
        PretrainParams(global_batch_size=30, batch_size=16)
    with pytest.raises(ValueError, match="activation_checkpointing"):
        PretrainParams(activation_checkpointing=0)


def test_a_global_batch_that_does_not_cut_evenly_names_the_fix():
    from lmforge.training.pretraining import BatchSplitError, accumulation_steps

    p = PretrainParams(global_batch_size=48, batch_size=16)
    assert accumulation_steps(p, 1) == 3 and accumulation_steps(p, 3) == 1
    with pytest.raises(BatchSplitError, match=r"48\) is not a multiple of batch_size \(16\) x 2 processes"):
        accumulation_steps(p, 2)


def test_async_checkpoints_in_one_process_end_as_synchronous_ones(tokens, tmp_path):
    from lmforge.training import pretraining

    p = fx.params({**RUN, "async_checkpoint": False}).pretrain
    background = p.model_copy(update={"async_checkpoint": True})
    sync = pretraining.train(p, seed=1, tokens_dir=tokens, checkpoint_root=tmp_path / "sync", progress=False)
    run = pretraining.train(background, seed=1, tokens_dir=tokens, checkpoint_root=tmp_path / "async", progress=False)
    assert run.run_dir.name == sync.run_dir.name  # an operational knob: the same run
    latest = checkpoint.latest_checkpoint(run.run_dir)
    assert latest.name == "step-000000040" and checkpoint.read_state(latest)["step"] == 40
    assert not [p for p in run.run_dir.iterdir() if ".tmp" in p.name]  # every background write completed
    for name, value in sync.model.state_dict().items():
        assert torch.equal(value, run.model.state_dict()[name]), name
