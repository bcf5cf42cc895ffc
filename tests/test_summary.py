import json

from tasks.summary import build_summary
from tests.conftest import run


def test_summary_reports_data_counts_and_missing_stages(dvc_repo):
    run(["dvc", "repro", "tokenize", "split@task"], dvc_repo)
    text = build_summary(dvc_repo / "reports")
    clean = json.loads((dvc_repo / "reports/clean/task.json").read_text())
    assert f"| task | {clean['rows_in']:,} | {clean['rows_kept']:,} |" in text
    assert "Tokenizer: bpe" in text
    assert "_Pretraining has not run yet._" in text
    assert "| split@task |" in text and "total (sum of stages)" in text  # stage timings


def test_summary_shows_live_aliases_over_the_report(tmp_path):
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "register.json").write_text(json.dumps({
        "tracking_uri": "sqlite:///x.db",
        "models": {"sentiment": {"name": "lmforge-sentiment", "version": "2", "registered": True, "aliases": ["challenger"]}},
    }))
    text = build_summary(reports, aliases={"lmforge-sentiment": {"champion": "2", "challenger": "2"}})
    assert "| lmforge-sentiment | 2 | True | @challenger = v2, @champion = v2 |" in text
