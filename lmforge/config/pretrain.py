"""The `pretrain` section: the model (lmforge/training/model.py) and its training loop (lmforge/training/pretraining.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from lmforge.config import Benchmark, Fraction, Section, refuse_renamed_knobs


class PretrainParams(Section):
    """lmforge/training/model.py builds the model, lmforge/training/pretraining.py runs the loop (see their docs)."""

    # model
    arch: Literal["llama", "gpt2", "bert"] = "llama"
    n_layer: int = Field(4, ge=1, le=512)
    n_head: int = Field(4, ge=1, le=512)
    n_kv_head: int | None = Field(None, ge=1, le=512)
    d_model: int = Field(128, ge=8, le=65_536)
    d_ff: int | None = Field(None, ge=8)
    context: int = Field(128, ge=4, le=1_048_576)
    rope_theta: float = Field(10_000.0, gt=0.0)  # llama only: the rotary embedding's base (Llama 3: 500,000)
    dropout: Fraction = 0.0
    tie_embeddings: bool = True
    pad_vocab: int = Field(1, ge=1, le=4096)  # round the model's vocabulary up to a multiple of this
    mlm_probability: float = Field(0.15, gt=0.0, lt=1.0)
    init_from: str | None = None
    gguf_file: str | None = None
    # optimisation
    max_steps: int = Field(300, ge=1)
    batch_size: int = Field(16, ge=1)  # per process: lmforge's name, kept (see RENAMED_KEYS)
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(3e-3, gt=0.0, le=1.0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    warmup_steps: int = Field(30, ge=0)
    weight_decay: float = Field(0.1, ge=0.0)
    adam_beta1: Fraction = 0.9
    adam_beta2: Fraction = 0.95
    max_grad_norm: float = Field(1.0, ge=0.0)
    # muon: Muon on the blocks' weight matrices, AdamW on the rest (lmforge/training/muon.py); its
    # update is scaled to AdamW's size, so muon_learning_rate null means learning_rate
    optimizer: Literal["adamw", "muon"] = "adamw"
    muon_learning_rate: float | None = Field(None, gt=0.0, le=1.0)
    muon_momentum: Fraction = 0.95
    # FP8 matmuls in the blocks' linear layers (torchao's float8 training; a GPU of compute capability
    # 8.9 or more): tensorwise or rowwise scaling. lmforge/training/float8.py
    float8: Literal["none", "tensorwise", "rowwise"] = "none"
    # evaluation, checkpoints, runtime
    eval_steps: int = Field(50, ge=1)
    eval_batches: int = Field(8, ge=1)
    # Every benchmark_steps steps (null: never), the lm-evaluation-harness scores the model in
    # training on benchmark_tasks (lmforge/evaluation/benchmarks.py), logged beside the loss.
    benchmark_steps: int | None = Field(None, ge=1)
    benchmark_tasks: list[Benchmark] = Field(default_factory=lambda: [Benchmark(name="hellaswag", limit=50),
                                                                      Benchmark(name="arc_easy", limit=50)])
    save_steps: int = Field(50, ge=1)
    save: Literal["best", "last"] = "best"
    logging_steps: int = Field(10, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = False
    # reduce-overhead adds CUDA graphs (one GPU): it pays for small models, whose steps are launch-bound
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    attention: Literal["auto", "flash", "cudnn", "efficient", "math"] = "auto"
    cuda_graph: bool = False  # capture the whole step as one CUDA graph (one GPU; lmforge/training/step_graph.py)
    fused_loss: bool = False  # the forward keeps the logits' gradient, not the logits (lmforge/training/fused_loss.py)
    param_dtype: Literal["fp32", "bf16"] = "fp32"  # bf16: steps on a bf16 copy, AdamW on fp32 masters (lmforge/training/master_weights.py)
    compile_optimizer: bool = False  # with param_dtype bf16: AdamW compiled with the copy's two passes folded in
    data_on_device: bool = True
    # MiB of gradients per DDP all-reduce bucket (PyTorch's default: 25). DDP's first bucket holds
    # 1 MiB, and torch.compile's DDP support asserts that no later bucket is smaller.
    ddp_bucket_mb: float = Field(25.0, ge=1.0)
    ddp_comm_dtype: Literal["fp32", "bf16"] = "fp32"  # dtype gradients travel in between GPUs
    # Compiled under DDP: true splits the graph at the buckets' edges so each bucket's all-reduce
    # overlaps the rest of the backward (Dynamo's DDPOptimizer); false keeps one graph, whose fusions
    # then match one GPU's, and all-reduces once the backward is done; compiled_autograd keeps one
    # forward graph and traces the backward with its all-reduces into one more, where Inductor buckets
    # them and starts each as its gradients are ready (DDP's python reducer). Eager DDP always overlaps.
    ddp_overlap: bool | Literal["compiled_autograd"] = True
    # Several processes: ddp keeps a whole replica per GPU; fsdp shards weights, gradients and AdamW's
    # state over the GPUs (FSDP2, lmforge/training/sharding.py). Both train the same model.
    parallel: Literal["ddp", "fsdp"] = "ddp"
    # Recompute each block's activations in the backward instead of keeping them: none, full (every
    # block), or n (every n-th block).
    activation_checkpointing: Literal["none", "full"] | int = "none"
    # With compile: the share of the activations the compiled step may keep for the backward (1: all
    # its min-cut keeps). Below 1, torch.compile's partitioner recomputes the ops that free the most
    # bytes per FLOP until the rest fits: selective checkpointing, per op, chosen by PyTorch.
    activation_memory_budget: float = Field(1.0, ge=0.0, le=1.0)
    # Windows per optimizer step over all processes. null: batch_size x gradient_accumulation_steps x
    # processes. Set, the accumulation is derived from it, so one run can resume on another number of
    # processes (the run is defined by its global batch, not by how it is split).
    global_batch_size: int | None = Field(None, ge=1)
    # Launch: processes per host (null: one per visible GPU, 1 on the CPU), hosts, and where they meet.
    # This host's rank comes from the environment (NODE_RANK or torchrun's PET_NODE_RANK).
    # Write each checkpoint's shards from a thread while training goes on: the run waits only for
    # the copy to CPU memory (which must hold one checkpoint more). `latest` moves at the next
    # checkpoint (or the end), once the write is done, so a kill can cost two intervals, not one.
    async_checkpoint: bool = False
    nproc_per_node: int | None = Field(None, ge=1)
    nnodes: int = Field(1, ge=1)
    rdzv_endpoint: str | None = None  # host:port of node 0 (null: MASTER_ADDR:MASTER_PORT or PET_RDZV_ENDPOINT)

    @model_validator(mode="before")
    @classmethod
    def _no_old_names(cls, data: object) -> object:
        return refuse_renamed_knobs(data, "pretrain")

    @model_validator(mode="after")
    def _shapes(self) -> PretrainParams:
        if self.init_from is None:
            if self.d_model % self.n_head:
                raise ValueError(f"n_head ({self.n_head}) does not divide d_model ({self.d_model})")
            if (self.d_model // self.n_head) % 2 and self.arch == "llama":
                raise ValueError(f"llama's rotary embedding needs an even head width, got {self.d_model // self.n_head}")
            if self.n_kv_head is not None:
                if self.arch != "llama":
                    raise ValueError("n_kv_head (grouped-query attention) applies to arch llama only")
                if self.n_head % self.n_kv_head:
                    raise ValueError(f"n_kv_head ({self.n_kv_head}) does not divide n_head ({self.n_head})")
        if self.cuda_graph and self.compile and self.compile_mode in ("reduce-overhead", "max-autotune"):
            raise ValueError(f"cuda_graph captures the whole step, and compile_mode {self.compile_mode} would add "
                             "CUDA graphs of its own inside it: use compile_mode default or "
                             "max-autotune-no-cudagraphs with cuda_graph")
        if self.gguf_file is not None and self.init_from is None:
            raise ValueError("gguf_file names a file inside init_from: set init_from too")
        if self.optimizer == "muon" and self.parallel == "fsdp":
            raise ValueError("optimizer muon orthogonalises whole weight matrices, which parallel fsdp shards "
                             "over the processes: use parallel ddp with muon, or optimizer adamw")
        if self.ddp_overlap == "compiled_autograd" and not self.compile:
            raise ValueError("ddp_overlap compiled_autograd traces the backward with torch.compile: set compile "
                             "true, or ddp_overlap true or false")
        if isinstance(self.activation_checkpointing, int) and self.activation_checkpointing < 1:
            raise ValueError("activation_checkpointing is none, full or a block interval n >= 1")
        if self.compile_optimizer and (self.param_dtype != "bf16" or self.optimizer != "adamw" or self.cuda_graph):
            raise ValueError("compile_optimizer compiles AdamW together with the bf16 working copy's passes: it "
                             "needs param_dtype bf16 and optimizer adamw, and is not tried under cuda_graph "
                             f"(here param_dtype {self.param_dtype}, optimizer {self.optimizer}, "
                             f"cuda_graph {self.cuda_graph})")
        if self.activation_memory_budget < 1.0 and not self.compile:
            raise ValueError(f"activation_memory_budget {self.activation_memory_budget} is met by torch.compile's "
                             "partitioner: set compile true, or use activation_checkpointing without compile")
        if self.activation_memory_budget < 1.0 and self.activation_checkpointing != "none":
            raise ValueError(f"activation_memory_budget {self.activation_memory_budget} and activation_checkpointing "
                             f"{self.activation_checkpointing} are two ways to recompute activations: set "
                             "activation_checkpointing none with a budget, or the budget to 1.0")
        if self.global_batch_size is not None and self.gradient_accumulation_steps != 1:
            raise ValueError("set global_batch_size or gradient_accumulation_steps, not both: with "
                             "global_batch_size the accumulation is derived from the number of processes")
        if self.global_batch_size is not None and self.global_batch_size % self.batch_size:
            raise ValueError(f"global_batch_size ({self.global_batch_size}) is not a multiple of batch_size "
                             f"({self.batch_size})")
        if self.warmup_steps >= self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below max_steps ({self.max_steps})")
        return self
