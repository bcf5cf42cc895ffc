"""The shape of the library: lmforge/ knows no pipeline (dvc.yaml and tasks/ own paths and stage
names), and its functions stay short enough to read in one screen."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = sorted((ROOT / "lmforge").rglob("*.py"))
MAX_FUNCTION_LINES = 80
PIPELINE_PATH = re.compile(r"(?<![\w./])(data|models|reports)/|dvc\.(lock|yaml)")


def _strings(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node


def test_the_library_names_no_pipeline_path():
    found = [f"{path.relative_to(ROOT)}:{node.lineno}: {node.value.strip()[:80]!r}"
             for path in LIBRARY for node in _strings(ast.parse(path.read_text()))
             if PIPELINE_PATH.search(node.value)]
    assert not found, "pipeline paths belong to dvc.yaml and tasks/:\n" + "\n".join(found)


def test_the_library_names_no_stage():
    stages = set(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    # lmforge/config/ is the schema of params.yaml, whose sections are named as the stages that read them.
    mentions = re.compile(r"\b(" + "|".join(sorted(stages)) + r") stage\b|dvc repro")
    found = [f"{path.relative_to(ROOT)}:{node.lineno}: {node.value.strip()[:80]!r}"
             for path in LIBRARY if "config" not in path.relative_to(ROOT / "lmforge").parts[:1]
             for node in _strings(ast.parse(path.read_text()))
             if node.value in stages or mentions.search(node.value)]
    assert not found, "stage names belong to dvc.yaml and tasks/:\n" + "\n".join(found)


def test_no_library_function_is_longer_than_a_screen():
    long = [f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines"
            for path in LIBRARY for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, "split these into functions with one job each:\n" + "\n".join(long)


# --- each stage's paths, written once: tasks/layout.py ------------------------------------------

TASKS = sorted((ROOT / "tasks").glob("*.py"))
PIPELINE_FILE = re.compile(r"(?<![\w./])(data|models|reports)/|^params\.yaml$")


def _layout():
    from tasks import layout

    return layout


def _layout_paths() -> dict[str, str]:
    """Each Path constant of tasks/layout.py by name, as dvc.yaml writes it."""
    return {name: value.as_posix() for name, value in vars(_layout()).items()
            if name.isupper() and isinstance(value, Path)}


def _docstrings(tree: ast.AST) -> set[int]:
    return {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}


def _from_layout(tree: ast.AST) -> set[str]:
    """The names a task module imports with `from tasks.layout import ...`."""
    return {alias.asname or alias.name for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module == "tasks.layout" for alias in node.names}


def _is_layout_constant(node: ast.AST, imported: set[str]) -> bool:
    """`layout.NAME`, or NAME imported from tasks.layout, or either under str(...)."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "str" and len(node.args) == 1:
        node = node.args[0]
    names = _layout_paths()
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "layout":
        return node.attr in names
    return isinstance(node, ast.Name) and node.id in imported and node.id in names


def _path_defaults(tree: ast.AST):
    """(option, default node) of every add_argument whose default may be a path: a string, a name
    or an expression, not a number, a bool, None, a list or argparse.SUPPRESS."""
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument"):
            continue
        default = next((k.value for k in node.keywords if k.arg == "default"), None)
        if default is None or isinstance(default, (ast.List, ast.Dict, ast.Tuple)):
            continue
        if isinstance(default, ast.Constant) and not isinstance(default.value, str):
            continue
        if isinstance(default, ast.Attribute) and isinstance(default.value, ast.Name) and default.value.id == "argparse":
            continue
        option = node.args[0].value if node.args and isinstance(node.args[0], ast.Constant) else "?"
        yield option, default


def test_every_path_default_of_a_task_module_is_a_layout_constant():
    found = []
    for path in TASKS:
        tree = ast.parse(path.read_text())
        imported = _from_layout(tree)
        found += [f"{path.relative_to(ROOT)}:{default.lineno} {option} default={ast.unparse(default)}"
                  for option, default in _path_defaults(tree) if not _is_layout_constant(default, imported)]
    assert not found, "argparse path defaults come from tasks/layout.py (layout.X or str(layout.X)):\n" + "\n".join(found)


def test_no_task_module_but_layout_writes_a_pipeline_path():
    found = []
    for path in TASKS:
        if path.name == "layout.py":
            continue
        tree = ast.parse(path.read_text())
        docs = _docstrings(tree)
        found += [f"{path.relative_to(ROOT)}:{node.lineno}: {node.value.strip()[:80]!r}"
                  for node in _strings(tree) if id(node) not in docs and PIPELINE_FILE.search(node.value)]
    assert not found, "a stage's paths are written once, in tasks/layout.py:\n" + "\n".join(found)


def _dvc_paths(stage: dict) -> list[str]:
    body = stage.get("do", stage)
    entries = [*(body.get("deps") or []), *(body.get("outs") or []), *(body.get("metrics") or []),
               *(body.get("plots") or [])]
    return [entry if isinstance(entry, str) else next(iter(entry)) for entry in entries]


def test_dvc_yaml_data_and_model_paths_are_layout_constants():
    """dvc.yaml must write its paths as YAML; each data and models path there is a constant of
    tasks/layout.py (CONSTANT/${item} in a foreach stage), each reports path one or a file in one."""
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    folders = set(_layout_paths().values())
    reports = folders - {_layout().REPORTS.as_posix()}
    plotted = [path for chart in pipeline.get("plots", []) for spec in chart.values() for path in spec.get("y", {})]
    found = []
    for name, stage in [*pipeline["stages"].items(), ("plots", {"deps": plotted})]:
        for path in _dvc_paths(stage):
            base = path.removesuffix("/${item}").removesuffix("/${item}.json")
            if path.startswith(("data/", "models/")) and base not in folders:
                found.append(f"{name}: {path}")
            if path.startswith("reports/") and not any(base == f or base.startswith(f + "/") for f in reports):
                found.append(f"{name}: {path}")
    assert not found, "dvc.yaml paths that tasks/layout.py does not name:\n" + "\n".join(found)


def test_each_stage_argparse_defaults_are_its_own_deps_and_outs():
    """A stage module's default paths (its `_args([])`) are deps or outs of its dvc.yaml stage, or
    folders holding them: the stage reads and writes what DVC tracks for it."""
    import importlib

    from tests.test_dvc_deps import STAGE_MODULE, covers, dvc_stages

    found = []
    for name, stage in dvc_stages().items():
        module = importlib.import_module(STAGE_MODULE.search(stage["cmd"]).group(1))
        if not hasattr(module, "_args"):
            continue  # a data stage: only --params (tasks/_common.py:stage_args)
        tracked = stage["deps"] + stage["outs"]
        for option, value in vars(module._args([])).items():
            if isinstance(value, str) and value.startswith(("data/", "models/", "reports/")) \
                    and not any(covers(value, path) for path in tracked):
                found.append(f"{name}: --{option} {value}")
    assert not found, "argparse defaults that dvc.yaml does not track for the stage:\n" + "\n".join(found)
