"""Pretraining's optimizer step: what one step of `pretraining.train` runs, and how it is built.

- `build_step` makes a `TrainStep` from a model already on its device: the model and its loss as one
  forward (`TrainingLoss`, optionally the fused head-and-loss kernel of fused_loss.py), under DDP
  when there are several unsharded processes (`wrap_ddp`, with Dynamo's optimize_ddp from
  pretrain.ddp_overlap), compiled by torch.compile (`compile_runner`), with the bf16 working copy
  of pretrain.param_dtype bf16 (`bf16_working`).
- `TrainStep` runs forward and backward over a step's micro-batches (no gradient sync before the
  last; compiled autograd traces the backward with ddp_overlap compiled_autograd), then `update`:
  gradients onto the fp32 masters, clipping, the optimizer, the working copy refreshed. Its loss
  accumulates on the device, so a step never waits for the GPU.
- `StepRunner` runs the steps eagerly or, with pretrain.cuda_graph, captured once in a CUDA graph
  and replayed (step_graph.py); `around_the_loop` holds what torch.compile must see when it traces
  the step: the SDPA kernels' order (`attention_backends`) and the share of activations the compiled
  step keeps (`activation_budget`).
- `forward_dtype` and `plain_loss` are the step's precision and loss, which validation shares.

bench/profile_step.py and bench/bench_fsdp.py time this same `build_step`. The loop around it
(preparing and resuming a run, the log, eval and checkpoint points) is pretraining.py's.

Imports only torch and lmforge.training's modules.
"""

from __future__ import annotations

from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch
import torch.nn.functional as F

from lmforge.training import batches, fused_loss, master_weights, runtime, sharding, step_graph
from lmforge.training.runtime import Dist


def forward_dtype(device: torch.device) -> torch.dtype | None:
    """Pretraining runs its forward in bf16 on a GPU, in fp32 on the CPU."""
    return torch.bfloat16 if device.type == "cuda" else None


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The mean cross-entropy of logits, upcast to fp32."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1),
                           ignore_index=batches.IGNORE_INDEX)


def plain_loss(model, x: torch.Tensor, y: torch.Tensor, masked: bool,
               loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy) -> torch.Tensor:
    """The mean cross-entropy of the model's logits (the training forward's loss unless fused_loss,
    and validation's)."""
    kwargs = {} if masked else {"use_cache": False}
    return loss_of(model(input_ids=x, **kwargs).logits, y)


class TrainingLoss(torch.nn.Module):
    """The model and its loss as one forward.

    Compiled as one graph, the fp32 upcast and the cross-entropy fuse into a kernel that reads the
    bf16 logits once (compiling the model alone left an eager loss that wrote and re-read fp32
    logits: a tenth of the G1 step). DDP wraps this module, so it sees one forward per micro-step.
    fused: the training forward goes through lmforge/training/fused_loss.py (evaluation keeps the plain loss).
    """

    def __init__(self, model, masked: bool, fused: bool = False,
                 loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy):
        super().__init__()
        self.model, self.masked, self.fused, self.loss_of = model, masked, fused, loss_of

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.fused and torch.is_grad_enabled():
            return fused_loss.causal_lm_loss(self.model, x, y, batches.IGNORE_INDEX)
        return plain_loss(self.model, x, y, self.masked, self.loss_of)


def loss_function(p: Any, sharded: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss of the logits. Under fsdp the blocks are compiled one by one (sharding.shard) and the
    rest of the forward stays eager, so with pretrain.compile the loss is compiled on its own: the fp32
    upcast then fuses into the cross-entropy's kernel instead of writing fp32 logits (8 GB a step at
    Llama 3's 128k vocabulary and 16k tokens). torchtitan compiles its loss apart for the same reason."""
    return torch.compile(cross_entropy) if sharded and p.compile else cross_entropy


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


def activation_budget(p: Any):
    """pretrain.activation_memory_budget as a context: torch.compile's partitioner reads it when it
    splits a compiled graph into forward and backward, which happens at the graph's first run (and
    at any recompile), so it is entered around the whole loop, as `attention_backends` is."""
    if p.activation_memory_budget >= 1.0:
        return nullcontext()
    import torch._functorch.config as functorch_config

    return functorch_config.patch(activation_memory_budget=p.activation_memory_budget)


def around_the_loop(p: Any, device: torch.device) -> ExitStack:
    """The contexts a training loop runs in, entered once around all its steps."""
    stack = ExitStack()
    stack.enter_context(attention_backends(p.attention, device))
    stack.enter_context(activation_budget(p))
    return stack


def bf16_working(p: Any, model, d: Dist, say: Callable[[str], None]) -> master_weights.BF16Working | None:
    """pretrain.param_dtype bf16: a bf16 working copy of `model`, whose fp32 weights become the masters."""
    if p.param_dtype != "bf16":
        return None
    if sharding.is_sharded(model):
        say("param_dtype bf16: under fsdp the shards stay fp32 and FSDP's mixed precision computes in bf16")
        return None
    if d.device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("pretrain.param_dtype bf16 needs a GPU with bf16; set param_dtype: fp32")
    say("param_dtype bf16: forward and backward on a bf16 copy of the weights, AdamW on the fp32 masters"
        + (", compiled to read the copy's gradients and write its weights" if p.compile_optimizer else ""))
    return master_weights.BF16Working(model)


def update(model, optimizer: torch.optim.Optimizer, working: master_weights.BF16Working | None, p: Any) -> None:
    """After the backward: gradients onto the fp32 weights, clip, AdamW, then the bf16 copy refreshed."""
    if working and p.compile_optimizer:
        working.compiled_update(optimizer, p.max_grad_norm)
        return
    if working:
        working.grads_to_masters()
    runtime.optimizer_step(model, optimizer, p.max_grad_norm)
    if working:
        working.refresh()


def use_cuda_graph(p: Any, d: Dist, say: Callable[[str], None]) -> bool:
    """pretrain.cuda_graph where it can work: one process on one GPU."""
    if not p.cuda_graph:
        return False
    if d.device.type != "cuda" or d.world > 1:
        say("cuda_graph needs one process on one GPU (DDP's and FSDP's hooks cannot be captured): running eager steps")
        return False
    return True


# torch.compile modes that wrap the compiled code in CUDA graphs (cudagraph trees).
CUDAGRAPH_MODES = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}


def compile_runner(module, p: Any, d: Dist, say: Callable[[str], None]):
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


def traced_backward(step: TrainStep):
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
    sharded = sharding.is_sharded(model)
    module = TrainingLoss(stepped, masked, use_fused_loss(p, stepped, masked, say), loss_function(p, sharded))
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
