"""The core library's layers import downwards only: base < data < training < evaluation < registry < serve.

A module may import its own layer and those below it. An import that runs back up (a training
module importing evaluation, say) ties a lower stage's code to a higher one's, so an edit made
for evaluation reruns training (tests/test_dvc_deps.py) and the layers stop meaning anything.
"""

from __future__ import annotations

import pytest

from tests.test_dvc_deps import ROOT, imported_modules

LAYERS = ("base", "data", "training", "evaluation", "registry", "serve")
# lmforge/*.py and lmforge/config/ are the base, except the old pyfunc import path kept for
# versions registered before lmforge/registry/ existed (it re-exports registry.serving).
COMPAT_SHIMS = {"lmforge/serving.py": "registry"}


def layer_of(path: str) -> str:
    if path in COMPAT_SHIMS:
        return COMPAT_SHIMS[path]
    parts = path.split("/")
    return parts[1] if len(parts) > 2 and parts[1] in LAYERS else "base"


def layer_of_module(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] != "lmforge":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "base"


MODULES = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "lmforge").rglob("*.py"))


@pytest.mark.parametrize("path", MODULES)
def test_no_import_runs_back_up_the_layers(path):
    own = LAYERS.index(layer_of(path))
    upward = sorted(name for name in imported_modules(ROOT / path)
                    if (layer := layer_of_module(name)) is not None and LAYERS.index(layer) > own)
    assert not upward, f"{path} ({layer_of(path)}) imports from a layer above it: {', '.join(upward)}"


@pytest.mark.parametrize("stage", ["tasks.pretrain", "tasks.evaluate"])
def test_the_stages_that_read_tokens_import_neither_the_data_engine_nor_the_tokenizer_trainer(stage):
    """They read token shards through lmforge/data/token_shards.py: an edit to the engine, the
    tokenizer trainer or the tokenize section reruns tokenize, not training."""
    from tests.test_dvc_deps import import_closure

    closure = {p.relative_to(ROOT).as_posix() for p in import_closure(stage)}
    assert "lmforge/data/token_shards.py" in closure
    assert not closure & {"lmforge/data/engine.py", "lmforge/data/tokenization.py", "lmforge/config/tokenize.py"}
