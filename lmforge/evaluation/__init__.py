"""Scoring: language-model metrics against a unigram baseline, classification metrics, and the
TF-IDF baseline a fine-tuned classifier must beat."""
