"""The `clean` section: per dataset, documents (a corpus), labelled rows (a task) or conversations (chat)
(lmforge/data/cleaning.py, lmforge/data/conversations.py)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from lmforge.config import Section


class NearDedupParams(Section):
    """MinHash near-duplicate removal (lmforge/data/near_dedup.py, datatrove's MinHash steps)."""

    n_grams: int = Field(5, ge=1)  # words per shingle
    buckets: int = Field(14, ge=1)  # LSH bands; with 8 hashes each, ~0.75 Jaccard is the usual cut
    hashes_per_bucket: int = Field(8, ge=1)
    seed: int = 1


class CleanDocuments(Section):
    kind: Literal["documents"] = "documents"
    min_chars: int = Field(1, ge=1)
    max_chars: int = Field(2_000_000, ge=1)
    max_line_chars: int = Field(20_000, ge=1)
    strip_boilerplate: bool = True
    text_field: str = Field("text", min_length=1)  # the JSON field / parquet column holding the text
    shard_mb: float = Field(16.0, gt=0.0)  # input files are grouped into shards of about this size (the unit of parallel work)
    near_dedup: NearDedupParams | None = None  # null: exact duplicates only
    # A plain-text file longer than this is cut into documents of about this many characters, at
    # blank lines (lmforge/data/cleaning.py: cutting_for); null, the schema's default so that a config
    # written before cutting existed reads as it did: a file is one document, whatever its length...
    chunk_chars: int | None = Field(None, ge=1)
    # ...and a corpus too small for that many is cut finer, into about this many documents.
    min_documents: int = Field(200, ge=1)

    @model_validator(mode="after")
    def _bounds(self) -> CleanDocuments:
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) exceeds max_chars ({self.max_chars})")
        if self.chunk_chars is None:
            return self
        if self.chunk_chars < 2 * self.min_chars:
            raise ValueError(f"chunk_chars ({self.chunk_chars}) must be at least twice min_chars ({self.min_chars}), "
                             "or the pieces of a cut file could be quarantined as too short")
        # A piece ends by twice the target plus its last line; a short last piece may join it.
        longest_piece = 3 * self.chunk_chars + self.max_line_chars
        if longest_piece > self.max_chars:
            raise ValueError(f"chunk_chars ({self.chunk_chars}) is too large for max_chars ({self.max_chars}): a piece "
                             f"of a cut file reaches 3 x chunk_chars + max_line_chars = {longest_piece} chars")
        return self


class CleanLabelled(Section):
    kind: Literal["labelled"] = "labelled"
    text_column: str = "text"
    label_column: str = "label"
    labels: dict[str, str] = Field(min_length=2)
    keep_sources: list[str] | None = None
    min_chars: int = Field(1, ge=1)
    max_chars: int = Field(100_000, ge=1)

    @field_validator("labels", mode="before")
    @classmethod
    def _string_keys(cls, labels: object) -> object:
        # YAML reads `0: negative` with an int key; raw labels are compared as strings.
        if isinstance(labels, dict):
            return {str(k): v for k, v in labels.items()}
        return labels

    @model_validator(mode="after")
    def _bounds(self) -> CleanLabelled:
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) exceeds max_chars ({self.max_chars})")
        if len(set(self.labels.values())) != len(self.labels):
            raise ValueError("label names must be distinct")
        return self


class CleanChat(Section):
    """Conversations for chat fine-tuning (lmforge/data/conversations.py)."""

    kind: Literal["chat"] = "chat"
    layout: Literal["messages", "chitchat"] = "messages"  # JSONL {"messages": [...]} or chitchat-dataset's dataset.json
    max_chars: int = Field(8000, ge=1)  # a longer conversation (its contents together) is quarantined


CleanParams = Annotated[CleanDocuments | CleanLabelled | CleanChat, Field(discriminator="kind")]
