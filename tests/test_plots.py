"""dvc.yaml's charts through real `dvc plots diff` in a temp git + DVC project.

The charts are the project's own (the top-level `plots:` of dvc.yaml, loaded, not copied), and
the files they read are written by the stages' own report writers, so a chart whose file,
column or template drifts from what the stages write fails here.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tests.conftest import ROOT, make_tar, run
from tests.test_dvc_deps import dvc_stages

LABELS = ["negative", "neutral", "positive"]
# Two experiments' test confusion matrices (rows: actual, columns: predicted, in LABELS order).
BEFORE = [[5, 2, 1], [1, 4, 3], [0, 2, 6]]
AFTER = [[7, 1, 0], [0, 7, 1], [0, 1, 7]]


def project_charts() -> dict[str, dict]:
    """dvc.yaml's top-level plots, chart id -> definition (each is a data chart with an id)."""
    entries = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    return {name: definition for entry in entries for name, definition in entry.items()}


def charted_files() -> set[str]:
    return {path for definition in project_charts().values() for path in definition["y"]}


def test_every_chart_reads_a_file_a_stage_writes():
    outputs = {path for stage in dvc_stages().values() for path in stage["outs"]}
    assert charted_files() and charted_files() <= outputs, charted_files() - outputs
    assert project_charts()["finetune_confusion"]["template"] == "confusion"


def rows_of(matrix: list[list[int]]) -> list[tuple[str, str]]:
    """(actual, predicted) pairs, as many of each as the matrix counts."""
    return [(actual, predicted) for actual, row in zip(LABELS, matrix)
            for predicted, count in zip(LABELS, row) for _ in range(count)]


# --- one experiment's reports, written by the stages' writers ----------------------------------


def write_pretrain(repo: Path, offset: float) -> None:
    from lmforge.training.pretraining import write_reports

    train = [{"step": s, "train_loss": 6.0 - s / 100 + offset} for s in range(10, 101, 10)]
    val = [{"step": s, "train_loss": 6.0 - s / 100 + offset, "val_loss": 6.2 - s / 100 + offset} for s in (50, 100)]
    write_reports(SimpleNamespace(history={"train": train, "val": val}), repo / "reports/pretrain", {"steps": 100})


def write_finetune(repo: Path, matrix: list[list[int]], accuracy: float) -> None:
    from tasks.finetune import write_history, write_predictions

    reports = repo / "reports/finetune"
    reports.mkdir(parents=True, exist_ok=True)
    history = [{"epoch": e, "step": 10 * e, "train_loss": 1.0 / e, "val_accuracy": accuracy + e / 100,
                "val_macro_f1": accuracy + e / 200, "train_seconds": 1.0, "train_samples": 24} for e in (1, 2)]
    write_history(reports / "history.csv", history)
    write_predictions(reports / "predictions.csv", rows_of(matrix))


def write_sft(repo: Path, offset: float) -> None:
    from tasks.sft import write_history

    history = [{"step": 10 * e, "epoch": 1, "train_loss": 3.0 - e / 10 + offset, "val_loss": 3.1 - e / 10 + offset,
                "lr": 1e-4, "tokens": 1000 * e} for e in (1, 2, 3)]
    (repo / "reports/sft").mkdir(parents=True, exist_ok=True)
    write_history(repo / "reports/sft/history.csv", history)


def write_tune(repo: Path, values: list[float]) -> None:
    import optuna

    from lmforge.training.tuning import TRIALS_FILE, _write_trials_table

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    for value in values:
        study.enqueue_trial({"learning_rate": value / 1000})
        study.optimize(lambda trial, v=value: trial.suggest_float("learning_rate", 1e-5, 1e-2) * 0 + v, n_trials=1)
    pruned = study.ask({"learning_rate": optuna.distributions.FloatDistribution(1e-5, 1e-2)})
    study.tell(pruned, state=optuna.trial.TrialState.PRUNED)  # a trial with no value: a gap, not a zero
    (repo / "reports/tune").mkdir(parents=True, exist_ok=True)
    _write_trials_table(study, repo / "reports/tune" / TRIALS_FILE)


@pytest.fixture(scope="module")
def two_experiments(tmp_path_factory) -> Path:
    """A git + DVC project with the project's charts and two commits of every charted file."""
    repo = tmp_path_factory.mktemp("plots")
    run(["git", "init", "-q"], repo)
    run(["dvc", "init", "-q"], repo)
    run(["dvc", "config", "core.analytics", "false"], repo)
    charts = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"plots": charts}, sort_keys=False))
    for offset, matrix, accuracy, trials in ((0.5, BEFORE, 0.6, [0.55, 0.6]), (0.0, AFTER, 0.8, [0.7, 0.8, 0.75])):
        write_pretrain(repo, offset)
        write_finetune(repo, matrix, accuracy)
        write_tune(repo, trials)
        write_sft(repo, offset)
        run(["git", "add", "-A"], repo)
        run(["git", "commit", "-q", "-m", f"experiment at accuracy {accuracy}"], repo)
    return repo


def diff_charts(repo: Path) -> dict[str, dict]:
    """`dvc plots diff HEAD~1 HEAD --json`: chart id -> its one rendered Vega-Lite chart."""
    result = run(["dvc", "plots", "diff", "HEAD~1", "HEAD", "--json"], repo)
    payload = json.loads(result.stdout)
    assert not payload.get("errors"), payload["errors"]
    charts = {}
    for name, rendered in payload["data"].items():
        assert len(rendered) == 1, f"{name} renders as {len(rendered)} charts, not one"
        assert set(rendered[0]["revisions"]) == {"HEAD~1", "HEAD"}, name
        charts[name] = rendered[0]["content"]
    return charts


def series(content: dict) -> Counter:
    """(revision, line) -> points, for a line chart's data; a line is named by the field DVC dashes
    lines by ("file::column" across files, "column" within one; absent for a single line)."""
    dashed_by = content["encoding"].get("strokeDash", {}).get("field")
    return Counter((point["rev"], point.get(dashed_by, "")) for point in content["data"]["values"])


def test_plots_diff_overlays_two_experiments(two_experiments: Path):
    charts = diff_charts(two_experiments)
    assert set(charts) == set(project_charts())

    # Train and val loss in one chart, for both experiments.
    assert series(charts["pretrain_loss"]) == {
        (rev, name): n for rev in ("HEAD~1", "HEAD")
        for name, n in (("train_loss.csv::train_loss", 10), ("loss.csv::val_loss", 2))}
    assert series(charts["finetune_val"]) == {
        (rev, column): 2 for rev in ("HEAD~1", "HEAD") for column in ("val_accuracy", "val_macro_f1")}
    assert series(charts["finetune_loss"]) == {(rev, ""): 2 for rev in ("HEAD~1", "HEAD")}
    assert {p["train_loss"] for p in charts["finetune_loss"]["data"]["values"]} == {"1.0", "0.5"}
    assert series(charts["sft_loss"]) == {(rev, column): 3 for rev in ("HEAD~1", "HEAD")
                                          for column in ("train_loss", "val_loss")}

    # The confusion template: one cell count per (actual, predicted), one panel per experiment.
    confusion = charts["finetune_confusion"]
    assert confusion["facet"]["column"]["field"] == "rev"
    assert confusion["spec"]["encoding"]["x"]["field"] == "actual"
    assert confusion["spec"]["encoding"]["y"]["field"] == "predicted"
    cells = Counter((p["rev"], p["actual"], p["predicted"]) for p in confusion["data"]["values"])
    for rev, matrix in (("HEAD~1", BEFORE), ("HEAD", AFTER)):
        assert [[cells[(rev, a, p)] for p in LABELS] for a in LABELS] == matrix, rev

    # Tune's trials: the pruned trial carries no value (Vega leaves a gap), the others theirs.
    values = {rev: [p["value"] for p in charts["tune_trials"]["data"]["values"] if p["rev"] == rev]
              for rev in ("HEAD~1", "HEAD")}
    assert values == {"HEAD~1": ["0.55", "0.6", ""], "HEAD": ["0.7", "0.8", "0.75", ""]}


def test_plots_show_writes_one_html_page_with_every_chart(two_experiments: Path):
    out = two_experiments / "dvc_plots"
    run(["dvc", "plots", "show", "-o", str(out)], two_experiments)
    page = (out / "index.html").read_text()
    for name, definition in project_charts().items():
        assert definition["title"] in page, name
    rows = list(csv.DictReader((two_experiments / "reports/finetune/predictions.csv").open()))
    assert len(rows) == sum(map(sum, AFTER)) and set(rows[0]) == {"actual", "predicted"}


# --- `make plots`: the same page, drawn offline (tasks/plots.py, #39) ---------------------------

VEGA_CHART = re.compile(r"vegaEmbed\('#([\w-]+)'")
MARKS = re.compile(r"<(?:canvas|svg)\b[^>]*\bclass=\"marks\"")  # what vega draws into (not the menu's icon)
NO_BROWSER = "LMFORGE_NO_BROWSER"


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.environ.get(NO_BROWSER) == "1":
        pytest.skip(f"{NO_BROWSER}=1: the charts are not drawn in a browser here")
    pytest.fail("the offline-chart tests draw the page in Debian's Chromium: apt-get install -y chromium "
                f"(or set {NO_BROWSER}=1 to skip them)")


def drawn_offline(page: Path, scratch: Path) -> dict[str, int]:
    """Chart id -> how many vega drawings (canvas or svg marks) headless Chromium leaves in its div,
    for every vega chart of the page, with every host name unresolvable and a proxy to nowhere."""
    command = [chromium(), "--headless", "--disable-gpu", "--no-sandbox", f"--user-data-dir={scratch}",
               "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9", "--no-first-run",
               "--virtual-time-budget=10000", "--dump-dom", page.resolve().as_uri()]
    dom = subprocess.run(command, capture_output=True, text=True, timeout=180, check=True).stdout
    charts = VEGA_CHART.findall(page.read_text())
    starts = sorted((re.search(rf"<div id=\"{re.escape(chart)}\"", dom).start(), chart) for chart in charts)
    ends = [start for start, _ in starts[1:]] + [len(dom)]
    return {chart: len(MARKS.findall(dom[start:end])) for (start, chart), end in zip(starts, ends)}


@pytest.fixture(scope="module")
def offline_page(two_experiments: Path) -> Path:
    from tasks.plots import show

    return show(two_experiments, "offline_plots")


def test_the_offline_page_inlines_the_pinned_scripts_and_loads_nothing_from_outside(offline_page: Path):
    from tasks.plots import PINS, external_sources, pinned_scripts

    page = offline_page.read_text()
    assert external_sources(page) == []
    assert not re.search(r"<script\b[^>]*\bsrc=", page), "every script is inline"
    assert all(script in page for script in pinned_scripts()), [pin.name for pin in PINS]
    assert len(VEGA_CHART.findall(page)) == len(project_charts())


def test_every_chart_of_the_offline_page_is_drawn_without_network(offline_page: Path, tmp_path: Path):
    drawn = drawn_offline(offline_page, tmp_path)
    assert set(drawn) == set(project_charts())
    assert all(drawn.values()), f"charts left blank offline: {[c for c, n in drawn.items() if not n]}"


def test_dvc_s_own_page_draws_no_chart_offline(two_experiments: Path, tmp_path: Path):
    """The check above is the one #39 needed: DVC's CDN page passes nothing of it."""
    from tasks.plots import external_sources

    run(["dvc", "plots", "show", "-o", "cdn_plots"], two_experiments)
    page = two_experiments / "cdn_plots/index.html"
    assert external_sources(page.read_text())
    drawn = drawn_offline(page, tmp_path)
    assert set(drawn) == set(project_charts()) and not any(drawn.values()), drawn


def fake_pin(tmp_path: Path, script: bytes):
    from tasks.plots import NpmScript, integrity_of

    good = make_tar(tmp_path / "good.tgz", {"package/build/fake.min.js": script})
    return NpmScript("fake", "1.0.0", integrity_of(good), "package/build/fake.min.js"), good


def test_a_tarball_off_its_pin_is_refused_before_anything_reads_it(tmp_path: Path, monkeypatch):
    import tasks.plots as plots

    pin, good = fake_pin(tmp_path, b"var fake = 1;")
    cache = tmp_path / "cache"
    cache.mkdir()
    evil = make_tar(tmp_path / "evil.tgz", {pin.member: b"fetch('//elsewhere')"})
    shutil.copy(evil, cache / pin.tarball)  # a tampered cached copy: fetched again
    monkeypatch.setattr(plots, "npm_pack", lambda p, dest: Path(shutil.copy(good, dest / p.tarball)))
    assert plots.integrity_of(plots.verified_tarball(pin, cache)) == pin.integrity

    (cache / pin.tarball).unlink()  # a tampered download: refused, kept nowhere, never opened
    monkeypatch.setattr(plots, "npm_pack", lambda p, dest: Path(shutil.copy(evil, dest / p.tarball)))
    monkeypatch.setattr(plots, "PINS", (pin,))
    opened = []
    monkeypatch.setattr(plots, "read_script", lambda *args: opened.append(args))
    with pytest.raises(plots.PlotsError, match="integrity mismatch"):
        plots.pinned_scripts(cache)
    assert not opened and list(cache.iterdir()) == []


@pytest.mark.parametrize("script", [b"s = '</script><script>x()';", b"s = '{plot_divs}';"])
def test_a_script_that_cannot_sit_inline_is_refused(tmp_path: Path, script: bytes):
    from tasks.plots import PlotsError, read_script

    pin, tarball = fake_pin(tmp_path, script)
    with pytest.raises(PlotsError, match="cannot be inlined"):
        read_script(pin, tarball)
