"""The baseline every fine-tune is reported beside: TF-IDF (word uni+bigrams, sublinear tf) and
logistic regression, trained on the same train split and scored on the same val/test splits."""

from __future__ import annotations

import time
from typing import Sequence

from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from lmforge.training.classification_scores import classification_metrics


def tfidf_baseline(
    train_texts: Sequence[str],
    train_labels: Sequence[str],
    evaluate: dict[str, tuple[Sequence[str], Sequence[str]]],
    *,
    labels: Sequence[str] | None = None,
    c: float,
    min_df: int = 2,
    max_features: int | None = 200_000,
    seed: int,
) -> dict:
    """Fit on train, score each named (texts, labels) pair in `evaluate`.

    Returns {"model": description, "train_seconds": s, "<split>": classification_metrics}."""
    labels = sorted(set(train_labels)) if labels is None else list(labels)
    start = time.perf_counter()
    vectorizer = TfidfVectorizer(
        ngram_range=(1, 2),
        sublinear_tf=True,
        min_df=min_df if len(train_texts) >= 50 else 1,
        max_features=max_features,
        strip_accents="unicode",
    )
    features = vectorizer.fit_transform(list(train_texts))
    classifier = LogisticRegression(C=c, max_iter=2000, random_state=seed)
    classifier.fit(features, list(train_labels))
    seconds = time.perf_counter() - start
    out: dict = {
        "model": f"tfidf(1-2gram, sublinear) + logistic regression (C={c})",
        "vocabulary": int(len(vectorizer.vocabulary_)),
        "train_seconds": round(seconds, 3),
    }
    for split, (texts, y_true) in evaluate.items():
        y_pred = classifier.predict(vectorizer.transform(list(texts)))
        out[split] = classification_metrics(y_true, y_pred, labels)
    return out
