"""One redaction for every URL-shaped value lmforge logs, tags, writes or shows.

    redact("postgresql://optuna:hunter2@db:5432/study")   -> "postgresql://optuna:***@db:5432/study"
    redact("https://token@host/x?api_key=abc&n=1")        -> "https://***@host/x?api_key=***&n=1"
    redact_all({"tune": {"storage": "...", "trials": 8}})  -> the same structure, every string redacted
    without_credentials("http://u:pw@host:5000/x")        -> "http://host:5000/x" (for a link that must work)

Credentials reach lmforge inside URLs: a tune.storage or tracking URI with user:password, a
token as the user part, a signed or keyed query string. Anything that leaves the process (MLflow
params and tags, lineage.json, reports, summary.md, Prefect logs and artifacts) passes through
here first. The password is masked and the rest kept, so a reader still sees which server and
which user; a userinfo of one part (often a token) is masked whole.
"""

from __future__ import annotations

import re
import urllib.parse
from typing import Any, Mapping

MASK = "***"

# scheme://userinfo@ : greedy up to the last "@" before the path, so a password holding an
# unescaped "@" is masked whole.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^\s/?#]+)@")
# A query parameter whose name says it authenticates: password=, token=, api_key=, sig=, and the
# signed-URL forms (X-Amz-Signature, X-Amz-Credential, X-Goog-Signature, X-Amz-Security-Token).
_QUERY_SECRET = re.compile(
    r"(?i)(?P<name>[?&;](?:[\w.-]*(?:password|passwd|secret|token|signature|credential|api[_-]?key|access[_-]?key)"
    r"[\w.-]*|pwd|sig|key|auth)=)[^&;#\s]+")


def _masked_userinfo(match: re.Match) -> str:
    user, has_password, _ = match["userinfo"].partition(":")
    return f"{match['scheme']}{user}:{MASK}@" if has_password else f"{match['scheme']}{MASK}@"


def redact(text: str) -> str:
    """`text` with the password (or one-part userinfo) of every URL in it, and secret-named query
    values, replaced by ***."""
    if "://" not in text and "=" not in text:
        return text
    return _QUERY_SECRET.sub(lambda m: m["name"] + MASK, _USERINFO.sub(_masked_userinfo, text))


def redact_all(value: Any) -> Any:
    """The same structure with every string in it (keys included) redacted."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {redact_all(key): redact_all(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_all(item) for item in value)
    return value


def without_credentials(url: str) -> str:
    """The URL without user and password: a link shown to people (the Prefect UI's) must work and
    carry no credential, which a masked `user:***@` would not."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{host}:{parts.port}" if parts.port else host))
