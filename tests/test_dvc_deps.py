"""dvc.yaml's deps cover the code each stage runs.

DVC reruns a stage only when one of its deps changed, and the deps are written by hand: a module
a stage imports but does not list is an edit DVC never sees, and the cached result goes stale
silently. This test follows each stage's imports from its `python -m tasks.<name>` module through
every project file (lmforge/, tasks/, flows/; imports inside functions too, package __init__.py
files included) and fails naming each file that no dep covers (a dep covers a file it equals or
a folder that holds it). It also fails on a listed dep that does not exist, unless another stage
writes it.

The schema of params.yaml has one module per section (lmforge/config/<section>.py). A section's
module is a dep of exactly the stages whose `params:` name that section: an edit to the
finetune knobs reruns tune, finetune and register, not ingest. Every stage validates the whole
file through lmforge/config/whole.py, imported by name, which is a gate before the work and no
input to it, so neither it nor the other sections' modules are deps.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("lmforge", "tasks", "flows")
STAGE_MODULE = re.compile(r"\bpython3? -m ((?:tasks)(?:\.\w+)+)")


# --- dvc.yaml -----------------------------------------------------------------------------------


def _substitute(text: str, variables: dict) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: str(variables[m.group(1)]), text)


def _paths(entries: list) -> list[str]:
    """A deps or outs list's paths (an entry is a path, or a one-key mapping path -> options)."""
    return [entry if isinstance(entry, str) else next(iter(entry)) for entry in entries or []]


def _params(entries: list) -> list[str]:
    """A params list's keys (an entry is a key of params.yaml, or a mapping file -> keys)."""
    keys = []
    for entry in entries or []:
        keys.extend([entry] if isinstance(entry, str) else [k for listed in entry.values() for k in listed])
    return keys


def dvc_stages() -> dict[str, dict]:
    """Stage name -> {"cmd", "deps", "outs"}, with each `foreach` stage expanded per item."""
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    stages = {}
    for name, stage in pipeline["stages"].items():
        if "foreach" not in stage:
            stages[name] = {"cmd": stage["cmd"], "deps": _paths(stage.get("deps")), "params": _params(stage.get("params")),
                            "outs": _paths(stage.get("outs")) + _paths(stage.get("metrics")) + _paths(stage.get("plots"))}
            continue
        items = stage["foreach"]
        if isinstance(items, str):  # ${datasets}: a list from params.yaml
            items = params[items.strip("${}")]
        body = stage["do"]
        for item in items:
            def fill(text, item=item):
                return _substitute(text, {"item": item})

            stages[f"{name}@{item}"] = {
                "cmd": fill(body["cmd"]),
                "deps": [fill(p) for p in _paths(body.get("deps"))],
                "params": [fill(p) for p in _params(body.get("params"))],
                "outs": [fill(p) for p in _paths(body.get("outs")) + _paths(body.get("metrics"))
                         + _paths(body.get("plots"))],
            }
    return stages


# --- the import closure -------------------------------------------------------------------------


def module_file(module: str) -> Path | None:
    """The project file of a dotted module name (a module or a package's __init__.py), or None."""
    if module.split(".")[0] not in PROJECT_PACKAGES:
        return None
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def files_of(module: str) -> list[Path]:
    """The module's file and the __init__.py of every package above it (Python runs them all)."""
    parts = module.split(".")
    found = [module_file(".".join(parts[:i])) for i in range(1, len(parts) + 1)]
    return [f for f in found if f is not None]


def _package_of(path: Path) -> list[str]:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return parts if path.name == "__init__.py" and parts.pop() else parts[:-1]


def _runtime_nodes(tree: ast.AST):
    """Every node of the file except those under `if TYPE_CHECKING:`, imports that never run."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for branch in node.orelse:
                yield branch
                yield from _runtime_nodes(branch)
            continue
        yield node
        yield from _runtime_nodes(node)


def imported_modules(path: Path) -> set[str]:
    """Every module name an import statement anywhere in the file may load (not those for type
    checkers only), `from pkg import mod` read as pkg.mod where that is a module of its own."""
    names: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the file's package, one level up per extra dot
                package = _package_of(path)
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([node.module] if node.module else []))
            else:
                base = node.module
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names if module_file(f"{base}.{alias.name}"))
    return names


def import_closure(module: str) -> set[Path]:
    """The project files that running `python -m <module>` can import."""
    seen: set[Path] = set()
    pending = files_of(module)
    while pending:
        path = pending.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_modules(path):
            pending.extend(files_of(name))
    return seen


def covers(dep: str, path: str) -> bool:
    dep = dep.rstrip("/")
    return path == dep or path.startswith(dep + "/")


STAGES = dvc_stages()


@pytest.mark.parametrize("name", sorted(STAGES))
def test_deps_cover_every_project_file_the_stage_imports(name):
    stage = STAGES[name]
    found = STAGE_MODULE.search(stage["cmd"])
    assert found, f"stage {name}: its cmd {stage['cmd']!r} runs no `python -m tasks.<name>` module"
    module = found.group(1)
    assert module_file(module), f"stage {name}: {module} is no module of this project"
    imported = sorted(p.relative_to(ROOT).as_posix() for p in import_closure(module))
    missing = [path for path in imported if not any(covers(dep, path) for dep in stage["deps"])]
    assert not missing, (f"stage {name} imports these project files, but dvc.yaml's deps of {name} do not "
                         f"list them (nor a folder that holds them): " + ", ".join(missing))


CONFIG = ROOT / "lmforge/config"
SECTION_MODULES = {p.stem: p.relative_to(ROOT).as_posix() for p in CONFIG.glob("*.py")
                   if p.stem not in ("__init__", "whole", "overrides")}


def sections_read(stage: dict) -> set[str]:
    """The sections of params.yaml a stage's `params:` name (`clean.${item}` -> clean); top-level
    scalars such as seed have no module of their own."""
    return {key.split(".")[0] for key in stage["params"]} & set(SECTION_MODULES)


def test_every_section_has_its_module():
    sections = set(yaml.safe_load((ROOT / "params.yaml").read_text())) - {"seed", "workers", "datasets"}
    assert sections == set(SECTION_MODULES), "one module per section of params.yaml under lmforge/config/"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_a_section_module_is_a_dep_of_exactly_the_stages_that_read_the_section(name):
    stage = STAGES[name]
    listed = {dep for dep in stage["deps"] if dep in SECTION_MODULES.values()}
    expected = {SECTION_MODULES[section] for section in sections_read(stage)}
    assert listed == expected, (f"stage {name} reads params sections {sorted(sections_read(stage))}: its deps must list "
                                f"{sorted(expected)} and no other section module; they list {sorted(listed)}")


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_code_dep_is_code_the_stage_runs(name):
    """A listed source file the stage never imports reruns it for nothing when that file changes
    (a section's module is code the stage runs when it reads that section: see the test above)."""
    stage = STAGES[name]
    module = STAGE_MODULE.search(stage["cmd"]).group(1)
    imported = {p.relative_to(ROOT).as_posix() for p in import_closure(module)}
    stale = [dep for dep in stage["deps"]
             if dep.endswith(".py") and dep not in imported and dep not in SECTION_MODULES.values()]
    assert not stale, f"stage {name} lists code it does not import: {', '.join(stale)}"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_dep_exists_or_is_written_by_a_stage(name):
    written = {out.rstrip("/") for stage in STAGES.values() for out in stage["outs"]}
    absent = [dep for dep in STAGES[name]["deps"] if not (ROOT / dep).exists() and dep.rstrip("/") not in written]
    assert not absent, f"stage {name} lists deps that do not exist and no stage writes: {', '.join(absent)}"


def test_the_closure_follows_imports_inside_functions_and_from_package_imports():
    """The walker itself, on what it must not miss: tasks/tune.py imports its library modules inside
    a function, and `from lmforge.registry import tracking` names a module, not a symbol."""
    closure = {p.relative_to(ROOT).as_posix() for p in import_closure("tasks.tune")}
    assert {"lmforge/training/tuning.py", "lmforge/registry/tracking.py", "lmforge/__init__.py",
            "lmforge/training/__init__.py", "tasks/__init__.py", "tasks/_common.py"} <= closure
    assert not any(p.startswith(("tests/", ".venv/")) for p in closure)
