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
    # config.py is the schema of params.yaml, whose sections are named as the stages that read them.
    mentions = re.compile(r"\b(" + "|".join(sorted(stages)) + r") stage\b|dvc repro")
    found = [f"{path.relative_to(ROOT)}:{node.lineno}: {node.value.strip()[:80]!r}"
             for path in LIBRARY if path.name != "config.py"
             for node in _strings(ast.parse(path.read_text()))
             if node.value in stages or mentions.search(node.value)]
    assert not found, "stage names belong to dvc.yaml and tasks/:\n" + "\n".join(found)


def test_no_library_function_is_longer_than_a_screen():
    long = [f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines"
            for path in LIBRARY for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, "split these into functions with one job each:\n" + "\n".join(long)
