"""The `sources` section: where each dataset comes from and its pin (lmforge/data/sources.py)."""

from __future__ import annotations

import re

from pydantic import Field, field_validator, model_validator

from lmforge.config import Section

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")  # a git commit: a branch or tag name can move under a pin
_SCHEMES = ("file:", "https:", "hf:", "pypi:")


class Source(Section):
    uri: str
    sha256: str | None = None  # of the file, or of a glob's manifest; hf: sources pin `revision` instead
    revision: str | None = None  # hf: only: the dataset repository's commit
    # The most bytes one fetch may download, or unpack from an archive: a source that grows past
    # this (a zip bomb, a runaway server) stops before it fills the disk. Raise it for big corpora.
    max_bytes: int = Field(64 * 2**30, ge=1)

    @field_validator("uri")
    @classmethod
    def _known_scheme(cls, uri: str) -> str:
        scheme = uri.split(":", 1)[0] + ":" if ":" in uri else ""
        if scheme and scheme not in _SCHEMES and len(scheme) > 2:  # "C:" style paths are paths
            raise ValueError(f"unknown scheme {scheme!r}; use a path or one of {', '.join(_SCHEMES)}")
        if uri.startswith("pypi:") and ("==" not in uri or "#" not in uri):
            raise ValueError("a pypi: source reads pypi:NAME==VERSION#GLOB")
        return uri

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, digest: str | None) -> str | None:
        if digest is not None and not _SHA256.match(digest):
            raise ValueError("must be 64 lowercase hex characters")
        return digest

    @model_validator(mode="after")
    def _pinned(self) -> Source:
        if self.uri.startswith("hf:"):
            if not self.revision:
                raise ValueError("an hf: source is pinned by `revision` (a commit of the dataset's repository)")
            if not _COMMIT.match(self.revision):
                raise ValueError("revision must be a full commit hash (40 lowercase hex characters): "
                                 "a branch or tag name can move, so it pins nothing")
        elif self.sha256 is None:
            raise ValueError("sha256 is required: the file's, or for a glob its manifest's (see lmforge/data/sources.py)")
        elif self.revision is not None:
            raise ValueError("revision pins hf: sources only; this source is pinned by its sha256")
        return self
