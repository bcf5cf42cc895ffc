"""The schema of params.yaml, one module per section, validated once, at the edge.

    lmforge/config/__init__.py   this base: Section, ConfigError, the YAML reader, load_params
    lmforge/config/<section>.py  one section's schema (sources, clean, split, tokenize, pretrain,
                                 evaluate, tune, finetune, register, data_engine)
    lmforge/config/whole.py      Params: the whole file, every section
    lmforge/config/overrides.py  `-S key=value` overrides and overlays merged over a params tree

Every stage calls `load_params()` before doing any work, and it validates the whole file: an
unknown key, a wrong type or an out-of-range value anywhere raises `ConfigError` naming the dotted
key path (`clean.task.max_chars`) and the reason, so a typo never silently falls back to a default.

The sections live apart so that DVC reruns what an edit touches and nothing else: a section's
module is a code dependency of exactly the stages whose `params:` name that section
(tests/test_dvc_deps.py). That is why this base imports no section and load_params finds the
whole-file schema by name: checking the other sections' values is a gate before the work, not an
input to it, and an edit to their schema must not rerun this stage.
"""

from __future__ import annotations

import importlib
import io
import re
from collections.abc import Hashable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import PydanticCustomError

from lmforge.errors import UserError

if TYPE_CHECKING:
    from lmforge.config.whole import Params

DEFAULT_PARAMS = Path("params.yaml")
DATASETS = ("corpus", "task")
WHOLE_FILE_SCHEMA = "lmforge.config.whole"  # imported by name: see the module's doc


class ConfigError(UserError, ValueError):
    """params.yaml is invalid; the message names every offending key path."""


class Section(BaseModel):
    # extra="forbid": a misspelt key is an error, not a silently ignored knob.
    model_config = ConfigDict(extra="forbid", frozen=True)


Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]

# The lm-evaluation-harness tasks lmforge/evaluation/benchmarks.py has local documents for (its
# TASKS). Scored by evaluate (the pretrained model) and by sft (the base and the chat model).
BenchmarkName = Literal["hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "copa", "social_iqa",
                        "commonsense_qa"]


class Benchmark(Section):
    """One harness task: the first `limit` documents of the split the harness scores (null: all of
    them), each after `num_fewshot` solved examples (0: zero-shot, as most published figures)."""

    name: BenchmarkName
    limit: int | None = Field(None, ge=1)
    num_fewshot: int = Field(0, ge=0)


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


def refuse_renamed_knobs(data: object, section: str) -> object:
    """A section validated on its own (a trial's or best.yaml's finetune overrides) gets the hint too."""
    hints = _renamed_hints(data, (section,))
    if hints:
        raise PydanticCustomError("renamed_key", "{hints}", {"hints": "; ".join(hints)})
    return data


def whole_file_schema() -> type[BaseModel]:
    """Params, the schema of the whole file (every section's module loads with it)."""
    return importlib.import_module(WHOLE_FILE_SCHEMA).Params


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
        return whole_file_schema().model_validate(raw)
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


