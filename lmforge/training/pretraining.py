"""The pretraining loop: one code path for the CPU, one GPU and N GPUs (torchrun; DDP or FSDP2).

- Fused AdamW, linear warmup then cosine decay to `min_lr_ratio * learning_rate`, gradient accumulation,
  clipping, bf16 autocast on CUDA and fp32 on the CPU, SDPA attention, optional torch.compile
  and CUDA graphs. What is not pretraining's own (devices, processes, the optimizer's groups,
  schedules, clipping, the run's checkpoints) comes from runtime.py, shared with fine-tuning.
- `build_step` makes the optimizer step (model and loss as one compiled module, DDP, the bf16
  working copy); `train` only draws batches, steps, and logs, evaluates and checkpoints at their
  intervals. bench/profile_step.py times the same `build_step`.
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

Imports only torch, numpy, transformers (via model.py), safetensors, tokenizers, tqdm and
lmforge.config (for its table of renamed knobs; pydantic and PyYAML, which every stage loads anyway).
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lmforge.config import RENAMED_KEYS
from lmforge.errors import UserError
from lmforge.training import (batches, checkpoint, float8, fused_loss, master_weights, muon, runtime, sharding,
                              step_graph)
from lmforge.training.model import (TokenInfo, blocks, build_model, count_params, flops_per_token, is_masked,
                                    set_activation_checkpointing, set_training_activation, set_training_attention)
from lmforge.training.runtime import Dist

# Knobs that change how a run computes, not what it trains (kernels, fusion and bf16 gradient
# transfer move the last bits only): they stay out of the run key, so a resume may change them.
OPERATIONAL_KEYS = {"eval_steps", "save_steps", "logging_steps", "compile", "compile_mode", "attention", "cuda_graph",
                    "fused_loss", "device", "data_on_device", "save", "ddp_bucket_mb", "ddp_comm_dtype",
                    "ddp_overlap", "parallel", "activation_checkpointing", "nproc_per_node", "nnodes",
                    "rdzv_endpoint", "async_checkpoint"}
# How the global batch is cut (per process, per micro-batch) moves float sums only: in the run key the
# global batch stands in for them (see run_fingerprint).
BATCH_SPLIT_KEYS = {"batch_size", "gradient_accumulation_steps", "global_batch_size"}
# Keys added after runs were already checkpointed, at the value that reproduces how those runs
# trained: left out of the run key at that value, so the older runs keep their key and resume.
LATER_KEYS_AT_OLD_BEHAVIOUR = {"param_dtype": "fp32", "optimizer": "adamw", "muon_learning_rate": None,
                               "muon_momentum": 0.95, "float8": "none"}
# Knobs renamed to TrainingArguments' names (lr -> learning_rate, ...) keep their old names in the
# run key, so a run checkpointed before the rename still resumes: new name -> old name.
NAMES_BEFORE_THE_RENAME = {new.removeprefix("pretrain."): old.removeprefix("pretrain.")
                           for old, new in RENAMED_KEYS.items() if old.startswith("pretrain.")}
Metrics = Callable[[dict[str, float], int], None]


def forward_dtype(device: torch.device) -> torch.dtype | None:
    """Pretraining runs its forward in bf16 on a GPU, in fp32 on the CPU."""
    return torch.bfloat16 if device.type == "cuda" else None


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
    knobs = {k: v for k, v in params_dict(p).items()
             if k not in OPERATIONAL_KEYS | BATCH_SPLIT_KEYS and LATER_KEYS_AT_OLD_BEHAVIOUR.get(k, object()) != v}
    knobs.update(batch_size=batch_size, gradient_accumulation_steps=accumulation)
    return {"seed": seed, "world_size": world, "data": meta["splits"], "vocab_size": meta["vocab_size"],
            "sampler": batches.SAMPLER_VERSION,
            **{f"pretrain.{NAMES_BEFORE_THE_RENAME.get(k, k)}": v for k, v in sorted(knobs.items())}}


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


def _loss(model, x: torch.Tensor, y: torch.Tensor, masked: bool) -> torch.Tensor:
    kwargs = {} if masked else {"use_cache": False}
    logits = model(input_ids=x, **kwargs).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1),
                           ignore_index=batches.IGNORE_INDEX)


class TrainingLoss(torch.nn.Module):
    """The model and its loss as one forward.

    Compiled as one graph, the fp32 upcast and the cross-entropy fuse into a kernel that reads the
    bf16 logits once (compiling the model alone left an eager loss that wrote and re-read fp32
    logits: a tenth of the G1 step). DDP wraps this module, so it sees one forward per micro-step.
    fused: the training forward goes through lmforge/training/fused_loss.py (evaluation keeps the plain loss).
    """

    def __init__(self, model, masked: bool, fused: bool = False):
        super().__init__()
        self.model, self.masked, self.fused = model, masked, fused

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.fused and torch.is_grad_enabled():
            return fused_loss.causal_lm_loss(self.model, x, y, batches.IGNORE_INDEX)
        return _loss(self.model, x, y, self.masked)


def use_fused_loss(p: Any, model, masked: bool, say: Callable[[str], None]) -> bool:
    """pretrain.fused_loss where the head allows it (a causal model with a plain linear head, unsharded)."""
    if not p.fused_loss:
        return False
    if sharding.is_sharded(model):
        say("fused_loss reads the head's weight outside the model's forward, where FSDP has not gathered it: "
            "keeping the plain loss")
        return False
    if masked or not fused_loss.supports(model):
        say(f"fused_loss needs a causal model whose head is one bias-free matrix; {type(model).__name__} "
            "keeps the plain loss")
        return False
    return True


SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                 "math": "MATH"}


def attention_backends(choice: str, device: torch.device):
    """A context that puts `choice` first among the SDPA kernels (auto: PyTorch's own order).

    It is entered around the whole loop, so torch.compile sees the choice when it traces.
    """
    if choice == "auto" or device.type != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    first = getattr(SDPBackend, SDPA_BACKENDS[choice])
    rest = [getattr(SDPBackend, n) for n in SDPA_BACKENDS.values() if n != SDPA_BACKENDS[choice]]
    return sdpa_kernel([first, *rest], set_priority=True)


def bf16_working(p: Any, model, d: "Dist", say: Callable[[str], None]) -> master_weights.BF16Working | None:
    """pretrain.param_dtype bf16: a bf16 working copy of `model`, whose fp32 weights become the masters."""
    if p.param_dtype != "bf16":
        return None
    if sharding.is_sharded(model):
        say("param_dtype bf16: under fsdp the shards stay fp32 and FSDP's mixed precision computes in bf16")
        return None
    if d.device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("pretrain.param_dtype bf16 needs a GPU with bf16; set param_dtype: fp32")
    say("param_dtype bf16: forward and backward on a bf16 copy of the weights, AdamW on the fp32 masters")
    return master_weights.BF16Working(model)


def update(model, optimizer: torch.optim.Optimizer, working: master_weights.BF16Working | None, p: Any) -> None:
    """After the backward: gradients onto the fp32 weights, clip, AdamW, then the bf16 copy refreshed."""
    if working:
        working.grads_to_masters()
    runtime.optimizer_step(model, optimizer, p.max_grad_norm)
    if working:
        working.refresh()


def use_cuda_graph(p: Any, d: "Dist", say: Callable[[str], None]) -> bool:
    """pretrain.cuda_graph where it can work: one process on one GPU."""
    if not p.cuda_graph:
        return False
    if d.device.type != "cuda" or d.world > 1:
        say("cuda_graph needs one process on one GPU (DDP's and FSDP's hooks cannot be captured): running eager steps")
        return False
    return True


# torch.compile modes that wrap the compiled code in CUDA graphs (cudagraph trees).
CUDAGRAPH_MODES = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}


def compile_runner(module, p: Any, d: "Dist", say: Callable[[str], None]):
    """torch.compile with pretrain.compile_mode, and whether it uses CUDA graphs (only on one GPU)."""
    mode = p.compile_mode
    if mode in CUDAGRAPH_MODES and (d.world > 1 or d.device.type != "cuda"):
        # CUDA graphs cannot hold DDP's gradient all-reduce, and there are none on the CPU.
        say(f"compile_mode {mode} uses CUDA graphs, which need one GPU: using {CUDAGRAPH_MODES[mode]}")
        mode = CUDAGRAPH_MODES[mode]
    return torch.compile(module, mode=None if mode == "default" else mode), mode in CUDAGRAPH_MODES


# pretrain.ddp_overlap -> Dynamo's optimize_ddp mode.
OPTIMIZE_DDP = {True: "ddp_optimizer", False: "no_optimization", "compiled_autograd": "python_reducer"}


def set_optimize_ddp(p: Any) -> None:
    """Dynamo's optimize_ddp from pretrain.ddp_overlap. A process-wide setting, read when DDP is built
    (whether it uses the python reducer) and when Dynamo traces it, so it is set before both."""
    import torch._dynamo as dynamo

    dynamo.config.optimize_ddp = OPTIMIZE_DDP[p.ddp_overlap]


# How compiled autograd compiles the backward it traces: static shapes, one graph, as the forward.
compile_backward = partial(torch.compile, backend="inductor", fullgraph=True, dynamic=False)


def traced_backward(step: "TrainStep"):
    """A context for the backward: with ddp_overlap compiled_autograd, compiled autograd traces it (the
    compiled forward's backward and DDP's all-reduce hooks) into one graph for Inductor; else nothing."""
    if not step.compiled_autograd:
        return nullcontext()
    from torch._dynamo import compiled_autograd

    return compiled_autograd._enable(compile_backward)


def wrap_ddp(module: torch.nn.Module, p: Any, d: Dist, say: Callable[[str], None]):
    """`module` under DistributedDataParallel with pretrain.ddp_bucket_mb and ddp_comm_dtype."""
    from torch.nn.parallel import DistributedDataParallel

    set_optimize_ddp(p)
    # Gradients as views into the all-reduce buckets: one copy fewer per step.
    ddp = DistributedDataParallel(module, device_ids=[d.local_rank] if d.device.type == "cuda" else None,
                                  gradient_as_bucket_view=True, bucket_cap_mb=p.ddp_bucket_mb)
    if p.ddp_comm_dtype == "bf16" and d.device.type != "cuda":
        say("ddp_comm_dtype bf16 needs NCCL (GPUs); gloo sends the gradients as fp32")
    elif p.ddp_comm_dtype == "bf16":
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook

        # Half the bytes on the wire, summed in bf16: the usual mixed-precision trade.
        ddp.register_comm_hook(None, bf16_compress_hook)
    return ddp


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
            loss = _loss(model, x, y, masking is not None)
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


# --- the step ------------------------------------------------------------------------------------


@dataclass
class TrainStep:
    """One optimizer step: forward and backward over the micro-batches, clip, AdamW.

    `module` is the model and its loss as one forward (under DDP when there are several
    processes), `runner` the same compiled; `model` holds the fp32 weights the optimizer updates,
    `working` their bf16 copy when pretrain.param_dtype is bf16. The mean loss of the steps since
    the last read accumulates in `loss_sum` on the device, so a step never waits for the GPU."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    working: master_weights.BF16Working | None
    module: torch.nn.Module
    runner: Callable
    cudagraphs: bool
    dtype: torch.dtype | None
    p: Any
    world: int
    loss_sum: torch.Tensor
    sharded: bool = False
    compiled_autograd: bool = False  # pretrain.ddp_overlap compiled_autograd, under DDP

    def __call__(self, step_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for micro, (x, y) in enumerate(step_batches):
            last = micro == len(step_batches) - 1
            if self.sharded:  # reduce-scatter the gradients once, after the last micro-batch
                self.model.set_requires_gradient_sync(last)
            context = self.module.no_sync() if self.world > 1 and not last and not self.sharded else nullcontext()
            if self.cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs are consumed
            with context:
                with runtime.autocast(self.loss_sum.device, self.dtype):
                    loss = self.runner(x, y)
                with traced_backward(self):
                    # No division by 1: compiled autograd in torch 2.11 hands the divisor of a
                    # division's backward to Inductor's kernel as an int where it wants a tensor.
                    (loss / len(step_batches) if len(step_batches) > 1 else loss).backward()
            self.loss_sum.add_(loss.detach() / len(step_batches))
        update(self.model, self.optimizer, self.working, self.p)


def build_step(model, optimizer: torch.optim.Optimizer, p: Any, d: Dist, masked: bool,
               say: Callable[[str], None] = print) -> TrainStep:
    """The optimizer step `train` runs, from a model already on its device (and resumed: the bf16
    working copy is made from the weights as they are now)."""
    working = bf16_working(p, model, d, say)
    stepped = working.model if working else model
    module = TrainingLoss(stepped, masked, use_fused_loss(p, stepped, masked, say))
    sharded = sharding.is_sharded(model)
    ddp = d.world > 1 and not sharded
    if ddp:
        module = wrap_ddp(module, p, d, say)
    if sharded:  # its blocks were compiled one by one before sharding (sharding.shard)
        runner, cudagraphs = module, False
    else:
        runner, cudagraphs = compile_runner(module, p, d, say) if p.compile else (module, False)
    traced = ddp and p.ddp_overlap == "compiled_autograd"  # the config asks compile for it
    return TrainStep(model=model, optimizer=optimizer, working=working, module=module, runner=runner,
                     cudagraphs=cudagraphs, dtype=forward_dtype(d.device), p=p, world=d.world,
                     loss_sum=torch.zeros((), device=d.device), sharded=sharded, compiled_autograd=traced)


class StepRunner:
    """Runs the steps eagerly or, with pretrain.cuda_graph, captured in one CUDA graph: the first
    step_graph.WARMUP_STEPS run eagerly on a side stream (as capture requires), then the step is
    captured once and replayed with each step's batches and learning rate."""

    def __init__(self, step: TrainStep, graphed: bool, start: int, device: torch.device):
        self.step, self.graphed, self.device = step, graphed, device
        self.capture_at = start + step_graph.WARMUP_STEPS
        self.captured: step_graph.CapturedStep | None = None
        self.side_stream = step_graph.side_stream(device) if graphed else None
        # Steps before this one pay for compilation, warm-up and capture: kept out of the throughput.
        self.timed_from = self.capture_at + 1 if graphed else start + 1

    def run(self, index: int, drawn: list[tuple[torch.Tensor, torch.Tensor]], factor: float) -> None:
        """Step `index` on the `drawn` micro-batches; `factor`: the schedule's multiplier of the peak
        lrs at this step (eager steps read the lrs the scheduler set; a replay is told them)."""
        if self.graphed and index >= self.capture_at:
            if self.captured is None:
                torch.cuda.current_stream(self.device).wait_stream(self.side_stream)
                self.captured = step_graph.CapturedStep(self.step, self.step.optimizer, drawn, factor)
            self.captured.replay(drawn, factor)
            return
        with torch.cuda.stream(self.side_stream) if self.side_stream is not None else nullcontext():
            self.step(drawn)
            self.step.optimizer.zero_grad(set_to_none=True)
        if self.side_stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.side_stream)


# --- the loop ------------------------------------------------------------------------------------


@dataclass
class Progress:
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
    def from_state(cls, state: dict[str, Any], start: int) -> Progress:
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
class Run:
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

    def metrics(self, values: dict[str, float], step: int) -> None:
        if self.d.main and self.on_metrics:
            self.on_metrics(values, step)


def open_model(p: Any, tokens_dir: Path, meta: dict, seed: int, d: Dist) -> tuple[torch.nn.Module, bool]:
    """The model from the pretrain params, in training mode, on the CPU (`distribute` places it)."""
    data_vocab = None
    if p.init_from:
        from tokenizers import Tokenizer

        data_vocab = Tokenizer.from_file(str(tokens_dir / "tokenizer.json")).get_vocab(with_added_tokens=True)
    model = build_model(p, TokenInfo.from_meta(meta), seed, data_vocab=data_vocab)
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


def distribute(model, p: Any, d: Dist, say: Callable[[str], None]):
    """The model on its device: whole (DDP wraps the step later, in build_step) or, with
    pretrain.parallel fsdp on several processes, sharded (sharding.py moves each shard to the GPU,
    so no process ever holds the whole model there)."""
    if p.parallel == "fsdp" and d.world > 1:
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


def start_or_resume(run: Run) -> tuple[Progress, int]:
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
        return Progress.from_state(state, start), start
    torch.manual_seed(run.seed * 1000 + run.d.rank)  # dropout and other in-step randomness
    run.say(f"run {run.checkpoints.dir.name}: no checkpoint yet, starting at step 0 of {run.p.max_steps}")
    return Progress(history={"train": [], "val": []}, best=math.inf), 0


def log_point(run: Run, step: TrainStep, progress: Progress, done: int, bar) -> None:
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


def bar_fields(progress: Progress) -> dict[str, str]:
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


def eval_point(run: Run, progress: Progress, done: int, bar) -> None:
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


def checkpoint_point(run: Run, progress: Progress, done: int) -> None:
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
          on_metrics: Metrics | None = None, progress: bool = True, log: Callable[[str], None] = print) -> TrainResult:
    """Train (or resume) the run that `p` and `seed` describe; return the model to save.

    p: the pretrain params (lmforge.config.pretrain.PretrainParams or any object with those attributes).
    on_metrics(metrics, step): called on rank 0 at every log and eval step.
    """
    started = time.perf_counter()
    run, train_tokens, setup_marks = prepare_run(p, seed, Path(tokens_dir), checkpoint_root, on_metrics, log)
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
    with attention_backends(p.attention, d.device):
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
            if done % p.save_steps == 0 or final:
                checkpoint_point(run, state, done)
    bar.close()
    return finish(run, state, start, started, setup_s)


def prepare_run(p: Any, seed: int, tokens_dir: Path, checkpoint_root: Path | str, on_metrics: Metrics | None,
                log: Callable[[str], None]) -> tuple[Run, Any, tuple[float, float]]:
    """Processes and devices, the data, the model, its optimizer and schedule, the checkpoint
    folder: everything but the step. Also returns the train tokens and two set-up time marks."""
    d = runtime.setup_distributed(p.device, "pretrain.device")
    devices_ready = time.perf_counter()
    say = log if d.main else (lambda _msg: None)
    meta = batches.read_meta(tokens_dir)
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
    run = Run(p=p, seed=seed, d=d, say=say, model=model, masked=masked, masking=masking_for(p, meta, masked),
              val_tokens=val_tokens, optimizer=optimizer, schedule=schedule,
              scheduler=runtime.lr_scheduler(optimizer, schedule),
              checkpoints=runtime.RunCheckpoints(checkpoint_root, fingerprint, d, background=p.async_checkpoint),
              accumulation=accumulation,
              tokens_per_step=p.batch_size * p.context * accumulation * d.world,
              flops_per_token=flops_per_token(model, p.context), peak=runtime.peak_flops(d.device),
              on_metrics=on_metrics)
    return run, train_tokens, (devices_ready, model_ready)


def unsharded(run: Run):
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


def finish(run: Run, state: Progress, start: int, started: float, setup_s: float) -> TrainResult:
    """Back to inference attention, the best weights loaded when pretrain.save is best, the figures."""
    p, d, model = run.p, run.d, run.model
    run.checkpoints.wait()  # the last checkpoint, if still being written
    params = count_params(model)
    if start >= p.max_steps:
        run.say(f"run {run.checkpoints.dir.name} was already complete at step {start}")
    if sharding.is_sharded(model):
        model = unsharded(run)  # None on ranks other than 0
    elif p.save == "best":
        run.checkpoints.load_best(model)
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
