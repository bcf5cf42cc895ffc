import pandas as pd
import pytest

from lmforge.config.split import SplitParams
from lmforge.data.splitting import SplitError, split_frame, split_report


def labelled(n_pos: int, n_neg: int) -> pd.DataFrame:
    texts = [f"review {i}" for i in range(n_pos + n_neg)]
    labels = ["positive"] * n_pos + ["negative"] * n_neg
    return pd.DataFrame({"id": [f"t{i}" for i in range(len(texts))], "text": texts, "label": labels})


def test_random_split_is_deterministic_disjoint_and_stratified():
    frame = labelled(300, 100)
    params = SplitParams(val=0.1, test=0.2)
    first, again = split_frame(frame, params, seed=7), split_frame(frame, params, seed=7)
    other = split_frame(frame, params, seed=8)
    for name in first:
        pd.testing.assert_frame_equal(first[name], again[name])
    assert not first["train"]["text"].equals(other["train"]["text"])
    sets = {name: set(part["text"]) for name, part in first.items()}
    assert not (sets["train"] & sets["val"] or sets["train"] & sets["test"] or sets["val"] & sets["test"])
    assert sum(len(s) for s in sets.values()) == 400
    assert (len(first["val"]), len(first["test"])) == (40, 80)
    for part in first.values():  # the 3:1 label ratio holds in every split
        counts = part["label"].value_counts()
        assert counts["positive"] == 3 * counts["negative"]
    assert first["train"]["label"].iloc[:20].nunique() == 2  # not sorted by label


def test_max_rows_caps_and_keeps_the_balance():
    splits = split_frame(labelled(500, 500), SplitParams(val=0.1, test=0.1, max_rows=100), seed=1)
    assert sum(len(p) for p in splits.values()) == 100
    assert (splits["train"]["label"] == "positive").sum() == 40


def test_contiguous_split_cuts_one_text_on_line_boundaries():
    text = "".join(f"line {i}\n" for i in range(1000))
    splits = split_frame(pd.DataFrame({"id": ["all"], "text": [text]}), SplitParams(mode="contiguous", val=0.1, test=0.0), seed=0)
    train, val = splits["train"]["text"][0], splits["val"]["text"][0]
    assert train + val == text
    assert train.endswith("\n") and val.startswith("line ")
    assert abs(len(val) / len(text) - 0.1) < 0.01
    assert splits["test"].empty
    assert split_report(splits)["test"] == {"rows": 0, "chars": 0}


def test_impossible_splits_are_refused():
    with pytest.raises(SplitError, match="contiguous mode is for unlabelled"):
        split_frame(labelled(5, 5), SplitParams(mode="contiguous"), seed=0)
    with pytest.raises(SplitError, match="no rows"):
        split_frame(labelled(0, 0), SplitParams(), seed=0)
