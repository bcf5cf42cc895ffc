"""Training checkpoints: written atomically, verified on load, never unpickled beyond tensors.

One run's folder (<checkpoint root>/<run key>/) holds
  step-000150/          the last complete checkpoint
    model.safetensors   the weights (shared tensors stored once)
    optimizer.pt        optimizer + scheduler state dicts (loaded with weights_only=True)
    rng-rank<r>.pt      each process's CPU and CUDA generator states
    state.json          step, data position, best val loss, loss history, run fingerprint,
                        world size and the sha256 of every file above
  latest                the name of the last complete checkpoint folder
  best/                 model.safetensors + state.json of the best validation loss up to `latest`
A checkpoint folder is filled under a temporary name and renamed when complete, then `latest` is
replaced in one rename, so a kill at any moment leaves the previous checkpoint intact. A file that
is missing, truncated or altered fails its sha256 and raises CheckpointError: a run never restarts
from zero in silence.

Imports only torch and safetensors.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_file, save_model

from lmforge.atomic import replace_dir
from lmforge.data.sources import sha256_of
from lmforge.errors import UserError

LATEST = "latest"
BEST = "best"
FORMAT = 1


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is corrupt or belongs to another run: delete it or point elsewhere."""


def _fsync_file(path: Path) -> None:
    with path.open("rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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


def _finish_folder(tmp: Path, final: Path, state: dict) -> None:
    state["files"] = {p.name: sha256_of(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    (tmp / "state.json").write_text(json.dumps(state, indent=1) + "\n")
    for p in tmp.iterdir():
        _fsync_file(p)
    _fsync_dir(tmp)
    replace_dir(tmp, final)
    _fsync_dir(final.parent)


def save_checkpoint(run_dir: Path | str, *, step: int, model, optimizer, scheduler, state: dict,
                    rng_states: list[dict[str, Any]]) -> Path:
    """Write a full training checkpoint for `step` (call on rank 0 with every rank's RNG state)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:09d}"
    tmp = run_dir / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(_unwrap(model), str(tmp / "model.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    for rank, rng in enumerate(rng_states):
        torch.save(rng, tmp / f"rng-rank{rank}.pt")
    payload = {"format": FORMAT, **state, "step": step, "world_size": len(rng_states)}
    _finish_folder(tmp, run_dir / name, payload)
    pointer = run_dir / f".{LATEST}.tmp-{os.getpid()}"
    pointer.write_text(name + "\n")
    _fsync_file(pointer)
    os.replace(pointer, run_dir / LATEST)
    _fsync_dir(run_dir)
    # Older checkpoints and leftovers of killed writes are no longer needed.
    for other in run_dir.iterdir():
        if other.name != name and (other.name.startswith("step-") or ".tmp-" in other.name):
            shutil.rmtree(other, ignore_errors=True) if other.is_dir() else other.unlink(missing_ok=True)
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
    if state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {folder} has format {state.get('format')!r}, this code reads {FORMAT}")
    if verify:
        for name, digest in state.get("files", {}).items():
            file = folder / name
            if not file.exists():
                raise CheckpointError(f"checkpoint {folder} is corrupt: {name} is missing")
            if sha256_of(file) != digest:
                raise CheckpointError(f"checkpoint {folder} is corrupt: {name} does not match its sha256")
    return state


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
                    fingerprint: dict) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG state; return state.json."""
    folder = Path(folder)
    state = read_state(folder)
    if state.get("fingerprint") != fingerprint:
        theirs, ours = state.get("fingerprint") or {}, fingerprint
        differ = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        raise CheckpointError(
            f"checkpoint {folder} was written by another run configuration (differs in: "
            f"{', '.join(differ) or 'unknown'}); delete {folder.parent} to start from step 0"
        )
    if state.get("world_size") != world_size:
        raise CheckpointError(
            f"checkpoint {folder} was written by {state.get('world_size')} processes, this run has "
            f"{world_size}: its batches would differ; resume with the same number of processes"
        )
    load_weights(folder, model)
    try:
        bundle = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
        optimizer.load_state_dict(bundle["optimizer"])
        scheduler.load_state_dict(bundle["scheduler"])
        rng = torch.load(folder / f"rng-rank{rank}.pt", map_location="cpu", weights_only=True)
    except (RuntimeError, ValueError, KeyError, OSError) as err:
        raise CheckpointError(f"checkpoint {folder} does not fit this run: {err}") from None
    set_rng_state(rng)
    return state
