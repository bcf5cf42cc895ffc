"""reports/summary.md: one page with the figures a person wants after a run.

Built only from the files the stages wrote under reports/ (never from live state), so it can be
rebuilt at any time and diffed between runs. A stage that has not run yet is listed as missing.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from lmforge.flat import flatten
from lmforge.redaction import redact

MAX_ROWS = 40


def _load(path: Path) -> object | None:
    if not path.exists():
        return None
    text = path.read_text()
    return yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.4f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def _table(pairs: dict[str, object], header: tuple[str, str] = ("metric", "value")) -> list[str]:
    rows = [(k, v) for k, v in pairs.items() if not isinstance(v, (list, dict))]
    lines = [f"| {header[0]} | {header[1]} |", "|---|---:|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in rows[:MAX_ROWS]]
    if len(rows) > MAX_ROWS:
        lines.append(f"| ... {len(rows) - MAX_ROWS} more in the JSON | |")
    return lines


def _missing(what: str) -> list[str]:
    return [f"_{what} has not run yet._"]


def data_section(reports: Path) -> list[str]:
    lines = ["## Data", "", "| dataset | rows in | kept | quarantined | top quarantine reasons | train / val / test |",
             "|---|---:|---:|---:|---|---|"]
    for name in ("corpus", "task", "chat"):
        clean, split = _load(reports / "clean" / f"{name}.json"), _load(reports / "split" / f"{name}.json")
        if clean is None:
            continue
        reasons = ", ".join(f"{r} ({n})" for r, n in list(clean["quarantine_by_reason"].items())[:3]) or "none"
        sizes = " / ".join(_fmt(split[s]["rows"]) for s in ("train", "val", "test")) if split else "not split"
        lines.append(f"| {name} | {_fmt(clean['rows_in'])} | {_fmt(clean['rows_kept'])} | "
                     f"{_fmt(clean['rows_quarantined'])} | {reasons} | {sizes} |")
    lines += cutting_lines(reports)
    tokens = _load(reports / "tokenize.json")
    if tokens:
        lines += ["", f"Tokenizer: {tokens['kind']}, vocabulary {tokens['vocab_size']:,}; train "
                  f"{tokens['train_tokens']:,} tokens, val {tokens['val_tokens']:,}, test {tokens['test_tokens']:,} "
                  f"({tokens['bytes_per_token']} bytes per token)."]
    return lines + [""]


def cutting_lines(reports: Path) -> list[str]:
    """How clean cut long text files into documents, when it cut any."""
    cut = (_load(reports / "clean" / "corpus.json") or {}).get("cutting") or {}
    if not cut.get("files_cut"):
        return []
    return ["", f"Corpus: {cut['files_cut']:,} long file(s) cut into {cut['documents_from_cut_files']:,} documents "
            f"of about {cut['target_chars']:,} characters ({cut['cuts_at_blank_lines']:,} cuts at blank lines, "
            f"{cut['cuts_at_line_breaks']:,} at line breaks where no blank line came)."]


def metrics_section(title: str, path: Path, images: list[str], reports: Path) -> list[str]:
    lines = [f"## {title}", ""]
    metrics = _load(path)
    lines += _table(flatten(metrics) if isinstance(metrics, dict) else {"": metrics}) if metrics is not None else _missing(title)
    for image in images:
        if (reports / image).exists():
            lines += ["", f"![{image}]({image})"]
    return lines + [""]


def samples_section(samples: Path, title: str = "Samples") -> list[str]:
    if not samples.exists():
        return []
    body = samples.read_text().strip().splitlines()
    if body and body[0].startswith("# "):
        body = body[1:]  # the file's own title; this page titles the section
    while body and not body[0].strip():
        body = body[1:]
    # Demote the file's own headings below this page's.
    return [f"## {title}", ""] + [("#" + line if line.startswith("#") else line) for line in body] + [""]


def _figure(version: object, value: object) -> str:
    return f"v{version}: {_fmt(value)}" if version is not None and value is not None else "-"


def verdict(standing: dict) -> str:
    """One sentence: the challenger's figure against its baseline (when it has one) and whether it
    was, or would be, promoted. `standing` is tasks/summarize.py:standings's entry for one model."""
    s = standing
    line = f"The challenger (v{s['challenger']}, {s['metric']} {_fmt(s['challenger_value'])})"
    if s.get("baseline_value") is not None:
        beats = "beats" if s["beats_baseline"] else "does not beat"
        line += f" {beats} its {s['baseline_name']} ({_fmt(s['baseline_value'])})"
    if s["is_champion"]:
        return line + (": it is @champion, promoted by force." if s.get("forced") else ": it was promoted and is @champion.")
    if s["passed"]:
        return line + ": it would be promoted (`lmforge promote` passes the gate)."
    if s.get("baseline_value") is not None and not s["beats_baseline"]:
        return line + ": it will not be promoted."
    joint = " but" if s.get("baseline_value") is not None else ""
    return line + (f"{joint} does not beat the champion (v{s['champion']}, {_fmt(s['champion_value'])}) by the gate: "
                   "it will not be promoted.")


def standings_lines(standings: dict[str, dict] | None) -> list[str]:
    """The gate figures of each model's challenger, champion and baseline, and the verdict in words."""
    if not standings:
        return []
    lines = ["", "| model | gate metric | challenger | champion | baseline |", "|---|---|---:|---:|---:|"]
    for name, s in standings.items():
        baseline = f"{s['baseline_name']}: {_fmt(s['baseline_value'])}" if s.get("baseline_value") is not None else "none"
        lines.append(f"| {name} | {s['metric']} | {_figure(s['challenger'], s['challenger_value'])} | "
                     f"{_figure(s['champion'], s['champion_value'])} | {baseline} |")
    return lines + [""] + [f"{name}: {verdict(s)}" for name, s in standings.items()]


def registry_section(reports: Path, aliases: dict[str, dict[str, str]] | None,
                     standings: dict[str, dict] | None = None) -> list[str]:
    """`aliases` (model name -> alias -> version) and `standings` (model name -> gate figures, see
    verdict) are read from the registry at summary time, since promotion moves aliases after the
    register stage wrote its report."""
    registered = _load(reports / "register.json")
    if registered is None:
        return ["## Registry", ""] + _missing("register") + [""]
    lines = ["## Registry", "", "| model | version this run | new this run | aliases now |", "|---|---:|---|---|"]
    for key, entry in registered.get("models", {}).items():
        if "skipped" in entry:
            lines.append(f"| {key} | - | skipped: {entry['skipped']} | |")
            continue
        name = entry.get("name", key)
        now = (aliases or {}).get(name) or {a: entry.get("version") for a in entry.get("aliases", [])}
        lines.append(f"| {name} | {entry.get('version')} | {entry.get('registered')} | "
                     f"{', '.join(f'@{a} = v{v}' for a, v in sorted(now.items())) or 'none'} |")
    lines += standings_lines(standings)
    return lines + ["", f"Tracking URI: `{redact(str(registered.get('tracking_uri', '?')))}`", ""]


def timing_section(reports: Path) -> list[str]:
    """Wall time of each stage's last run, as the stages recorded it (tasks/_common.py:timed)."""
    timings = [_load(p) for p in sorted((reports / "timings").glob("*.json"))]
    if not timings:
        return []
    ordered = sorted(timings, key=lambda t: t.get("finished", ""))
    seconds = {t["stage"]: f"{t['seconds']:.1f}" for t in ordered}
    seconds["total (sum of stages)"] = f"{sum(t['seconds'] for t in ordered):.1f}"
    return ["## Time per stage (last run of each)", ""] + _table(seconds, ("stage", "seconds")) + [""]


def build_summary(reports: Path | str = "reports", aliases: dict[str, dict[str, str]] | None = None,
                  standings: dict[str, dict] | None = None) -> str:
    reports = Path(reports)
    lines = ["# lmforge run summary", ""]
    lines += data_section(reports)
    lines += metrics_section("Pretraining", reports / "pretrain" / "metrics.json", ["pretrain/loss.png"], reports)
    lines += metrics_section("Evaluation (against the unigram baseline)", reports / "evaluate" / "metrics.json", [], reports)
    lines += metrics_section("Benchmarks (lm-evaluation-harness)", reports / "evaluate" / "benchmarks.json", [], reports)
    lines += samples_section(reports / "evaluate" / "samples.md")
    lines += metrics_section("Tuning (best trial)", reports / "tune" / "best.yaml",
                             ["tune/optimization_history.png", "tune/param_importances.png"], reports)
    lines += metrics_section("Fine-tuning (against TF-IDF + logistic regression)", reports / "finetune" / "metrics.json",
                             ["finetune/confusion_matrix.png"], reports)
    lines += metrics_section("Chat fine-tuning (against the base model)", reports / "sft" / "metrics.json", [], reports)
    lines += samples_section(reports / "sft" / "samples.md", "Chat replies")
    lines += registry_section(reports, aliases, standings)
    lines += timing_section(reports)
    return "\n".join(lines).rstrip() + "\n"
