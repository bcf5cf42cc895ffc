"""Corpus preparation: sources, documents, cleaning, deduplication, splitting and tokenization,
run shard by shard on datatrove's executors (engine.py)."""
