"""The schema of params.yaml: one pydantic model per section, validated once, at the edge.

Every stage calls `load_params()` before doing any work. An unknown key, a wrong type or an
out-of-range value raises `ConfigError` naming the dotted key path (`clean.task.max_chars`) and
the reason, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import copy
import io
import re
import types
from collections.abc import Hashable
from pathlib import Path
from typing import Annotated, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from lmforge.errors import UserError

DEFAULT_PARAMS = Path("params.yaml")
DATASETS = ("corpus", "task")


class ConfigError(UserError, ValueError):
    """params.yaml is invalid; the message names every offending key path."""


class Section(BaseModel):
    # extra="forbid": a misspelt key is an error, not a silently ignored knob.
    model_config = ConfigDict(extra="forbid", frozen=True)


Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]


# --- data stages ---------------------------------------------------------------------------

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")  # a git commit: a branch or tag name can move under a pin
_SCHEMES = ("file:", "https:", "hf:", "pypi:")


class Source(Section):
    uri: str
    sha256: str | None = None  # of the file, or of a glob's manifest; hf: sources pin `revision` instead
    revision: str | None = None  # hf: only: the dataset repository's commit
    # The most bytes one fetch may download, or unpack from an archive: a source that grows past
    # this (a zip bomb, a runaway server) stops before it fills the disk. Raise it for big corpora.
    max_bytes: int = Field(64 * 2**30, ge=1)

    @field_validator("uri")
    @classmethod
    def _known_scheme(cls, uri: str) -> str:
        scheme = uri.split(":", 1)[0] + ":" if ":" in uri else ""
        if scheme and scheme not in _SCHEMES and len(scheme) > 2:  # "C:" style paths are paths
            raise ValueError(f"unknown scheme {scheme!r}; use a path or one of {', '.join(_SCHEMES)}")
        if uri.startswith("pypi:") and ("==" not in uri or "#" not in uri):
            raise ValueError("a pypi: source reads pypi:NAME==VERSION#GLOB")
        return uri

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, digest: str | None) -> str | None:
        if digest is not None and not _SHA256.match(digest):
            raise ValueError("must be 64 lowercase hex characters")
        return digest

    @model_validator(mode="after")
    def _pinned(self) -> Source:
        if self.uri.startswith("hf:"):
            if not self.revision:
                raise ValueError("an hf: source is pinned by `revision` (a commit of the dataset's repository)")
            if not _COMMIT.match(self.revision):
                raise ValueError("revision must be a full commit hash (40 lowercase hex characters): "
                                 "a branch or tag name can move, so it pins nothing")
        elif self.sha256 is None:
            raise ValueError("sha256 is required: the file's, or for a glob its manifest's (see lmforge/data/sources.py)")
        elif self.revision is not None:
            raise ValueError("revision pins hf: sources only; this source is pinned by its sha256")
        return self


class NearDedupParams(Section):
    """MinHash near-duplicate removal (lmforge/data/near_dedup.py, datatrove's MinHash steps)."""

    n_grams: int = Field(5, ge=1)  # words per shingle
    buckets: int = Field(14, ge=1)  # LSH bands; with 8 hashes each, ~0.75 Jaccard is the usual cut
    hashes_per_bucket: int = Field(8, ge=1)
    seed: int = 1


class CleanDocuments(Section):
    kind: Literal["documents"] = "documents"
    min_chars: int = Field(1, ge=1)
    max_chars: int = Field(2_000_000, ge=1)
    max_line_chars: int = Field(20_000, ge=1)
    strip_boilerplate: bool = True
    text_field: str = Field("text", min_length=1)  # the JSON field / parquet column holding the text
    shard_mb: float = Field(16.0, gt=0.0)  # input files are grouped into shards of about this size (the unit of parallel work)
    near_dedup: NearDedupParams | None = None  # null: exact duplicates only
    # A plain-text file longer than this is cut into documents of about this many characters, at
    # blank lines (lmforge/data/cleaning.py: cutting_for); null, the schema's default so that a config
    # written before cutting existed reads as it did: a file is one document, whatever its length...
    chunk_chars: int | None = Field(None, ge=1)
    # ...and a corpus too small for that many is cut finer, into about this many documents.
    min_documents: int = Field(200, ge=1)

    @model_validator(mode="after")
    def _bounds(self) -> CleanDocuments:
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) exceeds max_chars ({self.max_chars})")
        if self.chunk_chars is None:
            return self
        if self.chunk_chars < 2 * self.min_chars:
            raise ValueError(f"chunk_chars ({self.chunk_chars}) must be at least twice min_chars ({self.min_chars}), "
                             "or the pieces of a cut file could be quarantined as too short")
        # A piece ends by twice the target plus its last line; a short last piece may join it.
        longest_piece = 3 * self.chunk_chars + self.max_line_chars
        if longest_piece > self.max_chars:
            raise ValueError(f"chunk_chars ({self.chunk_chars}) is too large for max_chars ({self.max_chars}): a piece "
                             f"of a cut file reaches 3 x chunk_chars + max_line_chars = {longest_piece} chars")
        return self


class CleanLabelled(Section):
    kind: Literal["labelled"] = "labelled"
    text_column: str = "text"
    label_column: str = "label"
    labels: dict[str, str] = Field(min_length=2)
    keep_sources: list[str] | None = None
    min_chars: int = Field(1, ge=1)
    max_chars: int = Field(100_000, ge=1)

    @field_validator("labels", mode="before")
    @classmethod
    def _string_keys(cls, labels: object) -> object:
        # YAML reads `0: negative` with an int key; raw labels are compared as strings.
        if isinstance(labels, dict):
            return {str(k): v for k, v in labels.items()}
        return labels

    @model_validator(mode="after")
    def _bounds(self) -> CleanLabelled:
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) exceeds max_chars ({self.max_chars})")
        if len(set(self.labels.values())) != len(self.labels):
            raise ValueError("label names must be distinct")
        return self


CleanParams = Annotated[CleanDocuments | CleanLabelled, Field(discriminator="kind")]


class SplitParams(Section):
    mode: Literal["hash", "random", "contiguous"] = "random"
    val: Fraction = 0.1
    test: Fraction = 0.1
    max_rows: int | None = Field(None, ge=3)

    @model_validator(mode="after")
    def _room_for_train(self) -> SplitParams:
        if self.val + self.test >= 1.0:
            raise ValueError(f"val + test = {self.val + self.test:g} leaves nothing to train on")
        if self.mode == "hash" and self.max_rows is not None:
            raise ValueError("max_rows has no meaning in hash mode (each document is placed on its own); set it to null")
        return self


class TokenizeParams(Section):
    kind: Literal["char", "bpe"] = "bpe"
    vocab_size: int = Field(4096, ge=64, le=1_000_000)
    min_frequency: int = Field(2, ge=1)
    sample_mb: float = Field(64.0, gt=0.0)  # MB of train text (a seeded sample) the tokenizer learns from


# --- training stages: see the modules that use them -------------------------------------------

# Knobs renamed to the name transformers' TrainingArguments gives the same knob: old -> new key path.
# An old name is refused with its new one, never read: a params file written before the rename
# stops with the fix instead of training on defaults. The batch sizes keep lmforge's names: they
# count rows per process, and TrainingArguments' per_device_* names would suggest otherwise.
RENAMED_KEYS = {
    "pretrain.lr": "pretrain.learning_rate",
    "pretrain.steps": "pretrain.max_steps",
    "pretrain.grad_clip": "pretrain.max_grad_norm",
    "pretrain.grad_accum": "pretrain.gradient_accumulation_steps",
    "pretrain.beta1": "pretrain.adam_beta1",
    "pretrain.beta2": "pretrain.adam_beta2",
    "pretrain.eval_every": "pretrain.eval_steps",
    "pretrain.checkpoint_every": "pretrain.save_steps",
    "pretrain.log_every": "pretrain.logging_steps",
    "finetune.epochs": "finetune.num_train_epochs",
    "finetune.checkpoint_every": "finetune.save_steps",
    "finetune.log_every": "finetune.logging_steps",
}
_SPACE = "tune.space"  # its keys name finetune knobs, so they follow finetune's renames


def renamed_key_hint(dotted: str) -> str | None:
    """For a key path that uses a knob's old name, the sentence naming its new one; else None."""
    where, _, knob = dotted.rpartition(".")
    new = RENAMED_KEYS.get(f"{'finetune' if where == _SPACE else where}.{knob}")
    if new is None:
        return None
    return f"{dotted} was renamed {where}.{new.rpartition('.')[2]} (the name transformers' TrainingArguments uses)"


def reject_renamed_keys(tree: object, source: str, path: tuple[str, ...] = ()) -> None:
    """ConfigError naming every key path in `tree` (a mapping found at `path`) that uses an old
    knob name, with its new name; `source` says where the tree came from."""
    hints = _renamed_hints(tree, path)
    if hints:
        raise ConfigError("\n".join(f"{source}: {hint}" for hint in hints))


def _renamed_hints(tree: object, path: tuple[str, ...]) -> list[str]:
    return [hint for dotted in _key_paths(tree, path) if (hint := renamed_key_hint(dotted))]


def _key_paths(tree: object, path: tuple[str, ...]):
    """Every key path in a tree of mappings (a path joined with dots), parents before children."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            dotted = (*path, str(key))
            yield ".".join(dotted)
            yield from _key_paths(value, dotted)


def _refuse_renamed_knobs(data: object, section: str) -> object:
    """A section validated on its own (a trial's or best.yaml's finetune overrides) gets the hint too."""
    hints = _renamed_hints(data, (section,))
    if hints:
        raise PydanticCustomError("renamed_key", "{hints}", {"hints": "; ".join(hints)})
    return data


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
        return _refuse_renamed_knobs(data, "pretrain")

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
        if self.global_batch_size is not None and self.gradient_accumulation_steps != 1:
            raise ValueError("set global_batch_size or gradient_accumulation_steps, not both: with "
                             "global_batch_size the accumulation is derived from the number of processes")
        if self.global_batch_size is not None and self.global_batch_size % self.batch_size:
            raise ValueError(f"global_batch_size ({self.global_batch_size}) is not a multiple of batch_size "
                             f"({self.batch_size})")
        if self.warmup_steps >= self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below max_steps ({self.max_steps})")
        return self


# accelerate's sizes (convert_file_size_to_int): no TB, and a bare number is no size in a string.
_MEMORY_SIZE = re.compile(r"^\d+(\.\d+)?\s*[KMG]i?B$", re.IGNORECASE)


class EvaluateParams(Section):
    """lmforge/evaluation/language_model.py: losses over whole splits, a unigram baseline, samples."""

    splits: list[Literal["val", "test"]] = Field(default_factory=lambda: ["val", "test"], min_length=1)
    batch_size: int = Field(32, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    mlm_probability: float = Field(0.15, gt=0.0, lt=1.0)
    samples: int = Field(3, ge=0, le=100)
    sample_tokens: int = Field(120, ge=1)
    temperature: float = Field(0.8, gt=0.0, le=10.0)
    top_k: int | None = Field(50, ge=1)
    prompts: list[str] = Field(default_factory=lambda: ["ROMEO:"])
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # A model larger than one device: none puts it whole on `device`; auto is transformers'
    # device_map="auto", its layers spread over the visible GPUs, then CPU memory, then disk
    # (with device cpu: CPU memory, then disk).
    device_map: Literal["none", "auto"] = "none"
    # device_map auto only: accelerate's cap per device, a GPU index or cpu -> a size such as 60GiB;
    # a device left out gets nothing, and disk takes what fits nowhere (null: what each device has free).
    max_memory: dict[str, str] | None = None

    @field_validator("max_memory", mode="before")
    @classmethod
    def _device_keys(cls, caps: object) -> object:
        # YAML reads `0: 60GiB` with an int key.
        if isinstance(caps, dict):
            return {str(k): v for k, v in caps.items()}
        return caps

    @field_validator("max_memory")
    @classmethod
    def _sizes(cls, caps: dict[str, str] | None) -> dict[str, str] | None:
        for key, size in (caps or {}).items():
            # accelerate reads a disk cap and ignores it: disk always takes the rest.
            if not (key.isdigit() or key == "cpu"):
                raise ValueError(f"{key!r} is no device max_memory caps: a GPU index (0, 1, ...) or cpu")
            if not _MEMORY_SIZE.match(size):
                raise ValueError(f"{key}: {size!r} is no size accelerate reads: a number and KB, MB, GB, "
                                 "KiB, MiB or GiB, e.g. 60GiB")
        return caps

    @model_validator(mode="after")
    def _distinct(self) -> EvaluateParams:
        if len(set(self.splits)) != len(self.splits):
            raise ValueError(f"splits lists a split twice: {self.splits}")
        if self.samples and not self.prompts:
            raise ValueError("samples > 0 needs at least one prompt")
        return self

    @model_validator(mode="after")
    def _placement(self) -> EvaluateParams:
        if self.max_memory is not None and self.device_map != "auto":
            raise ValueError("max_memory caps the devices of device_map auto: set device_map: auto, "
                             "or max_memory: null")
        gpus = [key for key in self.max_memory or {} if key.isdigit()]
        if gpus and self.device == "cpu":
            raise ValueError(f"device cpu keeps the GPUs out of device_map auto, yet max_memory caps GPU "
                             f"{', '.join(gpus)}: use device auto or cuda, or leave the GPUs out of max_memory")
        return self


class TuneParams(Section):
    """An Optuna study over finetune's knobs (lmforge/training/tuning.py)."""

    class Dimension(Section):
        """One searched knob: float / int in [low, high] (log scale or step), or categorical."""

        type: Literal["float", "int", "categorical"]
        low: float | None = None
        high: float | None = None
        log: bool = False
        step: float | None = Field(None, gt=0)
        choices: list[bool | int | float | str] | None = None

        @model_validator(mode="after")
        def _sampleable(self) -> TuneParams.Dimension:
            if self.type == "categorical":
                if not self.choices:
                    raise ValueError("a categorical dimension needs a non-empty `choices` list")
                if self.low is not None or self.high is not None or self.step is not None or self.log:
                    raise ValueError("a categorical dimension takes only `choices`")
                return self
            if self.choices is not None:
                raise ValueError(f"a {self.type} dimension takes low/high, not choices")
            if self.low is None or self.high is None:
                raise ValueError(f"a {self.type} dimension needs both `low` and `high`")
            if self.low > self.high:
                raise ValueError(f"low ({self.low:g}) exceeds high ({self.high:g})")
            if self.log and self.low <= 0:
                raise ValueError(f"a log-scale dimension needs low > 0, got {self.low:g}")
            if self.log and self.step is not None:
                raise ValueError("`log` and `step` cannot be combined")
            if self.type == "int":
                for name in ("low", "high", "step"):
                    value = getattr(self, name)
                    if value is not None and value != int(value):
                        raise ValueError(f"an int dimension needs an integer {name}, got {value:g}")
            return self

        def candidates(self) -> list:
            """The values that bound this dimension (checked against finetune's schema)."""
            if self.type == "categorical":
                return list(self.choices or [])
            cast = int if self.type == "int" else float
            return [cast(self.low), cast(self.high)]

    study_name: str = Field("finetune", min_length=1)
    storage: str | None = None
    n_trials: int = Field(2, ge=1, le=100_000)
    timeout: float | None = Field(None, gt=0)
    metric: Literal["accuracy", "macro_f1"] = "accuracy"
    startup_trials: int = Field(10, ge=0)
    pruner: Literal["median", "hyperband", "threshold", "none"] = "median"
    pruner_startup_trials: int = Field(1, ge=0)
    pruner_warmup_epochs: int = Field(0, ge=0)
    pruner_threshold: float = Field(0.0, ge=0.0, le=1.0)
    heartbeat_interval: int | None = Field(60, ge=1)
    max_train_rows: int | None = Field(400, ge=2)
    max_val_rows: int | None = Field(200, ge=2)
    max_length: int | None = Field(None, ge=8, le=32_768)  # trials' max_length (null: finetune's)
    # The study's first trial runs finetune's own values (the untuned default); fine-tuning
    # takes the best trial only when it beats that trial by at least this much.
    min_gain: float = Field(0.01, ge=0.0, le=1.0)
    space: dict[str, Dimension] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _space_fits_finetune(self) -> TuneParams:
        # Every searched key must be a finetune knob, and every bound a value finetune accepts,
        # so a study never starts on a space whose trials would all fail.
        fields = FinetuneParams.model_fields
        for key, dim in self.space.items():
            head, _, rest = key.partition(".")
            if hint := renamed_key_hint(f"{_SPACE}.{key}"):
                raise ValueError(hint)
            if head not in fields or (rest and head != "lora"):
                raise ValueError(f"space.{key}: not a finetune knob")
            if rest and rest not in FinetuneParams.Lora.model_fields:
                raise ValueError(f"space.{key}: not a finetune.lora knob")
            for value in dim.candidates():
                override = {head: {rest: value}} if rest else {head: value}
                try:
                    FinetuneParams.model_validate(override)
                except ValidationError as err:
                    reason = "; ".join(e["msg"] for e in err.errors())
                    raise ValueError(f"space.{key}: {value!r} is not a valid finetune.{key}: {reason}") from None
        return self


class FinetuneParams(Section):
    """Sequence-classification fine-tuning (lmforge/training/finetuning.py); the tune stage searches it."""

    class Lora(Section):
        r: int = Field(8, ge=1, le=4096)
        alpha: float = Field(16.0, gt=0)
        dropout: Fraction = 0.1
        target_modules: list[str] | None = Field(None, min_length=1)

    base_model: str = Field("minilm", min_length=1)
    method: Literal["full", "lora"] = "full"
    lora: Lora = Lora()
    max_length: int = Field(128, ge=8, le=32_768)
    truncation: Literal["head", "tail", "head_tail"] = "head"
    num_train_epochs: int = Field(1, ge=1, le=1000)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(16, ge=1, le=65_536)
    eval_batch_size: int = Field(64, ge=1, le=65_536)
    learning_rate: float = Field(5e-5, gt=0.0, le=1.0)
    weight_decay: float = Field(0.01, ge=0.0, le=1.0)
    layer_lr_decay: float = Field(1.0, gt=0.0, le=1.0)  # lr x decay^(layers above): the head learns fastest
    warmup_ratio: Fraction = 0.1
    max_grad_norm: float = Field(1.0, ge=0.0)
    group_by_length: bool = True
    metric: Literal["accuracy", "macro_f1"] = "accuracy"
    early_stopping_patience: int = Field(2, ge=0)
    save_steps: int = Field(100, ge=1)
    max_train_rows: int | None = Field(None, ge=2)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool | Literal["auto"] = "auto"
    pad_multiple: int = Field(8, ge=1, le=128)  # batch widths rounded up to a multiple (tensor-core friendly)
    logging_steps: int = Field(50, ge=1)
    use_tuned: bool = True
    baseline_c: float = Field(4.0, gt=0.0)

    @model_validator(mode="before")
    @classmethod
    def _no_old_names(cls, data: object) -> object:
        return _refuse_renamed_knobs(data, "finetune")


MAX_SERVED_BODY_BYTES = 256 << 20


class RegisterParams(Section):
    """lmforge/registry/registration.py: log and register the models in MLflow, gate promotion (aliases only)."""

    class Gate(Section):
        """`lmforge promote` moves `champion` to the challenger only when this passes."""

        metric: str = Field(min_length=1)
        direction: Literal["max", "min"] = "max"
        min_gain: float = Field(0.0, ge=0.0)

    class Model(Section):
        name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$", max_length=200)
        gate: RegisterParams.Gate

    class Serving(Section):
        """Request caps of the served models: a request over them is answered 400."""

        max_texts: int = Field(64, ge=1, le=10_000)
        max_chars: int = Field(20_000, ge=1, le=10_000_000)
        max_new_tokens: int = Field(64, ge=1, le=4096)

        @model_validator(mode="after")
        def _body_fits_memory(self) -> RegisterParams.Serving:
            # The server's body cap is room for max_texts texts of max_chars characters, each
            # escaped to 6 bytes (lmforge/registry/serving.py: body_limit): keep it to what one
            # server can hold, so no pair of caps lets a client send gigabytes.
            body = self.max_texts * (self.max_chars * 6 + 16) + 4096
            if body > MAX_SERVED_BODY_BYTES:
                raise ValueError(f"max_texts x max_chars allows request bodies of {body:,} bytes; the most is "
                                 f"{MAX_SERVED_BODY_BYTES:,} ({MAX_SERVED_BODY_BYTES >> 20} MiB): lower one of them")
            return self

    tracking_uri: str | None = Field(None, min_length=1)
    sentiment: Model = Field(default_factory=lambda: RegisterParams.Model(
        name="lmforge-sentiment", gate={"metric": "accuracy", "direction": "max"}))
    lm: Model = Field(default_factory=lambda: RegisterParams.Model(
        name="lmforge-lm", gate={"metric": "perplexity", "direction": "min"}))
    serving: Serving = Field(default_factory=lambda: RegisterParams.Serving())

    @model_validator(mode="after")
    def _distinct_names(self) -> RegisterParams:
        if self.sentiment.name == self.lm.name:
            raise ValueError(f"sentiment.name and lm.name are both {self.lm.name!r}: give each model its own name")
        return self


# A value written into a shell script unquoted: no space, quote, $, `, ;, |, &, <, >, newline.
_SHELL_WORD = r"^[A-Za-z0-9_.,:=/@%+-]+$"


class DataEngineParams(Section):
    """Where clean, split and tokenize run their shards (lmforge/data/engine.py): datatrove's local
    process pool, or its Slurm executor (one array job per step, paths on a shared filesystem)."""

    class Slurm(Section):
        """datatrove writes these into the sbatch script as they are (`source <venv_path>/...`,
        `#SBATCH --<key>=<value>`), and a shell runs it: every value is held to characters that
        no shell reads as syntax, so no value (a flow's -S override included) can run commands."""

        partition: str | None = Field(None, pattern=_SHELL_WORD)
        time: str = Field("4:00:00", pattern=r"^[0-9:-]+$")  # each array task's time limit
        cpus_per_task: int = Field(1, ge=1)
        mem_per_cpu_gb: int = Field(4, ge=1)
        qos: str = Field("normal", pattern=_SHELL_WORD)
        venv_path: str | None = Field(None, pattern=r"^/[A-Za-z0-9_./+-]*$")  # absolute: the environment each node activates
        sbatch_args: dict[str, str] = Field(default_factory=dict)

        @field_validator("sbatch_args")
        @classmethod
        def _plain_sbatch_args(cls, args: dict[str, str]) -> dict[str, str]:
            for key, value in args.items():
                if not re.fullmatch(r"[a-z][a-z0-9-]*", key):
                    raise ValueError(f"{key!r} is no sbatch option name (lowercase letters, digits and -)")
                if not re.fullmatch(_SHELL_WORD, value):
                    raise ValueError(f"the value of {key!r} may hold only letters, digits and _.,:=/@%+- "
                                     "(it is written into a shell script)")
            return args

    executor: Literal["local", "slurm"] = "local"
    slurm: Slurm = Field(default_factory=lambda: DataEngineParams.Slurm())

    @model_validator(mode="after")
    def _slurm_needs_a_partition(self) -> DataEngineParams:
        if self.executor == "slurm" and not self.slurm.partition:
            raise ValueError("executor slurm needs slurm.partition")
        return self


class Params(Section):
    seed: int = Field(1337, ge=0)
    # Processes for the data stages (null: every core). No stage lists it in dvc.yaml: the outputs
    # are the same bytes whatever it is, so changing it reruns nothing.
    workers: int | None = Field(None, ge=1)
    data_engine: DataEngineParams = Field(default_factory=lambda: DataEngineParams())
    datasets: list[Literal["corpus", "task"]] = list(DATASETS)
    sources: dict[Literal["corpus", "task"], Source]
    clean: dict[Literal["corpus", "task"], CleanParams]
    split: dict[Literal["corpus", "task"], SplitParams]
    tokenize: TokenizeParams = TokenizeParams()
    pretrain: PretrainParams = PretrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    tune: TuneParams = TuneParams()
    finetune: FinetuneParams = FinetuneParams()
    # "register" would shadow BaseModel.register (from ABCMeta): the attribute is register_.
    register_: RegisterParams = Field(RegisterParams(), alias="register")

    @model_validator(mode="after")
    def _every_dataset_configured(self) -> Params:
        for name in self.datasets:
            for section in ("sources", "clean", "split"):
                if name not in getattr(self, section):
                    raise ValueError(f"dataset {name!r} has no entry under {section}")
        return self


def _dotted(location: tuple) -> str:
    # pydantic puts the discriminator tag in the location (clean.task.labelled.max_chars): drop it.
    parts = [str(p) for p in location if p not in ("documents", "labelled")]
    return ".".join(parts) or "(top level)"


def validate_params(raw: object, source: str = "params") -> Params:
    """Validate a parsed params mapping; raise ConfigError naming each bad key path (and, for a
    knob's old name, its new one). `source` names the file in that message."""
    if not isinstance(raw, dict):
        raise ConfigError(f"params must be a mapping at the top level, got {type(raw).__name__}")
    reject_renamed_keys(raw, source)
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        lines = [f"  {_dotted(e['loc'])}: {e['msg']}" for e in err.errors()]
        raise ConfigError("invalid params:\n" + "\n".join(lines)) from None


def load_params(path: Path | str = DEFAULT_PARAMS) -> Params:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path} not found: run from the project root or pass --params")
    return validate_params(parse_yaml(path.read_text(), str(path)), str(path))


def parse_yaml(text: str, source: str) -> object:
    """yaml.safe_load with YAML 1.2 scalars (see _UniqueKeyLoader), except that a key written
    twice in one mapping is a ConfigError: PyYAML would keep the last one and silently drop the
    first (two `pretrain:` sections, say)."""
    stream = io.StringIO(text)
    stream.name = source  # PyYAML's error marks name the stream: `in "params.yaml", line 3`
    try:
        return yaml.load(stream, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source} is not valid YAML: {err}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's scalars, as DVC reads params.yaml and writes it back
    after `dvc exp run -S`. YAML 1.1 would read an unquoted 4:00:00 (a Slurm time DVC leaves
    unquoted) as the number 14400, and yes / no / on / off as booleans."""


_YAML_1_2_SCALARS = {
    "tag:yaml.org,2002:bool": (r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    "tag:yaml.org,2002:int": (r"^(?:[-+]?[0-9]+|0x[0-9a-fA-F]+)$", "-+0123456789"),
    "tag:yaml.org,2002:float": (r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                                r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$", "-+0123456789."),
}
_UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag not in _YAML_1_2_SCALARS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _tag, (_pattern, _first) in _YAML_1_2_SCALARS.items():
    _UniqueKeyLoader.add_implicit_resolver(_tag, re.compile(_pattern), list(_first))


def _unique_key_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may be overridden, by design
            continue
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, Hashable):
            continue  # construct_mapping reports it
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice in one mapping",
                                                    key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_key_mapping)


def parse_override(text: str) -> tuple[str, object]:
    """`dotted.key=value` -> (dotted key, value read as YAML: 3 is an int, true a bool, [a, b] a list)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must read dotted.key=value")
    return key.strip(), parse_yaml(value, f"override {text!r}")


def apply_overrides(tree: dict, overrides: list[str], *, where: str = "params") -> dict:
    """Set each `dotted.key=value` in a parsed params mapping (in place, and returned). Only keys
    that already exist can be set, so a typo is an error, not a new knob nobody reads; a knob's
    old name, in the tree or an override, is an error naming its new one."""
    reject_renamed_keys(tree, where)
    for text in overrides:
        dotted, value = parse_override(text)
        if hint := renamed_key_hint(dotted):
            raise ConfigError(f"override {text!r}: {hint}")
        node = tree
        *parents, leaf = dotted.split(".")
        for key in parents:
            if not isinstance(node, dict) or key not in node:
                raise ConfigError(f"override {text!r}: {where} has no section {key!r}")
            node = node[key]
        if not isinstance(node, dict) or leaf not in node:
            raise ConfigError(f"override {text!r}: {where} has no key {dotted!r}")
        node[leaf] = value
    return tree


def merge_overlay(base: dict, overlay: dict, *, where: str = "params", schema: type[BaseModel] | None = None) -> dict:
    """`base` with `overlay` merged over it, key by key (neither is changed): a mapping in both is
    merged, any other overlay value replaces the base's (a null section such as near_dedup takes
    the overlay's mapping whole, a list is replaced, not extended).

    A key the base lacks is a ConfigError naming its dotted path, so a typo in an overlay fails
    here instead of adding a knob nobody reads; unless `schema` (default: Params, the whole file)
    has a place for it: a field that the base leaves to its default (finetune.pad_multiple), or a
    new key of a free-form mapping (tune.space, data_engine.slurm.sbatch_args). Validate the
    result (validate_params): the merge checks key paths, not values. A knob's old name in the
    overlay is an error naming its new one."""
    reject_renamed_keys(overlay, "overlay")
    return _merge(copy.deepcopy(base), overlay, (), where, schema or Params)


def _merge(base: dict, overlay: dict, path: tuple[str, ...], where: str, schema: type[BaseModel]) -> dict:
    if not isinstance(overlay, dict):
        raise ConfigError(f"overlay{' ' + '.'.join(path) if path else ''}: expected a mapping, got {type(overlay).__name__}")
    for key, value in overlay.items():
        dotted = (*path, str(key))
        if key not in base and not _schema_has(schema, dotted):
            raise ConfigError(f"overlay key {'.'.join(dotted)!r}: {where} has no such key")
        if isinstance(base.get(key), dict) and isinstance(value, dict):
            _merge(base[key], value, dotted, where, schema)
        else:
            base[key] = copy.deepcopy(value)
    return base


def _schema_has(schema: type[BaseModel], dotted: tuple[str, ...]) -> bool:
    """Whether some reading of the schema has a place at this key path: a field of a section
    (by its YAML name), or any key of a free-form mapping (its key type is checked on validation)."""
    places: list = [schema]
    for key in dotted:
        places = [inner for place in places for option in _options(place) for inner in _children(option, key)]
        if not places:
            return False
    return True


def _options(annotation) -> list:
    """The types a value of this annotation may take: Annotated, Optional and unions unwrapped."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _options(get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        return [option for arg in get_args(annotation) for option in _options(arg)]
    return [annotation]


def _children(option, key: str) -> list:
    """The annotations found under `key` in a value of type `option` (none if it holds no such key)."""
    if isinstance(option, type) and issubclass(option, BaseModel):
        return [field.annotation for name, field in option.model_fields.items() if (field.alias or name) == key]
    if get_origin(option) is dict:
        return [get_args(option)[1]]
    return []
