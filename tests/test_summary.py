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


def standing(**changes) -> dict:
    below = {"metric": "test.accuracy", "challenger": "2", "challenger_value": 0.79, "champion": None,
             "champion_value": None, "baseline_name": "TF-IDF baseline", "baseline_value": 0.8167,
             "beats_baseline": False, "passed": False, "is_champion": False, "forced": False}
    return {**below, **changes}


def test_the_verdict_says_in_words_whether_the_challenger_beats_its_baseline_and_is_promoted():
    from tasks.summary import verdict

    assert verdict(standing()) == ("The challenger (v2, test.accuracy 0.7900) does not beat its TF-IDF baseline "
                                   "(0.8167): it will not be promoted.")
    above = dict(challenger_value=0.85, beats_baseline=True)
    assert verdict(standing(**above, passed=True)) == ("The challenger (v2, test.accuracy 0.8500) beats its TF-IDF "
                                                        "baseline (0.8167): it would be promoted (`lmforge promote` "
                                                        "passes the gate).")
    assert verdict(standing(**above, passed=True, is_champion=True, champion="2", champion_value=0.85)).endswith(
        "beats its TF-IDF baseline (0.8167): it was promoted and is @champion.")
    assert verdict(standing(**above, champion="1", champion_value=0.9)).endswith(
        "beats its TF-IDF baseline (0.8167) but does not beat the champion (v1, 0.9000) by the gate: "
        "it will not be promoted.")
    assert verdict(standing(is_champion=True, forced=True, champion="2")).endswith(": it is @champion, promoted by force.")
    no_baseline = standing(metric="test.perplexity", challenger_value=25.0, baseline_name=None, baseline_value=None,
                           beats_baseline=None, champion="1", champion_value=24.0)
    assert verdict(no_baseline) == ("The challenger (v2, test.perplexity 25.0000) does not beat the champion "
                                    "(v1, 24.0000) by the gate: it will not be promoted.")


def test_the_summary_shows_a_refused_challenger_beside_its_baseline(tmp_path, monkeypatch, capsys):
    """A real registry: the classifier scores below its TF-IDF baseline, promote refuses it, and
    the summary (read back from the registry) shows both figures and says so."""
    import mlflow

    from tasks import summarize
    from tests.test_register import cli, make_project, register

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("LMFORGE_EXPERIMENT", raising=False)
    monkeypatch.delenv("LMFORGE_TRACKING", raising=False)
    mlflow.MlflowClient(tracking_uri=uri).create_experiment("lmforge", artifact_location=str(tmp_path / "artifacts"))
    root = make_project(tmp_path / "proj", "summary", metrics={"test": {"accuracy": 0.79},
                                                                "baseline_tfidf": {"test": {"accuracy": 0.8167}}})
    register(root, monkeypatch, "sentiment")
    assert cli(root, monkeypatch, capsys, "promote", "summary-sentiment")[0] == 1

    report = root / "reports/register.json"
    text = build_summary(root / "reports", summarize.current_aliases(report),
                         summarize.standings(report, root / "params.yaml"))
    assert "| summary-sentiment | test.accuracy | v1: 0.7900 | - | TF-IDF baseline: 0.8167 |" in text
    assert ("summary-sentiment: The challenger (v1, test.accuracy 0.7900) does not beat its TF-IDF baseline "
            "(0.8167): it will not be promoted.") in text


def test_the_data_section_says_how_long_files_were_cut(tmp_path):
    report = {"rows_in": 3, "rows_kept": 250, "rows_quarantined": 0, "quarantine_by_reason": {},
              "cutting": {"target_chars": 20000, "files_cut": 2, "documents_from_cut_files": 251,
                          "cuts_at_blank_lines": 240, "cuts_at_line_breaks": 9}}
    (tmp_path / "clean").mkdir()
    (tmp_path / "clean/corpus.json").write_text(json.dumps(report))
    text = build_summary(tmp_path, aliases={}, standings={})
    assert ("Corpus: 2 long file(s) cut into 251 documents of about 20,000 characters "
            "(240 cuts at blank lines, 9 at line breaks where no blank line came).") in text
    report["cutting"]["files_cut"] = 0
    (tmp_path / "clean/corpus.json").write_text(json.dumps(report))
    assert "long file(s) cut" not in build_summary(tmp_path, aliases={}, standings={})
