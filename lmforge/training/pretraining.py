"""The pretraining loop: one code path for the CPU, one GPU and N GPUs (torchrun, DDP).

- Fused AdamW, linear warmup then cosine decay to `min_lr_ratio * lr`, gradient
  accumulation, clipping, bf16 autocast on CUDA and fp32 on the CPU, SDPA attention, optional
  torch.compile.
- Validation every `eval_every` steps on fixed random val batches; the best weights and the last
  full checkpoint (model, optimizer, scheduler, step, RNG states, data position) are written
  atomically (lmforge/training/checkpoint.py).
- Resumable: a run restarted with the same configuration continues from its last checkpoint and,
  because each batch is a function of (seed, step), ends with the same weights as an
  uninterrupted run (bitwise on the CPU). Checkpoints live in checkpoint_root/<run key>, the key a
  hash of everything that shapes the trajectory, so changing a knob starts a new run rather than
  resuming one that no longer fits.
- The step loop never waits for the GPU except at log, eval and checkpoint steps.
- A progress bar shows loss, tokens/s, MFU (against PEAK_FLOPS) and the ETA.

Imports only torch, numpy, transformers (via lmforge.training.model), safetensors, tokenizers and tqdm.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lmforge.training import batches
from lmforge.training import checkpoint
from lmforge.training import fused_loss
from lmforge.training import master_weights
from lmforge.training import step_graph
from lmforge.training.model import (TokenInfo, build_model, count_params, flops_per_token, is_masked, set_training_activation,
                           set_training_attention)

# Dense bf16 FLOP/s per device, matched by substring of the device name, first match wins.
# Hopper figures are the measured ceiling of a bf16 8192^3 matmul (BENCHMARKS.md, KINDS.md), the
# others datasheet dense figures. LMFORGE_PEAK_TFLOPS overrides the table.
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

# Knobs that change how a run computes, not what it trains (kernels, fusion and bf16 gradient
# transfer move the last bits only): they stay out of the run key, so a resume may change them.
OPERATIONAL_KEYS = {"eval_every", "checkpoint_every", "log_every", "compile", "compile_mode", "attention", "cuda_graph",
                    "fused_loss", "device", "data_on_device", "save", "ddp_bucket_mb", "ddp_comm_dtype",
                    "ddp_overlap"}
# Keys added after runs were already checkpointed, at the value that reproduces how those runs
# trained: left out of the run key at that value, so the older runs keep their key and resume.
LATER_KEYS_AT_OLD_BEHAVIOUR = {"param_dtype": "fp32"}
Metrics = Callable[[dict[str, float], int], None]


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


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def pick_device(preference: str) -> torch.device:
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("pretrain.device is cuda but no CUDA device is visible")
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


def setup_distributed(preference: str) -> Dist:
    """One process per GPU under torchrun (RANK/WORLD_SIZE set), else a single process."""
    base = pick_device(preference)
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
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    return Dist(rank=rank, local_rank=local_rank, world=world, device=device)


def lr_factor(step: int, *, warmup: int, total: int, floor: float) -> float:
    """Multiplier of the peak lr after `step` optimizer steps: linear warmup, then cosine to floor."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model, p: Any) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms, biases or 1-d tensors)."""
    seen: set[int] = set()
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": p.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # Fused on the CPU too: one update path (clipping through grad_scale included) for every device.
    return torch.optim.AdamW(groups, lr=p.lr, betas=(p.beta1, p.beta2), fused=True)


def params_dict(p: Any) -> dict[str, Any]:
    if hasattr(p, "model_dump"):
        return p.model_dump()
    return dict(vars(p))


def run_fingerprint(p: Any, seed: int, meta: dict, world: int) -> dict[str, Any]:
    """Everything that decides the weights a run ends with."""
    knobs = {k: v for k, v in params_dict(p).items()
             if k not in OPERATIONAL_KEYS and LATER_KEYS_AT_OLD_BEHAVIOUR.get(k, object()) != v}
    return {"seed": seed, "world_size": world, "data": meta["splits"], "vocab_size": meta["vocab_size"],
            "sampler": batches.SAMPLER_VERSION, **{f"pretrain.{k}": v for k, v in sorted(knobs.items())}}


def run_key(fingerprint: dict[str, Any]) -> str:
    text = json.dumps(fingerprint, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


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

    def summary(self) -> dict[str, Any]:
        return {
            "steps": self.steps, "resumed_from": self.resumed_from, "best_val_loss": self.best_val_loss,
            "final_val_loss": self.final_val_loss, "final_train_loss": self.final_train_loss,
            "tokens_per_step": self.tokens_per_step, "tokens_per_s": self.tokens_per_s, "mfu": self.mfu,
            "params": self.params, "flops_per_token": self.flops_per_token, "setup_s": self.setup_s,
            "first_step_s": self.first_step_s, "train_s": self.train_s, "wall_s": self.wall_s, "peak_memory_gb": self.peak_memory_gb,
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
    """pretrain.fused_loss where the head allows it (a causal model with a plain linear head)."""
    if not p.fused_loss:
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
    if d.device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("pretrain.param_dtype bf16 needs a GPU with bf16; set param_dtype: fp32")
    say("param_dtype bf16: forward and backward on a bf16 copy of the weights, AdamW on the fp32 masters")
    return master_weights.BF16Working(model)


def clip_gradients(model, optimizer: torch.optim.Optimizer, max_norm: float) -> None:
    """Scale the gradients down to `max_norm` where their norm exceeds it, as clip_grad_norm_ does.

    A fused AdamW divides each gradient by its `grad_scale` (AMP's unscaling) as it reads it, so the
    clipping rides on the update: clip_grad_norm_'s own pass over the fp32 gradients cost 0.28 ms of
    G1's step on an H200. The optimizer step must follow, and unset grad_scale after it."""
    if not all(group.get("fused") for group in optimizer.param_groups):  # a resumed state_dict sets it per group
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        return
    norm = torch.nn.utils.get_total_norm([q.grad for q in model.parameters() if q.grad is not None])
    optimizer.grad_scale = torch.clamp((norm + 1e-6) / max_norm, min=1.0)  # clip_grad_norm_'s 1e-6


def update(model, optimizer: torch.optim.Optimizer, working: master_weights.BF16Working | None, p: Any) -> None:
    """After the backward: gradients onto the fp32 weights, clip, AdamW, then the bf16 copy refreshed."""
    if working:
        working.grads_to_masters()
    if p.grad_clip > 0:
        clip_gradients(model, optimizer, p.grad_clip)
    optimizer.step()
    optimizer.grad_scale = None  # this step's clipping only
    if working:
        working.refresh()


def use_cuda_graph(p: Any, d: "Dist", say: Callable[[str], None]) -> bool:
    """pretrain.cuda_graph where it can work: one process on one GPU."""
    if not p.cuda_graph:
        return False
    if d.device.type != "cuda" or d.world > 1:
        say("cuda_graph needs one process on one GPU (DDP's hooks cannot be captured): running eager steps")
        return False
    return True


# torch.compile modes that wrap the compiled code in CUDA graphs (cudagraph trees).
CUDAGRAPH_MODES = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}


def compile_runner(module, p: Any, d: "Dist", say: Callable[[str], None]):
    """torch.compile with pretrain.compile_mode, and whether it uses CUDA graphs (only on one GPU).

    Under DDP it also sets Dynamo's optimize_ddp from pretrain.ddp_overlap: a process-wide setting,
    so it holds for every DDP module compiled after it in this process."""
    mode = p.compile_mode
    if mode in CUDAGRAPH_MODES and (d.world > 1 or d.device.type != "cuda"):
        # CUDA graphs cannot hold DDP's gradient all-reduce, and there are none on the CPU.
        say(f"compile_mode {mode} uses CUDA graphs, which need one GPU: using {CUDAGRAPH_MODES[mode]}")
        mode = CUDAGRAPH_MODES[mode]
    if d.world > 1:
        import torch._dynamo as dynamo

        dynamo.config.optimize_ddp = p.ddp_overlap  # read when Dynamo traces the DDP module
    return torch.compile(module, mode=None if mode == "default" else mode), mode in CUDAGRAPH_MODES


def wrap_ddp(module: torch.nn.Module, p: Any, d: Dist, say: Callable[[str], None]):
    """`module` under DistributedDataParallel with pretrain.ddp_bucket_mb and ddp_comm_dtype."""
    from torch.nn.parallel import DistributedDataParallel

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


def _all_mean(value: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        import torch.distributed as dist

        dist.all_reduce(value)  # SUM: gloo (CPU) has no AVG
        value = value / d.world
    return value


@torch.no_grad()
def validate(model, tokens, p: Any, seed: int, d: Dist, masking: batches.Masking | None, autocast) -> float:
    """Mean loss over the fixed val batches (spread over the ranks)."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, device=d.device, dtype=torch.float64)
    for x, y in batches.eval_batches(tokens, p.context, p.batch_size, seed, d.device, p.eval_batches,
                                     masking=masking, rank=d.rank, world=d.world):
        with autocast():
            loss = _loss(model, x, y, masking is not None)
        count = (y != batches.IGNORE_INDEX).sum()
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
    if d.world == 1:
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


def _gather_rng(d: Dist) -> list[dict[str, Any]]:
    mine = checkpoint.rng_state()
    if d.world == 1:
        return [mine]
    import torch.distributed as dist

    everyone: list[Any] = [None] * d.world
    dist.all_gather_object(everyone, mine)
    return everyone


def _barrier(d: Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()


def train(p: Any, *, seed: int, tokens_dir: Path | str, checkpoint_root: Path | str,
          on_metrics: Metrics | None = None, progress: bool = True, log: Callable[[str], None] = print) -> TrainResult:
    """Train (or resume) the run that `p` and `seed` describe; return the model to save.

    p: the pretrain params (lmforge.config.PretrainParams or any object with those attributes).
    on_metrics(metrics, step): called on rank 0 at every log and eval step.
    """
    started = time.perf_counter()
    d = setup_distributed(p.device)
    devices_ready = time.perf_counter()
    say = log if d.main else (lambda _msg: None)
    tokens_dir = Path(tokens_dir)
    meta = batches.read_meta(tokens_dir)
    tok = TokenInfo.from_meta(meta)
    train_tokens = batches.open_split(tokens_dir, "train", meta)
    val_tokens = batches.open_split(tokens_dir, "val", meta)
    batches.check_length(train_tokens, p.context, "train")
    batches.check_length(val_tokens, p.context, "val")
    data_vocab = None
    if p.init_from:
        from tokenizers import Tokenizer

        data_vocab = Tokenizer.from_file(str(tokens_dir / "tokenizer.json")).get_vocab(with_added_tokens=True)
    model = build_model(p, tok, seed, data_vocab=data_vocab)
    masked = is_masked(model)
    if masked and p.arch != "bert" and not p.init_from:
        raise ValueError("internal: a masked model from a causal arch")
    model.to(d.device)
    model.train()
    set_training_attention(model, True)
    set_training_activation(model, p.compile)
    model_ready = time.perf_counter()
    optimizer = make_optimizer(model, p)
    schedule = partial(lr_factor, warmup=p.warmup_steps, total=p.steps, floor=p.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    fingerprint = run_fingerprint(p, seed, meta, d.world)
    run_dir = Path(checkpoint_root) / run_key(fingerprint)
    state: dict[str, Any] = {"best_val_loss": math.inf, "history": {"train": [], "val": []}}
    start = 0
    latest = checkpoint.latest_checkpoint(run_dir)
    if latest is not None:
        state = checkpoint.load_checkpoint(latest, model=model, optimizer=optimizer, scheduler=scheduler,
                                           rank=d.rank, world_size=d.world, fingerprint=fingerprint)
        start = int(state["step"])
        for group in optimizer.param_groups:  # a captured run saves its lr as a device tensor
            group["lr"], group["capturable"] = float(group["lr"]), False
        say(f"resuming run {run_dir.name} from {latest.name} (step {start} of {p.steps})")
    else:
        torch.manual_seed(seed * 1000 + d.rank)  # dropout and other in-step randomness
        say(f"run {run_dir.name}: no checkpoint yet, starting at step 0 of {p.steps}")
    _barrier(d)

    masking = None
    if masked:
        special = tuple(sorted(meta["special_ids"].values()))
        masking = batches.Masking(p.mlm_probability, tok.mask_id, tok.vocab_size, special)
    sampler = batches.BatchSampler(train_tokens, p.context, p.batch_size, seed, d.device, masking=masking,
                                   rank=d.rank, on_device=p.data_on_device)

    if d.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

        def autocast():
            return torch.autocast("cuda", dtype=torch.bfloat16)
    else:
        autocast = nullcontext

    # The model that runs forward and backward: `model` itself, or its bf16 copy (pretrain.param_dtype).
    working = bf16_working(p, model, d, say)
    stepped = working.model if working else model
    wrapped = TrainingLoss(stepped, masked, use_fused_loss(p, stepped, masked, say))
    if d.world > 1:
        wrapped = wrap_ddp(wrapped, p, d, say)
    runner, cudagraphs = compile_runner(wrapped, p, d, say) if p.compile else (wrapped, False)

    n_params = count_params(model)
    fpt = flops_per_token(model, p.context)
    peak = peak_flops(d.device)
    tokens_per_step = p.batch_size * p.context * p.grad_accum * d.world
    say(f"model {type(model).__name__}: {n_params / 1e6:.2f}M parameters, {tokens_per_step} tokens/step, "
        f"device {d.device} x{d.world}, compile={p.compile}")
    if d.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(d.device)

    history = state["history"]
    best = float(state["best_val_loss"])
    last_val = history["val"][-1]["val_loss"] if history["val"] else math.nan
    last_train = history["train"][-1]["train_loss"] if history["train"] else math.nan
    loss_sum = torch.zeros((), device=d.device)
    loss_steps = 0
    eval_sum, eval_steps = 0.0, 0
    best_weights, best_info = None, {}
    # Throughput totals run over every segment of a resumed run (kept in the checkpoint).
    timing = state.get("timing", {})
    first_step_s = float(timing.get("first_step_s", 0.0))
    train_s, train_tokens_done = float(timing.get("train_s", 0.0)), int(timing.get("train_tokens", 0))
    tok_s, mfu = 0.0, None
    mark, mark_step = time.perf_counter(), start
    bar = tqdm(total=p.steps, initial=start, disable=not (progress and d.main), unit="step",
               dynamic_ncols=True, mininterval=1.0, desc="pretrain")

    def one_step(step_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Forward and backward over the micro-batches, clip, update: eager, or recorded by CapturedStep."""
        for micro, (x, y) in enumerate(step_batches):
            last = micro == len(step_batches) - 1
            context = wrapped.no_sync() if d.world > 1 and not last else nullcontext()
            if cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs are consumed
            with context:
                with autocast():
                    loss = runner(x, y)
                (loss / len(step_batches)).backward()
            loss_sum.add_(loss.detach() / len(step_batches))
        update(model, optimizer, working, p)

    graphed = use_cuda_graph(p, d, say)
    captured: step_graph.CapturedStep | None = None
    capture_at = start + step_graph.WARMUP_STEPS
    warm_stream = step_graph.side_stream(d.device) if graphed else None
    # Steps before this one pay for compilation, warm-up and capture: kept out of the throughput.
    timed_from = capture_at + 1 if graphed else start + 1

    def step_batches(step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [sampler.get(step, micro) for micro in range(p.grad_accum)]

    setup_s = time.perf_counter() - started
    say(f"set-up {setup_s:.1f}s (devices {devices_ready - started:.1f}s, model {model_ready - devices_ready:.1f}s, "
        f"data and the rest {started + setup_s - model_ready:.1f}s)")
    with attention_backends(p.attention, d.device):
        for step in range(start, p.steps):
            if graphed and step >= capture_at:
                drawn, step_lr = step_batches(step), p.lr * schedule(step)
                if captured is None:
                    torch.cuda.current_stream(d.device).wait_stream(warm_stream)
                    captured = step_graph.CapturedStep(one_step, optimizer, drawn, step_lr)
                captured.replay(drawn, step_lr)
            else:
                with torch.cuda.stream(warm_stream) if warm_stream is not None else nullcontext():
                    one_step(step_batches(step))
                    optimizer.zero_grad(set_to_none=True)
                if warm_stream is not None:
                    torch.cuda.current_stream(d.device).wait_stream(warm_stream)
            scheduler.step()
            loss_steps += 1
            done = step + 1
            bar.update(1)
            final = done == p.steps

            if done == timed_from:
                if d.device.type == "cuda":
                    torch.cuda.synchronize(d.device)
                first_step_s = max(first_step_s, time.perf_counter() - mark)
                mark, mark_step = time.perf_counter(), done

            if done % p.log_every == 0 or final:
                mean = _all_mean(loss_sum / loss_steps, d)
                last_train = float(mean)  # the one host sync of a log step
                eval_sum, eval_steps = eval_sum + last_train * loss_steps, eval_steps + loss_steps
                loss_sum.zero_()
                loss_steps = 0
                now = time.perf_counter()
                if done > mark_step:
                    span = now - mark
                    train_s += span
                    train_tokens_done += (done - mark_step) * tokens_per_step
                    tok_s = (done - mark_step) * tokens_per_step / span
                    mfu = tok_s * fpt / (peak * d.world) if peak else None
                mark, mark_step = now, done
                lr = scheduler.get_last_lr()[0]
                history["train"].append({"step": done, "train_loss": last_train})
                shown_val = "-" if math.isnan(last_val) else f"{last_val:.3f}"  # no evaluation yet
                postfix = {"loss": f"{last_train:.3f}", "val": shown_val, "tok/s": f"{tok_s:,.0f}"}
                if mfu is not None:
                    postfix["mfu"] = f"{100 * mfu:.1f}%"
                bar.set_postfix(postfix, refresh=False)
                if d.main and on_metrics:
                    metrics = {"train_loss": last_train, "lr": lr, "tokens_per_s": tok_s}
                    if mfu is not None:
                        metrics["mfu"] = mfu
                    on_metrics(metrics, done)

            if done % p.eval_every == 0 or final:
                last_val = validate(model, val_tokens, p, seed, d, masking, autocast)
                mean_train = eval_sum / eval_steps if eval_steps else last_train
                eval_sum, eval_steps = 0.0, 0
                history["val"].append({"step": done, "train_loss": mean_train, "val_loss": last_val})
                if last_val < best:
                    best = last_val
                    if d.main:  # kept on the device, written with the next checkpoint (a disk write per
                        # improvement cost more than the evaluation itself on a small model)
                        best_weights, best_info = checkpoint.snapshot(model), {"step": done, "val_loss": best}
                if d.main and on_metrics:
                    on_metrics({"val_loss": last_val, "best_val_loss": best}, done)
                mark, mark_step = time.perf_counter(), done

            if done % p.checkpoint_every == 0 or final:
                check_replicas_agree(model, d, done)
                rngs = _gather_rng(d)
                if d.main and best_weights is not None:  # before the checkpoint that records its loss
                    checkpoint.save_best(run_dir, best_weights, best_info)
                    best_weights = None
                if d.main:
                    checkpoint.save_checkpoint(
                        run_dir, step=done, model=model, optimizer=optimizer, scheduler=scheduler, rng_states=rngs,
                        state={"fingerprint": fingerprint, "data": {"sampler": batches.SAMPLER_VERSION, "next_step": done},
                               "best_val_loss": best, "history": history,
                               "timing": {"first_step_s": first_step_s, "train_s": train_s, "train_tokens": train_tokens_done}})
                _barrier(d)
                mark, mark_step = time.perf_counter(), done
    bar.close()
    set_training_attention(model, False)
    set_training_activation(model, False)

    resumed = start
    if start >= p.steps:
        say(f"run {run_dir.name} was already complete at step {start}")
    if p.save == "best" and (run_dir / checkpoint.BEST).exists():
        best_dir = run_dir / checkpoint.BEST
        checkpoint.read_state(best_dir)
        checkpoint.load_weights(best_dir, model)
    peak_mem = torch.cuda.max_memory_allocated(d.device) / 2**30 if d.device.type == "cuda" else None
    final_val = history["val"][-1]["val_loss"] if history["val"] else math.nan
    return TrainResult(
        model=model, masked=masked, device=str(d.device), run_dir=run_dir, steps=p.steps, resumed_from=resumed,
        best_val_loss=best, final_val_loss=final_val, final_train_loss=last_train,
        tokens_per_step=tokens_per_step, tokens_per_s=train_tokens_done / train_s if train_s else 0.0,
        mfu=(train_tokens_done / train_s * fpt / (peak * d.world)) if (peak and train_s) else None,
        params=n_params, flops_per_token=fpt, setup_s=setup_s, first_step_s=first_step_s, train_s=train_s,
        wall_s=time.perf_counter() - started,
        peak_memory_gb=peak_mem, history=history, dist=d,
    )
