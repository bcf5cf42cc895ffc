"""Edit one section's schema, rerun the stages that read that section: checked with DVC itself.

A copy of the project's code, dvc.yaml and params.yaml, with every stage's outputs stood in by
placeholders and committed (`dvc commit`), is up to date; then a comment is added to one section's
module and `dvc status` must name exactly the stages whose `params:` read that section.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import ROOT, run
from tests.test_dvc_deps import SECTION_MODULES, STAGES, sections_read


@pytest.fixture(scope="module")
def committed(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("status")
    for folder in ("lmforge", "tasks"):
        shutil.copytree(ROOT / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, root / name)
    for stage in STAGES.values():  # placeholders where the stages would write
        for out in stage["outs"]:
            path = root / out
            if path.suffix:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("{}\n" if path.suffix == ".json" else "placeholder\n")
            else:
                path.mkdir(parents=True, exist_ok=True)
                (path / "placeholder").write_text(out)
    run(["git", "init", "-q"], root)
    run(["dvc", "init", "-q"], root)
    run(["dvc", "config", "core.analytics", "false"], root)
    run(["dvc", "commit", "-f", "-q"], root)
    assert changed_stages(root) == set()
    return root


def changed_stages(root: Path) -> set[str]:
    status = json.loads(run(["dvc", "status", "--json"], root).stdout or "{}")
    return {name.rpartition(":")[2] for name in status}


@pytest.mark.parametrize("section", sorted(SECTION_MODULES))
def test_a_comment_in_a_section_module_reruns_only_the_stages_that_read_it(committed, section):
    module = committed / SECTION_MODULES[section]
    original = module.read_text()
    module.write_text(original + "# a comment, and nothing else\n")
    try:
        changed = changed_stages(committed)
    finally:
        module.write_text(original)
    expected = {name for name, stage in STAGES.items() if section in sections_read(stage)}
    assert changed == expected
    if section == "finetune":  # the issue's own example
        assert changed == {"tune", "finetune", "register"}
    if section == "pretrain":
        assert changed == {"pretrain", "register"}
