"""Training checkpoints: written atomically, verified on load, resumable on another number of processes.

One run's folder (<checkpoint root>/<run key>/) holds
  step-000150/          the last complete checkpoint
    .metadata, __<r>_0.distcp
                        model and optimizer state through torch.distributed.checkpoint (DCP):
                        each process writes its own shard (a whole replica's tensors are written
                        once), and a load re-shards them for however many processes read them
    scheduler.pt        the learning-rate scheduler's state dict (loaded with weights_only=True)
    rng-rank<r>.pt      each process's CPU and CUDA generator states
    state.json          step, data position, best val loss, loss history, run fingerprint,
                        world size and the sha256 of every file above
  latest                the name of the last complete checkpoint folder
  best/                 model.safetensors + state.json of the best validation loss up to `latest`
  .lock                 locked (flock) by the process training the run, so a second one is refused
A checkpoint folder is filled under a temporary name and renamed when complete, then `latest` is
replaced in one rename, so a kill at any moment leaves the previous checkpoint intact. A file that
is missing, truncated or altered fails its sha256 and raises CheckpointError: a run never restarts
from zero in silence. Each process hashes the shard it wrote, so the hashing is spread like the
writing. DCP's .metadata is a pickle: a checkpoint folder is trusted like code, as any torch
checkpoint with optimizer state is; the sha256 check catches damage, not tampering.

The folder must be one that every process sees (on several hosts, a shared file system).

Imports only torch and safetensors.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import threading
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file

from lmforge.atomic import drop_lock, fsync_dir, fsync_file, replace_dir, take_lock
from lmforge.errors import UserError
from lmforge.hashing import file_digest

# One process without a process group is DCP's documented single-process mode, and it says so in a
# warning at every save and load, from the writer thread too (where a local catch_warnings cannot
# reach): a user has nothing to do about it.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

LATEST = "latest"
BEST = "best"
FORMAT = 2
LEGACY_FORMAT = 1  # model.safetensors + optimizer.pt, written before DCP: still read, by as many processes


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is corrupt or belongs to another run: delete it or point elsewhere."""


class RunInUseError(UserError, RuntimeError):
    """Another process is training the same run (same run key) into the same checkpoint folder."""


# --- one process per run folder --------------------------------------------------------------------

RUN_LOCK = ".lock"
# The run folders this process has locked: {folder: [lock file descriptor, holders]}. A process
# runs its runs one after another; the one before may still be referenced (by the traceback of the
# error that stopped it), so it shares the lock rather than blocking its own successor.
_locked_runs: dict[Path, list] = {}
_locked_runs_guard = threading.Lock()


class RunLock:
    """An exclusive lock on a run folder, held from the run's start to its end so that a second
    process training the same run is refused instead of overwriting this one's checkpoints. It is
    an flock, which the OS releases when the process ends, so a killed run's folder is free for
    the run that resumes it. Released by `release` or when this object is collected."""

    def __init__(self, run_dir: Path | str):
        self.run_dir = Path(run_dir).resolve()
        with _locked_runs_guard:
            if self.run_dir not in _locked_runs:
                _locked_runs[self.run_dir] = [_lock_run_dir(self.run_dir), 0]
            _locked_runs[self.run_dir][1] += 1
        self.release = weakref.finalize(self, _unlock_run_dir, self.run_dir)


def _lock_run_dir(run_dir: Path) -> int:
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / RUN_LOCK
    fd = take_lock(lock, wait=False)
    if fd is None:
        raise RunInUseError(
            f"checkpoint folder {run_dir} is in use by another run ({_holder(lock)}): two runs with the "
            "same settings would overwrite each other's checkpoints. Wait for it to finish or stop it; "
            "a stopped run's checkpoints are resumed by the next run"
        )
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    return fd


def _holder(lock: Path) -> str:
    """Who holds the lock, as its holder wrote it."""
    try:
        return lock.read_text().strip() or "starting"
    except OSError:
        return "unknown process"


def _unlock_run_dir(run_dir: Path) -> None:
    with _locked_runs_guard:
        held = _locked_runs[run_dir]
        held[1] -= 1
        if held[1] == 0:
            del _locked_runs[run_dir]
            drop_lock(run_dir / RUN_LOCK, held[0])


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        saved = state["cuda"]
        if len(saved) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(saved)
        else:  # another machine shape: restore what matches, by index
            for index, value in enumerate(saved[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(value, index)


def _unwrap(model):
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DistributedDataParallel


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _barrier() -> None:
    if _distributed():
        torch.distributed.barrier()


def _hash_files(folder: Path, names: list[str]) -> dict[str, str]:
    return {name: file_digest(folder / name) for name in names}


def _hashes_of_every_rank(folder: Path, rank: int) -> dict[str, str]:
    """The sha256 of every file in `folder`: each rank hashes the DCP shard it wrote (__<rank>_*),
    rank 0 the rest; rank 0 gets them all."""
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    mine = [n for n in files if n.startswith(f"__{rank}_") or (rank == 0 and not n.startswith("__"))]
    hashes = _hash_files(folder, mine)
    if _distributed():
        everyone: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, hashes)
        hashes = {k: v for part in everyone for k, v in part.items()}
    return hashes


def _finish_folder(tmp: Path, final: Path, state: dict, files: dict[str, str] | None = None) -> None:
    state["files"] = files if files is not None else _hash_files(tmp, sorted(p.name for p in tmp.iterdir() if p.is_file()))
    (tmp / "state.json").write_text(json.dumps(state, indent=1) + "\n")
    for p in tmp.iterdir():
        fsync_file(p)
    fsync_dir(tmp)
    replace_dir(tmp, final)
    fsync_dir(final.parent)


def _filling(run_dir: Path, name: str) -> Path:
    """Where checkpoint `name` is filled before it is renamed into place: one name for every
    process, since they write into it together."""
    return run_dir / f".{name}.tmp"


@dataclass
class PendingCheckpoint:
    """A checkpoint whose shards are still being written in the background: `complete` waits for
    them, then publishes the folder. Until then `latest` names the previous checkpoint, so a kill
    in between resumes from that one."""

    future: Any
    run_dir: Path
    name: str
    payload: dict
    rank: int

    def complete(self) -> Path:
        self.future.result()
        return _publish(self.run_dir, self.name, self.payload, self.rank)


def save_checkpoint(run_dir: Path | str, *, step: int, model, optimizer, scheduler, state: dict,
                    rng_states: list[dict[str, Any]], rank: int = 0, background: bool = False,
                    group=None) -> Path | PendingCheckpoint:
    """Write a full training checkpoint for `step`. Every process calls it (it is collective under
    torch.distributed); rank 0 passes every rank's RNG state and writes all but the shards.

    background: the shards are copied to CPU memory now and written to disk by a thread (DCP's
    async_save, over `group`, a process group with a CPU backend), and a PendingCheckpoint is
    returned: call its `complete` (on every process) before the next checkpoint and at the end."""
    run_dir = Path(run_dir)
    name = f"step-{step:09d}"
    tmp = _filling(run_dir, name)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    # Imported here: torch.distributed.checkpoint costs start-up time a run without checkpoints need not pay.
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(_unwrap(model), optimizer)
    shards = {"model": model_state, "optimizer": optimizer_state}
    if rank == 0:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        for r, rng in enumerate(rng_states):
            torch.save(rng, tmp / f"rng-rank{r}.pt")
    # A copy: the run goes on appending to its history while a background write is pending.
    payload = copy.deepcopy({"format": FORMAT, **state, "step": step, "world_size": len(rng_states)})
    if background:
        future = dcp.async_save(shards, checkpoint_id=str(tmp), process_group=group, no_dist=not _distributed())
        return PendingCheckpoint(future, run_dir, name, payload, rank)
    dcp.save(shards, checkpoint_id=str(tmp), no_dist=not _distributed())
    return _publish(run_dir, name, payload, rank)


def _publish(run_dir: Path, name: str, payload: dict, rank: int) -> Path:
    """Hash the filled temporary folder, rename it into place, point `latest` at it and remove
    older checkpoints (collective)."""
    tmp = _filling(run_dir, name)
    _barrier()
    files = _hashes_of_every_rank(tmp, rank)
    if rank == 0:
        _finish_folder(tmp, run_dir / name, payload, files)
        pointer = run_dir / f".{LATEST}.tmp-{os.getpid()}"
        pointer.write_text(name + "\n")
        fsync_file(pointer)
        os.replace(pointer, run_dir / LATEST)
        fsync_dir(run_dir)
        # Older checkpoints and leftovers of killed writes are no longer needed.
        for other in run_dir.iterdir():
            if other.name != name and (other.name.startswith("step-") or ".tmp" in other.name):
                shutil.rmtree(other, ignore_errors=True) if other.is_dir() else other.unlink(missing_ok=True)
    _barrier()
    return run_dir / name


def snapshot(model) -> dict[str, torch.Tensor]:
    """A copy of the weights on their device, each shared tensor (tied embeddings) copied and named once."""
    seen: set[int] = set()
    weights: dict[str, torch.Tensor] = {}
    for name, tensor in _unwrap(model).state_dict().items():
        if tensor.data_ptr() in seen:
            continue  # load_model fills the other names of a shared tensor
        seen.add(tensor.data_ptr())
        weights[name] = tensor.detach().clone()
    return weights


def save_best(run_dir: Path | str, weights: dict[str, torch.Tensor], state: dict) -> Path:
    """Write a snapshot() as the run's best weights (loadable with load_weights)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{BEST}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"))
    _finish_folder(tmp, run_dir / BEST, {"format": FORMAT, **state})
    return run_dir / BEST


def latest_checkpoint(run_dir: Path | str) -> Path | None:
    """The last complete checkpoint of a run, or None when the run has none yet."""
    run_dir = Path(run_dir)
    pointer = run_dir / LATEST
    if not pointer.exists():
        stray = sorted(p.name for p in run_dir.glob("step-*")) if run_dir.exists() else []
        if stray:
            raise CheckpointError(
                f"{run_dir} holds {', '.join(stray)} but no '{LATEST}' pointer: the folder was "
                f"altered by hand; delete {run_dir} to start this run from step 0"
            )
        return None
    name = pointer.read_text().strip()
    folder = run_dir / name
    if not name.startswith("step-") or not folder.is_dir():
        raise CheckpointError(
            f"{pointer} names {name!r}, which is not a checkpoint folder in {run_dir}; the checkpoint "
            f"is corrupt: delete {run_dir} to start this run from step 0"
        )
    return folder


def read_state(folder: Path | str, *, verify: bool = True) -> dict:
    """state.json of a checkpoint folder, after checking every file against its sha256."""
    folder = Path(folder)
    path = folder / "state.json"
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {folder} is corrupt: cannot read state.json ({err})") from None
    if state.get("format") not in (FORMAT, LEGACY_FORMAT):
        raise CheckpointError(f"checkpoint {folder} has format {state.get('format')!r}, this code reads "
                              f"{LEGACY_FORMAT} and {FORMAT}: delete {folder.parent} to start from step 0")
    if verify:
        for name, digest in state.get("files", {}).items():
            file = folder / name
            if not file.exists():
                raise CheckpointError(f"checkpoint {folder} is corrupt: {name} is missing")
            if file_digest(file) != digest:
                raise CheckpointError(f"checkpoint {folder} is corrupt: {name} does not match its sha256")
    return state


def read_weights(folder: Path | str) -> dict[str, torch.Tensor]:
    """model.safetensors of a checkpoint folder as a state dict on the CPU."""
    return load_file(str(Path(folder) / "model.safetensors"))


def load_weights(folder: Path | str, model) -> None:
    """Load model.safetensors of a checkpoint folder into `model` (shapes and names must match)."""
    folder = Path(folder)
    try:
        missing, unexpected = load_model(_unwrap(model), str(folder / "model.safetensors"), strict=False)
    except RuntimeError as err:  # shape mismatch
        raise CheckpointError(f"checkpoint {folder} does not fit this model: {err}") from None
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {folder} does not fit this model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )


def load_checkpoint(folder: Path | str, *, model, optimizer, scheduler, rank: int, world_size: int,
                    fingerprint: dict, verify: bool = True) -> dict:
    """Restore model, optimizer and scheduler (re-sharded for this run's processes) and, when the
    run has as many processes as the one that wrote it, this rank's RNG state; return state.json
    (its "rng_restored" says whether the RNG was). verify: check every file's sha256 first (False
    where rank 0 has checked them for everyone)."""
    folder = Path(folder)
    state = read_state(folder, verify=verify)
    if state.get("fingerprint") != fingerprint:
        theirs, ours = state.get("fingerprint") or {}, fingerprint
        differ = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        raise CheckpointError(
            f"checkpoint {folder} was written by another run configuration (differs in: "
            f"{', '.join(differ) or 'unknown'}); delete {folder.parent} to start from step 0"
        )
    if state["format"] == LEGACY_FORMAT:
        return _load_legacy(folder, state, model=model, optimizer=optimizer, scheduler=scheduler, rank=rank,
                            world_size=world_size)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException: named on its own
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(_unwrap(model), optimizer)
    target = {"model": model_state, "optimizer": optimizer_state}

    try:
        dcp.load(target, checkpoint_id=str(folder), no_dist=not _distributed())
        set_state_dict(_unwrap(model), optimizer, model_state_dict=target["model"],
                       optim_state_dict=target["optimizer"])
        scheduler.load_state_dict(torch.load(folder / "scheduler.pt", map_location="cpu", weights_only=True))
    except (RuntimeError, ValueError, KeyError, OSError, CheckpointException) as err:
        raise CheckpointError(f"checkpoint {folder} does not fit this run, or is being changed by another "
                              f"run still writing there: {str(err)[-600:]}") from None
    state["rng_restored"] = state.get("world_size") == world_size
    if state["rng_restored"]:
        set_rng_state(torch.load(folder / f"rng-rank{rank}.pt", map_location="cpu", weights_only=True))
    return state


def _load_legacy(folder: Path, state: dict, *, model, optimizer, scheduler, rank: int, world_size: int) -> dict:
    """A format-1 checkpoint (whole weights, the optimizer's own state dict): the run that wrote it
    resumes, on as many processes as it had."""
    if state.get("world_size") != world_size:
        raise CheckpointError(
            f"checkpoint {folder} was written before checkpoints could change process count, by "
            f"{state.get('world_size')} processes; this run has {world_size}: resume it once on "
            f"{state.get('world_size')} (its next checkpoint has the new format), or delete {folder.parent}")
    load_weights(folder, model)
    try:
        bundle = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
        optimizer.load_state_dict(bundle["optimizer"])
        scheduler.load_state_dict(bundle["scheduler"])
        rng = torch.load(folder / f"rng-rank{rank}.pt", map_location="cpu", weights_only=True)
    except (RuntimeError, ValueError, KeyError, OSError) as err:
        raise CheckpointError(f"checkpoint {folder} does not fit this run: {err}") from None
    set_rng_state(rng)
    state["rng_restored"] = True
    return state
