"""What both training loops share: devices and processes, precision, the optimizer, learning-rate
schedules, gradient clipping and the run's checkpoints.

The pretraining loop (pretraining.py) and the fine-tuning loop (finetuning.py) differ in what a
step computes and when they evaluate; everything around the step is here, so a fix to device
choice, AdamW's parameter groups, a schedule or checkpoint writing reaches both.

Both loops have the same skeleton and speak of it in the same words:
- a *run* (PretrainRun, FinetuneRun): everything training is made of, built by `prepare_run`
  before the first step;
- its *progress* (PretrainProgress, FinetuneProgress): what the loop carries from step to step,
  into each checkpoint and out of it again (`start_or_resume`);
- its *checkpoints* (RunCheckpoints below): the last state, the best weights (`save_best`,
  `restore_best`), in a folder named by
- its *key* (`run_key` of a fingerprint whose knobs `recorded_knobs` picks by the same rules
  for both loops).

Imports only torch and the standard library (and checkpoint.py, which adds safetensors).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from lmforge.errors import UserError
from lmforge.training import checkpoint

# Dense bf16 FLOP/s per device, matched by substring of the device name, first match wins.
# Hopper figures are the measured ceiling of a bf16 8192^3 matmul on the lent H200s, the others
# datasheet dense figures. LMFORGE_PEAK_TFLOPS overrides the table.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 801e12),
    ("H200", 788e12),
    ("H100", 801e12),
    ("H800", 801e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("T4", 65e12),
)


def peak_flops(device: torch.device) -> float | None:
    """Per-device dense bf16 FLOP/s for MFU, or None where there is no meaningful figure (CPU)."""
    override = os.environ.get("LMFORGE_PEAK_TFLOPS")
    if override:
        return float(override) * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_FLOPS:
        if key in name:
            return value
    return None


# --- devices and processes ----------------------------------------------------------------------


# How long a process waits at a collective before the run is declared hung. NCCL's default, 10
# minutes, is shorter than rank 0 alone may work while the others wait: gathering and saving a
# large sharded model as one transformers folder, or its best weights.
COLLECTIVE_TIMEOUT = timedelta(minutes=60)


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


class NoGpu(UserError, RuntimeError):
    """A section asks for `device: cuda` and torch sees no GPU."""


def pick_device(preference: str, knob: str = "device") -> torch.device:
    """auto: the GPU when there is one; cuda: the GPU or an error naming `knob`; cpu: the CPU."""
    if preference == "cuda" and not torch.cuda.is_available():
        raise NoGpu(f"{knob} is cuda but no CUDA device is visible")
    if preference in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def start_cuda_init(preference: str) -> None:
    """Create this process's CUDA context on a thread while the caller goes on importing and
    building the model on the CPU: 0.3-0.4 s off the set-up on the lent H200 machines, whose set-up
    is mostly imports (bench/startup_probe.py). torch's lazy initialisation is locked, so the main
    thread's first CUDA call simply waits for it."""
    if preference == "cpu" or not torch.cuda.is_available():
        return
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    threading.Thread(target=torch.zeros, args=(1,), kwargs={"device": device}, daemon=True,
                     name="cuda-init").start()


def setup_distributed(preference: str, knob: str = "device") -> Dist:
    """One process per GPU under torchrun (RANK/WORLD_SIZE set), else a single process."""
    base = pick_device(preference, knob)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        if base.type == "cuda":
            torch.cuda.set_device(0)
            return Dist(device=torch.device("cuda", 0))
        return Dist(device=base)
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if base.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = base
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None, timeout=COLLECTIVE_TIMEOUT)
    return Dist(rank=rank, local_rank=local_rank, world=world, device=device)


def barrier(d: Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()


def all_mean(value: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        import torch.distributed as dist

        dist.all_reduce(value)  # SUM: gloo (CPU) has no AVG
        value = value / d.world
    return value


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- precision ----------------------------------------------------------------------------------


def enable_tf32(device: torch.device) -> None:
    """fp32 matmuls on tensor cores (TF32): what is left in fp32 under bf16 autocast runs faster."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def compute_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` (auto | bf16 | fp32): auto is bf16 on a GPU that has it,
    fp32 (None: no autocast) elsewhere."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """A context running the forward in `dtype`; None runs it as the weights are, even inside
    an autocast a caller entered."""
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def compile_blocks(model: torch.nn.Module, log: Callable[[str], None]) -> torch.nn.Module:
    """Compile each transformer block in place (regional compilation); the whole model if it names no blocks.

    Why blocks: a model's blocks share one forward, so Dynamo traces it and Inductor compiles it once for all
    of them (SmolLM2's 30 layers cost what one costs), and a new batch width recompiles one block, not the
    model. The glue between them (embeddings, transformers' mask building, the head) stays eager: a handful
    of kernels. dynamic=True because length-grouped batches vary in width."""
    kinds = {name for m in model.modules() for name in (getattr(m, "_no_split_modules", None) or [])}
    blocks = [m for m in model.modules() if type(m).__name__ in kinds]
    if not blocks:
        log(f"{type(model).__name__} names no blocks to compile: compiling the whole model")
        return torch.compile(model, dynamic=True)
    for block in blocks:
        block.compile(dynamic=True)
    counts = Counter(type(block).__name__ for block in blocks)
    log("compiled " + ", ".join(f"{n} {kind}" for kind, n in counts.most_common()))
    return model


# --- optimizer and schedules ---------------------------------------------------------------------


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only (not on norms, biases or other 1-d tensors); frozen
    parameters (LoRA's base weights) and tied ones seen twice are left out."""
    seen: set[int] = set()
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(model: torch.nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999),
          groups: list[dict[str, Any]] | None = None) -> torch.optim.AdamW:
    """AdamW over `groups` (default: parameter_groups(model, weight_decay)); a group's own "lr" overrides `lr`."""
    # Fused on the CPU too: one update path (clipping through grad_scale included) for every device.
    return torch.optim.AdamW(groups or parameter_groups(model, weight_decay), lr=lr, betas=betas, fused=True)


def warmup_cosine(step: int, *, warmup: int, total: int, floor: float) -> float:
    """Multiplier of the peak lr after `step` optimizer steps: linear warmup, then cosine to floor."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_linear(step: int, *, warmup: int, total: int) -> float:
    """Multiplier of the peak lr after `step` optimizer steps: linear warmup, then linear to zero."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return max(0.0, (total - step) / max(1, total - warmup))


def lr_scheduler(optimizer: torch.optim.Optimizer, factor: Callable[[int], float]):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def clip_gradients(model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_norm: float) -> None:
    """Scale the gradients down to `max_norm` where their norm exceeds it, as clip_grad_norm_ does.

    A fused AdamW divides each gradient by its `grad_scale` (AMP's unscaling) as it reads it, so the
    clipping rides on the update: clip_grad_norm_'s own pass over the fp32 gradients cost 0.28 ms of
    G1's step on an H200. The optimizer step must follow, and unset grad_scale after it."""
    if not all(group.get("fused") for group in optimizer.param_groups):  # a resumed state_dict sets it per group
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        return
    norm = torch.nn.utils.get_total_norm([q.grad for q in model.parameters() if q.grad is not None])
    optimizer.grad_scale = torch.clamp((norm + 1e-6) / max_norm, min=1.0)  # clip_grad_norm_'s 1e-6


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float) -> None:
    """Clip (when max_grad_norm > 0), then one AdamW step."""
    if max_grad_norm > 0:
        clip_gradients(model, optimizer, max_grad_norm)
    optimizer.step()
    optimizer.grad_scale = None  # this step's clipping only


# --- the run's checkpoints ------------------------------------------------------------------------


_ABSENT = object()


def recorded_knobs(prefix: str, knobs: Mapping[str, Any], *, operational: set[str],
                   later_at_old_behaviour: Mapping[str, Any], old_names: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A params section's knobs as a run's fingerprint records them, `<prefix><knob>` (the prefix
    names the section: "finetune."), sorted. Both loops' run keys follow these rules:
    - an operational knob (how fast, how often it logs or saves, where it runs) is left out: it
      does not change the weights a run ends with, so changing it keeps the run's checkpoints;
    - a knob added after runs were checkpointed is left out while it holds the value that behaves
      as before, so those runs keep their key and resume;
    - a renamed knob is recorded under its old name (old_names: new -> old), for the same reason."""
    kept = {k: v for k, v in knobs.items()
            if k not in operational and later_at_old_behaviour.get(k, _ABSENT) != v}
    return {f"{prefix}{(old_names or {}).get(k, k)}": v for k, v in sorted(kept.items())}


def run_key(fingerprint: dict[str, Any]) -> str:
    """A short name for everything that decides a run's weights: its checkpoint folder."""
    text = json.dumps(fingerprint, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def gather_rng(d: Dist) -> list[dict[str, Any]]:
    mine = checkpoint.rng_state()
    if d.world == 1:
        return [mine]
    import torch.distributed as dist

    everyone: list[Any] = [None] * d.world
    dist.all_gather_object(everyone, mine)
    return everyone


class RunCheckpoints:
    """One run's checkpoints in root/<run key>: resume from the last, save a new one, keep the best.

    The key hashes the fingerprint, so a run with other settings or data gets a folder of its own
    and never resumes from (or overwrites) one that does not fit it. Every rank calls every
    method: each writes its shard of a checkpoint, rank 0 the rest and the best weights.

    The folder is locked while this object lives (checkpoint.RunLock): a second process starting
    the same run is refused with RunInUseError rather than breaking this run's checkpoints."""

    def __init__(self, root: Path | str, fingerprint: dict[str, Any], d: Dist, background: bool = False):
        self.fingerprint, self.d = fingerprint, d
        self.dir = Path(root) / run_key(fingerprint)
        self.lock = self._claim()
        # background: shards written by a thread while training goes on (checkpoint.PendingCheckpoint).
        self.background = background
        self.pending: checkpoint.PendingCheckpoint | None = None
        self.group = None
        if background and d.world > 1:
            import torch.distributed as dist

            # DCP's writer thread needs collectives of its own, on the CPU: NCCL's are the training's.
            self.group = dist.new_group(backend="gloo")

    def _claim(self) -> checkpoint.RunLock | None:
        """Rank 0 locks the run folder and tells every rank whether it could, so that all of them
        stop alike when another process runs this run (rank 0 holds the lock for all)."""
        lock, refusal = None, None
        if self.d.main:
            try:
                lock = checkpoint.RunLock(self.dir)
            except checkpoint.RunInUseError as err:
                refusal = str(err)
        if self.d.world > 1:
            import torch.distributed as dist

            decision = [refusal]
            dist.broadcast_object_list(decision, src=0)
            refusal = decision[0]
        if refusal:
            raise checkpoint.RunInUseError(refusal)
        return lock

    def resume(self, model, optimizer, scheduler) -> dict[str, Any] | None:
        """Load the last checkpoint into model, optimizer, scheduler and this rank's RNG, and
        return its state (None: the run has none yet)."""
        latest = self._verified_latest()
        if latest is None:
            return None
        state = checkpoint.load_checkpoint(latest, model=model, optimizer=optimizer, scheduler=scheduler,
                                           rank=self.d.rank, world_size=self.d.world, fingerprint=self.fingerprint,
                                           verify=False)
        for group in optimizer.param_groups:  # a captured run saves its lr as a device tensor
            group["lr"], group["capturable"] = float(group["lr"]), False
        return state

    def _verified_latest(self) -> Path | None:
        """The last checkpoint, found and sha256-checked by rank 0 alone and told to every rank, so
        all of them resume from the same one or fail alike (and each file is hashed once)."""
        decision: list[Any] = [None, None]  # (folder, error)
        if self.d.main:
            try:
                latest = checkpoint.latest_checkpoint(self.dir)
                if latest is not None:
                    checkpoint.read_state(latest)
                decision = [str(latest) if latest else None, None]
            except checkpoint.CheckpointError as err:
                decision = [None, str(err)]
        if self.d.world > 1:
            import torch.distributed as dist

            dist.broadcast_object_list(decision, src=0)
        if decision[1]:
            raise checkpoint.CheckpointError(decision[1])
        return Path(decision[0]) if decision[0] else None

    def save(self, step: int, model, optimizer, scheduler, state: dict[str, Any]) -> None:
        """Write a checkpoint (first completing one still written in the background)."""
        self.wait()
        written = checkpoint.save_checkpoint(self.dir, step=step, model=model, optimizer=optimizer,
                                             scheduler=scheduler, rng_states=gather_rng(self.d), rank=self.d.rank,
                                             state={"fingerprint": self.fingerprint, **state},
                                             background=self.background, group=self.group)
        if isinstance(written, checkpoint.PendingCheckpoint):
            self.pending = written

    def wait(self) -> None:
        """Complete the checkpoint being written in the background, if any (every rank calls it)."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.complete()

    def save_best(self, weights: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
        """Write a checkpoint.snapshot() as the run's best weights (rank 0 only)."""
        if self.d.main:
            checkpoint.save_best(self.dir, weights, info)

    def best_weights(self) -> dict[str, torch.Tensor] | None:
        """The run's best weights as a state dict on the CPU; None when the run kept none."""
        best = self.dir / checkpoint.BEST
        if not best.exists():
            return None
        checkpoint.read_state(best)
        return checkpoint.read_weights(best)

    def restore_best(self, model) -> bool:
        """Load the best weights into `model`; False when the run kept none."""
        best = self.dir / checkpoint.BEST
        if not best.exists():
            return False
        checkpoint.read_state(best)
        checkpoint.load_weights(best, model)
        return True


# --- what every loop does around its steps ---------------------------------------------------------


def finite_loss(value: float, where: str) -> float:
    """The loss, or FloatingPointError naming where it stopped being finite."""
    if not math.isfinite(value):
        raise FloatingPointError(f"training loss is {value} at {where}")
    return value


def keep_best(run, info: dict[str, Any]) -> None:
    """Keep a run's weights as its best: in its RunCheckpoints folder, or (a run without one) as a
    CPU copy in run.best_in_memory. run: a loop's run (checkpoints, model, best_in_memory)."""
    if run.checkpoints is not None:
        run.checkpoints.save_best(checkpoint.snapshot(run.model), info)
    else:
        run.best_in_memory = {k: v.detach().to("cpu", copy=True) for k, v in run.model.state_dict().items()}


def restore_best(run) -> None:
    """Load what keep_best kept back into run.model (nothing kept: the weights stay as they are)."""
    if run.checkpoints is not None:
        run.checkpoints.restore_best(run.model)
    elif run.best_in_memory is not None:
        run.model.load_state_dict(run.best_in_memory)
