"""The pretraining loop: one code path for the CPU, one GPU and N GPUs (torchrun; DDP or FSDP2).

- Fused AdamW, linear warmup then cosine decay to `min_lr_ratio * learning_rate`, gradient accumulation,
  clipping, bf16 autocast on CUDA and fp32 on the CPU, SDPA attention, optional torch.compile
  and CUDA graphs. What is not pretraining's own (devices, processes, the optimizer's groups,
  schedules, clipping, the run's checkpoints) comes from runtime.py, shared with fine-tuning.
- The optimizer step (model and loss as one compiled module, DDP, the bf16 working copy, CUDA
  graphs) is pretrain_step.py's `build_step`; `train` here prepares or resumes the run, then only
  draws batches, steps, and logs, evaluates and checkpoints at their intervals, and `finish`
  hands back the model to save.
- pretrain.parallel fsdp shards the model over the processes instead (sharding.py); activation
  checkpointing recomputes chosen blocks in the backward (either strategy).
- A run is defined by its global batch (windows per step over all processes), not by how it is
  split: its run key and its batches are those of one process taking the whole global batch, so a
  run checkpointed on N processes resumes on M and ends where it would have (set
  pretrain.global_batch_size so the accumulation follows the number of processes).
- Validation every `eval_steps` steps on fixed random val batches; the best weights and the last
  full checkpoint (model, optimizer, scheduler, step, RNG states, data position) are written
  atomically (checkpoint.py).
- Resumable: a run restarted with the same configuration continues from its last checkpoint and,
  because each batch is a function of (seed, step), ends with the same weights as an
  uninterrupted run (bitwise on the CPU). Checkpoints live in checkpoint_root/<run key>, the key a
  hash of everything that shapes the trajectory, so changing a knob starts a new run rather than
  resuming one that no longer fits.
- The step loop never waits for the GPU except at log, eval and checkpoint steps.
- A progress bar shows loss, tokens/s, MFU (against runtime.PEAK_FLOPS) and the ETA.
- What a finished run leaves, in the folders the caller names: the model folder (`save_model`:
  save_pretrained, the tokenizer files, lmforge.json from `model_info`) and the loss reports
  (`write_reports`: metrics.json, loss.csv, train_loss.csv, loss.png).

Imports only torch, numpy, transformers (via model.py), safetensors, tokenizers, tqdm, matplotlib
(for loss.png, when installed) and lmforge.config (for its table of renamed knobs; pydantic and
PyYAML, which every stage loads anyway).
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from lmforge.config import RENAMED_KEYS
from lmforge.data import token_shards
from lmforge.errors import UserError
from lmforge.training import batches, checkpoint, float8, muon, runtime, sharding
from lmforge.training.model import (TokenInfo, blocks, build_model, count_params, flops_per_token, is_masked,
                                    set_activation_checkpointing, set_training_activation, set_training_attention)
from lmforge.training.pretrain_step import (StepRunner, TrainStep, around_the_loop, build_step, forward_dtype,
                                            plain_loss, use_cuda_graph)
from lmforge.training.runtime import Dist

# Knobs that change how a run computes, not what it trains (kernels, fusion and bf16 gradient
# transfer move the last bits only): they stay out of the run key, so a resume may change them.
OPERATIONAL_KEYS = {"eval_steps", "save_steps", "logging_steps", "benchmark_steps", "benchmark_tasks",
                    "compile", "compile_mode", "attention", "cuda_graph",
                    "fused_loss", "device", "data_on_device", "save", "ddp_bucket_mb", "ddp_comm_dtype",
                    "ddp_overlap", "parallel", "activation_checkpointing", "activation_memory_budget",
                    "compile_optimizer", "nproc_per_node", "nnodes", "rdzv_endpoint", "async_checkpoint"}
# How the global batch is cut (per process, per micro-batch) moves float sums only: in the run key the
# global batch stands in for them (see run_fingerprint).
BATCH_SPLIT_KEYS = {"batch_size", "gradient_accumulation_steps", "global_batch_size"}
# Keys added after runs were already checkpointed, at the value that reproduces how those runs
# trained: left out of the run key at that value, so the older runs keep their key and resume.
LATER_KEYS_AT_OLD_BEHAVIOUR = {"param_dtype": "fp32", "optimizer": "adamw", "muon_learning_rate": None,
                               "muon_momentum": 0.95, "float8": "none", "rope_theta": 10_000.0}
# Knobs renamed to TrainingArguments' names (lr -> learning_rate, ...) keep their old names in the
# run key, so a run checkpointed before the rename still resumes: new name -> old name.
NAMES_BEFORE_THE_RENAME = {new.removeprefix("pretrain."): old.removeprefix("pretrain.")
                           for old, new in RENAMED_KEYS.items() if old.startswith("pretrain.")}
Metrics = Callable[[dict[str, float], int], None]
# Scores of the model in training, by name (pretrain.benchmark_steps): the caller brings the scorer,
# since scoring (lmforge/evaluation/) sits above training.
Scorer = Callable[[torch.nn.Module], dict[str, float]]



def make_optimizer(model, p: Any) -> torch.optim.AdamW:
    """Fused AdamW, or with pretrain.optimizer muon, Muon on the blocks' matrices and AdamW on the rest."""
    betas = (p.adam_beta1, p.adam_beta2)
    if p.optimizer == "adamw":
        return runtime.adamw(model, lr=p.learning_rate, weight_decay=p.weight_decay, betas=betas)
    matrices = [param for param in blocks(model).parameters() if param.dim() == 2 and param.requires_grad]
    taken = {id(param) for param in matrices}
    rest = [group | {"params": [q for q in group["params"] if id(q) not in taken]}
            for group in runtime.parameter_groups(model, p.weight_decay)]
    return muon.MuonAdamW(matrices, rest,
                          lr=p.learning_rate, muon_lr=p.muon_learning_rate or p.learning_rate,
                          momentum=p.muon_momentum, weight_decay=p.weight_decay, betas=betas)


def params_dict(p: Any) -> dict[str, Any]:
    if hasattr(p, "model_dump"):
        return p.model_dump()
    return dict(vars(p))


def _fingerprint(p: Any, seed: int, meta: dict, *, world: int, batch_size: int, accumulation: int) -> dict[str, Any]:
    """The run key's fingerprint of `p`, its batch knobs as given (how they are recorded is the caller's)."""
    knobs = {k: v for k, v in params_dict(p).items() if k not in BATCH_SPLIT_KEYS}
    knobs.update(batch_size=batch_size, gradient_accumulation_steps=accumulation)
    return {"seed": seed, "world_size": world, "data": meta["splits"], "vocab_size": meta["vocab_size"],
            "sampler": batches.SAMPLER_VERSION,
            **runtime.recorded_knobs("pretrain.", knobs, operational=OPERATIONAL_KEYS,
                                     later_at_old_behaviour=LATER_KEYS_AT_OLD_BEHAVIOUR, old_names=NAMES_BEFORE_THE_RENAME)}


def fingerprint_before_global_batches(p: Any, seed: int, meta: dict, world: int) -> dict[str, Any]:
    """The run key's fingerprint as it was before batches were drawn per global batch (each process
    drew its own, so such runs cannot go on under the new sampler unless they had one process and
    no accumulation, whose key is unchanged)."""
    return _fingerprint(p, seed, meta, world=world, batch_size=p.batch_size,
                        accumulation=accumulation_steps(p, world))


def warn_of_stranded_checkpoints(p: Any, seed: int, meta: dict, d: Dist, root: Path | str, key: str,
                                 say: Callable[[str], None]) -> None:
    """Say so when this configuration has checkpoints under its key from before global batches: the
    run starts at step 0 (their batches were drawn per process), and the folder is left for the user."""
    old = runtime.run_key(fingerprint_before_global_batches(p, seed, meta, d.world))
    if old != key and (Path(root) / old / checkpoint.LATEST).exists():
        say(f"checkpoints of this configuration from before batches were drawn per global batch are in "
            f"{Path(root) / old}: they cannot be continued, so this run starts at step 0 (delete that folder "
            "when it is no longer wanted)")


class BatchSplitError(UserError, ValueError):
    """pretrain.global_batch_size cannot be cut evenly over this run's processes."""


def accumulation_steps(p: Any, world: int) -> int:
    """Micro-batches per step and process: gradient_accumulation_steps, or what global_batch_size asks."""
    if p.global_batch_size is None:
        return p.gradient_accumulation_steps
    per_step = p.batch_size * world
    if p.global_batch_size % per_step:
        raise BatchSplitError(f"pretrain.global_batch_size ({p.global_batch_size}) is not a multiple of batch_size "
                              f"({p.batch_size}) x {world} processes; choose a batch_size that divides it")
    return p.global_batch_size // per_step


def run_fingerprint(p: Any, seed: int, meta: dict, world: int) -> dict[str, Any]:
    """Everything that decides the weights a run ends with.

    The batch knobs are recorded as one process taking the whole global batch (world_size 1,
    batch_size = the global batch, no accumulation): the sampler draws the same global batch
    however it is cut, so a run keeps its key, and resumes, on another number of processes. The
    keys of single-process runs without accumulation are the ones they had before."""
    return _fingerprint(p, seed, meta, world=1, batch_size=p.batch_size * accumulation_steps(p, world) * world,
                        accumulation=1)


@dataclass
class TrainResult:
    model: Any
    masked: bool
    device: str
    run_dir: Path
    steps: int
    resumed_from: int
    best_val_loss: float
    final_val_loss: float
    final_train_loss: float
    tokens_per_step: int
    tokens_per_s: float
    mfu: float | None
    params: int
    flops_per_token: float
    setup_s: float
    first_step_s: float
    train_s: float
    wall_s: float
    peak_memory_gb: float | None
    history: dict[str, list[dict[str, float]]]
    dist: Dist
    checkpoint_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "steps": self.steps, "resumed_from": self.resumed_from, "best_val_loss": self.best_val_loss,
            "final_val_loss": self.final_val_loss, "final_train_loss": self.final_train_loss,
            "tokens_per_step": self.tokens_per_step, "tokens_per_s": self.tokens_per_s, "mfu": self.mfu,
            "params": self.params, "flops_per_token": self.flops_per_token, "setup_s": self.setup_s,
            "first_step_s": self.first_step_s, "train_s": self.train_s, "checkpoint_s": self.checkpoint_s,
            "wall_s": self.wall_s, "peak_memory_gb": self.peak_memory_gb,
            "device": self.device, "world_size": self.dist.world, "masked": self.masked,
        }



@torch.no_grad()
def validate(model, tokens, p: Any, seed: int, d: Dist, masking: batches.Masking | None) -> float:
    """Mean loss over the fixed val batches (spread over the ranks)."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, device=d.device, dtype=torch.float64)
    # Sharded, every process must run as many forwards as the others (each one gathers weights from
    # all): the ranks short of a batch run one more, counted for nothing.
    n = -(-p.eval_batches // d.world) * d.world if sharding.is_sharded(model) else p.eval_batches
    for i, (x, y) in enumerate(batches.eval_batches(tokens, p.context, p.batch_size, seed, d.device, n,
                                                    masking=masking, rank=d.rank, world=d.world,
                                                    wrap=p.eval_batches)):
        with runtime.autocast(d.device, forward_dtype(d.device)):
            loss = plain_loss(model, x, y, masking is not None)
        count = (y != batches.IGNORE_INDEX).sum() * (d.rank + i * d.world < p.eval_batches)
        total[0] += loss.double() * count
        total[1] += count
    if d.world > 1:
        import torch.distributed as dist

        dist.all_reduce(total)
    model.train(was_training)
    return float(total[0] / total[1].clamp(min=1))


class ReplicaDivergence(RuntimeError):
    """Under DDP the ranks' weights drifted apart: what rank 0 would checkpoint is not what the others train."""


# Integer views of a float tensor's bits, by element size: their sums are exact whatever the order.
BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def check_replicas_agree(model, d: Dist, step: int) -> None:
    """Every rank must hold the same weights after a DDP step; rank 0 alone writes the checkpoint,
    so drift on another rank would otherwise go unseen. Replicas start equal and, given the same
    all-reduced gradients (NCCL and gloo hand every rank the same result), stay bitwise equal, so
    each tensor is summarised by the sum of its raw bits: exact, NaN-safe, and any one value that
    changes changes it."""
    if d.world == 1 or sharding.is_sharded(model):  # shards are not replicas
        return
    import torch.distributed as dist

    named = list(model.named_parameters())
    with torch.no_grad():
        mine = torch.stack([param.view(BITS[param.element_size()]).sum(dtype=torch.int64) for _, param in named])
    everyone = [torch.empty_like(mine) for _ in range(d.world)]
    dist.all_gather(everyone, mine)
    for rank, theirs in enumerate(everyone[1:], start=1):
        differs = (theirs != everyone[0]).nonzero().flatten().tolist()
        if differs:
            raise ReplicaDivergence(
                f"at step {step}, rank {rank}'s weights differ from rank 0's in {named[differs[0]][0]}"
                f"{f' and {len(differs) - 1} more tensors' if len(differs) > 1 else ''}: the replicas no longer "
                "train one model, so this checkpoint is not written (the last one stands)")


# --- the loop ------------------------------------------------------------------------------------


@dataclass
class PretrainProgress:
    """What the loop carries from step to step; a checkpoint carries it across a kill."""

    history: dict[str, list[dict[str, float]]]
    best: float
    last_train: float = math.nan
    last_val: float = math.nan
    loss_steps: int = 0  # steps in step.loss_sum since the last log
    eval_sum: float = 0.0  # train loss summed over the steps since the last evaluation
    eval_steps: int = 0
    best_weights: dict[str, torch.Tensor] | None = None  # kept on the device until the next checkpoint
    best_info: dict[str, Any] = field(default_factory=dict)
    # Throughput over every segment of a resumed run.
    first_step_s: float = 0.0
    train_s: float = 0.0
    train_tokens: int = 0
    checkpoint_s: float = 0.0  # time spent writing checkpoints (the training waits for them)
    tokens_per_s: float = 0.0
    mfu: float | None = None
    mark: float = field(default_factory=time.perf_counter)  # the clock runs from (mark, mark_step)
    mark_step: int = 0

    @classmethod
    def from_state(cls, state: dict[str, Any], start: int) -> PretrainProgress:
        history = state["history"]
        # Throughput and MFU are per GPU of this run: segments run on another number of processes
        # do not add up with this one's, so only this segment is timed then.
        timing = state.get("timing", {}) if state["rng_restored"] else {}
        return cls(history=history, best=float(state["best_val_loss"]),
                   last_train=history["train"][-1]["train_loss"] if history["train"] else math.nan,
                   last_val=history["val"][-1]["val_loss"] if history["val"] else math.nan,
                   first_step_s=float(timing.get("first_step_s", 0.0)), train_s=float(timing.get("train_s", 0.0)),
                   train_tokens=int(timing.get("train_tokens", 0)),
                   checkpoint_s=float(timing.get("checkpoint_s", 0.0)), mark_step=start)

    def restart_clock(self, done: int) -> None:
        """Time spent since the mark (evaluation, checkpoint) is not training time."""
        self.mark, self.mark_step = time.perf_counter(), done

    def clock_in(self, done: int, tokens_per_step: int, flops_per_token_: float, peak: float | None, world: int) -> None:
        now = time.perf_counter()
        if done > self.mark_step:
            span = now - self.mark
            self.train_s += span
            self.train_tokens += (done - self.mark_step) * tokens_per_step
            self.tokens_per_s = (done - self.mark_step) * tokens_per_step / span
            self.mfu = self.tokens_per_s * flops_per_token_ / (peak * world) if peak else None
        self.mark, self.mark_step = now, done

    def checkpoint_state(self, done: int) -> dict[str, Any]:
        return {"data": {"sampler": batches.SAMPLER_VERSION, "next_step": done}, "best_val_loss": self.best,
                "history": self.history,
                "timing": {"first_step_s": self.first_step_s, "train_s": self.train_s, "train_tokens": self.train_tokens,
                           "checkpoint_s": self.checkpoint_s}}


@dataclass
class PretrainRun:
    """Everything a training run is made of, built once by `train` before its first step."""

    p: Any
    seed: int
    d: Dist
    say: Callable[[str], None]
    model: torch.nn.Module
    masked: bool
    masking: batches.Masking | None
    val_tokens: Any
    optimizer: torch.optim.Optimizer
    schedule: Callable[[int], float]  # the peak lr's multiplier after a number of steps
    scheduler: Any
    checkpoints: runtime.RunCheckpoints
    accumulation: int  # micro-batches per step on each process
    tokens_per_step: int
    flops_per_token: float
    peak: float | None
    on_metrics: Metrics | None
    scorer: Scorer | None = None

    def metrics(self, values: dict[str, float], step: int) -> None:
        if self.d.main and self.on_metrics:
            self.on_metrics(values, step)


def open_model(p: Any, tokens_dir: Path, meta: dict, seed: int, d: Dist) -> tuple[torch.nn.Module, bool]:
    """The model from the pretrain params, in training mode: a random one made on its device, except
    under FSDP, where each process holds it whole on the CPU until `distribute` shards it; one from
    init_from on the CPU (`distribute` places it)."""
    data_vocab = None
    if p.init_from:
        from tokenizers import Tokenizer

        data_vocab = Tokenizer.from_file(str(tokens_dir / "tokenizer.json")).get_vocab(with_added_tokens=True)
    model = build_model(p, TokenInfo.from_meta(meta), seed, data_vocab=data_vocab, device=init_device(p, d))
    masked = is_masked(model)
    if masked and p.arch != "bert" and not p.init_from:
        raise ValueError("internal: a masked model from a causal arch")
    model.train()
    set_training_attention(model, True)
    set_training_activation(model, p.compile)
    set_activation_checkpointing(model, p.activation_checkpointing, True)
    return model, masked


def use_float8(model, p: Any, say: Callable[[str], None]) -> None:
    """pretrain.float8: FP8 matmuls in the blocks' linear layers (before the optimizer, the bf16 working
    copy, DDP or FSDP and torch.compile see the model). `finish` puts plain layers back."""
    if p.float8 == "none":
        return
    converted = float8.to_float8_training(model, p.float8)
    if converted:
        say(f"float8 {p.float8}: {converted} linear layers compute their matmuls in FP8 (torchao)")
    else:
        say(f"float8 {p.float8}: no linear layer of this model is wide enough to gain from FP8 by torchao's "
            "thresholds; all stay bf16")


def shards_model(p: Any, d: Dist) -> bool:
    """Whether this run shards the model over its processes (pretrain.parallel fsdp on several)."""
    return p.parallel == "fsdp" and d.world > 1


def init_device(p: Any, d: Dist) -> torch.device:
    """Where a random model's weights are drawn: on the training device, unless the run shards the
    model, whose processes each hold it whole on the CPU until `distribute` shards it."""
    return torch.device("cpu") if shards_model(p, d) else d.device


def distribute(model, p: Any, d: Dist, say: Callable[[str], None]):
    """The model on its device: whole (DDP wraps the step later, in build_step) or, with
    pretrain.parallel fsdp on several processes, sharded (sharding.py moves each shard to the GPU,
    so no process ever holds the whole model there)."""
    if shards_model(p, d):
        return sharding.shard(model, p, d, say)
    if p.parallel == "fsdp":
        say("parallel fsdp on one process: nothing to shard, training the whole model here")
    return model.to(d.device)


def masking_for(p: Any, meta: dict, masked: bool) -> batches.Masking | None:
    if not masked:
        return None
    tok = TokenInfo.from_meta(meta)
    special = tuple(sorted(meta["special_ids"].values()))
    return batches.Masking(p.mlm_probability, tok.mask_id, tok.vocab_size, special)


def start_or_resume(run: PretrainRun) -> tuple[PretrainProgress, int]:
    """The progress of the run's last checkpoint, or a fresh one seeded for step 0."""
    state = run.checkpoints.resume(run.model, run.optimizer, run.scheduler)
    if state is not None:
        start = int(state["step"])
        run.say(f"resuming run {run.checkpoints.dir.name} from step-{start:09d} (step {start} of {run.p.max_steps})")
        if not state["rng_restored"]:
            # Another number of processes: there is no generator state to continue per rank. The
            # batches do not depend on it; dropout's draws start from a seed of this step.
            torch.manual_seed(run.seed * 1000 + run.d.rank + 7919 * start)
            run.say(f"the checkpoint was written by {state['world_size']} processes, this run has {run.d.world}: "
                    "same global batches, fresh dropout seeds")
        return PretrainProgress.from_state(state, start), start
    torch.manual_seed(run.seed * 1000 + run.d.rank)  # dropout and other in-step randomness
    run.say(f"run {run.checkpoints.dir.name}: no checkpoint yet, starting at step 0 of {run.p.max_steps}")
    return PretrainProgress(history={"train": [], "val": []}, best=math.inf), 0


def log_point(run: PretrainRun, step: TrainStep, progress: PretrainProgress, done: int, bar) -> None:
    """Read the mean train loss (the one host sync of a log step), the throughput, and report."""
    progress.last_train = float(runtime.all_mean(step.loss_sum / progress.loss_steps, run.d))
    progress.eval_sum += progress.last_train * progress.loss_steps
    progress.eval_steps += progress.loss_steps
    step.loss_sum.zero_()
    progress.loss_steps = 0
    progress.clock_in(done, run.tokens_per_step, run.flops_per_token, run.peak, run.d.world)
    progress.history["train"].append({"step": done, "train_loss": progress.last_train})
    metrics = {"train_loss": progress.last_train, "lr": run.scheduler.get_last_lr()[0],
               "tokens_per_s": progress.tokens_per_s}
    if progress.mfu is not None:
        metrics["mfu"] = progress.mfu
    bar.set_postfix(bar_fields(progress), refresh=False)
    run.metrics(metrics, done)


def bar_fields(progress: PretrainProgress) -> dict[str, str]:
    """The figures the progress bar shows: only those measured so far (no `val` field before the
    first evaluation, rather than a nan or a placeholder)."""
    fields = {}
    if not math.isnan(progress.last_train):
        fields["loss"] = f"{progress.last_train:.3f}"
    if not math.isnan(progress.last_val):
        fields["val"] = f"{progress.last_val:.3f}"
    if progress.tokens_per_s:
        fields["tok/s"] = f"{progress.tokens_per_s:,.0f}"
    if progress.mfu is not None:
        fields["mfu"] = f"{100 * progress.mfu:.1f}%"
    return fields


def eval_point(run: PretrainRun, progress: PretrainProgress, done: int, bar) -> None:
    """Validate; a new best is kept on the device and written with the next checkpoint (a disk
    write per improvement cost more than the evaluation itself on a small model)."""
    progress.last_val = validate(run.model, run.val_tokens, run.p, run.seed, run.d, run.masking)
    mean_train = progress.eval_sum / progress.eval_steps if progress.eval_steps else progress.last_train
    progress.eval_sum, progress.eval_steps = 0.0, 0
    progress.history["val"].append({"step": done, "train_loss": mean_train, "val_loss": progress.last_val})
    if progress.last_val < progress.best:
        progress.best = progress.last_val
        if sharding.is_sharded(run.model):  # gathered by every process onto rank 0's CPU
            weights = sharding.full_weights(run.model)
            progress.best_weights = weights if run.d.main else None
        elif run.d.main:
            progress.best_weights = checkpoint.snapshot(run.model)
        progress.best_info = {"step": done, "val_loss": progress.best}
    run.metrics({"val_loss": progress.last_val, "best_val_loss": progress.best}, done)
    bar.set_postfix(bar_fields(progress), refresh=False)  # the new val loss, not at the next log only
    progress.restart_clock(done)


def benchmark_point(run: PretrainRun, progress: PretrainProgress, done: int) -> None:
    """Score the model in training (pretrain.benchmark_steps) on rank 0 while the others wait; the
    time is off the training clock, as an evaluation's."""
    if sharding.is_sharded(run.model):
        if done == run.p.benchmark_steps:
            run.say("benchmarks during training: skipped, the model is sharded over the GPUs; evaluate scores "
                    "the saved model")
        return
    if run.d.main:
        scores = run.scorer(getattr(run.model, "module", run.model))  # DDP's wrapper off
        progress.history.setdefault("benchmarks", []).append({"step": done, **scores})
        run.metrics(scores, done)
    runtime.barrier(run.d)
    progress.restart_clock(done)


def checkpoint_point(run: PretrainRun, progress: PretrainProgress, done: int) -> None:
    """Write the best weights kept since the last checkpoint, then a checkpoint, and time what the
    run waits for: all of it, or with pretrain.async_checkpoint the copy to CPU memory (and any
    rest of the previous checkpoint's write)."""
    started = time.perf_counter()
    check_replicas_agree(run.model, run.d, done)
    if progress.best_weights is not None:  # before the checkpoint that records its loss
        run.checkpoints.save_best(progress.best_weights, progress.best_info)
        progress.best_weights = None
    # The state written carries the checkpoint time up to the previous checkpoint (not this one's).
    run.checkpoints.save(done, run.model, run.optimizer, run.scheduler, progress.checkpoint_state(done))
    spent = time.perf_counter() - started
    progress.checkpoint_s += spent
    run.metrics({"checkpoint_s": spent}, done)
    progress.restart_clock(done)


def train(p: Any, *, seed: int, tokens_dir: Path | str, checkpoint_root: Path | str,
          on_metrics: Metrics | None = None, scorer: Scorer | None = None, progress: bool = True,
          log: Callable[[str], None] = print) -> TrainResult:
    """Train (or resume) the run that `p` and `seed` describe; return the model to save.

    p: the pretrain params (lmforge.config.pretrain.PretrainParams or any object with those attributes).
    on_metrics(metrics, step): called on rank 0 at every log and eval step.
    scorer(model): scores by name every p.benchmark_steps steps (and at the last), logged as metrics
    and kept in the history under "benchmarks"; None: none.
    """
    started = time.perf_counter()
    run, train_tokens, setup_marks = prepare_run(p, seed, Path(tokens_dir), checkpoint_root, on_metrics, log)
    run.scorer = scorer if getattr(p, "benchmark_steps", None) else None
    d, say = run.d, run.say
    state, start = start_or_resume(run)
    runtime.barrier(d)
    sampler = batches.BatchSampler(train_tokens, p.context, p.batch_size, seed, d.device, masking=run.masking,
                                   rank=d.rank, world=d.world, accumulation=run.accumulation,
                                   on_device=p.data_on_device)
    runtime.enable_tf32(d.device)
    step = build_step(run.model, run.optimizer, p, d, run.masked, say)
    runner = StepRunner(step, use_cuda_graph(p, d, say), start, d.device)
    say(f"model {type(run.model).__name__}: {count_params(run.model) / 1e6:.2f}M parameters, "
        f"{run.tokens_per_step} tokens/step, device {d.device} x{d.world}, compile={p.compile}")
    if d.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(d.device)
    setup_s = time.perf_counter() - started
    devices_ready, model_ready = setup_marks
    say(f"set-up {setup_s:.1f}s (devices {devices_ready - started:.1f}s, model {model_ready - devices_ready:.1f}s, "
        f"data and the rest {started + setup_s - model_ready:.1f}s)")
    bar = tqdm(total=p.max_steps, initial=start, disable=not (progress and d.main), unit="step",
               dynamic_ncols=True, mininterval=1.0, desc="pretraining")
    state.restart_clock(start)
    with around_the_loop(p, d.device):
        for index in range(start, p.max_steps):
            runner.run(index, [sampler.get(index, micro) for micro in range(run.accumulation)], run.schedule(index))
            run.scheduler.step()
            state.loss_steps += 1
            done = index + 1
            bar.update(1)
            final = done == p.max_steps
            if done == runner.timed_from:
                runtime.synchronize(d.device)
                state.first_step_s = max(state.first_step_s, time.perf_counter() - state.mark)
                state.restart_clock(done)
            if done % p.logging_steps == 0 or final:
                log_point(run, step, state, done, bar)
            if done % p.eval_steps == 0 or final:
                eval_point(run, state, done, bar)
            if run.scorer and (done % p.benchmark_steps == 0 or final):
                benchmark_point(run, state, done)
            if done % p.save_steps == 0 or final:
                checkpoint_point(run, state, done)
    bar.close()
    return finish(run, state, start, started, setup_s)


def prepare_run(p: Any, seed: int, tokens_dir: Path, checkpoint_root: Path | str, on_metrics: Metrics | None,
                log: Callable[[str], None]) -> tuple[PretrainRun, Any, tuple[float, float]]:
    """Processes and devices, the data, the model, its optimizer and schedule, the checkpoint
    folder: everything but the step. Also returns the train tokens and two set-up time marks."""
    d = runtime.setup_distributed(p.device, "pretrain.device")
    devices_ready = time.perf_counter()
    say = log if d.main else (lambda _msg: None)
    meta = token_shards.read_meta(tokens_dir)
    train_tokens = batches.open_split(tokens_dir, "train", meta)
    val_tokens = batches.open_split(tokens_dir, "val", meta)
    batches.check_length(train_tokens, p.context, "train")
    batches.check_length(val_tokens, p.context, "val")
    model, masked = open_model(p, tokens_dir, meta, seed, d)
    use_float8(model, p, say)
    model = distribute(model, p, d, say)
    model_ready = time.perf_counter()
    accumulation = accumulation_steps(p, d.world)
    optimizer = make_optimizer(model, p)
    schedule = partial(runtime.warmup_cosine, warmup=p.warmup_steps, total=p.max_steps, floor=p.min_lr_ratio)
    fingerprint = run_fingerprint(p, seed, meta, d.world)
    warn_of_stranded_checkpoints(p, seed, meta, d, checkpoint_root, runtime.run_key(fingerprint), say)
    run = PretrainRun(p=p, seed=seed, d=d, say=say, model=model, masked=masked, masking=masking_for(p, meta, masked),
              val_tokens=val_tokens, optimizer=optimizer, schedule=schedule,
              scheduler=runtime.lr_scheduler(optimizer, schedule),
              checkpoints=runtime.RunCheckpoints(checkpoint_root, fingerprint, d, background=p.async_checkpoint),
              accumulation=accumulation,
              tokens_per_step=p.batch_size * p.context * accumulation * d.world,
              flops_per_token=flops_per_token(model, p.context), peak=runtime.peak_flops(d.device),
              on_metrics=on_metrics)
    return run, train_tokens, (devices_ready, model_ready)


def unsharded(run: PretrainRun):
    """The sharded model as one plain model on rank 0's CPU, with the weights pretrain.save asks for
    (None on the other ranks). The last weights are gathered by every process."""
    weights = sharding.full_weights(run.model) if run.p.save == "last" else None
    if not run.d.main:
        return None
    if weights is None:
        weights = run.checkpoints.best_weights()
        if weights is None:
            raise RuntimeError("internal: a finished run kept no best weights")
    return sharding.plain_copy(run.model, weights)


def finish(run: PretrainRun, state: PretrainProgress, start: int, started: float, setup_s: float) -> TrainResult:
    """Back to inference attention, the best weights loaded when pretrain.save is best, the figures."""
    p, d, model = run.p, run.d, run.model
    run.checkpoints.wait()  # the last checkpoint, if still being written
    params = count_params(model)
    if start >= p.max_steps:
        run.say(f"run {run.checkpoints.dir.name} was already complete at step {start}")
    if sharding.is_sharded(model):
        model = unsharded(run)  # None on ranks other than 0
    elif p.save == "best":
        run.checkpoints.restore_best(model)
    if model is not None:
        set_training_attention(model, False)
        set_training_activation(model, False)
        set_activation_checkpointing(model, "none", False)
        if p.float8 != "none":
            float8.plain_linears(model)
    peak_mem = torch.cuda.max_memory_allocated(d.device) / 2**30 if d.device.type == "cuda" else None
    history = state.history
    tokens_per_s = state.train_tokens / state.train_s if state.train_s else 0.0
    return TrainResult(
        model=model, masked=run.masked, device=str(d.device), run_dir=run.checkpoints.dir, steps=p.max_steps,
        resumed_from=start, best_val_loss=state.best,
        final_val_loss=history["val"][-1]["val_loss"] if history["val"] else math.nan,
        final_train_loss=state.last_train, tokens_per_step=run.tokens_per_step, tokens_per_s=tokens_per_s,
        mfu=tokens_per_s * run.flops_per_token / (run.peak * d.world) if (run.peak and state.train_s) else None,
        params=params, flops_per_token=run.flops_per_token, setup_s=setup_s,
        first_step_s=state.first_step_s, train_s=state.train_s, wall_s=time.perf_counter() - started,
        peak_memory_gb=peak_mem, history=history, dist=d, checkpoint_s=state.checkpoint_s,
    )


# --- what a run leaves ---------------------------------------------------------------------------


def resolve_init_from(p: Any) -> Any:
    """`p` with a packaged model name in pretrain.init_from (smollm2, ...) replaced by its local
    folder (fetched, checked and converted once); a folder that exists is left as it is."""
    if not p.init_from or Path(p.init_from).exists():
        return p
    from lmforge.training.base_models import PACKAGED, resolve_base_model

    if p.init_from in PACKAGED:
        return p.model_copy(update={"init_from": str(resolve_base_model(p.init_from, key="pretrain.init_from"))})
    return p


def model_info(result: TrainResult, p: Any, seed: int, tokens_dir: Path | str) -> dict[str, Any]:
    """lmforge.json of the saved model: its arch, context and seed, the run key, the token data's
    meta.json and the run's summary (evaluation reads its context from here)."""
    meta = json.loads((Path(tokens_dir) / "meta.json").read_text())
    info = {"arch": p.arch, "masked": result.masked, "context": p.context, "seed": seed,
            "run_key": result.run_dir.name, "tokens": meta, "train": result.summary()}
    if p.init_from:  # continued pretraining: evaluation scores the base model beside this one
        info["base_model"] = {"folder": str(Path(p.init_from).resolve()), "gguf_file": p.gguf_file}
    return info


def run_metrics(result: TrainResult) -> dict[str, Any]:
    """The summary's figures (numbers only) for metrics.json and the tracking run."""
    return {k: v for k, v in result.summary().items() if isinstance(v, (int, float)) and v is not None}


def save_model(model, tokens_dir: Path | str, out: Path | str, info: dict) -> None:
    """save_pretrained + the tokenizer files of `tokens_dir` + lmforge.json (`info`), replacing
    `out` in one rename."""
    from lmforge.atomic import atomic_dir

    tokens_dir = Path(tokens_dir)
    with atomic_dir(Path(out)) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer_dir = tokens_dir / "tokenizer"
        if tokenizer_dir.is_dir():
            for file in tokenizer_dir.iterdir():
                if file.is_file():
                    shutil.copy2(file, tmp / file.name)
        elif (tokens_dir / "tokenizer.json").exists():
            shutil.copy2(tokens_dir / "tokenizer.json", tmp / "tokenizer.json")
        (tmp / "lmforge.json").write_text(json.dumps(info, indent=2) + "\n")


def write_reports(result, reports: Path | str, metrics: dict) -> list[Path]:
    """metrics.json, loss.csv (train and val loss at each evaluation), train_loss.csv (at each log
    step) and loss.png (when matplotlib is installed) into `reports`; returns the files written.
    result: anything with TrainResult's `history`."""
    from lmforge.atomic import atomic_path, write_json

    reports = Path(reports)
    reports.mkdir(parents=True, exist_ok=True)
    write_json(reports / "metrics.json", metrics)
    history = result.history
    with atomic_path(reports / "loss.csv") as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "train_loss", "val_loss"])
        for row in history["val"]:
            writer.writerow([row["step"], f"{row['train_loss']:.6f}", f"{row['val_loss']:.6f}"])
    with atomic_path(reports / "train_loss.csv") as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "train_loss"])
        for row in history["train"]:
            writer.writerow([row["step"], f"{row['train_loss']:.6f}"])
    png = reports / "loss.png"
    if not _plot_loss(history, png):
        return [reports / "metrics.json", reports / "loss.csv"]
    return [reports / "metrics.json", reports / "loss.csv", png]


def _plot_loss(history: dict[str, list[dict[str, float]]], png: Path) -> bool:
    """The train and val loss curves into `png`; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    from lmforge.atomic import atomic_path

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in history["train"]], [r["train_loss"] for r in history["train"]],
            label="train", alpha=0.6)
    ax.plot([r["step"] for r in history["val"]], [r["val_loss"] for r in history["val"]], "o-", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("pretrain loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return True
